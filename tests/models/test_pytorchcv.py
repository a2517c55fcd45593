"""pytorchcv (imgclsmob) ResNets: their key names map onto ours and give the same logits."""

from __future__ import annotations

import re

import pytest
import torch

from models import CheckpointError, build_model, load_checkpoint
from models.checkpoints.pytorchcv import rename_pytorchcv
from tests.conftest import (
    assert_same_logits,
    new_model,
    refused,
    torch_bytes,
)

# our key prefix -> pytorchcv's, inside a residual unit and inside a BAM block
UNIT_NAMES = [
    ("conv1.", "body.conv1.conv."),
    ("bn1.", "body.conv1.bn."),
    ("conv2.", "body.conv2.conv."),
    ("bn2.", "body.conv2.bn."),
    ("conv3.", "body.conv3.conv."),
    ("bn3.", "body.conv3.bn."),
    ("downsample.0.", "identity_conv.conv."),
    ("downsample.1.", "identity_conv.bn."),
    ("cbam.ChannelGate.mlp.1.", "cbam.ch_gate.mlp.fc1."),
    ("cbam.ChannelGate.mlp.3.", "cbam.ch_gate.mlp.fc2."),
    ("cbam.SpatialGate.spatial.conv.", "cbam.sp_gate.conv.conv."),
    ("cbam.SpatialGate.spatial.bn.", "cbam.sp_gate.conv.bn."),
]
BAM_NAMES = [
    ("channel_att.gate_c.gate_c_fc_0.", "ch_att.init_fc.fc."),
    ("channel_att.gate_c.gate_c_bn_1.", "ch_att.init_fc.bn."),
    ("channel_att.gate_c.gate_c_fc_final.", "ch_att.final_fc."),
    ("spatial_att.gate_s.gate_s_conv_reduce0.", "sp_att.init_conv.conv."),
    ("spatial_att.gate_s.gate_s_bn_reduce0.", "sp_att.init_conv.bn."),
    ("spatial_att.gate_s.gate_s_conv_di_0.", "sp_att.dil_convs.conv1.conv."),
    ("spatial_att.gate_s.gate_s_bn_di_0.", "sp_att.dil_convs.conv1.bn."),
    ("spatial_att.gate_s.gate_s_conv_di_1.", "sp_att.dil_convs.conv2.conv."),
    ("spatial_att.gate_s.gate_s_bn_di_1.", "sp_att.dil_convs.conv2.bn."),
    ("spatial_att.gate_s.gate_s_conv_final.", "sp_att.final_conv."),
]


def swap_prefix(key: str, names: list[tuple[str, str]]) -> str:
    ours, theirs = next((o, t) for o, t in names if key.startswith(o))
    return theirs + key[len(ours) :]


def to_pytorchcv(key: str, bam_net: bool) -> str:
    """pytorchcv's name for one of our keys (the inverse mapping, written out independently)."""
    if key.startswith(("conv1.", "bn1.")):  # the stem is one conv block
        layer, param = key.split(".")
        return f"features.init_block.conv.{'conv' if layer == 'conv1' else 'bn'}.{param}"
    if key.startswith("fc."):
        return "output." + key[3:]
    if key.startswith("bam"):  # BAM i sits in front of stage i + 1, in its first unit
        return f"features.stage{int(key[3]) + 1}.unit1.bam." + swap_prefix(key[5:], BAM_NAMES)
    stage, block, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key).groups()
    wrapper = "res_unit." if bam_net else ""  # BAM-ResNet units wrap a plain ResNet unit
    return f"features.stage{stage}.unit{int(block) + 1}.{wrapper}" + swap_prefix(rest, UNIT_NAMES)


def as_pytorchcv(state: dict, bam_net: bool) -> dict:
    return {to_pytorchcv(k, bam_net): v for k, v in state.items()}


def meta_state(depth: int, attention: str | None) -> dict:
    with torch.device("meta"):
        return build_model(depth, attention).state_dict()


def test_hand_written_pytorchcv_keys():
    theirs_to_ours = {
        "features.init_block.conv.conv.weight": "conv1.weight",
        "features.init_block.conv.bn.running_var": "bn1.running_var",
        "features.stage1.unit1.body.conv3.bn.weight": "layer1.0.bn3.weight",
        "features.stage2.unit1.identity_conv.conv.weight": "layer2.0.downsample.0.weight",
        "features.stage2.unit1.identity_conv.bn.bias": "layer2.0.downsample.1.bias",
        "features.stage3.unit4.cbam.ch_gate.mlp.fc2.bias": "layer3.3.cbam.ChannelGate.mlp.3.bias",
        "features.stage4.unit2.cbam.sp_gate.conv.conv.weight": (
            "layer4.1.cbam.SpatialGate.spatial.conv.weight"
        ),
        "features.stage4.unit2.cbam.sp_gate.conv.bn.num_batches_tracked": (
            "layer4.1.cbam.SpatialGate.spatial.bn.num_batches_tracked"
        ),
        "features.stage2.unit1.bam.ch_att.init_fc.bn.running_mean": (
            "bam1.channel_att.gate_c.gate_c_bn_1.running_mean"
        ),
        "features.stage4.unit1.bam.sp_att.dil_convs.conv2.conv.bias": (
            "bam3.spatial_att.gate_s.gate_s_conv_di_1.bias"
        ),
        "features.stage3.unit1.bam.sp_att.final_conv.weight": (
            "bam2.spatial_att.gate_s.gate_s_conv_final.weight"
        ),
        "features.stage2.unit3.res_unit.body.conv2.conv.weight": "layer2.2.conv2.weight",
        "output.bias": "fc.bias",
    }
    tensors = {key: torch.tensor(float(i)) for i, key in enumerate(theirs_to_ours)}
    renamed = rename_pytorchcv(tensors)
    assert {ours: renamed[ours] for ours in theirs_to_ours.values()} == {
        ours: tensors[theirs] for theirs, ours in theirs_to_ours.items()
    }


# the weight counts pytorchcv's own tests assert for these models: the same layers as ours
PYTORCHCV_PARAMETERS = {
    (18, "cbam"): 11779392,
    (50, "cbam"): 28089624,
    (101, "cbam"): 49330172,
    (18, "bam"): 11712503,
    (50, "bam"): 25915099,
    (101, "bam"): 44907227,
}


@pytest.mark.parametrize("depth,attention", PYTORCHCV_PARAMETERS)
def test_same_layers_as_pytorchcv(depth, attention):
    state = meta_state(depth, attention)
    with torch.device("meta"):
        count = sum(p.numel() for p in build_model(depth, attention).parameters())
    assert count == PYTORCHCV_PARAMETERS[depth, attention]
    theirs = as_pytorchcv(state, bam_net=attention == "bam")
    renamed = rename_pytorchcv(theirs)
    assert renamed.keys() == state.keys()
    assert all(renamed[k] is v for k, v in state.items())


@pytest.mark.parametrize("depth", [18, 34])
def test_plain_basic_resnets_rename(depth):
    state = meta_state(depth, None)
    assert rename_pytorchcv(as_pytorchcv(state, bam_net=False)).keys() == state.keys()


@pytest.mark.parametrize(
    "depth,attention", [(18, "cbam"), (18, "bam"), (18, None), (50, "bam")], ids=str
)
def test_pytorchcv_checkpoint_gives_the_same_logits(depth, attention):
    model = new_model(depth, attention, num_classes=1000)
    data = torch_bytes(as_pytorchcv(model.state_dict(), bam_net=attention == "bam"))
    ckpt = load_checkpoint(data)
    assert ckpt.format == "pytorchcv"
    assert ckpt.arch == model.arch
    assert_same_logits(ckpt.model, model)


def test_plain_bottleneck_resnet_is_refused():
    # pytorchcv's resnet50 strides in conv1 of a unit, resnet50b in conv2: same keys, other maths
    with pytest.raises(CheckpointError, match="resnet50b") as info:
        rename_pytorchcv(as_pytorchcv(meta_state(50, None), bam_net=False))
    assert "\n" not in str(info.value)
    fake = {
        "features.init_block.conv.conv.weight": torch.zeros(64, 3, 7, 7),
        "features.stage1.unit1.body.conv3.conv.weight": torch.zeros(256, 64, 1, 1),
    }
    refused(torch_bytes(fake), "pytorchcv", "refused")


@pytest.mark.parametrize(
    "extra",
    [
        "features.stage1.unit1.se.conv1.weight",  # pytorchcv's SE-ResNet
        "features.stage1.unit1.bam.ch_att.final_fc.weight",  # BAM where none can be
        "features.stage2.unit1.bam.ch_att.main_fcs.fc1.fc.weight",  # a deeper BAM channel MLP
    ],
)
def test_keys_without_counterpart_are_refused(extra):
    state = as_pytorchcv(new_model(18, "cbam").state_dict(), bam_net=False)
    state[extra] = torch.zeros(1)
    refused(torch_bytes(state), "no counterpart", extra)
