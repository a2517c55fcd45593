"""What a CAM explains: one differentiable score per image, from whatever the network returns.

A target is a callable `target(output) -> Tensor (N,)`: `output` is the network's return value
for the batch (class logits (N, C), a segmentation map (N, K, H, W) or torchvision's
`{"out": ...}`, a detector's list of per-image dicts, an embedding (N, D)). The helpers here
cover the usual outputs, as pytorch-grad-cam's `model_targets` and TorchCAM's callable targets
do; any function of the same shape works too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ClassScore",
    "RawScore",
    "SegmentationScore",
    "BoxScore",
    "SimilarityScore",
    "main_tensor",
    "TARGET_HELPERS",
]

TARGET_HELPERS = "ClassScore, SegmentationScore, BoxScore, SimilarityScore, RawScore"


def main_tensor(output: object) -> Tensor:
    """The tensor a network's output holds: itself, `out` of torchvision's segmentation
    dicts, the first tensor of a tuple (Hugging Face outputs: their logits).

    Raises:
        ValueError: no tensor in it (one line naming the type).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("out"), Tensor):
        return output["out"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"the network returned a {type(output).__name__}: no tensor to score")


@dataclass(frozen=True)
class ClassScore:
    """Class `k`'s logit of a classifier (N, C): the same maps as `target=k`."""

    k: int

    def __call__(self, output: object) -> Tensor:
        logits = main_tensor(output)
        if logits.ndim != 2:
            raise ValueError(
                f"ClassScore needs class logits (N, C); the network returned {tuple(logits.shape)}"
            )
        if not 0 <= self.k < logits.shape[1]:
            raise ValueError(f"class {self.k} is not one of the {logits.shape[1]} outputs")
        return logits[:, self.k]


@dataclass(frozen=True)
class RawScore:
    """Entry `index` of each image's output, flattened (a regression output, one unit)."""

    index: int

    def __call__(self, output: object) -> Tensor:
        flat = main_tensor(output).flatten(1)
        if not 0 <= self.index < flat.shape[1]:
            raise ValueError(f"output entry {self.index} is not one of {flat.shape[1]}")
        return flat[:, self.index]


@dataclass(frozen=True)
class SegmentationScore:
    """A segmentation network's logits of `category` (N, K, H, W), summed over `mask`.

    `mask`: (H, W) or (N, H, W), 0/1 or weights; default: the pixels the network predicts as
    `category` (taken from the output, not differentiated). Equal to pytorch-grad-cam's
    `SemanticSegmentationTarget` given the same mask.
    """

    category: int
    mask: Tensor | None = field(default=None, compare=False)

    def __call__(self, output: object) -> Tensor:
        maps = main_tensor(output)
        if maps.ndim != 4:
            raise ValueError(
                "SegmentationScore needs a segmentation output (N, K, H, W); the network "
                f"returned {tuple(maps.shape)}"
            )
        if not 0 <= self.category < maps.shape[1]:
            raise ValueError(f"category {self.category} is not one of the {maps.shape[1]} outputs")
        scores = maps[:, self.category]
        if self.mask is None:
            mask = (maps.argmax(1) == self.category).to(scores.dtype).detach()
        else:
            mask = torch.as_tensor(self.mask, dtype=scores.dtype, device=scores.device)
            if mask.shape[-2:] != scores.shape[-2:]:
                raise ValueError(
                    f"the mask is {tuple(mask.shape[-2:])}, the output {tuple(scores.shape[-2:])}"
                )
        return (scores * mask).sum((-2, -1))


@dataclass(frozen=True)
class BoxScore:
    """A torchvision detector's output (a list of per-image dicts with `boxes`, `labels`,
    `scores`): for each wanted box, the detection of its label that overlaps it best, counted
    when the IoU exceeds `iou`, as its IoU plus its score; summed per image. Equal to
    pytorch-grad-cam's `FasterRCNNBoxScoreTarget`.

    `boxes`: (K, 4) x0, y0, x1, y1 in the input's pixels, for every image, or a list of one
    (K, 4) per image; `labels`: (K,) likewise.
    """

    boxes: Tensor | Sequence[Tensor] = field(compare=False)
    labels: Tensor | Sequence[Tensor] = field(compare=False)
    iou: float = 0.5

    def __call__(self, output: object) -> Tensor:
        from torchvision.ops import box_iou

        if not isinstance(output, (list, tuple)) or not all(
            isinstance(o, dict) and {"boxes", "labels", "scores"} <= set(o) for o in output
        ):
            raise ValueError(
                "BoxScore needs a detector's output: a list of dicts with boxes, labels, scores"
            )
        scores = []
        for i, found in enumerate(output):
            boxes, labels = self._wanted(i, len(output))
            total = found["scores"].sum() * 0  # zero, in the graph and dtype of the scores
            if len(found["boxes"]):
                overlap = box_iou(boxes.to(found["boxes"]), found["boxes"])
                for k in range(len(boxes)):
                    j = overlap[k].argmax()
                    if overlap[k, j] > self.iou and found["labels"][j] == labels[k]:
                        total = total + overlap[k, j] + found["scores"][j]
            scores.append(total)
        return torch.stack(scores)

    def _wanted(self, i: int, n: int) -> tuple[Tensor, Tensor]:
        per_image = not isinstance(self.boxes, Tensor)
        if per_image and len(self.boxes) != n:
            raise ValueError(f"BoxScore has boxes for {len(self.boxes)} images, the batch {n}")
        boxes = torch.as_tensor(self.boxes[i] if per_image else self.boxes, dtype=torch.float32)
        labels = torch.as_tensor(self.labels[i] if per_image else self.labels)
        return boxes.reshape(-1, 4), labels.reshape(-1)


@dataclass(frozen=True)
class SimilarityScore:
    """Cosine similarity of each image's embedding (N, D) to `embedding` (D,): explains what
    makes an image close to a concept (pytorch-grad-cam's embeddings tutorial)."""

    embedding: Tensor = field(compare=False)

    def __call__(self, output: object) -> Tensor:
        vectors = main_tensor(output).flatten(1)
        concept = torch.as_tensor(self.embedding, dtype=vectors.dtype, device=vectors.device)
        if concept.numel() != vectors.shape[1]:
            raise ValueError(
                f"the embedding has {concept.numel()} values, the network's output "
                f"{vectors.shape[1]}"
            )
        return F.cosine_similarity(vectors, concept.reshape(1, -1), dim=1)
