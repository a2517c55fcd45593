"""Attention modules: SE, BAM and CBAM with the official state-dict key names.

- SE: Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 (https://arxiv.org/abs/1709.01507).
  Keys follow timm's SE-ResNets (`se.fc1`, `se.fc2`, 1x1 convs with bias).
- BAM: Park et al., "BAM: Bottleneck Attention Module", BMVC 2018 (https://arxiv.org/abs/1807.06514).
- CBAM: Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018
  (https://arxiv.org/abs/1807.06521).

BAM and CBAM keys are those of the official release (github.com/Jongchan/attention-module).

Every map a reader may want is the output of its own submodule, so a forward hook reads it from
the forward the user runs, without computing anything twice:

- `SqueezeExcite.gate`            -> channel weights (N, C, 1, 1), after sigmoid
- `CBAM.ChannelGate.gate`         -> channel weights (N, C), after sigmoid
- `CBAM.SpatialGate.gate`         -> spatial map (N, 1, H, W), after sigmoid, on the refined feature
- `BAM.channel_att.gate_c`        -> M_c(F) (N, C), before sigmoid
- `BAM.spatial_att.gate_s`        -> M_s(F) (N, 1, H, W), before sigmoid
- `BAM.gate`                      -> the full 3-D gate 1 + sigmoid(...) (N, C, H, W) that multiplies F
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "SqueezeExcite",
    "CBAM",
    "BAM",
    "BAM_FUSIONS",
    "ATTENTION",
    "ATTENTION_TYPES",
    "ATTENTION_MODULES",
    "AttentionType",
    "attention_from_keys",
    "se_reduced_channels",
]

BAM_FUSIONS = ("product", "sum")


def se_reduced_channels(channels: int, ratio: float = 1 / 16, divisor: int = 8) -> int:
    """Hidden width of an SE block, rounded as timm does so its `seresnet*` weights fit."""
    value = channels * ratio
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(mean_hw x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = se_reduced_channels(channels)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        squeezed = x.mean((2, 3), keepdim=True)
        weights = self.gate(self.fc2(self.act(self.fc1(squeezed))))  # (N, C, 1, 1)
        return x * weights


# --- CBAM -----------------------------------------------------------------------------------


class CBAMChannelGate(nn.Module):
    """CBAM channel attention: sigmoid(MLP(avgpool F) + MLP(maxpool F)), MLP shared."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        # indices 1 and 3 carry weights: keys `mlp.1.*`, `mlp.3.*` as in the official release
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        avg = x.mean((2, 3))
        mx = x.amax((2, 3))
        weights = self.gate(self.mlp(avg) + self.mlp(mx))  # (N, C)
        return x * weights[:, :, None, None]


class ConvBN(nn.Module):
    """Conv without bias followed by BatchNorm (the official `BasicConv` with relu=False)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class CBAMSpatialGate(nn.Module):
    """CBAM spatial attention: sigmoid(BN(conv7x7([max_c F; mean_c F]))) — pool order [max, mean]."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.spatial = ConvBN(2, 1, kernel_size)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), dim=1)
        scale = self.gate(self.spatial(pooled))  # (N, 1, H, W)
        return x * scale


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel gate, then spatial gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.ChannelGate = CBAMChannelGate(channels, reduction)
        self.SpatialGate = CBAMSpatialGate()

    def forward(self, x: Tensor) -> Tensor:
        return self.SpatialGate(self.ChannelGate(x))


# --- BAM ------------------------------------------------------------------------------------


class BAMChannelGate(nn.Module):
    """BAM channel branch M_c(F) = BN(MLP(avgpool F)) as logits (N, C)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.gate_c = nn.Sequential(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("gate_c_fc_0", nn.Linear(channels, hidden)),
                    ("gate_c_bn_1", nn.BatchNorm1d(hidden)),
                    ("gate_c_relu_1", nn.ReLU()),
                    ("gate_c_fc_final", nn.Linear(hidden, channels)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.gate_c(x.mean((2, 3), keepdim=True))  # (N, C)


class BAMSpatialGate(nn.Module):
    """BAM spatial branch M_s(F): 1x1 reduce, two dilated 3x3 convs, 1x1 to one map (N, 1, H, W)."""

    def __init__(
        self, channels: int, reduction: int = 16, dilation_convs: int = 2, dilation: int = 4
    ) -> None:
        super().__init__()
        hidden = channels // reduction
        layers: list[tuple[str, nn.Module]] = [
            ("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, kernel_size=1)),
            ("gate_s_bn_reduce0", nn.BatchNorm2d(hidden)),
            ("gate_s_relu_reduce0", nn.ReLU()),
        ]
        for i in range(dilation_convs):
            layers += [
                (
                    f"gate_s_conv_di_{i}",
                    nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                ),
                (f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden)),
                (f"gate_s_relu_di_{i}", nn.ReLU()),
            ]
        layers.append(("gate_s_conv_final", nn.Conv2d(hidden, 1, kernel_size=1)))
        self.gate_s = nn.Sequential(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        return self.gate_s(x)


class BAMGate(nn.Module):
    """The 3-D gate 1 + sigmoid(z) that multiplies F; its own module so a hook can read it."""

    def forward(self, z: Tensor) -> Tensor:
        return 1.0 + torch.sigmoid(z)


class BAM(nn.Module):
    """Bottleneck Attention Module.

    `fusion="product"` computes F * (1 + sigmoid(M_c(F) * M_s(F))) as the official code (and its
    released checkpoint) does; `fusion="sum"` computes the paper's F + F * sigmoid(M_c(F) + M_s(F)).
    """

    def __init__(self, channels: int, reduction: int = 16, fusion: str = "product") -> None:
        super().__init__()
        if fusion not in BAM_FUSIONS:
            raise ValueError(f"bam_fusion must be one of {BAM_FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.channel_att = BAMChannelGate(channels, reduction)
        self.spatial_att = BAMSpatialGate(channels, reduction)
        self.gate = BAMGate()

    def forward(self, x: Tensor) -> Tensor:
        channel = self.channel_att(x)[:, :, None, None]  # (N, C, 1, 1)
        spatial = self.spatial_att(x)  # (N, 1, H, W)
        mixed = channel * spatial if self.fusion == "product" else channel + spatial
        return x * self.gate(mixed)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion!r}"


# --- the one place that knows the attention types -------------------------------------------


@dataclass(frozen=True)
class AttentionType:
    """How the ResNet builder places an attention type and how a state dict reveals it.

    Attributes:
        name: "se", "bam", "cbam".
        module: the module class.
        placement: "block" (inside every residual block, before the addition, attribute
            `name`) or "stage" (after stages 1-3, `bam1`..`bam3`).
        key_marker: a substring that only this type's state-dict keys contain.
        build: (channels, bam_fusion) -> a new module.
    """

    name: str
    module: type[nn.Module]
    placement: str
    key_marker: str
    build: Callable[[int, str], nn.Module]


ATTENTION: dict[str, AttentionType] = {
    "se": AttentionType("se", SqueezeExcite, "block", ".se.", lambda c, _f: SqueezeExcite(c)),
    "cbam": AttentionType("cbam", CBAM, "block", ".cbam.", lambda c, _f: CBAM(c, 16)),
    "bam": AttentionType("bam", BAM, "stage", "bam1.", lambda c, f: BAM(c, fusion=f)),
}
"""Attention types in the order a state dict is sniffed (CBAM before SE: timm's CBAM keys are
`*.se.channel.*`, handled as another network, not ours)."""

ATTENTION_MODULES: dict[str, type[nn.Module]] = {k: t.module for k, t in ATTENTION.items()}
ATTENTION_TYPES: tuple[str | None, ...] = (None, *ATTENTION)


def attention_from_keys(keys) -> str | None:
    """The attention type whose marker the state-dict keys carry, or None (plain)."""
    keys = list(keys)
    for kind in ("cbam", "bam", "se"):
        marker = ATTENTION[kind].key_marker
        if any((k.startswith(marker) if marker.endswith("1.") else marker in k) for k in keys):
            return kind
    return None
