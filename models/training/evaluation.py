"""Top-1 during training (cached images at a test size) and of a stored checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms import functional as TF
from tqdm import tqdm

from models.checkpoints.checkpoint import load_checkpoint
from models.images import ImageError, load_image
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from models.training.data import eval_geometry, list_split, normalize

__all__ = ["evaluate_cached", "evaluate_checkpoint", "eval_sizes"]


@torch.no_grad()
def evaluate_cached(
    model,
    images: Tensor,
    labels: Tensor,
    size: int,
    bf16: bool,
    bs: int = 200,
    crop_ratio: float = 1.0,
    norm: tuple[tuple, tuple] = (IMAGENET_MEAN, IMAGENET_STD),
    channels_last: bool = True,
) -> float:
    """Top-1 (%) on cached square images: resize to size / crop_ratio, centre-crop `size`."""
    model.eval()
    resize, crop = eval_geometry(size, crop_ratio)
    correct = 0
    for i in range(0, len(images), bs):
        x = images[i : i + bs]
        if resize != x.shape[-1]:
            x = TF.resize(x, [resize, resize], antialias=True)
        x = TF.center_crop(x, [crop, crop])
        device = next(model.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(normalize(x, norm, channels_last).to(device)).argmax(1).cpu()
        correct += (pred == labels[i : i + bs]).sum().item()
    return 100.0 * correct / len(images)


@torch.no_grad()
def evaluate_checkpoint(path: Path, val_root: Path) -> tuple[float, int]:
    """Top-1 (%) of a stored checkpoint through its own preprocessing, float32, on PIL images."""
    ckpt = load_checkpoint(path)
    samples, _ = list_split(val_root)
    correct = total = 0
    batch, targets = [], []

    def flush() -> int:
        logits = ckpt.model(ckpt.preprocess.batch(batch))
        return (logits.argmax(1) == torch.tensor(targets)).sum().item()

    for path_i, target in tqdm(samples, desc="final eval", unit="img", leave=False):
        try:
            batch.append(load_image(path_i))
        except ImageError:
            continue  # counted out of the total below, as in training
        targets.append(target)
        total += 1
        if len(batch) == 100:
            correct += flush()
            batch, targets = [], []
    if batch:
        correct += flush()
    return 100.0 * correct / max(1, total), total


# --- training ---------------------------------------------------------------------------------


def eval_sizes(args: argparse.Namespace) -> list[int]:
    """The candidate test sizes, those the cache can serve (a ViT: its own size only)."""
    student = getattr(args, "student", None)
    if student is not None and student.fixed_size:
        return [args.img_size]
    sizes = [int(s) for s in args.eval_sizes.split(",") if s.strip()]
    return [s for s in sizes if s <= args.cache_size] or [args.cache_size]
