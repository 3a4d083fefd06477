"""Tiny vanilla models (Llama, Mistral causal LMs; RoBERTa for sequence classification and masked LM) on
disk, and HyC / PEFT twins of them with the same adapter weights."""

import importlib.util
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, RobertaConfig,
                          RobertaForMaskedLM, RobertaForSequenceClassification)

import hyclora_models as H
from hyclora_models.memory import saved_bytes_for_backward

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# odd sizes: hidden not a multiple of 32, GQA (6 heads, 2 kv heads), rank 5, alpha 7
TINY = dict(vocab_size=101, hidden_size=60, intermediate_size=97, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


ROBERTA_TARGETS = ["query", "key", "value", "dense"]
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# arch: (vanilla config, vanilla model, HyC model, arch-specific config entries)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, H.HyCLlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, H.HyCMistralForCausalLM, dict(sliding_window=4)),  # < length
    "roberta-cls": (RobertaConfig, RobertaForSequenceClassification, H.HyCRobertaForSequenceClassification,
                    dict(num_labels=3, **_NO_DROPOUT)),
    "roberta-mlm": (RobertaConfig, RobertaForMaskedLM, H.HyCRobertaForMaskedLM, _NO_DROPOUT),
}
# PEFT's settings for each arch's task head
PEFT_TASK = {"roberta-cls": dict(task_type="SEQ_CLS"), "roberta-mlm": dict(modules_to_save=["lm_head"])}


def save_tiny(path, arch="llama", **overrides):
    config_cls, model_cls, _, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **extra, **overrides}))
    model.save_pretrained(path)
    return path


save_tiny_llama = save_tiny


def save_tiny_tokenizer(path, text, vocab_size=TINY["vocab_size"]):
    """A BPE tokenizer trained on ``text`` (at most ``vocab_size`` tokens; <pad> = 0, as TINY's pad_token_id),
    saved to ``path`` beside a tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    special = dict(pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special.values())))
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(path)
    return path


def batch(seed=0, n=3, length=11, vocab=101, arch="llama"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    if arch == "roberta-cls":
        labels = torch.arange(n) % 3
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def peft_name(name):
    """PEFT's name of a HyC adapter parameter: LoRA ``X.lora_A.weight`` -> ``X.lora_A.default.weight``,
    a task head's ``classifier.dense.weight`` -> ``classifier.modules_to_save.default.dense.weight``."""
    if ".lora_" in name:
        return "base_model.model." + name.replace(".weight", ".default.weight")
    head, _, rest = name.partition(".")
    return f"base_model.model.{head}.modules_to_save.default.{rest}"


def hyc_and_peft(path, bits, r=5, alpha=7, targets=TARGETS, attn="sdpa", device="cpu", arch="llama", **cfg):
    """HyC and PEFT models on the same base weights, with the same random (non-zero) adapters (and task
    heads, which both train whole)."""
    from peft import LoraConfig, get_peft_model

    _, vanilla_cls, hyc_cls, _ = ARCHS[arch]
    if targets is TARGETS and arch.startswith("roberta"):
        targets = ROBERTA_TARGETS
    hyc = hyc_cls.from_pretrained(path, attn_implementation=attn, hyclora_config=H.HyCLoRAConfig(
        r=r, lora_alpha=alpha, target_modules=targets, bits=bits, **cfg)).to(device)
    peft = get_peft_model(vanilla_cls.from_pretrained(path, attn_implementation=attn),
                          LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                     **PEFT_TASK.get(arch, {}))).to(device)
    g = torch.Generator().manual_seed(1)
    peft_params = dict(peft.named_parameters())
    trained = {peft_name(n) for n, p in hyc.named_parameters() if p.requires_grad}
    for name, p in peft_params.items():
        p.requires_grad_(name in trained)  # PEFT's copy of a masked-LM head unties (and trains) the decoder
    for name, p in hyc.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                peft_params[peft_name(name)].copy_(p)
    return hyc.train(), peft.train()


def lora_grads(model):
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.replace("base_model.model.", "").replace(".modules_to_save.default", "")
            out[name.replace(".default", "")] = p.grad.detach().clone()
    return out


def loss_and_grads(model, b):
    model.zero_grad()
    device = next(model.parameters()).device
    loss = model(**{k: v.to(device) for k, v in b.items()}).loss
    loss.backward()
    return loss.detach(), lora_grads(model)


def cosines(a, b):
    """Cosine of each gradient in ``a`` to the same-named one in ``b``."""
    return torch.stack([torch.nn.functional.cosine_similarity(a[k].flatten(), b[k].flatten(), 0) for k in b])


def assert_matches_peft(hyc, peft, b):
    """Same loss and every LoRA gradient within 1e-4 relative (fp32), on batch ``b``; returns the loss."""
    lh, gh = loss_and_grads(hyc, b)
    lp, gp = loss_and_grads(peft, b)
    assert gh.keys() == gp.keys()
    torch.testing.assert_close(lh, lp, rtol=1e-6, atol=0)
    for k in gp:
        assert ((gh[k] - gp[k]).norm() / gp[k].norm()) < 1e-4, k
    return lh


def eval_logits(model, b):
    with torch.no_grad():
        return model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def assert_eval_and_generate_match_peft(hyc, peft, b, new_tokens):
    """In eval the logits on ``b`` equal PEFT's, and greedy generate() (KV cache) gives the same tokens."""
    torch.testing.assert_close(eval_logits(hyc, b), eval_logits(peft, b))
    ids = b["input_ids"][:1]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    out_h, out_p = hyc.generate(input_ids=ids, **kw), peft.generate(input_ids=ids, **kw)
    assert torch.equal(out_h, out_p) and out_h.shape[1] == ids.shape[1] + new_tokens


def model_layers(model):
    """The transformer layers (decoder or encoder; fused or, in a PEFT model, transformers' own)."""
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "RobertaLayer"))]


def layer_saved_bytes(model, b):
    """Bytes the transformer layers save for backward in one step on batch ``b``."""
    return saved_bytes_for_backward(lambda: loss_and_grads(model, b), model_layers(model))


def assert_gradient_matches_finite_difference(model, b):
    """With dropout on in ``model``: the same seed gives the same loss; the gradient along a random direction
    equals the finite difference of the loss, each forward replaying the same masks (same seed), so the masks
    backward regenerates are the forward's; another seed gives another loss."""
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        torch.manual_seed(5)
        return model(**b).loss

    model.zero_grad()
    first = loss()
    first.backward()
    assert torch.equal(first.detach(), loss().detach())
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g) for p in params]
    analytic = sum((p.grad * v).sum() for p, v in zip(params, direction))
    eps, fd = 1e-3, []
    for sign in (1, -1):  # the training path (grad on), as the gradient was taken
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(sign * eps * v)
        fd.append(loss().detach().double())
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(sign * eps * v)
    numeric = (fd[0] - fd[1]) / (2 * eps)
    assert abs(numeric - analytic) <= 3e-3 * abs(analytic), (numeric, analytic)
    torch.manual_seed(6)
    assert not torch.equal(model(**b).loss, loss())  # the masks do depend on the seed


ROOT = Path(__file__).resolve().parents[1]


def load_script(path, name=None):
    """A script of the repository (benchmarks/, examples/) imported as a module, by its path."""
    path = ROOT / path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
