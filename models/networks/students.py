"""timm networks trained by `python -m models.train --arch timm:NAME` (from scratch, no weights
downloaded): what to build, how to normalise its input, and its AdamW parameter groups.

`--arch-kwargs` is a JSON object of build options. Those that shape the network (image size,
width, depth, heads, ...: `models.checkpoints.vit_recognition.OPTION_LIMITS`) are recorded in the checkpoint,
which `load_checkpoint` rebuilds from them; training-only ones (dropout and stochastic depth
rates) are used for training and not recorded, since they do nothing at inference.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from torch import nn

from models.checkpoints.architectures import ForeignArch, attention_kind
from models.checkpoints.vit_recognition import timm_options

__all__ = ["TRAIN_ONLY_OPTIONS", "StudentSpec", "adamw_groups", "student_spec"]

TRAIN_ONLY_OPTIONS = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate")


@dataclass(frozen=True)
class StudentSpec:
    """A timm network to train.

    Attributes:
        name: timm model name, e.g. "deit_tiny_distilled_patch16_224".
        options: build options recorded in the checkpoint (img_size added when the network
            has a fixed input size other than the training size).
        train_options: dropout / stochastic-depth rates, for training only.
        mean, std: its pretrained config's normalisation.
        crop_pct: its pretrained config's crop / resize ratio.
        fixed_size: the network takes only `img_size`-px inputs (ViTs).
    """

    name: str
    options: dict = field(hash=False)
    train_options: dict = field(hash=False)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    fixed_size: bool

    def build(self, num_classes: int, *, train: bool = True) -> nn.Module:
        """A new network, randomly initialised (pretrained=False)."""
        import timm

        extra = self.train_options if train else {}
        return timm.create_model(
            self.name, pretrained=False, num_classes=num_classes, **self.options, **extra
        )

    def arch(self, model: nn.Module, num_classes: int) -> ForeignArch:
        """What the checkpoint says the network is."""
        return ForeignArch(self.name, "timm", num_classes, attention_kind(model), self.options)


def student_spec(arch: str, kwargs_json: str | None, img_size: int) -> StudentSpec:
    """`--arch timm:NAME` and `--arch-kwargs JSON` -> what to build.

    Raises:
        ValueError: an unknown timm name, JSON that is not an object, an option not allowed.
    """
    import timm

    name = arch.removeprefix("timm:")
    if not timm.is_model(name):
        raise ValueError(f"--arch {arch}: timm has no model {name!r}")
    try:
        given = json.loads(kwargs_json) if kwargs_json else {}
    except ValueError as exc:
        raise ValueError(f"--arch-kwargs is not valid JSON ({exc})") from None
    if not isinstance(given, dict):
        raise ValueError("--arch-kwargs must be a JSON object")
    train_options = {}
    for key in TRAIN_ONLY_OPTIONS:
        if key in given:
            rate = given.pop(key)
            if not isinstance(rate, (int, float)) or not (0 <= rate < 1 and math.isfinite(rate)):
                raise ValueError(f"--arch-kwargs {key} must be a number in [0, 1)")
            train_options[key] = float(rate)
    try:
        options = timm_options(given)
    except ValueError as exc:
        raise ValueError(f"--arch-kwargs: {exc}") from None
    cfg = timm.models.get_pretrained_cfg(name)
    fixed = bool(getattr(cfg, "fixed_input_size", False))
    if fixed and "img_size" not in options and cfg.input_size[-1] != img_size:
        options["img_size"] = img_size
    if fixed and options.get("img_size", img_size) != img_size:
        raise ValueError(
            f"--arch-kwargs img_size {options['img_size']} is not --img-size {img_size}"
        )
    return StudentSpec(
        name, options, train_options, tuple(cfg.mean), tuple(cfg.std), float(cfg.crop_pct), fixed
    )


def adamw_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups: weight decay on weight matrices and kernels only (no biases, norms,
    position embeddings or class/distillation/register tokens: timm's `no_weight_decay`)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
