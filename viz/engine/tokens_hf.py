"""Where a Hugging Face transformers ViT keeps its tokens (timm's and torchvision's: `tokens`).

ViT, DeiT (class and distillation tokens), BEiT, DINOv2 (class and register tokens), CLIP's and
SigLIP's vision towers (SigLIP has no class token: its maps are the patch rows' mean), and Swin
v1 and v2 (one grid per stage, as timm's and torchvision's): prefix
tokens first, then the patches row by row, on the input's grid over the config's patch size.
The image classifiers get LeGrad's score, as timm's ViTs do: the final norm and head applied to
the mean of a block's tokens (a DeiT with teacher averages its two heads, DINOv2's head takes
the class token and the patch mean: the token mean stands for both); the headless models
(`ViTModel`, `Dinov2Model`, ...) get none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["layout_fields"]


@dataclass(frozen=True)
class _Spec:
    """Where one transformers class keeps its blocks and what comes before its patches."""

    blocks: str  # the ModuleList of blocks
    norm: str  # each block's first norm (the Grad-CAM layer)
    prefix: Callable[[nn.Module], int]
    class_token: bool = True
    score: Callable[[nn.Module, Tensor], Tensor] | None = None  # (model, tokens) -> logits


def _one(_m: nn.Module) -> int:
    return 1


def _two(_m: nn.Module) -> int:
    return 2


def _registers(m: nn.Module) -> int:
    return 1 + int(getattr(m.config, "num_register_tokens", 0))


def _vit_score(m, t):
    return m.classifier(m.vit.layernorm(t.mean(1)))


def _deit_score(m, t):
    return m.classifier(m.deit.layernorm(t.mean(1)))


def _deit_teacher_score(m, t):
    pooled = m.deit.layernorm(t.mean(1))
    return (m.cls_classifier(pooled) + m.distillation_classifier(pooled)) / 2


def _beit_score(m, t):
    norm = getattr(m.beit.pooler, "layernorm", None) if m.beit.pooler is not None else None
    pooled = (norm or m.beit.layernorm)(t.mean(1))
    return m.classifier(pooled)


def _dinov2_score(backbone: str) -> Callable[[nn.Module, Tensor], Tensor]:
    def score(m, t):
        pooled = m.get_submodule(backbone).layernorm(t.mean(1))
        return m.classifier(torch.cat([pooled, pooled], 1))

    return score


def _clip_score(m, t):
    return m.classifier(t.mean(1))


def _siglip_score(m, t):
    return m.classifier(m.vision_model.post_layernorm(t.mean(1)))


_SPECS: dict[str, _Spec] = {
    "ViTForImageClassification": _Spec("vit.layers", "layernorm_before", _one, True, _vit_score),
    "ViTModel": _Spec("layers", "layernorm_before", _one),
    "DeiTForImageClassificationWithTeacher": _Spec(
        "deit.layers", "layernorm_before", _two, True, _deit_teacher_score
    ),
    "DeiTForImageClassification": _Spec("deit.layers", "layernorm_before", _two, True, _deit_score),
    "DeiTModel": _Spec("layers", "layernorm_before", _two),
    "BeitForImageClassification": _Spec("beit.layers", "layernorm_before", _one, True, _beit_score),
    "BeitModel": _Spec("layers", "layernorm_before", _one),
    "Dinov2ForImageClassification": _Spec(
        "dinov2.encoder.layer", "norm1", _one, True, _dinov2_score("dinov2")
    ),
    "Dinov2Model": _Spec("encoder.layer", "norm1", _one),
    "Dinov2WithRegistersForImageClassification": _Spec(
        "dinov2_with_registers.encoder.layer",
        "norm1",
        _registers,
        True,
        _dinov2_score("dinov2_with_registers"),
    ),  # fmt: skip
    "Dinov2WithRegistersModel": _Spec("encoder.layer", "norm1", _registers),
    "CLIPForImageClassification": _Spec(
        "vision_model.encoder.layers", "layer_norm1", _one, True, _clip_score
    ),
    "CLIPVisionModel": _Spec("encoder.layers", "layer_norm1", _one),
    "SiglipForImageClassification": _Spec(
        "vision_model.encoder.layers", "layer_norm1", lambda _m: 0, False, _siglip_score
    ),
    "SiglipVisionModel": _Spec("encoder.layers", "layer_norm1", lambda _m: 0, False),
}


def _patch_size(m: nn.Module) -> int:
    config = m.config
    config = getattr(config, "vision_config", None) or config
    patch = config.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _maker(spec: _Spec) -> Callable[[str, nn.Module], dict]:
    def fields(path: str, m: nn.Module) -> dict:
        patch = _patch_size(m)
        depth = len(m.get_submodule(spec.blocks))
        score = None if spec.score is None else (lambda tokens: spec.score(m, tokens))
        last = f"{spec.blocks}.{depth - 1}.{spec.norm}"
        return dict(
            family="vit", path=path, prefix=spec.prefix(m), class_token=spec.class_token,
            patch=patch, depth=depth, grid_of=lambda hw: (hw[0] // patch, hw[1] // patch),
            score=score, last_norm=f"{path}.{last}" if path else last,
        )  # fmt: skip

    return fields


def _swin(backbone: str, norm: str = "layernorm_before") -> Callable[[str, nn.Module], dict]:
    """Swin: one level per stage, read at its last block's first norm (v2, which normalises
    after each branch: the MLP branch's norm): (N, h*w, C) tokens on the stage's grid (a
    stage's own output is a tuple, its patch merging on the next stage's grid)."""

    def fields(path: str, m: nn.Module) -> dict:
        stages = m.get_submodule(backbone).encoder.layers if backbone else m.encoder.layers
        prefix = ".".join(p for p in (path, backbone, "encoder.layers") if p)
        names = tuple(
            f"{prefix}.{i}.blocks.{len(stage.blocks) - 1}.{norm}" for i, stage in enumerate(stages)
        )
        return dict(
            family="swin", path=path, prefix=0, class_token=False, patch=_patch_size(m),
            depth=len(names), grid_of=lambda hw: hw, score=None, stage_layers=names,
        )  # fmt: skip

    return fields


def layout_fields() -> list[tuple[type, Callable[[str, nn.Module], dict]]]:
    """(transformers class, (path, module) -> `TokenLayout` fields) for each class known here
    (the classes imported on the first call: transformers' model code is then loaded)."""
    import transformers

    found = [(getattr(transformers, name), _maker(spec)) for name, spec in _SPECS.items()]
    return found + [
        (transformers.SwinForImageClassification, _swin("swin")),
        (transformers.SwinModel, _swin("")),
        (transformers.Swinv2ForImageClassification, _swin("swinv2", "layernorm_after")),
        (transformers.Swinv2Model, _swin("", "layernorm_after")),
    ]
