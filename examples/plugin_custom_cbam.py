"""A worked plugin: a small CNN with a CBAM written differently from Attention Lens's own.

Here the channel and the spatial attention *return the gate* and the block multiplies, as many
research codebases write CBAM. Two registrations make Attention Lens read it everywhere:

    python -m viz export --plugin examples/plugin_custom_cbam.py --checkpoint mine.pth \\
        --images samples/tench_12881.jpg --out out/mine
    ATTENTION_LENS_PLUGINS=examples/plugin_custom_cbam.py make app

A plugin is trusted code of whoever starts the app or the command (it runs on import).
"""

from __future__ import annotations

import torch
from torch import nn

from models import Preprocess, register_architecture
from viz import register_attention


class ChannelAttention(nn.Module):
    """Returns the channel gate sigmoid(MLP(avg) + MLP(max)), shape (N, C, 1, 1)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean((2, 3), keepdim=True))
        mx = self.mlp(x.amax((2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """Returns the spatial gate sigmoid(conv([mean_c; max_c])), shape (N, 1, H, W)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)
        return torch.sigmoid(self.conv(pooled))


class CBAMBlock(nn.Module):
    """x * M_c(x), then * M_s(of that)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel_gate = ChannelAttention(channels)
        self.spatial_gate = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_gate(x)
        return x * self.spatial_gate(x)


class SmallCBAMNet(nn.Module):
    """Stem, four stride-2 conv stages each ending in a CBAM block, global pool, classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        widths = [width, width * 2, width * 4, width * 8, width * 8]
        stages = []
        for i in range(4):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1, bias=False),
                    nn.BatchNorm2d(widths[i + 1]),
                    nn.ReLU(),
                    CBAMBlock(widths[i + 1]),
                )
            )
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.classifier(x.mean((2, 3)))


# the two lines a researcher writes: where the gates are, and how to build the network
register_attention(CBAMBlock, kind="cbam", channel="channel_gate", spatial="spatial_gate")
register_architecture(
    "small_cbam_net",
    build=lambda num_classes: SmallCBAMNet(num_classes),
    preprocess=Preprocess(resize=73, crop=64),
)
