"""Hard distillation from CNN teachers, as DeiT trains its distilled ViTs.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
ICML 2021, https://arxiv.org/abs/2012.12877 (section 5.2, "hard-label distillation").

The teachers (checkpoints opened by `models.load_checkpoint`) see the image the student sees,
after augmentation and mixing, in eval mode under `torch.inference_mode`; their prediction is
the argmax of the mean of their softmaxes. The loss of a distilled student (timm's
`VisionTransformerDistilled`, which returns its class and distillation heads as a pair in
training) is

    0.5 * CE(class head, label) + 0.5 * CE(distillation head, teacher label)

and a student with one head gets the same two terms on its one output. At inference the
distilled model's logits are the mean of its two heads (timm's eval behaviour), which is what
`inference_logits` gives during training.

Cost: one teacher forward per step (a ResNet-18 at 224 px is about half a DeiT-Ti's forward
and backward).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints.checkpoint import Checkpoint, CheckpointError, load_checkpoint

__all__ = [
    "Teachers",
    "distillation_loss",
    "inference_logits",
    "set_distilled_training",
    "teacher_labels",
]

Output = Tensor | tuple[Tensor, Tensor]


def teacher_labels(logits: list[Tensor]) -> Tensor:
    """Hard labels (N,) from teachers' logits, each (N, C): argmax of the mean softmax."""
    probs = torch.stack([t.float().softmax(dim=1) for t in logits]).mean(dim=0)
    return probs.argmax(dim=1)


def inference_logits(output: Output) -> Tensor:
    """The logits a network gives at inference: a distilled pair's mean, else the output."""
    if isinstance(output, (tuple, list)):
        cls, dist = output
        return (cls + dist) / 2
    return output


def distillation_loss(
    output: Output, target: Tensor, teacher: Tensor | None, label_smoothing: float = 0.0
) -> Tensor:
    """DeiT's hard-distillation loss (see the module docstring).

    Args:
        output: the student's logits (N, C), or its (class head, distillation head) pair.
        target: labels (N,) or soft targets (N, C) (after MixUp/CutMix).
        teacher: the teachers' hard labels (N,), or None (no distillation: a pair's two
            heads both learn the labels).
        label_smoothing: applied to the label term only (the teacher's term has none, as DeiT).

    Returns:
        The mean loss over the batch, a float32 scalar.
    """
    if isinstance(output, (tuple, list)):
        cls, dist = (o.float() for o in output)
    else:
        cls = dist = output.float()
    label_term = F.cross_entropy(cls, target, label_smoothing=label_smoothing)
    if teacher is None:
        if cls is dist:
            return label_term
        return 0.5 * label_term + 0.5 * F.cross_entropy(
            dist, target, label_smoothing=label_smoothing
        )
    return 0.5 * label_term + 0.5 * F.cross_entropy(dist, teacher)


class Teachers:
    """One or more checkpoints predicting hard labels for the student's batches."""

    def __init__(self, checkpoints: list[Checkpoint], paths: list[Path]) -> None:
        self.checkpoints, self.paths = checkpoints, paths
        for ckpt in checkpoints:
            ckpt.model.eval()
            for p in ckpt.model.parameters():
                p.requires_grad_(False)

    @classmethod
    def load(cls, paths: list[Path]) -> Teachers:
        """Open every teacher (raises `CheckpointError` naming the file that fails)."""
        checkpoints = []
        for path in paths:
            try:
                checkpoints.append(load_checkpoint(path))
            except CheckpointError as exc:
                raise CheckpointError(f"--teacher {path}: {exc}") from None
        return cls(checkpoints, list(paths))

    def to(self, device) -> Teachers:
        """Move the teachers to `device`, channels-last (their convolutions run faster)."""
        for ckpt in self.checkpoints:
            ckpt.model.to(device, memory_format=torch.channels_last)
        return self

    def check_classes(self, class_names: list[str]) -> str | None:
        """Why the teachers cannot teach these classes (one line), or None."""
        for path, ckpt in zip(self.paths, self.checkpoints):
            if ckpt.arch.num_classes != len(class_names):
                return (
                    f"--teacher {path} has {ckpt.arch.num_classes} classes, the data "
                    f"{len(class_names)}"
                )
            numbered = all(n == f"class {i}" for i, n in enumerate(ckpt.class_names))
            if not numbered and ckpt.class_names != class_names:
                return (
                    f"--teacher {path}'s classes are {ckpt.class_names[:3]}..., the data's "
                    f"{class_names[:3]}... (same classes in the same order needed; "
                    "--class-names names the data's)"
                )
        return None

    def labels(self, x: Tensor, mean: tuple, std: tuple, bf16: bool) -> Tensor:
        """Hard labels (N,) for the student's normalised batch x (N, 3, H, W).

        Each teacher gets the same pixels normalised its own way (its checkpoint's mean/std).
        """
        # computed under inference mode, cloned out of it: a loss may keep it for backward
        return self._labels(x.detach(), mean, std, bf16).clone()

    @torch.inference_mode()
    def _labels(self, x: Tensor, mean: tuple, std: tuple, bf16: bool) -> Tensor:
        pixels = x.float() * _column(std, x) + _column(mean, x)
        logits = []
        for ckpt in self.checkpoints:
            pre = ckpt.preprocess
            seen = ((pixels - _column(pre.mean, x)) / _column(pre.std, x)).contiguous(
                memory_format=torch.channels_last
            )
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits.append(ckpt.model(seen).float())
        return teacher_labels(logits)

    def records(self) -> list[dict]:
        """What the student's metadata says about its teachers."""
        return [
            {
                "file": path.name,
                "sha256": ckpt.sha256,
                "name": ckpt.label,
                **({"accuracy": ckpt.metadata["accuracy"]} if "accuracy" in ckpt.metadata else {}),
            }
            for path, ckpt in zip(self.paths, self.checkpoints)
        ]


def _column(values: tuple, like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, 3, 1, 1)


def set_distilled_training(model: nn.Module) -> bool:
    """Make a distilled timm ViT return both heads in training mode; whether it has them."""
    if hasattr(model, "set_distilled_training") and hasattr(model, "head_dist"):
        model.set_distilled_training(True)
        return True
    return False
