"""imgclsmob / pytorchcv ResNet layouts (`features.init_block...`, `output`), renamed to ours.

pytorchcv's `cbam_resnet*`, `bam_resnet*` and `resnet18/34` compute exactly what our models compute
(same stem, BN placement, biases, pooling order, attention position and BAM product fusion), so
their weights load after renaming:

    features.init_block.conv.{conv,bn}         -> conv1, bn1
    features.stageS.unitU.body.convK.{conv,bn} -> layerS.(U-1).convK, bnK
    features.stageS.unitU.identity_conv        -> layerS.(U-1).downsample.{0,1}
    ...unitU.cbam.ch_gate.mlp.fc{1,2}          -> ...cbam.ChannelGate.mlp.{1,3}
    ...unitU.cbam.sp_gate.conv.{conv,bn}       -> ...cbam.SpatialGate.spatial.{conv,bn}
    features.stageS.unit1.bam (S = 2, 3, 4)    -> bam(S-1)  (BAM in front of stage S = after S-1)
    features.stageS.unitU.res_unit.*           -> layerS.(U-1).*  (BAM-ResNet wraps its units)
    output                                     -> fc

pytorchcv's plain `resnet50/101/152` put the stride in the first 1x1 conv of a bottleneck, its
`resnet50b/101b/152b` in the 3x3 conv (as we do); their keys are identical, so such a file is
refused rather than guessed.
"""

from __future__ import annotations

import re

from torch import Tensor

from models.errors import CheckpointError, first_keys

__all__ = ["is_pytorchcv_layout", "rename_pytorchcv"]

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# key inside one residual unit -> our key inside `layerS.B.`
_UNIT_RULES = [
    (r"body\.conv([123])\.conv\.weight", r"conv\1.weight"),
    (rf"body\.conv([123])\.bn\.{_BN}", r"bn\1.\2"),
    (r"identity_conv\.conv\.weight", "downsample.0.weight"),
    (rf"identity_conv\.bn\.{_BN}", r"downsample.1.\1"),
    (r"cbam\.ch_gate\.mlp\.fc1\.(weight|bias)", r"cbam.ChannelGate.mlp.1.\1"),
    (r"cbam\.ch_gate\.mlp\.fc2\.(weight|bias)", r"cbam.ChannelGate.mlp.3.\1"),
    (r"cbam\.sp_gate\.conv\.conv\.weight", "cbam.SpatialGate.spatial.conv.weight"),
    (rf"cbam\.sp_gate\.conv\.bn\.{_BN}", r"cbam.SpatialGate.spatial.bn.\1"),
]

# key inside a BAM block -> our key inside `bamN.`
_BAM_RULES = [
    (r"ch_att\.init_fc\.fc\.(weight|bias)", r"channel_att.gate_c.gate_c_fc_0.\1"),
    (rf"ch_att\.init_fc\.bn\.{_BN}", r"channel_att.gate_c.gate_c_bn_1.\1"),
    (r"ch_att\.final_fc\.(weight|bias)", r"channel_att.gate_c.gate_c_fc_final.\1"),
    (r"sp_att\.init_conv\.conv\.(weight|bias)", r"spatial_att.gate_s.gate_s_conv_reduce0.\1"),
    (rf"sp_att\.init_conv\.bn\.{_BN}", r"spatial_att.gate_s.gate_s_bn_reduce0.\1"),
    (r"sp_att\.dil_convs\.conv1\.conv\.(weight|bias)", r"spatial_att.gate_s.gate_s_conv_di_0.\1"),
    (rf"sp_att\.dil_convs\.conv1\.bn\.{_BN}", r"spatial_att.gate_s.gate_s_bn_di_0.\1"),
    (r"sp_att\.dil_convs\.conv2\.conv\.(weight|bias)", r"spatial_att.gate_s.gate_s_conv_di_1.\1"),
    (rf"sp_att\.dil_convs\.conv2\.bn\.{_BN}", r"spatial_att.gate_s.gate_s_bn_di_1.\1"),
    (r"sp_att\.final_conv\.(weight|bias)", r"spatial_att.gate_s.gate_s_conv_final.\1"),
]

_TOP_RULES = [
    (r"features\.init_block\.conv\.conv\.weight", "conv1.weight"),
    (rf"features\.init_block\.conv\.bn\.{_BN}", r"bn1.\1"),
    (r"output\.(weight|bias)", r"fc.\1"),
]


def is_pytorchcv_layout(state: dict[str, Tensor]) -> bool:
    """True for pytorchcv key names (`features.init_block.*`, `output.*`)."""
    return any(k.startswith("features.init_block.") for k in state)


def _apply(rules: list[tuple[str, str]], key: str) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _rename_key(key: str) -> str | None:
    """Our name for one pytorchcv key, or None when it has no counterpart here."""
    bam = re.fullmatch(r"features\.stage([234])\.unit1\.bam\.(.+)", key)
    if bam:
        inner = _apply(_BAM_RULES, bam.group(2))
        return None if inner is None else f"bam{int(bam.group(1)) - 1}.{inner}"
    unit = re.fullmatch(r"features\.stage([1-4])\.unit(\d+)\.(?:res_unit\.)?(.+)", key)
    if unit:
        inner = _apply(_UNIT_RULES, unit.group(3))
        return None if inner is None else f"layer{unit.group(1)}.{int(unit.group(2)) - 1}.{inner}"
    return _apply(_TOP_RULES, key)


def rename_pytorchcv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map pytorchcv keys to ours.

    Raises:
        CheckpointError: for keys with no counterpart here (other pytorchcv models) and for plain
            bottleneck ResNets, whose stride placement cannot be told from the file.
    """
    attention = any(".cbam." in k or ".bam." in k for k in state)
    if not attention and any(".body.conv3." in k for k in state):
        raise CheckpointError(
            "pytorchcv plain ResNet-50/101/152 refused: resnet50 strides in the first 1x1 conv, "
            "resnet50b in the 3x3, and their keys are identical, so the computation is unknown"
        )
    renamed: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        new = _rename_key(key)
        if new is None:
            unknown.append(key)
        else:
            renamed[new] = value
    if unknown:
        raise CheckpointError(
            f"pytorchcv keys with no counterpart in our ResNets: {first_keys(unknown)}"
        )
    return renamed
