"""A hybrid CNN + vision transformer: ResNet-18 + CBAM up to layer3, then self-attention.

As the hybrid of Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words", section 3.1, "R50 +
ViT-B/16"): the CNN's stride-16 feature map (a 14 x 14 grid at 224 px) is projected to tokens by
a 1 x 1 convolution, a class token and position embeddings are added, and timm transformer
blocks follow. One network holds both CBAM gates (in the trunk) and self-attention (in the
blocks), so a trace reads both, in forward order.

It is a timm `VisionTransformer` whose patch embedding is timm's `HybridEmbed` around our trunk,
so timm's attention, the self-attention probes and the token layout need nothing new. Its
state-dict keys are `patch_embed.backbone.<official ResNet keys up to layer3>` then timm's ViT
keys; `load_checkpoint` recognises it by those keys (registered below).

Cost: the trunk is ResNet-18's first three stages (about 1.4 GFLOPs at 224 px); each block
about 0.1 GFLOPs at width 192 over 197 tokens.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from models.checkpoints.architectures import Architecture, _registry
from models.networks.resnet import build_model
from models.preprocess import Preprocess

__all__ = ["HYBRID_NAME", "HybridShape", "ResNetTrunk", "build_hybrid", "hybrid_architecture"]

HYBRID_NAME = "resnet18_cbam_vit_hybrid"
TRUNK_STRIDE = 16


class ResNetTrunk(nn.Module):
    """A ResNet's stem and stages 1-3 (stride 16), with the official key names; (N, 256, h, w)."""

    def __init__(self, depth: int = 18, attention: str | None = "cbam") -> None:
        super().__init__()
        full = build_model(depth, attention, num_classes=1)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            self.add_module(name, getattr(full, name))
        self.num_features = 256 * full.arch.expansion

    def forward(self, x: Tensor) -> Tensor:
        """Input (N, 3, H, W) -> layer3 features (N, 256, H / 16, W / 16)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class HybridShape:
    """The transformer part's size (the shipped checkpoint's; tests use smaller ones)."""

    embed_dim = 192
    depth = 6
    num_heads = 3
    img_size = 224


def build_hybrid(
    num_classes: int,
    *,
    embed_dim: int = HybridShape.embed_dim,
    depth: int = HybridShape.depth,
    num_heads: int = HybridShape.num_heads,
    img_size: int = HybridShape.img_size,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A new hybrid (random weights): ResNet-18 + CBAM trunk, `depth` ViT blocks, a linear head.

    Args:
        num_classes: classes of the head.
        embed_dim, depth, num_heads: the transformer's width, blocks and heads.
        img_size: the input size it is built for (a square; the token grid is img_size / 16).
        drop_path_rate: stochastic depth while training (no weights; nothing at inference).
    """
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    side = img_size // TRUNK_STRIDE
    embed = partial(HybridEmbed, backbone=ResNetTrunk(), feature_size=side, feature_ratio=16)
    return VisionTransformer(
        img_size=img_size,
        patch_size=1,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        embed_layer=embed,
        drop_path_rate=drop_path_rate,
    )


MAX_DEPTH = 24  # blocks a file may ask for (`train_hybrid --depth`)


def hybrid_architecture(depth: int = HybridShape.depth) -> Architecture:
    """The hybrid's recognition candidate with `depth` blocks.

    The registered candidate has the shipped depth; a file trained with another
    (`python -m models.train_hybrid --depth d`) names it in its metadata's arch options, and
    `load_checkpoint` builds this one for it.

    Raises:
        ValueError: a depth outside 1..MAX_DEPTH.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"the hybrid's depth must be an integer in [1, {MAX_DEPTH}]")
    required = (
        "patch_embed.backbone.layer3.0.conv1.weight",
        "pos_embed",
        "blocks.0.attn.qkv.weight",
    )
    width = HybridShape.embed_dim
    return Architecture(
        HYBRID_NAME,
        "attention-lens",
        partial(build_hybrid, depth=depth),
        lambda keys: all(k in keys for k in required),
        lambda: Preprocess(resize=256, crop=HybridShape.img_size),
        shapes=(
            ("patch_embed.proj.weight", (width, 256, 1, 1)),
            (f"blocks.{depth - 1}.norm1.weight", (width,)),
        ),
        classifier=("head",),
        options=hybrid_options(depth),
    )


def hybrid_options(depth: int) -> dict:
    """The arch options a hybrid with `depth` blocks is saved with (none at the shipped depth)."""
    return {} if depth == HybridShape.depth else {"depth": depth}


def _register() -> None:
    _registry[HYBRID_NAME] = hybrid_architecture()


_register()
