"""What a CAM explains: one differentiable score per image, from whatever the network returns.

A target is a callable `target(output) -> Tensor (N,)`: `output` is the network's return value
for the batch (class logits (N, C), a segmentation map (N, K, H, W) or torchvision's
`{"out": ...}`, a detector's list of per-image dicts, an embedding (N, D)). The helpers here
cover the usual outputs, as pytorch-grad-cam's `model_targets` and TorchCAM's callable targets
do; any function of the same shape works too.

Optional methods `analyze` uses when a target has them: `fixed_on(output)` (the target with what
it reads from the images as given fixed, e.g. the predicted mask), `for_image(i)` (image i's
target alone, for the batches of copies the pass methods run), `describe()` (what it explains,
in words) and `outline(i)` (a mask (H, W) or boxes (K, 4) for the figures to draw).
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
    "output_kind",
    "OUTPUT_KINDS",
    "TARGET_HELPERS",
    "matching_detection",
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


OUTPUT_KINDS = {
    "classes": "class logits",
    "segments": "a segmentation map",
    "boxes": "detected boxes",
    "embedding": "an embedding",
}
"""What a network returns, by `output_kind`, and its words."""


def output_kind(output: object, headless: bool = False) -> str:
    """ "boxes" (a detector's list of dicts), "segments" (an (N, K, H, W) map or torchvision's
    `{"out": ...}`), "embedding" ((N, D) of a network without classifier: `headless`) or
    "classes" ((N, C) logits); ValueError for anything else."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict):
        if {"boxes", "labels", "scores"} <= set(output[0]):
            return "boxes"
    tensor = main_tensor(output)
    if tensor.ndim == 4:
        return "segments"
    if tensor.ndim == 2:
        return "embedding" if headless else "classes"
    raise ValueError(
        f"the network returned {tuple(tensor.shape)}: not an output Attention Lens explains"
    )


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

    def describe(self) -> str:
        return f"class {self.k}"


@dataclass(frozen=True)
class RawScore:
    """Entry `index` of each image's output, flattened (a regression output, one unit)."""

    index: int

    def __call__(self, output: object) -> Tensor:
        flat = main_tensor(output).flatten(1)
        if not 0 <= self.index < flat.shape[1]:
            raise ValueError(f"output entry {self.index} is not one of {flat.shape[1]}")
        return flat[:, self.index]

    def describe(self) -> str:
        return f"output entry {self.index}"


@dataclass(frozen=True)
class SegmentationScore:
    """A segmentation network's logits of `category` (N, K, H, W), summed over `mask`.

    `mask`: (H, W) or (N, H, W), 0/1 or weights; default: the pixels the network predicts as
    `category` (taken from the output, not differentiated). Equal to pytorch-grad-cam's
    `SemanticSegmentationTarget` given the same mask. `name`: the category's name, for figures.
    """

    category: int
    mask: Tensor | None = field(default=None, compare=False)
    name: str | None = field(default=None, compare=False)

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
        if mask.ndim == 3 and len(mask) != len(scores):
            raise ValueError(f"the mask is for {len(mask)} images, the batch has {len(scores)}")
        return (scores * mask).sum((-2, -1))

    def fixed_on(self, output: object) -> SegmentationScore:
        """The same target with its default mask taken from `output` (the images as given), so
        masked or noisy copies are scored over the same pixels."""
        if self.mask is not None:
            return self
        self(output)  # the checks, in one line each
        maps = main_tensor(output)
        predicted = (maps.argmax(1) == self.category).detach()
        empty = [i for i in range(len(predicted)) if not predicted[i].any()]
        if empty:
            raise ValueError(
                f"no pixel of image {empty[0]} is predicted as category {self.category}: "
                "nothing to explain (give a mask)"
            )
        return SegmentationScore(self.category, predicted, self.name)

    def for_image(self, i: int) -> SegmentationScore:
        """The target of image `i` alone (its own mask), for a batch of copies of it."""
        if self.mask is None or torch.as_tensor(self.mask).ndim < 3:
            return self
        return SegmentationScore(self.category, self.mask[i], self.name)

    def describe(self) -> str:
        kind = "predicted" if self.mask is None else "given"
        if self.name:
            return f"segment {self.name} ({self.category}, {kind} mask)"
        return f"segment {self.category} ({kind} mask)"

    def outline(self, i: int) -> Tensor | None:
        """Image `i`'s mask (H, W) as booleans, for figures to outline (None: not fixed yet)."""
        if self.mask is None:
            return None
        mask = torch.as_tensor(self.mask)
        return (mask[i] if mask.ndim == 3 else mask) > 0


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
    names: Sequence[str] | None = field(default=None, compare=False)  # class names, for figures

    def __post_init__(self) -> None:
        per_image = self.boxes if not isinstance(self.boxes, Tensor) else [self.boxes]
        labels = self.labels if not isinstance(self.boxes, Tensor) else [self.labels]
        if len(per_image) != len(labels):
            raise ValueError(f"BoxScore has {len(per_image)} box sets and {len(labels)} label sets")
        for boxes, wanted in zip(per_image, labels):
            boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            if len(boxes) != torch.as_tensor(wanted).numel():
                raise ValueError(
                    f"BoxScore has {len(boxes)} boxes and {torch.as_tensor(wanted).numel()} labels"
                )
            if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
                raise ValueError(
                    f"a box must be x0, y0, x1, y1 with x0 < x1 and y0 < y1: {boxes.tolist()}"
                )
            if (boxes < 0).any():
                raise ValueError(
                    f"a box lies outside the image (negative coordinates): {boxes.tolist()}"
                )

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

    def for_image(self, i: int) -> BoxScore:
        """The boxes of image `i` alone, for a batch of copies of it."""
        if isinstance(self.boxes, Tensor):
            return self
        return BoxScore(
            torch.as_tensor(self.boxes[i]), torch.as_tensor(self.labels[i]), self.iou, self.names
        )

    def outline(self, i: int) -> Tensor:
        """Image `i`'s wanted boxes (K, 4), for figures to draw."""
        boxes = self.boxes if isinstance(self.boxes, Tensor) else self.boxes[i]
        return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)

    def describe(self) -> str:
        boxes = self.boxes if isinstance(self.boxes, Tensor) else self.boxes[0]
        rows = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).round().int().tolist()
        labels = torch.as_tensor(self.labels if isinstance(self.boxes, Tensor) else self.labels[0])

        def label(k: int) -> str:
            return self.names[k] if self.names and 0 <= k < len(self.names) else f"label {k}"

        shown = "; ".join(
            f"({', '.join(map(str, r))}) {label(int(k))}" for r, k in zip(rows, labels.flatten())
        )
        return f"box {shown}"


@dataclass(frozen=True)
class SimilarityScore:
    """Cosine similarity of each image's embedding (N, D) to `embedding`: (D,) for every image
    or (N, D) one per image; explains what makes an image close to a concept
    (pytorch-grad-cam's embeddings tutorial)."""

    embedding: Tensor = field(compare=False)

    def __call__(self, output: object) -> Tensor:
        vectors = main_tensor(output).flatten(1)
        concept = torch.as_tensor(self.embedding, dtype=vectors.dtype, device=vectors.device)
        concept = concept.reshape(-1, concept.shape[-1]) if concept.ndim else concept.reshape(1, 1)
        if concept.shape[1] != vectors.shape[1]:
            raise ValueError(
                f"the embedding has {concept.shape[1]} values, the network's output "
                f"{vectors.shape[1]}"
            )
        if len(concept) not in (1, len(vectors)):
            raise ValueError(f"{len(concept)} embeddings for a batch of {len(vectors)} images")
        return F.cosine_similarity(vectors, concept, dim=1)

    def for_image(self, i: int) -> SimilarityScore:
        """The concept of image `i` alone, for a batch of copies of it."""
        concept = torch.as_tensor(self.embedding)
        return SimilarityScore(concept[i]) if concept.ndim == 2 and len(concept) > 1 else self

    def describe(self) -> str:
        return f"cosine similarity to a {torch.as_tensor(self.embedding).shape[-1]}-d embedding"


BOX_IOU = 0.5  # the overlap a detection needs to count for a box (pytorch-grad-cam's default)


def matching_detection(found: dict, box: list[float], label: int | None, names, said=None):
    """`BoxScore` of the detection in `found` (a torchvision detector's dict for one image)
    overlapping `box` best, of class `label` when given (else any; `said`: the label as the
    user wrote it). ValueError when no detection overlaps it by IoU > `BOX_IOU`."""
    from torchvision.ops import box_iou

    boxes, labels = found["boxes"], found["labels"]
    if label is not None:  # only that label's detections count (else the score would be 0)
        boxes, labels = boxes[labels == label], labels[labels == label]
    overlap = box_iou(torch.tensor([box]), boxes)[0] if len(boxes) else torch.zeros(0)
    best = int(overlap.argmax()) if len(overlap) else -1
    if best < 0 or float(overlap[best]) <= BOX_IOU:
        shown = f"{float(overlap[best]):.2f}" if best >= 0 else "none"
        of = "" if label is None else f" of label {said or names[label]}"
        raise ValueError(
            f"no detection{of} overlaps the box by IoU > {BOX_IOU} (best {shown}); choose a box "
            "near a detection"
        )
    return BoxScore(torch.tensor([box]), labels[best : best + 1].clone(), BOX_IOU, list(names))
