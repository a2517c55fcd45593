"""Attention modules that no probe reads: found by their class name, named in a warning.

A network may hold attention that Attention Lens has no probe for (timm's `EvaAttention`,
`SelectiveKernelAttn`, a user's `MyAttention`): the trace then has no map of it and rollout, GAE
and LeGrad have nothing to build on. Such a module is one whose class name says attention
("Attention", "Attn") and that is neither registered (`models.probes`), inside a registered
module (timm's `CbamModule.channel` is a `ChannelAttn`), nor holding one (Hugging Face's
`ViTAttention` around its registered `ViTSelfAttention`). Its insides (q/k norms, qkv, the
attention matrix) are never CAM layers (`viz.engine.levels`), and `analyze` warns once per call
with `UnreadAttentionWarning`, one line naming the classes; `unread_attention` gives the names
to the command line and the app.

Cost: one walk over the model's modules, cached per model (module count and registry
generation).
"""

from __future__ import annotations

import re
import threading
import warnings
import weakref

from torch import nn

from models.probes import find_probe, registry_generation
from viz.engine.model_state import submodules

__all__ = [
    "UnreadAttentionWarning",
    "attention_like",
    "unread_attention",
    "unread_attention_line",
    "warn_unread_attention",
]

_NAMED = re.compile(r"attention|attn", re.IGNORECASE)


class UnreadAttentionWarning(UserWarning):
    """The network has attention modules that no registered probe reads."""


def attention_like(module: nn.Module) -> bool:
    """Whether `module`'s class name says it is attention ("Attention", "Attn")."""
    return bool(_NAMED.search(type(module).__name__))


def attention_names(modules: list[tuple[str, nn.Module]]) -> list[str]:
    """Dotted names of the modules (not the network itself) that are attention: registered or
    named so. Their insides are attention internals, never a feature map of the network."""
    return [n for n, m in modules if n and (find_probe(m) is not None or attention_like(m))]


_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)
_cache_guard = threading.Lock()


def unread_attention(model: nn.Module) -> list[str]:
    """Class names of `model`'s attention modules that no probe reads, sorted, each once
    (e.g. `["EvaAttention"]`); `[]` when every attention module is read."""
    key = (len(submodules(model)), registry_generation())
    with _cache_guard:
        hit = _cache.get(model)
    if hit is not None and hit[0] == key:
        return list(hit[1])
    modules = list(model.named_modules())
    read = [n for n, m in modules if find_probe(m) is not None]

    def near_read(name: str) -> bool:  # inside a read module, or holding one
        return any(r == name or r.startswith(name + ".") or name.startswith(r + ".") for r in read)

    found: list[str] = []
    outer: list[str] = []  # unread modules kept: their insides are part of them
    for name, module in modules:
        if not name or not attention_like(module) or near_read(name):
            continue
        if any(name.startswith(o + ".") for o in outer):
            continue
        outer.append(name)
        found.append(type(module).__name__)
    names = tuple(sorted(set(found)))
    with _cache_guard:
        _cache[model] = (key, names)
    return list(names)


def unread_attention_line(model: nn.Module) -> str | None:
    """The one-line warning about `model`'s unread attention modules, None if there are none."""
    names = unread_attention(model)
    if not names:
        return None
    return (
        f"attention modules no probe reads: {', '.join(names)}; their maps are not traced and "
        "the CAMs are taken at the network's feature maps (register_attention can read them)"
    )


def warn_unread_attention(model: nn.Module, stacklevel: int = 2) -> list[str]:
    """Warn (`UnreadAttentionWarning`) when `model` has attention no probe reads; returns the
    class names (empty: no warning)."""
    line = unread_attention_line(model)
    if line is not None:
        warnings.warn(line, UnreadAttentionWarning, stacklevel=stacklevel + 1)
    return unread_attention(model)
