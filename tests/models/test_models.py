"""The networks compute what the official BAM/CBAM release computes, with its key names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_model
from models.networks.attention import BAM, CBAM
from models.networks.resnet import BasicBlock, Bottleneck
from tests.conftest import randomize_bn

# manifest name in tests/reference -> build_model(depth, attention, num_classes, stem)
OFFICIAL_ARCHS = {
    "resnet50_CBAM_ImageNet": (50, "cbam", 1000, "imagenet"),
    "resnet50_BAM_ImageNet": (50, "bam", 1000, "imagenet"),
    "resnet18_CBAM_ImageNet": (18, "cbam", 1000, "imagenet"),
    "resnet101_CBAM_ImageNet": (101, "cbam", 1000, "imagenet"),
    "resnet18_BAM_CIFAR10": (18, "bam", 10, "cifar"),
    "resnet50_plain_ImageNet": (50, None, 1000, "imagenet"),
}


def meta_model(*args, **kwargs) -> nn.Module:
    """A model without memory: enough for key names and shapes."""
    with torch.device("meta"):
        return build_model(*args, **kwargs)


def test_every_manifest_is_covered(manifests):
    assert set(manifests) == set(OFFICIAL_ARCHS)


@pytest.mark.parametrize("name", OFFICIAL_ARCHS)
def test_state_dict_matches_official_manifest(manifests, name):
    model = meta_model(*OFFICIAL_ARCHS[name])
    ours = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert ours == manifests[name]  # same keys, same order, same shapes


# --- single modules against the official vectors -----------------------------------------------


def load_module(module: nn.Module, vectors: dict, prefix: str) -> nn.Module:
    state = {
        key[len(prefix) :]: torch.from_numpy(value)
        for key, value in vectors.items()
        if key.startswith(prefix)
    }
    module.load_state_dict(state)  # strict: the official keys fit exactly
    return module.eval()


def capture(module: nn.Module, out: dict, name: str):
    return module.register_forward_hook(lambda _m, _i, output: out.__setitem__(name, output))


def assert_vector(actual: torch.Tensor, vectors: dict, key: str) -> None:
    torch.testing.assert_close(actual, torch.from_numpy(vectors[key]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,channels", [("cbam", 64), ("cbam_rect", 128)])
def test_cbam_reproduces_official_vectors(module_vectors, name, channels):
    cbam = load_module(CBAM(channels, 16), module_vectors, f"{name}/state_dict/")
    seen: dict = {}
    capture(cbam.ChannelGate.gate, seen, "channel")
    capture(cbam.SpatialGate.gate, seen, "spatial")
    with torch.no_grad():
        out = cbam(torch.from_numpy(module_vectors[f"{name}/input"]))
    assert_vector(out, module_vectors, f"{name}/output")
    assert_vector(seen["channel"], module_vectors, f"{name}/channel_scale")
    assert_vector(seen["spatial"][:, 0], module_vectors, f"{name}/spatial_scale")


def test_bam_reproduces_official_vectors(module_vectors):
    bam = load_module(BAM(64), module_vectors, "bam/state_dict/")
    seen: dict = {}
    capture(bam.channel_att.gate_c, seen, "channel")
    capture(bam.spatial_att.gate_s, seen, "spatial")
    with torch.no_grad():
        out = bam(torch.from_numpy(module_vectors["bam/input"]))
    assert_vector(out, module_vectors, "bam/output")
    assert_vector(seen["channel"], module_vectors, "bam/channel_logits")
    assert_vector(seen["spatial"][:, 0], module_vectors, "bam/spatial_logits")


# --- BAM fusion -----------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["sum", "product"])
def test_bam_fusion_follows_its_formula(fusion):
    torch.manual_seed(0)
    bam = randomize_bn(BAM(64, fusion=fusion)).eval()
    x = torch.randn(2, 64, 14, 10)
    with torch.no_grad():
        out = bam(x)
        mc = bam.channel_att(x)[:, :, None, None]  # M_c(F), (N, C, 1, 1)
        ms = bam.spatial_att(x)  # M_s(F), (N, 1, H, W)
    if fusion == "sum":  # the paper: F + F * sigmoid(M_c + M_s)
        expected = x + x * torch.sigmoid(mc + ms)
    else:  # the official code: F * (1 + sigmoid(M_c * M_s))
        expected = x * (1 + torch.sigmoid(mc * ms))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_bam_fusion_reaches_every_bam_of_a_model():
    summed = build_model(18, "bam", num_classes=5, bam_fusion="sum")
    assert [summed.get_submodule(f"bam{i}").fusion for i in (1, 2, 3)] == ["sum"] * 3
    assert build_model(18, "bam", num_classes=5).bam1.fusion == "product"  # the official default
    product = build_model(18, "bam", num_classes=5)
    product.load_state_dict(summed.state_dict())  # same weights, other formula
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(summed.eval()(x), product.eval()(x))


# --- pooling --------------------------------------------------------------------------------


def test_any_input_size_works():
    model = build_model(18, "cbam", num_classes=3).eval()
    with torch.no_grad():
        for size in [(32, 32), (64, 48), (97, 131)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 3)


def test_adaptive_pool_equals_official_avgpool7_at_224():
    torch.manual_seed(0)
    model = randomize_bn(build_model(18, "bam", num_classes=4)).eval()
    seen: dict = {}
    model.avgpool.register_forward_hook(lambda _m, inputs, out: seen.update(x=inputs[0], y=out))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert seen["x"].shape[-2:] == (7, 7)
    torch.testing.assert_close(seen["y"], nn.AvgPool2d(7)(seen["x"]))  # float32 rounding only


# --- SE: timm's keys, attention before the residual addition ----------------------------------


def test_se_keys_and_widths_follow_timm():
    shapes = {k: tuple(v.shape) for k, v in meta_model(18, "se").state_dict().items()}
    assert shapes["layer1.0.se.fc1.weight"] == (8, 64, 1, 1)  # 1x1 conv, 64 -> 8
    assert shapes["layer1.0.se.fc1.bias"] == (8,)
    assert shapes["layer1.0.se.fc2.weight"] == (64, 8, 1, 1)
    assert shapes["layer1.0.se.fc2.bias"] == (64,)
    shapes = {k: tuple(v.shape) for k, v in meta_model(50, "se").state_dict().items()}
    assert shapes["layer1.0.se.fc1.weight"] == (16, 256, 1, 1)  # 256 channels -> 16
    assert shapes["layer4.2.se.fc2.weight"] == (2048, 128, 1, 1)


@pytest.mark.parametrize("attention", ["se", "cbam"])
@pytest.mark.parametrize(
    "block",
    [
        lambda att: BasicBlock(64, 64, 1, att),  # identity shortcut
        lambda att: BasicBlock(64, 128, 2, att),  # downsample shortcut
        lambda att: Bottleneck(256, 64, 1, att),
        lambda att: Bottleneck(256, 128, 2, att),
    ],
    ids=["basic", "basic-down", "bottleneck", "bottleneck-down"],
)
def test_block_attention_sits_after_last_bn_before_the_addition(block, attention):
    torch.manual_seed(0)
    block = randomize_bn(block(attention)).eval()
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    seen: dict = {}
    last_bn.register_forward_hook(lambda _m, _i, out: seen.update(bn=out.clone()))
    block.get_submodule(attention).register_forward_hook(
        lambda _m, inputs, out: seen.update(att_in=inputs[0].clone(), att=out.clone())
    )
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        out = block(x)
        identity = x if block.downsample is None else block.downsample(x)
    torch.testing.assert_close(seen["att_in"], seen["bn"])  # attention reads the last BN
    torch.testing.assert_close(out, torch.relu(seen["att"] + identity))  # and is added after


# --- option errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,bad,valid",
    [
        ({"depth": 20}, "20", ["18", "34", "50", "101", "152"]),
        ({"attention": "eca"}, "'eca'", ["'se'", "'bam'", "'cbam'"]),
        ({"stem": "tiny"}, "'tiny'", ["'imagenet'", "'cifar'"]),
        ({"attention": "bam", "bam_fusion": "max"}, "'max'", ["'product'", "'sum'"]),
    ],
)
def test_unknown_options_raise_value_error_naming_the_valid_ones(kwargs, bad, valid):
    with pytest.raises(ValueError) as info:
        meta_model(**kwargs)
    message = str(info.value)
    assert bad in message
    for value in valid:
        assert value in message
