"""`--target` of the command line: a class, or what else to explain in a network's output.

    --target tench                      a class by name or index (as before)
    --target class:3                    the same, said explicitly
    --target segment:7                  a segmentation network's category 7 over its predicted mask
    --target box:40,30,200,180[:label]  a detector's best detection overlapping that box, in the
                                        pixels of the image as the network sees it (after resize
                                        and crop); label: a class, default the detection's own
    --target similar-to:other.jpg       an embedding network: cosine similarity to the embedding
                                        of another image

A plain value (no known `kind:` prefix) is a class, so class names with a colon keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from viz.commands.inputs import UsageError, regular_file, resolve_target

__all__ = ["OutputTarget", "parse_output_target", "TARGET_KINDS"]

TARGET_KINDS = ("class", "segment", "box", "similar-to")


@dataclass(frozen=True)
class OutputTarget:
    """A parsed `--target KIND:VALUE` whose target is made per image (`build`)."""

    kind: str
    value: str

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.value}"

    def check(self, ckpt) -> None:
        """What can be checked before any image: the category of `segment:K` is a class."""
        if self.kind == "segment":
            resolve_target(self.value, ckpt.class_names, "--target segment")

    def build(self, ckpt, image, max_image_bytes: int):
        """The `viz.targets` callable for `ckpt` on `image` (a PIL image), checked in one line."""
        from viz.targets import SegmentationScore

        if self.kind == "segment":
            k = resolve_target(self.value, ckpt.class_names, "--target segment")
            return SegmentationScore(k, name=ckpt.class_names[k])
        if self.kind == "box":
            return _box(self.value, ckpt, image)
        return _similar_to(self.value, ckpt, max_image_bytes)


def parse_output_target(value: str | None) -> OutputTarget | None:
    """`--target`'s value as an `OutputTarget`, or None when it names a class (plain or
    `class:`) — `resolve_target` reads those. Malformed values: one `UsageError` line."""
    if value is None or ":" not in value:
        return None
    kind, rest = value.split(":", 1)
    kind = kind.strip().lower()
    if kind not in TARGET_KINDS:
        return None  # a class name with a colon in it
    if not rest.strip():
        raise UsageError(f"--target {kind}: needs a value ({_USAGE})")
    if kind == "class":
        return None
    if kind == "box":
        _box_numbers(rest)  # checked before any model is loaded
    return OutputTarget(kind, rest.strip())


def class_value(value: str | None) -> str | None:
    """The class `--target` names once a `class:` prefix is taken off."""
    if value is not None and value.lower().startswith("class:"):
        return value.split(":", 1)[1].strip()
    return value


_USAGE = "class:K, segment:K, box:x0,y0,x1,y1[:label] or similar-to:IMAGE"


def _box_numbers(value: str) -> tuple[list[float], str | None]:
    coords, _, label = value.partition(":")
    try:
        box = [float(v) for v in coords.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise UsageError(f"--target box:{value} must be four numbers x0,y0,x1,y1 (then :label)")
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1) or min(box) < 0:
        raise UsageError(f"--target box:{value}: a box needs 0 <= x0 < x1 and 0 <= y0 < y1")
    return box, label.strip() or None


def _box(value: str, ckpt, image):
    """`BoxScore` for the box; without a label, the label of the detection overlapping it best."""
    box, label = _box_numbers(value)
    x = ckpt.preprocess(image)
    height, width = x.shape[-2:]
    if box[2] > width or box[3] > height:
        raise UsageError(
            f"--target box:{value} lies outside the image as the network sees it "
            f"({width} x {height} pixels)"
        )
    from viz.targets import matching_detection

    with torch.inference_mode():
        found = ckpt.model(x)
    if not isinstance(found, (list, tuple)) or not found or "boxes" not in found[0]:
        raise UsageError("--target box: the network is not a detector (no boxes in its output)")
    k = None if label is None else resolve_target(label, ckpt.class_names, "--target box")
    try:
        return matching_detection(found[0], box, k, ckpt.class_names, said=label)
    except ValueError as exc:
        raise UsageError(f"--target box:{value}: {exc}") from None


def _similar_to(value: str, ckpt, max_image_bytes: int):
    """`SimilarityScore` to the embedding the network gives another image."""
    from models.images import load_image
    from viz.targets import SimilarityScore, main_tensor

    path = Path(value)
    regular_file(path, "--target similar-to image", max_image_bytes)
    try:
        other = load_image(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--target similar-to:{value}: {exc}") from None
    with torch.inference_mode():
        embedding = main_tensor(ckpt.model(ckpt.preprocess(other))).flatten(1)[0]
    return SimilarityScore(embedding.clone())
