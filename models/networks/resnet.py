"""ResNet (He et al., https://arxiv.org/abs/1512.03385) with optional SE, BAM or CBAM attention.

Layout and state-dict keys match torchvision's ResNet, the official BAM/CBAM `ResidualNet`
and timm's SE-ResNets, so their weights load without renaming:

- SE and CBAM sit in every block after its last BN, before the residual addition
  (`layerX.Y.se`, `layerX.Y.cbam`).
- BAM sits after layer1, layer2 and layer3 (`bam1`, `bam2`, `bam3`).
- Global average pooling is adaptive, so any input size works; at 224x224 it equals the
  official AvgPool2d(7).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

from models.networks.attention import ATTENTION, ATTENTION_TYPES, BAM_FUSIONS

__all__ = ["Arch", "ResNet", "build_model", "DEPTHS", "STEMS", "STAGE_WIDTHS"]

# depth -> (block kind, blocks per stage)
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEMS = ("imagenet", "cifar")
STAGE_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class Arch:
    """What a ResNet is: enough to rebuild it."""

    depth: int = 50
    attention: str | None = None
    num_classes: int = 1000
    stem: str = "imagenet"
    bam_fusion: str = "product"

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {self.depth!r}")
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(
                f"attention must be one of {list(ATTENTION_TYPES)}, got {self.attention!r}"
            )
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {list(STEMS)}, got {self.stem!r}")
        if self.bam_fusion not in BAM_FUSIONS:
            raise ValueError(
                f"bam_fusion must be one of {list(BAM_FUSIONS)}, got {self.bam_fusion!r}"
            )
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")

    @property
    def expansion(self) -> int:
        return 4 if DEPTHS[self.depth][0] == "bottleneck" else 1

    @property
    def label(self) -> str:
        """Short human name, e.g. 'ResNet-50 + CBAM'."""
        extra = f" + {self.attention.upper()}" if self.attention else ""
        return f"ResNet-{self.depth}{extra}"

    def to_dict(self) -> dict:
        return asdict(self)


def _block_attention(kind: str | None, channels: int) -> dict[str, nn.Module]:
    """The attention module a residual block holds (by its key name), if its type goes there."""
    spec = ATTENTION.get(kind) if kind else None
    if spec is None or spec.placement != "block":
        return {}
    return {spec.name: spec.build(channels, "product")}


class BasicBlock(nn.Module):
    """Two 3x3 convs; attention after bn2, before the residual addition."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, attention: str | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride)
        self.attention_name = None
        for name, module in _block_attention(attention, planes).items():
            self.add_module(name, module)
            self.attention_name = name

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.attention_name is not None:
            out = getattr(self, self.attention_name)(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1, 3x3 (stride here, as torchvision and the official code), 1x1; attention after bn3."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, attention: str | None) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, width, stride)
        self.attention_name = None
        for name, module in _block_attention(attention, width).items():
            self.add_module(name, module)
            self.attention_name = name

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.attention_name is not None:
            out = getattr(self, self.attention_name)(out)
        return self.relu(out + identity)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
    )


class ResNet(nn.Module):
    """ResNet with optional attention; `arch` says which (see `Arch`)."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        block = Bottleneck if arch.expansion == 4 else BasicBlock
        if arch.stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if arch.stem == "imagenet" else None
        self.stage_attention = None
        spec = ATTENTION.get(arch.attention) if arch.attention else None
        if spec is not None and spec.placement == "stage":
            # registered before the stages, as in the official release (key order matters to diffs)
            self.stage_attention = spec.name
            for i, width in enumerate(STAGE_WIDTHS[:3], start=1):
                self.add_module(
                    f"{spec.name}{i}", spec.build(width * block.expansion, arch.bam_fusion)
                )
        inplanes = 64
        for i, (width, count) in enumerate(zip(STAGE_WIDTHS, DEPTHS[arch.depth][1]), start=1):
            blocks = []
            for j in range(count):
                stride = 2 if (j == 0 and i > 1) else 1
                blocks.append(block(inplanes, width, stride, arch.attention))
                inplanes = width * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, arch.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.fc.weight.is_meta:  # built to load a checkpoint into: nothing to initialise
            return  # (and initialising meta tensors imports torch._dynamo: a second)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # start every residual branch near identity (zero-init of the last BN): trains faster
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Input (N, 3, H, W) -> last stage features (N, C, h, w)."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if i < 4 and self.stage_attention is not None:
                x = getattr(self, f"{self.stage_attention}{i}")(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Input (N, 3, H, W) -> logits (N, num_classes)."""
        return self.fc(self.avgpool(self.forward_features(x)).flatten(1))


def build_model(
    depth: int = 50,
    attention: str | None = None,
    num_classes: int = 1000,
    stem: str = "imagenet",
    bam_fusion: str = "product",
) -> ResNet:
    """Build a randomly initialised ResNet.

    Args:
        depth: 18, 34, 50, 101 or 152.
        attention: None, "se", "bam" or "cbam".
        num_classes: size of the classifier.
        stem: "imagenet" (conv7x7/2 + maxpool) or "cifar" (conv3x3/1, no maxpool).
        bam_fusion: "product" (official code) or "sum" (the BAM paper's formula).

    Raises:
        ValueError: for an unknown option, naming the valid ones.
    """
    if isinstance(attention, str):
        attention = attention.lower()
        attention = None if attention in ("", "none", "plain") else attention
    return ResNet(Arch(depth, attention, num_classes, stem, bam_fusion))
