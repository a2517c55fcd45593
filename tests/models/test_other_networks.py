"""Checkpoints of timm and torchvision networks load by themselves (keys and shapes), exactly."""

from __future__ import annotations

import io

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save as save_safetensors

from models import CheckpointError, ForeignArch, load_checkpoint
from models.checkpoints.checkpoint import imagenet_class_names
from tests.conftest import randomize_bn

NETWORKS = {
    # name: (builder(num_classes), expected label)
    "timm seresnet18": (
        lambda n: timm.create_model("seresnet18", pretrained=False, num_classes=n),
        "ResNet-18 + SE",  # the same keys as our SE-ResNet: read as ours
    ),
    "timm resnet18 + CBAM": (
        lambda n: timm.create_model(
            "resnet18", pretrained=False, num_classes=n, block_args={"attn_layer": "cbam"}
        ),
        "timm resnet18+cbam",
    ),
    "timm ecaresnet26t": (
        lambda n: timm.create_model("ecaresnet26t", pretrained=False, num_classes=n),
        "timm ecaresnet26t",
    ),
    "torchvision efficientnet_b0": (
        lambda n: torchvision.models.efficientnet_b0(num_classes=n),
        "torchvision efficientnet_b0",
    ),
    "torchvision mobilenet_v3_small": (
        lambda n: torchvision.models.mobilenet_v3_small(num_classes=n),
        "torchvision mobilenet_v3_small",
    ),
    "torchvision resnet18": (
        lambda n: torchvision.models.resnet18(num_classes=n),
        "ResNet-18",
    ),
}
LAYOUTS = {
    "bare .pth": lambda state: _pth(state),
    "state_dict + module. .pth": lambda state: _pth(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    ),
    "model_state_dict .pt": lambda state: _pth({"model_state_dict": state}),
    "model .bin": lambda state: _pth({"model": state}),
    ".safetensors": lambda state: save_safetensors({k: v.contiguous() for k, v in state.items()}),
}


def _pth(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _logits(model, size: int = 64) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x)


def _original(net: str, classes: int):
    torch.manual_seed(0)
    return randomize_bn(NETWORKS[net][0](classes)).eval()


@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize(
    ("layout", "classes"),
    [
        ("bare .pth", 10),
        ("state_dict + module. .pth", 1000),
        ("model_state_dict .pt", 10),
        ("model .bin", 10),
        (".safetensors", 10),
    ],  # fmt: skip
)
def test_state_dicts_of_other_networks_load_exactly(net, layout, classes):
    original = _original(net, classes)
    ckpt = load_checkpoint(LAYOUTS[layout](original.state_dict()))
    assert ckpt.arch.num_classes == classes
    assert ckpt.arch.label == NETWORKS[net][1]
    assert torch.equal(_logits(ckpt.model), _logits(original))
    if classes == 1000:
        assert ckpt.class_names == imagenet_class_names()
    else:
        assert ckpt.class_names == [f"class {i}" for i in range(classes)]


def test_foreign_checkpoints_say_what_they_are():
    ckpt = load_checkpoint(_pth(_original("timm ecaresnet26t", 10).state_dict()))
    assert isinstance(ckpt.arch, ForeignArch)
    assert ckpt.arch.to_dict() == {
        "source": "timm", "name": "ecaresnet26t", "num_classes": 10, "attention": "eca",
    }  # fmt: skip
    assert ckpt.label == "timm ecaresnet26t"
    # timm's pretrained config for the architecture: 256 px crop at 0.875
    assert (ckpt.preprocess.resize, ckpt.preprocess.crop) == (293, 256)
    effnet = load_checkpoint(_pth(_original("torchvision efficientnet_b0", 10).state_dict()))
    assert effnet.arch.attention == "se"
    assert (effnet.preprocess.resize, effnet.preprocess.crop) == (256, 224)


def test_a_file_close_to_a_known_network_names_the_difference():
    state = _original("torchvision efficientnet_b0", 10).state_dict()
    state["features.1.0.block.1.fc1.weight"] = torch.zeros(9, 32, 1, 1)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_pth(state))
    text = str(info.value)
    assert "\n" not in text
    assert "closest known architecture is torchvision efficientnet_b0" in text
    assert "features.1.0.block.1.fc1.weight is [9, 32, 1, 1]" in text
    del state["classifier.1.bias"]
    with pytest.raises(CheckpointError, match="missing classifier.1.bias"):
        load_checkpoint(_pth(state))


def test_traced_and_analysed_like_ours():
    from viz import analyze

    ckpt = load_checkpoint(_pth(_original("timm resnet18 + CBAM", 10).state_dict()))
    x = torch.randn(1, 3, 64, 64)
    result = analyze(ckpt.model, x)
    assert list(result.cams) == ["layer1", "layer2", "layer3", "layer4"]
    assert [r.kind for r in result.trace] == ["cbam"] * 8
