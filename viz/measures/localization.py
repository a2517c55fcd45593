"""Does a map point at the object? Bounding boxes, read from three formats, and three scores.

- `pointing_game` (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016,
  https://arxiv.org/abs/1608.00507): a hit when the map's maximum lies in a box, with a
  tolerance of 15 px as in the paper.
- `energy_pointing_game` (Wang et al., "Score-CAM", CVPRW 2020, https://arxiv.org/abs/1910.01279):
  the share of the map's (non-negative) energy that falls inside the boxes.
- `energy_in_mask`, `pointing_in_mask`: the same two against a segmentation mask (the pixels a
  `viz.targets.SegmentationScore` explains), the map resized to the mask's grid.
- `box_iou` (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016,
  https://arxiv.org/abs/1512.04150): keep the pixels above 20% of the map's range, take the
  bounding box of their largest connected region, report its best IoU with a box.

Boxes come in the original image's pixels; `models.preprocess.Preprocess.map_box` moves them
into the crop the network saw, and the maps are bilinearly resized to that crop.

Box files are untrusted: sizes are bounded, XML with a DOCTYPE or entity is refused, and every
value is checked; a bad file is one `BoxError` line.
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from xml.etree import ElementTree

import torch
import torch.nn.functional as F
from torch import Tensor

from viz.engine.maps import upsample

__all__ = [
    "BoxError",
    "Box",
    "read_boxes",
    "pointing_game",
    "energy_pointing_game",
    "energy_in_mask",
    "pointing_in_mask",
    "box_iou",
    "POINTING_TOLERANCE",
    "BOX_THRESHOLD",
]

POINTING_TOLERANCE = 15  # px, Zhang et al. 2016
BOX_THRESHOLD = 0.2  # fraction of the map's range, Zhou et al. 2016
_MAX_BOX_FILE = 200 * 2**20
_MAX_XML_FILE = 2**20

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (continuous pixel coordinates)


class BoxError(ValueError):
    """A box file that cannot be used; the message is one line."""


# --- reading ----------------------------------------------------------------------------------


def _read_text(path: Path, limit: int) -> str:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise BoxError(f"--boxes {path}: not a regular file")
        if info.st_size > limit:
            raise BoxError(f"--boxes {path}: {info.st_size / 2**20:.0f} MB is too large")
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise BoxError(f"--boxes {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise BoxError(f"--boxes {path}: not UTF-8 text") from None


def _box(values: Sequence[object], where: str) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BoxError(f"{where}: a box needs four numbers, got {list(values)!r:.80}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise BoxError(f"{where}: not a box (x0 < x1, y0 < y1): {x0, y0, x1, y1}")
    return (x0, y0, x1, y1)


def _read_csv(path: Path) -> dict[str, list[Box]]:
    text = _read_text(path, _MAX_BOX_FILE)
    try:
        reader = csv.DictReader(text.splitlines())
        rows = list(reader)
    except csv.Error as exc:
        raise BoxError(f"--boxes {path}: {exc}") from None
    need = {"file", "x0", "y0", "x1", "y1"}
    if not need <= set(reader.fieldnames or []):
        raise BoxError(f"--boxes {path}: needs the columns file,x0,y0,x1,y1[,label]")
    boxes: dict[str, list[Box]] = {}
    for line, row in enumerate(rows, start=2):
        file = (row["file"] or "").strip()
        if not file:
            raise BoxError(f"--boxes {path}: line {line} has no file")
        where = f"--boxes {path}: line {line}"
        boxes.setdefault(file, []).append(_box([row[k] for k in ("x0", "y0", "x1", "y1")], where))
    return boxes


def _read_coco(path: Path) -> dict[str, list[Box]]:
    try:
        data = json.loads(_read_text(path, _MAX_BOX_FILE))
    except json.JSONDecodeError as exc:
        raise BoxError(f"--boxes {path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:  # brackets nested thousands deep
        raise BoxError(f"--boxes {path}: JSON nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BoxError(f"--boxes {path}: not COCO JSON (no 'images' list)")
    names = {}
    for image in data["images"]:
        if isinstance(image, dict) and isinstance(image.get("file_name"), str):
            names[image.get("id")] = image["file_name"]
    boxes: dict[str, list[Box]] = {name: [] for name in names.values()}
    for i, ann in enumerate(data.get("annotations") or []):
        if not isinstance(ann, dict) or ann.get("image_id") not in names:
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise BoxError(f"--boxes {path}: annotation {i} has no [x, y, w, h] bbox")
        x, y, w, h = bbox
        where = f"--boxes {path}: annotation {i}"
        try:
            boxes[names[ann["image_id"]]].append(_box([x, y, float(x) + w, float(y) + h], where))
        except TypeError:
            raise BoxError(f"{where}: a box needs four numbers") from None
    return boxes


def _read_voc_file(path: Path) -> tuple[str, list[Box]]:
    text = _read_text(path, _MAX_XML_FILE)
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise BoxError(f"--boxes {path}: XML with a DOCTYPE or entity is refused")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise BoxError(f"--boxes {path}: not XML ({exc})") from None
    name = (root.findtext("filename") or path.with_suffix(".jpg").name).strip()
    boxes = []
    for obj in root.iter("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        values = [bnd.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
        x0, y0, x1, y1 = _box(values, f"--boxes {path}")
        boxes.append((x0 - 1.0, y0 - 1.0, x1, y1))  # VOC counts pixels from 1, ends inclusive
    return name, boxes


def read_boxes(path: str | os.PathLike) -> dict[str, list[Box]]:
    """Bounding boxes per image file name, from a CSV, a COCO JSON or a Pascal VOC XML folder.

    - CSV: columns `file,x0,y0,x1,y1[,label]`, pixel coordinates of the original image.
    - COCO JSON: `images[].file_name` and `annotations[].bbox` as [x, y, width, height].
    - Pascal VOC: a folder of `.xml` files (or one with an `Annotations` subfolder), each with
      `filename` and `object/bndbox/{xmin,ymin,xmax,ymax}` (1-based, inclusive).

    Returns:
        {file name or relative path: [box, ...]}; an image listed without boxes maps to [].

    Raises:
        BoxError: unreadable or malformed file (one line).
    """
    p = Path(path)
    if p.is_dir():
        folder = p / "Annotations" if (p / "Annotations").is_dir() else p
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() == ".xml" and f.is_file())
        if not files:
            raise BoxError(f"--boxes {p}: no Pascal VOC .xml files in this folder")
        boxes: dict[str, list[Box]] = {}
        for f in files:
            name, found = _read_voc_file(f)
            boxes.setdefault(name, []).extend(found)
        return boxes
    if p.suffix.lower() == ".json":
        return _read_coco(p)
    if p.suffix.lower() == ".csv":
        return _read_csv(p)
    if not p.exists():
        raise BoxError(f"--boxes {p}: no such file or folder")
    raise BoxError(f"--boxes {p}: give a .csv, a COCO .json or a folder of VOC .xml files")


# --- scores -----------------------------------------------------------------------------------


def _at(saliency: Tensor, size: int) -> Tensor:
    s = torch.nan_to_num(saliency.detach().float().cpu(), nan=0.0)
    return s if tuple(s.shape) == (size, size) else upsample(s, (size, size))


def _box_mask(boxes: Sequence[Box], size: int, grow: float = 0.0) -> Tensor:
    """(size, size) bool: pixels whose centre lies in a box (grown by `grow` px)."""
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    mask = torch.zeros(size, size, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        cols = (centres >= x0 - grow) & (centres <= x1 + grow)
        rows = (centres >= y0 - grow) & (centres <= y1 + grow)
        mask |= rows[:, None] & cols[None, :]
    return mask


def pointing_game(
    saliency: Tensor, boxes: Sequence[Box], size: int, *, tolerance: float = POINTING_TOLERANCE
) -> float:
    """1.0 when the map's maximum (first one, row-major) is in a box grown by `tolerance` px.

    Args:
        saliency: (h, w) map, resized bilinearly to `size` x `size`.
        boxes: boxes in the crop's pixel coordinates.
        size: the crop's side.

    Returns:
        1.0 hit, 0.0 miss, nan without boxes.
    """
    if not boxes:
        return math.nan
    s = _at(saliency, size)
    where = int(torch.argmax(s.flatten()))
    y, x = divmod(where, size)
    return float(_box_mask(boxes, size, tolerance)[y, x])


def energy_pointing_game(saliency: Tensor, boxes: Sequence[Box], size: int) -> float:
    """Share of the map's energy (its values clipped at 0, resized to the crop) inside the boxes.

    Returns:
        In [0, 1]; nan without boxes or when the map has no positive value.
    """
    if not boxes:
        return math.nan
    s = _at(saliency, size).clamp(min=0)
    total = float(s.sum())
    if total <= 0.0:
        return math.nan
    return float(s[_box_mask(boxes, size)].sum()) / total


def _on_mask(saliency: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The map resized (bilinear) to the mask's grid, and the mask as booleans."""
    mask = torch.as_tensor(mask)
    if mask.ndim != 2:
        raise ValueError(f"a segmentation mask is (H, W), got {tuple(mask.shape)}")
    s = torch.nan_to_num(torch.as_tensor(saliency).detach().float().cpu(), nan=0.0)
    return upsample(s, tuple(mask.shape)), mask.bool().cpu()


def energy_in_mask(saliency: Tensor, mask: Tensor) -> float:
    """Share of the map's energy (values clipped at 0) inside a segmentation mask: the energy
    pointing game against the region a `SegmentationScore` explains (`Analysis.outlines`).

    Returns:
        In [0, 1]; nan for an empty mask or a map without a positive value.
    """
    s, inside = _on_mask(saliency, mask)
    s = s.clamp(min=0)
    total = float(s.sum())
    if total <= 0.0 or not inside.any():
        return math.nan
    return float(s[inside].sum()) / total


def pointing_in_mask(saliency: Tensor, mask: Tensor) -> float:
    """1.0 when the map's maximum (first one, row-major) lies in the mask; nan for an empty one."""
    s, inside = _on_mask(saliency, mask)
    if not inside.any():
        return math.nan
    return float(inside.flatten()[int(torch.argmax(s.flatten()))])


def _largest_region(mask: Tensor) -> Tensor:
    """The largest 8-connected region of a (H, W) bool mask (label propagation by max-pooling)."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * mask
    m = mask.view(1, 1, h, w).float()
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * m
        if torch.equal(grown, labels):
            break
        labels = grown
    ids, counts = torch.unique(labels[labels > 0], return_counts=True)
    if ids.numel() == 0:
        return mask
    return (labels == ids[counts.argmax()]).view(h, w)


def box_iou(
    saliency: Tensor, boxes: Sequence[Box], size: int, *, threshold: float = BOX_THRESHOLD
) -> float:
    """Best IoU between a box and the bounding box of the map's largest region above threshold.

    The map is resized to the crop and scaled to [0, 1] by its minimum and maximum; pixels at or
    above `threshold` form the region (a constant map keeps every pixel).

    Returns:
        In [0, 1]; nan without boxes.
    """
    if not boxes:
        return math.nan
    s = _at(saliency, size)
    lo, hi = float(s.min()), float(s.max())
    scaled = (s - lo) / (hi - lo) if hi > lo else torch.ones_like(s)
    region = _largest_region(scaled >= threshold)
    rows, cols = region.any(1).nonzero(), region.any(0).nonzero()
    px0, px1 = float(cols.min()), float(cols.max()) + 1.0
    py0, py1 = float(rows.min()), float(rows.max()) + 1.0
    best = 0.0
    for x0, y0, x1, y1 in boxes:
        iw = max(0.0, min(x1, px1) - max(x0, px0))
        ih = max(0.0, min(y1, py1) - max(y0, py0))
        inter = iw * ih
        union = (x1 - x0) * (y1 - y0) + (px1 - px0) * (py1 - py0) - inter
        best = max(best, inter / union if union > 0 else 0.0)
    return best
