"""Where a vision transformer's tokens sit on the image: prefix tokens and the patch grid.

A plain ViT keeps (N, T, C) tokens: `prefix` tokens first (class, distillation, register
tokens), then the patches row by row on a grid the patch embedding sets. Swin keeps (N, H, W, C)
maps, one resolution per stage. Both are read from the model (timm's `num_prefix_tokens`,
`patch_embed`; torchvision's `patch_size`, `image_size`; transformers' config, in `tokens_hf`),
never guessed from token counts, so `dynamic_img_size` ViTs get the grid of each input.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["TokenLayout", "token_layout", "as_feature_map"]


@dataclass(frozen=True)
class TokenLayout:
    """How one transformer lays out its tokens.

    Attributes:
        family: "vit" (global attention over (N, T, C) tokens) or "swin" ((N, H, W, C) stages).
        path: dotted name of the transformer inside the model ("" for the model itself).
        prefix: tokens before the patches (ViT): 1 class token, +1 distillation, + registers.
        class_token: the first token is a class token (else the ViT pools its patches).
        patch: the patch size (ViT), the stride of Swin's first stage.
        depth: transformer blocks (ViT) or stages (Swin).
        grid_of: input (H, W) -> patch grid (h, w) (ViT).
        score: tokens (N, T, C) -> class logits through the network's final norm and head, for
            LeGrad's per-block scores (None where the head is not known).
        stage_layers: Swin: the module names of its stages, first to last.
        last_norm: ViT: the last block's first norm (the usual Grad-CAM layer).
        trunk: a hybrid ViT's CNN inside its patch embedding (timm `HybridEmbed.backbone`),
            dotted name; "" for a ViT that cuts the image into patches itself.
    """

    family: str
    path: str
    prefix: int
    class_token: bool
    patch: int
    depth: int
    grid_of: Callable[[tuple[int, int]], tuple[int, int]]
    score: Callable[[Tensor], Tensor] | None = None
    stage_layers: tuple[str, ...] = ()
    last_norm: str = ""
    trunk: str = ""

    def grid(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        return self.grid_of(input_hw)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _timm_vit(path: str, m: nn.Module) -> TokenLayout:
    embed = m.patch_embed
    ph, pw = embed.patch_size
    # a hybrid's tokens are cells of its CNN's feature map: the patch is the CNN's stride
    hybrid = isinstance(getattr(embed, "backbone", None), nn.Module)
    if hybrid:
        ph *= int(embed.feature_ratio[0])

    def grid_of(hw: tuple[int, int]) -> tuple[int, int]:
        if getattr(m, "dynamic_img_size", False):
            return tuple(embed.dynamic_feat_size(hw))
        return tuple(embed.grid_size)

    def score(tokens: Tensor) -> Tensor:  # LeGrad: the final norm and head on the token mean
        pooled = tokens.mean(1)
        for norm in (getattr(m, "norm", None), getattr(m, "fc_norm", None)):  # EVA, BEiT: one
            pooled = pooled if norm is None else norm(pooled)
        logits = m.head(pooled)
        head_dist = getattr(m, "head_dist", None)
        return logits if head_dist is None else (logits + head_dist(pooled)) / 2

    depth = len(m.blocks)
    last_norm = f"blocks.{depth - 1}.norm1"
    if len(getattr(m, "blocks_token_only", ())):  # CaiT: the class token joins there
        last_norm = f"blocks_token_only.{len(m.blocks_token_only) - 1}.norm1"
    return TokenLayout(
        "vit", path, int(m.num_prefix_tokens), bool(getattr(m, "has_class_token", True)), ph,
        depth, grid_of, score, last_norm=_join(path, last_norm),
        trunk=_join(path, "patch_embed.backbone") if hybrid else "",
    )  # fmt: skip


def _torchvision_vit(path: str, m: nn.Module) -> TokenLayout:
    side = m.image_size // m.patch_size

    def score(tokens: Tensor) -> Tensor:  # as TorchCAM's LeGrad: the head on the token mean
        return m.heads(m.encoder.ln(tokens.mean(1)))

    depth = len(m.encoder.layers)
    last = list(dict(m.encoder.layers.named_children()))[-1]
    return TokenLayout(
        "vit", path, 1, True, m.patch_size, depth, lambda _hw: (side, side), score,
        last_norm=_join(path, f"encoder.layers.{last}.ln_1"),
    )  # fmt: skip


def _timm_swin(path: str, m: nn.Module) -> TokenLayout:
    stages = tuple(_join(path, f"layers.{i}") for i in range(len(m.layers)))
    patch = m.patch_embed.patch_size[0]
    return TokenLayout("swin", path, 0, False, patch, len(stages), lambda hw: hw, None, stages)


def _torchvision_swin(path: str, m: nn.Module) -> TokenLayout:
    # features: [patch embedding, stage, merging, stage, merging, ...]
    stages = tuple(_join(path, f"features.{i}") for i in range(1, len(m.features), 2))
    patch = m.features[0][0].stride[0]
    return TokenLayout("swin", path, 0, False, patch, len(stages), lambda hw: hw, None, stages)


def _recognisers() -> list[tuple[type, Callable[[str, nn.Module], TokenLayout]]]:
    found = []
    if "timm" in sys.modules:
        from timm.models.beit import Beit
        from timm.models.cait import Cait
        from timm.models.eva import Eva
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.swin_transformer_v2 import SwinTransformerV2
        from timm.models.vision_transformer import VisionTransformer

        found += [(VisionTransformer, _timm_vit), (Eva, _timm_vit), (Beit, _timm_vit),
                  (Cait, _timm_vit),
                  (SwinTransformer, _timm_swin), (SwinTransformerV2, _timm_swin)]  # fmt: skip
    if "torchvision" in sys.modules:
        from torchvision.models.swin_transformer import SwinTransformer as TvSwin
        from torchvision.models.vision_transformer import VisionTransformer as TvViT

        found += [(TvViT, _torchvision_vit), (TvSwin, _torchvision_swin)]
    if "transformers.modeling_utils" in sys.modules:  # a transformers model exists
        from viz.engine.tokens_hf import layout_fields

        found += [(cls, lambda p, m, f=f: TokenLayout(**f(p, m))) for cls, f in layout_fields()]
    return found


_cache: weakref.WeakKeyDictionary[nn.Module, tuple[int, TokenLayout | None]] = (
    weakref.WeakKeyDictionary()
)


def token_layout(model: nn.Module) -> TokenLayout | None:
    """The layout of the (first) vision transformer in `model`, or None for a CNN (cached)."""
    count = sum(1 for _ in model.modules())
    hit = _cache.get(model)
    if hit is not None and hit[0] == count:
        return hit[1]
    layout = None
    kinds = _recognisers()
    if kinds:
        for name, module in model.named_modules():
            make = next((f for cls, f in kinds if isinstance(module, cls)), None)
            if make is not None:
                layout = make(name, module)
                break
    _cache[model] = (count, layout)
    return layout


def guessed_grid(patches: int) -> tuple[int, int] | None:
    side = math.isqrt(patches)
    return (side, side) if side * side == patches else None


def as_feature_map(
    t: Tensor, layout: TokenLayout | None, input_hw: tuple[int, int], name: str = "layer"
) -> Tensor:
    """A layer's output as (N, C, h, w): ViT tokens without the prefix on the patch grid,
    Swin's (N, H, W, C) permuted; 4-D channels-first maps unchanged.

    Raises:
        ValueError: the output cannot be placed on a grid (one line, with the shape).
    """
    if t.ndim == 4:
        if layout is not None and layout.family == "swin" and not _channels_first(t, input_hw):
            return t.permute(0, 3, 1, 2)
        return t
    if t.ndim == 3:
        prefix = layout.prefix if layout is not None else 0
        if layout is not None and layout.family == "vit":
            h, w = layout.grid(input_hw)
            if t.shape[1] == h * w:  # a block that sees the patches only (CaiT's first ones)
                prefix = 0
        else:
            guess = guessed_grid(t.shape[1]) or guessed_grid(t.shape[1] - 1)
            if guess is None:
                raise ValueError(f"{name!r} outputs {t.shape[1]} tokens: no square patch grid")
            h, w = guess
            prefix = t.shape[1] - h * w
        if t.shape[1] != prefix + h * w:
            raise ValueError(
                f"{name!r} outputs {t.shape[1]} tokens, not {prefix} prefix + {h}x{w} patches"
            )
        return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
    raise ValueError(f"{name!r} outputs {tuple(t.shape)}: neither tokens nor a feature map")


def _channels_first(t: Tensor, input_hw: tuple[int, int]) -> bool:
    """(N, C, h, w) rather than (N, H, W, C): h and w divide the input by one common stride."""
    h, w = t.shape[-2], t.shape[-1]
    if h <= 0 or w <= 0 or input_hw[0] % h or input_hw[1] % w:
        return False
    return input_hw[0] // h == input_hw[1] // w


def stage_of_block(block: int, depth: int) -> int:
    """ViT blocks grouped into four depth quarters: stages 1..4."""
    return 1 + (4 * block) // max(depth, 1)


__all__ += ["guessed_grid", "stage_of_block"]
