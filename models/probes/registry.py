"""Attention probes: which submodule outputs of an attention module are its maps.

A probe is registered per module type and matched by `isinstance` (the most specific registered
class in the module's MRO wins), so a network built with any library is read the same way:

    from viz import register_attention
    register_attention(MyChannelAttention, kind="cbam-channel", channel="sigmoid")
    register_attention(MySpatialAttention, kind="cbam-spatial", spatial="sigmoid")
    register_attention(MyCBAM, kind="cbam", channel="ca.act", spatial="sa.act")

`channel` / `spatial` / `gate` are dotted submodule names relative to the registered module
(`""` is the module's own output) whose forward output *is* the map: N x C elements for a
channel gate, N x H x W for a spatial gate, (N, C, H, W) for a full 3-D gate.

Built in: Attention Lens's own SE, BAM and CBAM (`models.networks.attention`), timm's `SEModule`,
`EffectiveSEModule`, `SqueezeExcite` (EfficientNet blocks), `EcaModule`, `CecaModule`,
`CbamModule`, `LightCbamModule`, `GlobalContext`, and torchvision's `SqueezeExcitation`; and
self-attention (`kind="self-attention"`, read by `models.probes.selfattention`): timm's `Attention`
(ViT, DeiT, register-token ViTs) and Swin `WindowAttention`, torchvision's ViT
(`nn.MultiheadAttention` called as self-attention) and Swin `ShiftedWindowAttention`, and
Hugging Face transformers' ViT, DeiT, BEiT, DINOv2 (with registers too), CLIP, SigLIP, Swin
and Swin v2 attention.
How each kind is named in figures lives here too (`kind_style`), so nothing else asks "is this
BAM?".
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.networks.attention import BAM, CBAM, SqueezeExcite
from models.probes.selfattention import (
    CaitClassAttentionReader,
    CaitTalkingHeadsReader,
    HuggingFaceAttentionReader,
    HuggingFaceSwinV2Reader,
    HuggingFaceWindowReader,
    MultiheadReader,
    ProbabilitiesReader,
    TimmAttentionReader,
    TimmUnfusedReader,
    TimmWindowReader,
    TimmWindowV2Reader,
    TorchvisionWindowReader,
)

__all__ = [
    "AttentionProbe",
    "KindStyle",
    "find_probe",
    "kind_style",
    "register_attention",
    "registered_attention",
    "unregister_attention",
]


@dataclass(frozen=True)
class AttentionProbe:
    """Where one attention-module type keeps its maps.

    Attributes:
        module_type: the registered class (subclasses match too).
        kind: short name of the attention type, e.g. "cbam", "se", "eca".
        channel: dotted submodule whose output is the channel gate (N x C elements), or None.
        spatial: dotted submodule whose output is the spatial gate (N x H x W elements), or None.
        gate: dotted submodule whose output is the full (N, C, H, W) gate, or None (then the
            gate is the product of the channel and spatial gates).
        activations: map name ("channel", "spatial") -> function turning the tapped output
            into the gate, for modules that apply their sigmoid functionally (timm's
            `LightChannelAttn`: tap `fc2`, apply `torch.sigmoid`).
        logits: the channel/spatial maps are logits (figures show their sigmoid): BAM's
            branches M_c(F), M_s(F), as the paper defines them.
        multiplies: the module's output is its input times the channel and spatial gates, so
            feature means can be computed from the gates in one pass (built-ins only).
        optional: a submodule that does not exist means "no map here" rather than a mistake
            (built-ins whose gate depends on a constructor flag).
        reader: for kind "self-attention": how the tracer reads the module's attention
            probabilities (`models.probes.selfattention`).
    """

    module_type: type
    kind: str
    channel: str | None = None
    spatial: str | None = None
    gate: str | None = None
    activations: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    logits: bool = False
    multiplies: bool = False
    optional: bool = False
    reader: object | None = None

    def taps(self) -> dict[str, str]:
        """Map name -> submodule name, for the maps this probe reads."""
        named = {"channel": self.channel, "spatial": self.spatial, "gate": self.gate}
        return {part: path for part, path in named.items() if path is not None}


@dataclass(frozen=True)
class KindStyle:
    """How figures name an attention kind.

    Attributes:
        label: short display name, e.g. "CBAM".
        channel: what the channel weights are called in a colour-bar label.
        spatial: what the spatial map is called.
        own_level: the module refines a whole stage (BAM): labelled "BAM 2 (after stage 2)"
            rather than by its block.
        symbol: the spatial map's symbol in a column header, e.g. "$M_s$" (may be "").
    """

    label: str
    channel: str
    spatial: str
    own_level: bool = False
    symbol: str = ""


_lock = threading.Lock()
_probes: dict[type, AttentionProbe] = {}
_styles: dict[str, KindStyle] = {
    "se": KindStyle("SE", "SE excitation", "SE (no spatial map)"),
    "cbam": KindStyle("CBAM", r"CBAM $M_c$", r"CBAM spatial attention $M_s$", symbol="$M_s$"),
    "bam": KindStyle(
        "BAM", r"BAM $\sigma(M_c)$", r"BAM $\sigma(M_s)$ (spatial branch)", True, r"$\sigma(M_s)$"
    ),
    "eca": KindStyle("ECA", "ECA channel weights", "ECA (no spatial map)"),
    "gc": KindStyle("GC", "global-context channel weights", "GC (no spatial map)"),
    "self-attention": KindStyle(
        "self-attention", "self-attention", "class-token attention to the patches"
    ),
}
_generation = 0  # bumped on every change, so cached per-model plans know they are stale


def register_attention(
    module_type: type,
    *,
    kind: str,
    channel: str | None = None,
    spatial: str | None = None,
    gate: str | None = None,
    activations: dict[str, Callable[[Tensor], Tensor]] | None = None,
    logits: bool = False,
    label: str | None = None,
    attention: str | None = None,
    _multiplies: bool = False,
    _optional: bool = False,
    _reader: object | None = None,
) -> AttentionProbe:
    """Teach Attention Lens where `module_type` keeps its attention maps.

    Args:
        module_type: the attention module's class; instances of subclasses match too.
        kind: its attention type ("cbam", "se", "eca", "my-gate", ...), shown in figures.
        channel: dotted submodule (relative to the module; "" = the module itself) whose output
            is the channel gate, N x C elements.
        spatial: likewise for the spatial gate, N x H x W elements.
        gate: likewise for a full (N, C, H, W) gate, when it is not channel x spatial.
        activations: "channel"/"spatial" -> function applied to the tapped output.
        logits: the maps are logits (figures show their sigmoid).
        label: how figures name the kind (default: `kind` in upper case).
        attention: with `kind="self-attention"`: dotted submodule whose output is the
            post-softmax attention probabilities (N, heads, T, T), e.g. "attn_drop" or the
            module's softmax (its unfused path must run). The patch grid and the prefix
            tokens (class, distillation, registers) come from the enclosing timm or
            torchvision transformer; elsewhere T must be a square, or a square plus one
            class token.

    Returns:
        The registered probe (registering a type again replaces its probe).

    Raises:
        TypeError: `module_type` is not an `nn.Module` subclass.
        ValueError: no map given, an empty kind, or an unknown activation name.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_attention needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError("register_attention needs a non-empty kind, e.g. kind='cbam'")
    if kind == "self-attention":
        if _reader is None:
            if not isinstance(attention, str):
                raise ValueError(
                    "register_attention(kind='self-attention') needs attention=<submodule "
                    "whose output is the attention probabilities>, e.g. attention='attn_drop'"
                )
            _reader = ProbabilitiesReader(attention)
    elif attention is not None:
        raise ValueError("attention=... is for kind='self-attention'")
    elif channel is None and spatial is None:
        raise ValueError("register_attention needs channel=..., spatial=... or both")
    for path in (channel, spatial, gate):
        if path is not None and not isinstance(path, str):
            raise TypeError(f"submodule names are dotted strings, got {path!r}")
    activations = dict(activations or {})
    unknown = set(activations) - {"channel", "spatial"}
    if unknown:
        raise ValueError(f"activations may name 'channel' and 'spatial', got {sorted(unknown)}")
    probe = AttentionProbe(
        module_type, kind, channel, spatial, gate, activations, logits, _multiplies, _optional,
        _reader,
    )  # fmt: skip
    global _generation
    with _lock:
        _probes[module_type] = probe
        if label is not None or kind not in _styles:
            name = label or kind.upper()
            _styles[kind] = KindStyle(name, f"{name} channel weights", f"{name} spatial map")
        _generation += 1
    return probe


def unregister_attention(module_type: type) -> None:
    """Forget the probe of `module_type` (no error when there is none)."""
    global _generation
    with _lock:
        if _probes.pop(module_type, None) is not None:
            _generation += 1


def registered_attention() -> dict[type, AttentionProbe]:
    """A copy of the registry: module type -> probe."""
    _register_imported_packages()
    with _lock:
        return dict(_probes)


def find_probe(module: nn.Module) -> AttentionProbe | None:
    """The probe of the most specific registered class `module` is an instance of, or None."""
    if _third_party:
        _register_imported_packages()
    probes = _probes
    for cls in type(module).__mro__:
        probe = probes.get(cls)
        if probe is not None:
            return probe
    return None


def kind_style(kind: str) -> KindStyle:
    """How figures name `kind`; an unregistered kind gets a generic style."""
    style = _styles.get(kind)
    if style is None:
        name = kind.upper()
        return KindStyle(name, f"{name} channel weights", f"{name} spatial map")
    return style


def registry_generation() -> int:
    """A number that changes whenever the registry does (for caches)."""
    return _generation


# --- built-in probes ------------------------------------------------------------------------

register_attention(SqueezeExcite, kind="se", channel="gate", _multiplies=True)
register_attention(
    CBAM, kind="cbam", channel="ChannelGate.gate", spatial="SpatialGate.gate", _multiplies=True
)
register_attention(
    BAM,
    kind="bam",
    channel="channel_att.gate_c",
    spatial="spatial_att.gate_s",
    gate="gate",
    logits=True,
)


def _builtin(module_type: type, **options) -> None:
    """Register a third-party type unless the user has registered it already."""
    if module_type not in _probes:
        register_attention(module_type, **options)


def _register_torchvision() -> None:
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    from torchvision.ops.misc import SqueezeExcitation

    _builtin(SqueezeExcitation, kind="se", channel="scale_activation", _multiplies=True)
    _builtin(ShiftedWindowAttention, kind="self-attention", _reader=TorchvisionWindowReader())
    # torchvision's ViT blocks call it as self-attention; cross-attention calls give no record
    _builtin(nn.MultiheadAttention, kind="self-attention", _reader=MultiheadReader())


def _register_timm() -> None:
    try:
        from timm.layers.cbam import CbamModule, LightCbamModule
        from timm.layers.eca import CecaModule, EcaModule
        from timm.layers.global_context import GlobalContext
        from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
        from timm.models._efficientnet_blocks import SqueezeExcite as TimmSqueezeExcite
    except ImportError:  # timm is optional for the library; the app and tests pin it
        return
    for cls in (SEModule, EffectiveSEModule, TimmSqueezeExcite):
        _builtin(cls, kind="se", channel="gate", _multiplies=True)
    for cls in (EcaModule, CecaModule):
        _builtin(cls, kind="eca", channel="gate", _multiplies=True)
    _builtin(
        CbamModule, kind="cbam", channel="channel.gate", spatial="spatial.gate", _multiplies=True
    )
    # its channel half applies F.sigmoid itself: read the logits of fc2 and apply it here
    _builtin(
        LightCbamModule,
        kind="cbam",
        channel="channel.fc2",
        spatial="spatial.gate",
        activations={"channel": torch.sigmoid},
        _multiplies=True,
    )
    # the gate exists only with fuse_scale=True; without it the probe finds no map (skipped)
    _builtin(GlobalContext, kind="gc", channel="gate", _optional=True)
    try:
        from timm.layers.attention import Attention
        from timm.models.swin_transformer import WindowAttention
    except ImportError:
        return
    _builtin(Attention, kind="self-attention", _reader=TimmAttentionReader())
    _builtin(WindowAttention, kind="self-attention", _reader=TimmWindowReader())
    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention
    from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2

    for cls in (EvaAttention, BeitAttention):
        _builtin(cls, kind="self-attention", _reader=TimmUnfusedReader())
    _builtin(WindowAttentionV2, kind="self-attention", _reader=TimmWindowV2Reader())
    from timm.models.cait import ClassAttn, TalkingHeadAttn

    _builtin(TalkingHeadAttn, kind="self-attention", _reader=CaitTalkingHeadsReader())
    _builtin(ClassAttn, kind="self-attention", _reader=CaitClassAttentionReader())


def _register_transformers() -> None:
    # once one transformers model module is imported (2 s), these add about 0.1 s
    from transformers.models.beit.modeling_beit import BeitAttention
    from transformers.models.clip.modeling_clip import CLIPAttention
    from transformers.models.deit.modeling_deit import DeiTAttention
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention
    from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
        Dinov2WithRegistersAttention,
    )
    from transformers.models.siglip.modeling_siglip import SiglipAttention
    from transformers.models.swin.modeling_swin import SwinAttention
    from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention
    from transformers.models.vit.modeling_vit import ViTAttention

    for cls in (ViTAttention, DeiTAttention, BeitAttention, Dinov2Attention,
                Dinov2WithRegistersAttention, CLIPAttention, SiglipAttention):  # fmt: skip
        _builtin(cls, kind="self-attention", _reader=HuggingFaceAttentionReader())
    _builtin(SwinAttention, kind="self-attention", _reader=HuggingFaceWindowReader())
    _builtin(Swinv2SelfAttention, kind="self-attention", _reader=HuggingFaceSwinV2Reader())


# torchvision's, timm's and transformers' types are registered once their package (for
# transformers: its model code) has been imported (no module of theirs exists before):
# importing them here would add seconds to every start-up
_third_party = {
    "torchvision": _register_torchvision,
    "timm": _register_timm,
    "transformers.modeling_utils": _register_transformers,
}


def _register_imported_packages() -> None:
    for package in [p for p in _third_party if p in sys.modules]:
        register = _third_party.pop(package, None)  # None: another thread got there first
        if register is not None:
            register()
