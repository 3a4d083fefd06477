"""Counting what autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``)."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn


def _storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.device


def saved_bytes_for_backward(fn, modules: list[nn.Module]) -> int:
    """Run ``fn()`` (e.g. a forward and backward) and return the bytes of the activations autograd saved
    for backward while one of ``modules`` ran its forward (the decoder layers, or ``[model]`` for all),
    each storage counted once (a view of a kept tensor adds nothing). Weights are not activations: the
    modules' own parameters and buffers are not counted."""
    seen = {}
    skip = {_storage_key(t) for m in modules for t in (*m.parameters(), *m.buffers())}

    def pack(t):
        key = _storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    stack, handles = ExitStack(), []
    hooks = torch.autograd.graph.saved_tensors_hooks
    for m in modules:
        handles.append(m.register_forward_pre_hook(lambda mod, args: stack.enter_context(hooks(pack, lambda t: t))))
        handles.append(m.register_forward_hook(lambda mod, args, out: stack.close()))
    try:
        fn()
    finally:
        stack.close()
        for h in handles:
            h.remove()
    return sum(seen.values())


__all__ = ["saved_bytes_for_backward"]
