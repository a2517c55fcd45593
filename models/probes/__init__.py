"""Attention probes: which submodule outputs are an attention module's maps, and how to read them."""

from models.probes.registry import (
    AttentionProbe,
    KindStyle,
    find_probe,
    kind_style,
    register_attention,
    registered_attention,
    registry_generation,
    unregister_attention,
)

__all__ = [
    "AttentionProbe",
    "KindStyle",
    "find_probe",
    "kind_style",
    "register_attention",
    "registered_attention",
    "registry_generation",
    "unregister_attention",
]
