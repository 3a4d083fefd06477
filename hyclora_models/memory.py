"""Counting what autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``)."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn


def saved_bytes_for_backward(fn, modules: list[nn.Module] | None = None, exclude=()) -> int:
    """Run ``fn()`` (e.g. a forward and backward) and return the bytes of the activations autograd saved
    for backward, each storage counted once (a view of a kept tensor adds nothing). Weights are not
    activations: storages of ``exclude`` (e.g. ``model.parameters()``) are not counted. With ``modules``,
    only what is saved while one of them runs its forward (e.g. the decoder layers), their own
    parameters and buffers excluded."""
    seen = {}
    skip = {(t.untyped_storage().data_ptr(), t.device) for t in exclude}
    for m in modules or ():
        skip |= {(t.untyped_storage().data_ptr(), t.device) for t in (*m.parameters(), *m.buffers())}

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in skip:
            seen[key] = storage.nbytes()
        return t

    def hooks():
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    if modules is None:
        with hooks():
            fn()
        return sum(seen.values())
    stack, handles = ExitStack(), []
    for m in modules:
        handles.append(m.register_forward_pre_hook(lambda mod, args: stack.enter_context(hooks())))
        handles.append(m.register_forward_hook(lambda mod, args, out: stack.close()))
    try:
        fn()
    finally:
        stack.close()
        for h in handles:
            h.remove()
    return sum(seen.values())


__all__ = ["saved_bytes_for_backward"]
