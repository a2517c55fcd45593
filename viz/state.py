"""One place that borrows a model and gives it back as it was.

The app caches one model per checkpoint and shares it between browser sessions (threads), so
every analysis holds the model's lock while it attaches hooks or changes flags, and restores
`training` flags and `requires_grad` on the way out, also after an exception.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["model_lock", "preserve_model_state"]

_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock held while hooks are attached to `model` (re-entrant, one per model)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@contextmanager
def preserve_model_state(
    model: nn.Module,
    *,
    eval_mode: bool = True,
    freeze: bool = False,
    modules: list[nn.Module] | None = None,
) -> Iterator[nn.Module]:
    """Hold `model`'s lock; optionally switch to eval mode and freeze parameters; restore all.

    Args:
        model: the network.
        eval_mode: call `model.eval()` inside the block.
        freeze: set `requires_grad=False` on every parameter inside the block (a CAM needs
            gradients of activations, not of weights: the backward stops earlier).
        modules: `list(model.modules())` when the caller has it already (saves a walk).

    Only flags that change are written back (`nn.Module.__setattr__` is slow enough to show in
    the cost of a small forward).
    """
    with model_lock(model):
        flags = [(m, m.training) for m in (model.modules() if modules is None else modules)]
        grads = [(p, p.requires_grad) for p in model.parameters()] if freeze else []
        try:
            if eval_mode and any(flag for _, flag in flags):
                model.eval()
            for p, _ in grads:
                p.requires_grad_(False)
            yield model
        finally:
            for p, flag in grads:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
            for module, flag in flags:
                if module.training != flag:
                    module.training = flag
