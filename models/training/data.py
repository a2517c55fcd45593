"""The training data: ImageFolder splits decoded to uint8, the hold-out, crops and normalisation."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF
from tqdm import tqdm

from models.checkpoints.checkpoint import parse_class_names
from models.images import ImageError, load_image
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "list_split",
    "load_split",
    "holdout_split",
    "augment",
    "normalize",
    "input_norm",
    "eval_geometry",
    "read_class_names",
]


def list_split(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """The (path, class index) pairs and class folder names of an ImageFolder split."""
    folder = ImageFolder(str(root), loader=load_image, allow_empty=True)
    return folder.samples, folder.classes


def load_split(
    root: Path, size: int, desc: str, quiet: bool = False
) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Decode an ImageFolder split to uint8 (N, 3, size, size), labels (N,), classes, paths.

    Images go through `models.images.load_image` (allow-listed Pillow decoders only: a data set
    from the internet may hold an EPS named `.jpg`). Unreadable files are skipped and counted.
    """
    samples, classes = list_split(root)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    labels, paths, skipped = [], [], []
    for path, target in tqdm(samples, desc=desc, unit="img", leave=False, disable=quiet):
        try:
            im = load_image(path)
        except ImageError as exc:
            skipped.append(str(exc))
            continue
        im = TF.center_crop(TF.resize(im, size), size)
        images[len(labels)] = TF.pil_to_tensor(im)
        labels.append(target)
        paths.append(path)
    if skipped and not quiet:
        print(f"warning: skipped {len(skipped)} unreadable image(s) in {root}; first: {skipped[0]}")
    return images[: len(labels)], torch.tensor(labels, dtype=torch.long), classes, paths


def holdout_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (keep, held_out): a seeded, per-class `fraction` of the images held out.

    Stratified, so each class keeps its share; the same labels, fraction and seed always give
    the same split (recorded in the metadata so that others can rebuild it).
    """
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held.append(idx[: int(round(fraction * len(idx)))])
    held_out = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    return mask.nonzero().flatten(), held_out


def augment(
    batch: Tensor, out_size: int, min_scale: float, gen: torch.Generator, part: slice | None = None
) -> Tensor:
    """Random-resized crop (area in [min_scale, 1], ratio 3/4..4/3) and horizontal flip, uint8.

    `part` picks the images to return (a rank's share of the global batch): the random draws
    are made for the whole batch, so every rank stays in step and the shares add up to exactly
    what one process would make of the whole batch.
    """
    r = torch.rand((batch.shape[0], 4), generator=gen)
    flip = torch.rand(batch.shape[0], generator=gen) < 0.5
    if part is not None:
        batch, r, flip = batch[part], r[part], flip[part]
    n, _, h, w = batch.shape
    out = torch.empty((n, 3, out_size, out_size), dtype=torch.uint8)
    for i in range(n):
        area = h * w * (min_scale + (1 - min_scale) * r[i, 0].item())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[i, 1].item())
        ch = min(h, int(round(math.sqrt(area / ratio))))
        cw = min(w, int(round(math.sqrt(area * ratio))))
        top = int(r[i, 2].item() * (h - ch + 1))
        left = int(r[i, 3].item() * (w - cw + 1))
        out[i] = TF.resized_crop(batch[i], top, left, ch, cw, [out_size, out_size], antialias=True)
    out[flip] = out[flip].flip(-1)
    return out


def normalize(
    batch: Tensor,
    norm: tuple[tuple, tuple] = (IMAGENET_MEAN, IMAGENET_STD),
    channels_last: bool = True,
) -> Tensor:
    """uint8 (N, 3, H, W) -> float, normalised by `norm` (mean, std of pixels in [0, 1])."""
    mean = torch.tensor(norm[0]).view(1, 3, 1, 1) * 255
    std = torch.tensor(norm[1]).view(1, 3, 1, 1) * 255
    x = (batch.float() - mean) / std
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def input_norm(args: argparse.Namespace) -> tuple[tuple, tuple]:
    """(mean, std) of the network being trained: a timm student's own, else ImageNet's."""
    student = getattr(args, "student", None)
    return (student.mean, student.std) if student is not None else (IMAGENET_MEAN, IMAGENET_STD)


def eval_geometry(size: int, crop_ratio: float) -> tuple[int, int]:
    """(resize, crop) for testing at `size`: resize the short side to size / crop_ratio."""
    return int(round(size / crop_ratio)), size


def read_class_names(spec: str | None, folders: list[str]) -> list[str]:
    if spec is None:
        return list(folders)
    text = Path(spec).read_text() if Path(spec).is_file() else spec.replace(",", "\n")
    try:
        return parse_class_names(text, len(folders), "--class-names")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
