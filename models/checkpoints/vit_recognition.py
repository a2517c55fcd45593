"""Vision transformers as checkpoint candidates: timm ViT, DeiT (distilled too), register-token
ViTs and Swin; torchvision ViT and Swin.

A state dict of one of these opens like the other foreign networks (`models.checkpoints.architectures`):
recognised by keys and shapes, its class count read off the head (both heads of a distilled
DeiT), timm's preprocessing from the model's pretrained config (mean, std, input size, crop
percentage), torchvision's ImageNet defaults with the resize and crop of its weights.

ViT-Ti/S/B/L differ in width and depth but not in key names, and there are many candidates,
so each carries cheap facts besides its family's key hint: the shape of its patch embedding
(width, patch size) and of its last block's first norm (depth). A file is compared in full
only with the candidates that have both, so a ViT file builds one to three of them the first
time (224 and 384 px variants differ only in the position embedding).

Networks built with options besides their name (a timm ViT trained by `python -m models.train
--arch timm:NAME --arch-kwargs JSON`) are described by the file's metadata (`described`); the
weights must then have exactly the keys and shapes the description builds.

Architecturally identical networks cannot be told apart by their weights: timm's
`deit_{tiny,small,base}_patch16_{224,384}` are `vit_*` networks with other preprocessing, and
open as the `vit_*` name (the network and its logits are the same; the ViT's normalisation is
offered) unless the file's metadata names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from models.checkpoints.architectures import (
    Architecture,
    _registry,
    _timm_build,
    _timm_preprocess,
    _torchvision_build,
    _torchvision_preprocess,
)
from models.preprocess import Preprocess

__all__ = ["OPTION_LIMITS", "described", "timm_options"]

# timm ViTs with a class token or global pooling, neither distillation nor register tokens:
# name, width, depth, patch size
_TIMM_VIT = (
    ("vit_tiny_patch16_224", 192, 12, 16),
    ("vit_tiny_patch16_384", 192, 12, 16),
    ("vit_small_patch16_224", 384, 12, 16),
    ("vit_small_patch16_384", 384, 12, 16),
    ("vit_small_patch32_224", 384, 12, 32),
    ("vit_small_patch32_384", 384, 12, 32),
    ("vit_small_patch8_224", 384, 12, 8),
    ("vit_base_patch16_224", 768, 12, 16),
    ("vit_base_patch16_384", 768, 12, 16),
    ("vit_base_patch32_224", 768, 12, 32),
    ("vit_base_patch32_384", 768, 12, 32),
    ("vit_base_patch8_224", 768, 12, 8),
    ("vit_large_patch16_224", 1024, 24, 16),
    ("vit_large_patch16_384", 1024, 24, 16),
    ("vit_large_patch32_384", 1024, 24, 32),
    ("vit_huge_patch14_224", 1280, 32, 14),
    ("deit3_small_patch16_224", 384, 12, 16),
    ("deit3_small_patch16_384", 384, 12, 16),
    ("deit3_medium_patch16_224", 512, 12, 16),
    ("deit3_base_patch16_224", 768, 12, 16),
    ("deit3_base_patch16_384", 768, 12, 16),
    ("deit3_large_patch16_224", 1024, 24, 16),
    ("deit3_large_patch16_384", 1024, 24, 16),
    ("deit3_huge_patch14_224", 1280, 32, 14),
    ("vit_small_patch14_dinov2", 384, 12, 14),
    ("vit_base_patch14_dinov2", 768, 12, 14),
    ("vit_large_patch14_dinov2", 1024, 24, 14),
    ("vit_base_patch16_clip_224", 768, 12, 16),
    ("vit_base_patch32_clip_224", 768, 12, 32),
    ("vit_large_patch14_clip_224", 1024, 24, 14),
    ("vit_base_patch16_224_miil", 768, 12, 16),
    ("vit_base_patch16_gap_224", 768, 12, 16),
    ("vit_medium_patch16_gap_256", 512, 12, 16),
)
_TIMM_DISTILLED = (
    ("deit_tiny_distilled_patch16_224", 192, 12, 16),
    ("deit_small_distilled_patch16_224", 384, 12, 16),
    ("deit_base_distilled_patch16_224", 768, 12, 16),
    ("deit_base_distilled_patch16_384", 768, 12, 16),
)
_TIMM_EVA02 = (  # EVA-02 (rotary embeddings): classifier fine-tunes of the MIM backbones
    ("eva02_tiny_patch14_224", 192, 12, 14),
    ("eva02_tiny_patch14_336", 192, 12, 14),
    ("eva02_small_patch14_224", 384, 12, 14),
    ("eva02_small_patch14_336", 384, 12, 14),
    ("eva02_base_patch14_224", 768, 12, 14),
    ("eva02_base_patch14_448", 768, 12, 14),
    ("eva02_large_patch14_224", 1024, 24, 14),
    ("eva02_large_patch14_448", 1024, 24, 14),
)
_TIMM_REGISTERS = (
    ("vit_small_patch14_reg4_dinov2", 384, 12, 14),
    ("vit_base_patch14_reg4_dinov2", 768, 12, 14),
    ("vit_large_patch14_reg4_dinov2", 1024, 24, 14),
    ("vit_base_patch16_reg4_gap_256", 768, 12, 16),
    ("vit_betwixt_patch16_reg4_gap_256", 640, 12, 16),
    ("vit_medium_patch16_reg4_gap_256", 512, 12, 16),
    ("vit_medium_patch16_reg1_gap_256", 512, 12, 16),
    ("vit_little_patch16_reg4_gap_256", 320, 14, 16),
    ("vit_little_patch16_reg1_gap_256", 320, 14, 16),
    ("vit_wee_patch16_reg1_gap_256", 256, 14, 16),
)
# Swin: name, width, blocks in the third stage (the only one that varies), patch size 4
_TIMM_SWIN = (
    ("swin_tiny_patch4_window7_224", 96, 6),
    ("swin_small_patch4_window7_224", 96, 18),
    ("swin_base_patch4_window7_224", 128, 18),
    ("swin_base_patch4_window12_384", 128, 18),
    ("swin_large_patch4_window7_224", 192, 18),
    ("swin_large_patch4_window12_384", 192, 18),
    ("swin_s3_tiny_224", 96, 6),
    ("swin_s3_small_224", 96, 18),
    ("swin_s3_base_224", 96, 30),
)
_TORCHVISION_VIT = (
    ("vit_b_16", 768, 12, 16),
    ("vit_b_32", 768, 12, 32),
    ("vit_l_16", 1024, 24, 16),
    ("vit_l_32", 1024, 24, 32),
)
_TORCHVISION_SWIN = (
    ("swin_t", 96, 6),
    ("swin_s", 96, 18),
    ("swin_b", 128, 18),
    ("swin_v2_t", 96, 6),
    ("swin_v2_s", 96, 18),
    ("swin_v2_b", 128, 18),
)


def _keys_hint(required: tuple[str, ...], refused: tuple[str, ...] = ()) -> Callable:
    """A hint on key names only: set lookups, no scan over the file's keys."""
    return lambda keys: all(k in keys for k in required) and not any(k in keys for k in refused)


_TIMM_BLOCK = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight")


def _eva02_hint(keys: set[str]) -> bool:
    """EVA-02: a position table and the q and v biases of its attention (fused or separate)."""
    first = ("blocks.0.attn.q_bias", "blocks.0.attn.q_proj.weight")
    return (
        "patch_embed.proj.weight" in keys and "pos_embed" in keys and any(k in keys for k in first)
    )


def _register_timm_vits() -> None:
    families = (
        (_TIMM_VIT, _keys_hint(_TIMM_BLOCK, ("dist_token", "reg_token")), ("head",)),
        (_TIMM_DISTILLED, _keys_hint((*_TIMM_BLOCK, "dist_token")), ("head", "head_dist")),
        (_TIMM_REGISTERS, _keys_hint((*_TIMM_BLOCK, "reg_token")), ("head",)),
        (_TIMM_EVA02, _eva02_hint, ("head",)),
    )
    for rows, hint, classifier in families:
        for name, width, depth, patch in rows:
            _registry[name] = Architecture(
                name,
                "timm",
                _timm_build(name),
                hint,
                _timm_preprocess(name),
                shapes=(
                    ("patch_embed.proj.weight", (width, 3, patch, patch)),
                    (f"blocks.{depth - 1}.norm1.weight", (width,)),
                ),
                classifier=classifier,
            )
    swin = _keys_hint(
        ("patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table")
    )
    for name, width, blocks in _TIMM_SWIN:
        _registry[name] = Architecture(
            name,
            "timm",
            _timm_build(name),
            swin,
            _timm_preprocess(name),
            shapes=(
                ("patch_embed.proj.weight", (width, 3, 4, 4)),
                (f"layers.2.blocks.{blocks - 1}.norm1.weight", (4 * width,)),
            ),
            classifier=("head.fc",),
        )


def _register_torchvision() -> None:
    vit = _keys_hint(("class_token", "conv_proj.weight", "encoder.pos_embedding"))
    for name, width, depth, patch in _TORCHVISION_VIT:
        _registry[name] = Architecture(
            name,
            "torchvision",
            _torchvision_build(name),
            vit,
            _torchvision_preprocess(name),
            shapes=(
                ("conv_proj.weight", (width, 3, patch, patch)),
                (f"encoder.layers.encoder_layer_{depth - 1}.ln_1.weight", (width,)),
            ),
            classifier=("heads.head",),
        )
    v1 = _keys_hint(("features.0.0.weight", "features.1.0.attn.relative_position_bias_table"))
    v2 = _keys_hint(("features.0.0.weight", "features.1.0.attn.cpb_mlp.0.weight"))
    for name, width, blocks in _TORCHVISION_SWIN:
        _registry[name] = Architecture(
            name,
            "torchvision",
            _torchvision_build(name),
            v2 if "_v2_" in name else v1,
            _torchvision_preprocess(name),
            shapes=(
                ("features.0.0.weight", (width, 3, 4, 4)),
                (f"features.5.{blocks - 1}.norm1.weight", (4 * width,)),
            ),
            classifier=("head",),
        )


# --- networks described by a file's metadata --------------------------------------------------

# the build options a file may ask for, with their allowed values (anything else is refused)
OPTION_LIMITS: dict[str, tuple[type, float, float] | tuple[str, ...]] = {
    "img_size": (int, 8, 1024),
    "patch_size": (int, 1, 64),
    "embed_dim": (int, 1, 4096),
    "depth": (int, 1, 64),
    "num_heads": (int, 1, 64),
    "mlp_ratio": (float, 0.25, 16.0),
    "qkv_bias": (bool, 0, 1),
    "class_token": (bool, 0, 1),
    "reg_tokens": (int, 0, 16),
    "no_embed_class": (bool, 0, 1),
    "window_size": (int, 1, 64),
    "global_pool": ("token", "avg", "avgmax", "max", ""),
}


def timm_options(options: object) -> dict:
    """Build options for a timm model, checked against `OPTION_LIMITS`.

    Raises:
        ValueError: an option not allowed, or a value of the wrong type or out of range.
    """
    if not isinstance(options, dict):
        raise ValueError("options must be a JSON object")
    checked = {}
    for key, value in options.items():
        limit = OPTION_LIMITS.get(key)
        if limit is None:
            raise ValueError(f"option {str(key)[:40]!r} is not one of {', '.join(OPTION_LIMITS)}")
        if isinstance(limit[0], str):
            if value not in limit:
                raise ValueError(f"{key} must be one of {limit}")
        else:
            kind, low, high = limit
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool)
            )  # fmt: skip
            if kind is int and ok and value != int(value):
                ok = False
            if not ok or not (math.isfinite(value) and low <= value <= high):
                if kind is bool:
                    raise ValueError(f"{key} must be true or false")
                kind_text = "an integer" if kind is int else "a number"
                raise ValueError(f"{key} must be {kind_text} in [{low}, {high}]")
            value = kind(value)
        checked[key] = value
    return checked


def described(arch_meta: dict) -> Architecture | None:
    """The candidate a file's metadata names (`{"source": "timm", "name": ..., "options": ...}`).

    Returns:
        The registered candidate of that name when there are no options, a one-off timm
        candidate built with them otherwise, or None when the metadata names no timm network.

    Raises:
        ValueError: options that are not allowed (see `timm_options`).
    """
    name, source = arch_meta.get("name"), arch_meta.get("source")
    if source == "attention-lens" and arch_meta.get("options"):
        return _described_hybrid(name, arch_meta["options"])
    if not isinstance(name, str) or source not in ("timm", "torchvision"):
        return None
    options = timm_options(arch_meta.get("options") or {})
    registered = _registry.get(name)
    if not options and registered is not None and registered.source == source:
        return registered
    if source != "timm" or len(name) > 100:
        return None
    import timm

    if not timm.is_model(name):
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = cfg.classifier if isinstance(cfg.classifier, (tuple, list)) else (cfg.classifier,)
    return Architecture(
        name,
        "timm",
        _timm_build(name, **options),
        lambda keys: True,
        _sized_preprocess(name, options.get("img_size")),
        classifier=tuple(classifier),
        options=options,
    )


def _described_hybrid(name: object, options: object) -> Architecture:
    """Our hybrid CNN + ViT at the depth its file names (its only option)."""
    from models.networks.hybrid import HYBRID_NAME, hybrid_architecture

    if name != HYBRID_NAME:
        raise ValueError(f"attention-lens networks with options are {HYBRID_NAME} only")
    checked = timm_options(options)
    if set(checked) != {"depth"}:
        raise ValueError(f"{HYBRID_NAME} takes one option, depth")
    return hybrid_architecture(checked["depth"])


def _sized_preprocess(name: str, img_size: int | None) -> Callable[[], Preprocess]:
    """timm's preprocessing of `name`, at `img_size` when the network was built for another."""
    default = _timm_preprocess(name)
    if img_size is None:
        return default

    def make() -> Preprocess:
        base = default()
        ratio = base.crop / base.resize
        return Preprocess(int(round(img_size / ratio)), img_size, base.mean, base.std)

    return make


_register_timm_vits()
_register_torchvision()
