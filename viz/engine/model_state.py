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

__all__ = ["model_lock", "preserve_model_state", "submodules"]

_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock held while hooks are attached to `model` (re-entrant, one per model)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


def submodules(model: nn.Module) -> list[nn.Module]:
    """`model` and every module inside it, once each, parents first.

    What `list(model.modules())` gives (breadth first rather than depth first), without the
    names and nested generators that make that 4x slower: every trace walks the model once to
    check its caches and flags. A module registered under two parents, or under its own
    descendant, is listed once.
    """
    found = [model]
    seen = {id(model)}
    for module in found:  # grows while it is read: breadth first
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


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
        eval_mode: call `model.eval()` inside the block and give every module its `training`
            flag back on exit (False: flags are neither changed nor read).
        freeze: set `requires_grad=False` on every parameter inside the block (a CAM needs
            gradients of activations, not of weights: the backward stops earlier).
        modules: `submodules(model)` when the caller has it already (saves a walk).

    Only flags that change are written back (`nn.Module.__setattr__` is slow enough to show in
    the cost of a small forward).
    """
    with model_lock(model):
        if modules is None:
            modules = submodules(model)
        # reading every module's flag is a pass over the whole model: only when they change
        flags = [(m, m.training) for m in modules] if eval_mode else []
        grads = []
        if freeze:  # read straight from the modules: `model.parameters()` is 10x slower
            grads = [
                (p, p.requires_grad)
                for m in modules
                for p in m._parameters.values()
                if p is not None
            ]
        try:
            if any(flag for _, flag in flags):
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
