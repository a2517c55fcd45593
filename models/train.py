"""Train a ResNet (+SE/BAM/CBAM) or a timm network (a DeiT-style ViT, distilled from CNN teachers)
on an ImageFolder dataset and write an Attention Lens checkpoint.

    python -m models.train --data DIR --depth 18 --attention cbam --out checkpoints/NAME.safetensors
    python -m models.train --data DIR --arch timm:deit_tiny_distilled_patch16_224 \
        --teacher checkpoints/resnet18_cbam_imagenette.safetensors --optimizer adamw \
        --augment strong --img-size 224 --out out/deit_tiny.safetensors

`DIR` holds `train/<class>/*` and `val/<class>/*` (torchvision ImageFolder layout). Images are
decoded once into memory as uint8 (`--cache-size`), then augmented per batch (random-resized crop,
flip), which keeps a small CPU busy with the network rather than with JPEG decoding.
Training state is written after every epoch (`<out>.state.pt`); `--resume` continues from it,
so an interrupted run loses at most one epoch. `--init CHECKPOINT` starts from a checkpoint's
weights (ours, the official release's, a state dict) with a fresh schedule, to continue training
or to fine-tune on another dataset; the new checkpoint records where it started. The final
top-1 is measured on the stored (float16) weights after a save/load round trip, through the
checkpoint's own preprocessing.

`--arch timm:NAME` trains a timm network from scratch (`pretrained=False`; `--arch-kwargs` JSON
for build options, `models.students`), normalised as its pretrained config says.
`--teacher CHECKPOINT` (repeatable) adds DeiT's hard distillation (`models.distill`);
`--optimizer adamw` and `--augment strong` (`models.augment`: TrivialAugmentWide or RandAugment,
random erasing, MixUp/CutMix) give DeiT's recipe. A distilled student's checkpoint gives the
mean of its two heads, as timm does at inference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF
from tqdm import tqdm

from models.images import ImageError, load_image

from .attention import ATTENTION
from .augment import POLICIES, StrongAugment
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    parse_class_names,
    save_checkpoint,
)
from .distill import Teachers, distillation_loss, inference_logits, set_distilled_training
from .distributed import Ranks, start_distributed, stop_distributed
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .resnet import Arch, ResNet, build_model
from .students import adamw_groups, student_spec

__all__ = ["RECIPE_OPTIONS", "main", "parse_args"]


_DEFAULT_EVAL_SIZES = "128,160,192,224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.train",
        description="Train a ResNet with optional SE/BAM/CBAM, or a timm network (optionally "
        "distilled from teacher checkpoints), on an ImageFolder dataset.",
    )
    for add in (_data_options, _augment_options, _model_options, _optimiser_options, _run_options):
        add(p)
    args = p.parse_args(argv)
    adamw = args.optimizer == "adamw"
    if args.lr is None:  # DeiT's rule for AdamW: 5e-4 per 512 images in a batch
        args.lr = 5e-4 * args.batch_size / 512 if adamw else 0.3
    if args.weight_decay is None:
        args.weight_decay = 0.05 if adamw else 5e-4
    if args.channels_last is None:  # helps convolutions; a ViT is all matrix products
        args.channels_last = args.arch == "resnet"
    args.student = None
    if args.arch != "resnet":
        if not args.arch.startswith("timm:"):
            p.error(f"--arch {args.arch}: expected resnet or timm:NAME")
        try:
            args.student = student_spec(args.arch, args.arch_kwargs, args.img_size)
        except ValueError as exc:
            p.error(str(exc))
    elif args.arch_kwargs:
        p.error("--arch-kwargs needs --arch timm:NAME")
    return args


def _data_options(p: argparse.ArgumentParser) -> None:
    """The data set, its augmentation, caching, hold-out and test resolutions."""
    p.add_argument(
        "--data", required=True, type=Path, help="folder with train/ and val/ ImageFolders"
    )
    p.add_argument("--img-size", type=int, default=128, help="training crop size")
    p.add_argument(
        "--cache-size", type=int, default=224, help="images are kept in memory at this size"
    )
    p.add_argument(
        "--eval-sizes",
        default=_DEFAULT_EVAL_SIZES,
        help="test resolutions to pick from (one size fixes it, e.g. 224)",
    )
    p.add_argument(
        "--test-crop-ratio",
        type=float,
        default=1.0,
        help="crop / resize at test time (0.875: resize 256, crop 224, the official evaluation)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="hold out this fraction of the training images (per class, seeded); every choice "
        "during training (test size, progress) is made on it and val/ is scored once at the end",
    )
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of the hold-out split")
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="ship the weights of the evaluated epoch (--eval-every) with the best top-1 on the "
        "selection split (the hold-out, if any), not those of the last epoch",
    )
    p.add_argument("--min-scale", type=float, default=0.25, help="random-resized-crop minimum area")
    p.add_argument(
        "--class-names", default=None, help="comma list or text file, one name per class"
    )
    p.add_argument("--dataset-name", default=None, help="recorded in the metadata")
    p.add_argument(
        "--data-loading",
        default="cache",
        choices=["cache", "stream"],
        help="cache: decode every image once into memory (small data sets); stream: decode "
        "and augment per batch in --workers processes (ImageNet)",
    )
    p.add_argument("--workers", type=int, default=4, help="decoding processes per rank (stream)")


def _augment_options(p: argparse.ArgumentParser) -> None:
    """basic: random-resized crop and flip; strong: DeiT's recipe on top (models.augment)."""
    p.add_argument(
        "--augment",
        default="basic",
        choices=["basic", "strong"],
        help="strong adds an automatic policy, random erasing and MixUp/CutMix (for ViTs)",
    )
    p.add_argument("--auto-augment", default="trivial", choices=POLICIES,
                   help="strong: TrivialAugmentWide or RandAugment (2 ops, magnitude 9)")  # fmt: skip
    p.add_argument("--mixup", type=float, default=0.8, help="strong: MixUp alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="strong: CutMix alpha (0: off)")
    p.add_argument("--erase", type=float, default=0.25, help="strong: random-erasing probability")


def _model_options(p: argparse.ArgumentParser) -> None:
    """The architecture: unset means as --init or, without it, ARCH_DEFAULTS."""
    p.add_argument(
        "--arch",
        default="resnet",
        help="resnet (ours: --depth, --attention, ...) or timm:NAME, a timm network built "
        "without weights, e.g. timm:deit_tiny_distilled_patch16_224",
    )
    p.add_argument(
        "--arch-kwargs",
        default=None,
        help='timm build options as JSON, e.g. \'{"embed_dim": 96, "drop_path_rate": 0.1}\'',
    )
    p.add_argument(
        "--teacher",
        type=Path,
        action="append",
        default=[],
        help="distil from this checkpoint (repeatable: the argmax of their mean softmax), "
        "DeiT's hard distillation",
    )
    p.add_argument("--depth", type=int, default=None, choices=[18, 34, 50, 101, 152])
    p.add_argument("--attention", default=None, choices=["none", *ATTENTION])
    p.add_argument("--stem", default=None, choices=["imagenet", "cifar"])
    p.add_argument("--bam-fusion", default=None, choices=["product", "sum"])
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint's weights with a fresh schedule (its architecture; "
        "a new classifier if its class count differs from the data's)",
    )


def _optimiser_options(p: argparse.ArgumentParser) -> None:
    """Epochs, batch, the optimiser and its learning-rate schedule."""
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adamw"],
        help="SGD with momentum 0.9, or AdamW (betas 0.9, 0.999) as DeiT",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 0.3 for SGD, 5e-4 x batch / 512 for AdamW)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="default: 5e-4 for SGD, 0.05 for AdamW (never on biases, norms, tokens)",
    )
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--schedule",
        default="cosine",
        choices=["cosine", "step"],
        help="cosine after linear warm-up, or the official step decay (x0.1 every --step-epochs)",
    )
    p.add_argument("--step-epochs", type=int, default=30, help="epochs per step of --schedule step")
    p.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Nesterov momentum (the official BAM/CBAM recipe uses plain momentum: --no-nesterov)",
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    """Output, precision, resuming, devices and ranks."""
    p.add_argument("--out", required=True, type=Path, help="output .safetensors checkpoint")
    p.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="validate every N epochs and after the last (validation is not free on a CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast (fast on CPUs with AMX/AVX512-BF16)",
    )
    p.add_argument(
        "--float16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store weights as float16 (loading gives float32)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format for the network and its inputs (default: for "
        "ResNets; teachers always)",
    )
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu or cuda")
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="SyncBatchNorm across ranks (CUDA only): batch statistics over the global batch",
    )
    p.add_argument(
        "--freeze-bn",
        action="store_true",
        help="BatchNorm uses and keeps its running statistics (fine-tuning with small batches)",
    )


# the options recorded as a checkpoint's training recipe (the model card rebuilds commands from them)
RECIPE_OPTIONS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "img_size",
    "min_scale",
    "seed",
    "bf16",
    "holdout",
    "holdout_seed",
    "keep_best",
    "test_crop_ratio",
    "eval_sizes",
    "arch",
    "arch_kwargs",
    "augment",
    "auto_augment",
    "mixup",
    "cutmix",
    "erase",
)
ARCH_DEFAULTS = {"depth": 18, "attention": "none", "stem": "imagenet", "bam_fusion": "product"}


def resolve_arch(args: argparse.Namespace, init: Checkpoint | None) -> str | None:
    """Fill the unset architecture options from `init` (else ARCH_DEFAULTS), in place.

    Returns:
        None, or a one-line reason when an option given on the command line contradicts `init`.
    """
    if args.student is not None:  # a timm network: none of our ResNet's options apply
        given = next((k for k in ARCH_DEFAULTS if getattr(args, k) is not None), None)
        if given is not None:
            return f"--{given.replace('_', '-')} is for --arch resnet, not {args.arch}"
        if init is not None:
            return f"--init continues our ResNets only; --arch {args.arch} trains from scratch"
        return None
    for key, default in ARCH_DEFAULTS.items():
        given = getattr(args, key)
        if init is None:
            setattr(args, key, default if given is None else given)
            continue
        have = getattr(init.arch, key)
        have = "none" if have is None else have
        if given is not None and given != have:
            option = "--" + key.replace("_", "-")
            return f"{option} {given} contradicts --init, a {init.arch.label} ({option} {have})"
        setattr(args, key, have)
    return None


def start_from(model: ResNet, init: Checkpoint) -> bool:
    """Copy `init`'s weights into `model` (same architecture); the classifier only if it fits.

    Returns:
        Whether the classifier was copied (False: it keeps its fresh initialisation).
    """
    state = init.model.state_dict()
    keep_classifier = init.arch.num_classes == model.arch.num_classes
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise CheckpointError(f"--init does not fit: missing {missing[:3]}, extra {unexpected[:3]}")
    return keep_classifier


def init_record(path: Path, init: Checkpoint, keep_classifier: bool) -> dict:
    """What the new checkpoint says about its starting point (its training record included)."""
    record = {
        "file": path.name,
        "sha256": init.sha256,
        "name": init.label,
        "format": init.format,
        "classifier": "kept" if keep_classifier else "new",
    }
    for key in ("dataset", "accuracy", "training"):
        if key in init.metadata:
            record[key] = init.metadata[key]
    return record


# --- data -------------------------------------------------------------------------------------


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


def lr_at(
    step: int, total: int, warmup: int, peak: float, schedule: str = "cosine", every: int = 0
) -> float:
    """Linear warm-up, then cosine decay to zero, or x0.1 every `every` steps ("step")."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "step":
        return peak * 0.1 ** (step // max(1, every))
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def eval_sizes(args: argparse.Namespace) -> list[int]:
    """The candidate test sizes, those the cache can serve (a ViT: its own size only)."""
    student = getattr(args, "student", None)
    if student is not None and student.fixed_size:
        return [args.img_size]
    sizes = [int(s) for s in args.eval_sizes.split(",") if s.strip()]
    return [s for s in sizes if s <= args.cache_size] or [args.cache_size]


def selection_record(args: argparse.Namespace, split: str, n_train: int, n_select: int) -> dict:
    """Which images the choices during training were made on (the model card shows it)."""
    if split == "holdout":
        return {
            "split": "holdout",
            "fraction": args.holdout,
            "seed": args.holdout_seed,
            "stratified": True,
            "images": n_select,
            "train_images": n_train,
            "note": "carved from train/; val/ scored once, after training",
        }
    return {"split": "val", "images": n_select, "train_images": n_train}


def read_class_names(spec: str | None, folders: list[str]) -> list[str]:
    if spec is None:
        return list(folders)
    text = Path(spec).read_text() if Path(spec).is_file() else spec.replace(",", "\n")
    try:
        return parse_class_names(text, len(folders), "--class-names")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


class CachedData:
    """Every image decoded once into memory (uint8); batches cut from one seeded permutation."""

    def __init__(self, args: argparse.Namespace, ranks: Ranks) -> None:
        t0 = time.time()
        self.args, self.ranks = args, ranks
        quiet = not ranks.main
        self.train_x, self.train_y, self.classes, _ = load_split(
            args.data / "train", args.cache_size, "decode train", quiet
        )
        self.val_classes = list_split(args.data / "val")[1]
        if args.holdout > 0:
            # choices are made on images carved from train/; val/ is only scored at the end
            keep, held = holdout_split(self.train_y, args.holdout, args.holdout_seed)
            self.select_x, self.select_y = self.train_x[held], self.train_y[held]
            self.train_x, self.train_y = self.train_x[keep], self.train_y[keep]
            self.select_split = "holdout"
        else:
            self.select_x, self.select_y, _, _ = load_split(
                args.data / "val", args.cache_size, "decode val", quiet
            )
            self.select_split = "val"
        self.seconds = time.time() - t0

    @property
    def n_train(self) -> int:
        return len(self.train_x)

    @property
    def n_select(self) -> int:
        return len(self.select_x)

    def batches(self, epoch: int, gen: torch.Generator):
        """(uint8 images, labels) of this rank's share of each global batch of the epoch."""
        del epoch  # the generator carries the state from epoch to epoch (saved for --resume)
        args, ranks = self.args, self.ranks
        share = args.batch_size // ranks.world
        part = slice(ranks.rank * share, (ranks.rank + 1) * share)
        order = torch.randperm(self.n_train, generator=gen)
        for b in range(self.n_train // args.batch_size):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            images = augment(self.train_x[idx], args.img_size, args.min_scale, gen, part)
            yield images, self.train_y[idx][part]

    def evaluate(self, model, size: int) -> float:
        return evaluate_cached(
            model, self.select_x, self.select_y, size, self.args.bf16,
            crop_ratio=self.args.test_crop_ratio, norm=input_norm(self.args),
            channels_last=self.args.channels_last,
        )  # fmt: skip


class _Decoded(torch.utils.data.Dataset):
    """(path, label) samples decoded by the allow-listed loader, then `transform` (uint8 out)."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        try:
            image = load_image(path)
        except ImageError:
            # a broken file in a large data set: a black image keeps the batch shapes; the
            # count is small and said by the decoding of the validation split as well
            return torch.zeros(3, *self.transform.size, dtype=torch.uint8), label
        return TF.pil_to_tensor(self.transform(image)), label


class _TrainCrop:
    """Random-resized crop and horizontal flip of a PIL image (torchvision's parameters)."""

    def __init__(self, size: int, min_scale: float) -> None:
        from torchvision import transforms

        self.size = (size, size)
        self.crop = transforms.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)
        self.flip = transforms.RandomHorizontalFlip()

    def __call__(self, image):
        return self.flip(self.crop(image.convert("RGB")))


class _TestCrop:
    def __init__(self, size: int, crop_ratio: float) -> None:
        resize, crop = eval_geometry(size, crop_ratio)
        self.size = (crop, crop)
        self.preprocess = Preprocess(resize=resize, crop=crop)

    def __call__(self, image):
        return self.preprocess.crop_image(image)


class StreamData:
    """Images decoded and augmented per batch in worker processes, sharded by a sampler."""

    def __init__(self, args: argparse.Namespace, ranks: Ranks) -> None:
        self.args, self.ranks = args, ranks
        samples, self.classes = list_split(args.data / "train")
        self.val_classes = list_split(args.data / "val")[1]
        labels = torch.tensor([y for _, y in samples], dtype=torch.long)
        if args.holdout > 0:
            keep, held = holdout_split(labels, args.holdout, args.holdout_seed)
            self.train = [samples[i] for i in keep.tolist()]
            self.select = [samples[i] for i in held.tolist()]
            self.select_split = "holdout"
        else:
            self.train, self.select_split = samples, "val"
            self.select = list_split(args.data / "val")[0]
        self.seconds = 0.0

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_select(self) -> int:
        return len(self.select)

    def batches(self, epoch: int, gen: torch.Generator):
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        args, ranks = self.args, self.ranks
        dataset = _Decoded(self.train, _TrainCrop(args.img_size, args.min_scale))
        sampler = DistributedSampler(
            dataset, ranks.world, ranks.rank, shuffle=True, seed=args.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        loader = DataLoader(
            dataset, batch_size=args.batch_size // ranks.world, sampler=sampler,
            num_workers=args.workers, drop_last=True, pin_memory=args.device == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        yield from loader

    def evaluate(self, model, size: int) -> float:
        from torch.utils.data import DataLoader

        dataset = _Decoded(self.select, _TestCrop(size, self.args.test_crop_ratio))
        loader = DataLoader(dataset, batch_size=100, num_workers=self.args.workers)
        device = next(model.parameters()).device
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in loader:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                    x = normalize(x, input_norm(self.args), self.args.channels_last)
                    pred = model(x.to(device)).argmax(1)
                correct += (pred.cpu() == y).sum().item()
        return 100.0 * correct / max(1, len(dataset))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check_options(args: argparse.Namespace, ranks: Ranks) -> str | None:
    """What is wrong with the options (one line), or None."""
    if not 0.0 <= args.holdout < 0.5:
        return "--holdout must be in [0, 0.5)"
    if args.keep_best and args.holdout == 0:
        return "--keep-best chooses an epoch on the hold-out: give --holdout (e.g. 0.1), not val/"
    if not 0.5 <= args.test_crop_ratio <= 1.0:
        return "--test-crop-ratio must be in [0.5, 1]"
    if args.batch_size % ranks.world:
        return f"--batch-size {args.batch_size} is not divisible by the {ranks.world} ranks"
    if args.sync_bn and args.device != "cuda":
        return "--sync-bn needs --device cuda (PyTorch's SyncBatchNorm has no CPU kernel)"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available"
    student = args.student
    if student is not None and student.fixed_size and args.eval_sizes != _DEFAULT_EVAL_SIZES:
        if {int(v) for v in args.eval_sizes.split(",") if v.strip()} != {args.img_size}:
            return f"--eval-sizes: timm {student.name} takes {args.img_size}-px inputs only"
    if not (0 <= args.erase <= 1 and args.mixup >= 0 and args.cutmix >= 0):
        return "--erase must be in [0, 1], --mixup and --cutmix at least 0"
    return None


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            return _fail(f"{args.data / split} is not a folder (need train/ and val/)")
    init = None
    if args.init is not None:
        try:  # before the data: a bad --init fails in a second, not after decoding
            init = load_checkpoint(args.init)
        except CheckpointError as exc:
            return _fail(f"--init {args.init}: {exc}")
        if not isinstance(init.arch, Arch):
            return _fail(
                f"--init {args.init}: a {init.arch.label}; training continues only our "
                "ResNets (with SE, BAM or CBAM) for now"
            )
    conflict = resolve_arch(args, init)
    if conflict:
        return _fail(conflict)
    try:  # before the data, as --init
        teachers = Teachers.load(args.teacher) if args.teacher else None
    except CheckpointError as exc:
        return _fail(str(exc))
    ranks = start_distributed(args.device)
    try:
        problem = _check_options(args, ranks)
        if problem:
            return _fail(problem)
        return _train(args, init, ranks, teachers)
    finally:
        stop_distributed()


def _say(ranks: Ranks, text: str) -> None:
    if ranks.main:
        print(text, flush=True)


def _train(
    args: argparse.Namespace, init: Checkpoint | None, ranks: Ranks, teachers: Teachers | None
) -> int:
    state_path = args.out.with_name(args.out.name + ".state.pt")
    # the same command, run again after it finished, must not start over and overwrite it
    finished = args.resume and ranks.main and args.out.exists() and not state_path.is_file()
    if ranks.broadcast(finished):
        return _fail(f"--resume: {args.out} is finished (no {state_path.name} to continue)")
    torch.manual_seed(args.seed)
    attention = None if args.attention == "none" else args.attention
    device = (
        torch.device("cuda", ranks.local_rank) if args.device == "cuda" else torch.device("cpu")
    )
    data = StreamData(args, ranks) if args.data_loading == "stream" else CachedData(args, ranks)
    if data.val_classes != data.classes:
        return _fail("train/ and val/ have different class folders")
    class_names = read_class_names(args.class_names, data.classes)
    problem = teachers.check_classes(class_names) if teachers is not None else None
    if problem:
        return _fail(problem)
    _say(ranks, (
        f"data: {data.n_train} train, {data.n_select} {data.select_split} (choices), "
        f"{len(data.classes)} classes (decoded in {data.seconds:.0f}s); {ranks.world} process(es)"
    ))  # fmt: skip
    torch.manual_seed(args.seed)
    if args.student is not None:
        model = args.student.build(len(data.classes))
        set_distilled_training(model)  # a distilled ViT trains on (class, distillation) heads
    else:
        model = build_model(args.depth, attention, len(data.classes), args.stem, args.bam_fusion)
    keep_classifier = True
    if init is not None:
        try:
            keep_classifier = start_from(model, init)
        except CheckpointError as exc:
            return _fail(str(exc))
        _say(ranks, (
            f"starting from {args.init} ({init.label}; classifier "
            f"{'kept' if keep_classifier else 'new, class count differs'})"
        ))  # fmt: skip
    model = model.to(device, memory_format=_memory_format(args))
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if teachers is not None:
        teachers.to(device)
    history, best = _epochs(args, model, data, device, state_path, ranks, teachers)
    if not ranks.main:
        return 0
    if args.sync_bn:
        model = _plain_batchnorm(model)
    model = model.cpu()
    chosen = len(history)
    if args.keep_best and best is not None:
        model.load_state_dict(best["model"])
        chosen = best["epoch"]
        _say(ranks, f"keeping epoch {chosen} ({data.select_split} top-1 {best['acc']:.2f}%)")
    return _finish(args, init, keep_classifier, model, data, class_names, history, state_path,
                   attention, ranks, teachers, chosen)  # fmt: skip


def _memory_format(args: argparse.Namespace) -> torch.memory_format:
    return torch.channels_last if args.channels_last else torch.contiguous_format


def _optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return torch.optim.AdamW(adamw_groups(model, args.weight_decay), lr=args.lr)
    return _sgd(model, args)


def _sgd(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD with momentum 0.9; no weight decay on biases and BatchNorm parameters."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=args.lr,
        momentum=0.9,
        nesterov=args.nesterov,
    )


def _resume(args, model, opt, gen, state_path: Path, ranks: Ranks) -> tuple[int, list, dict | None]:
    """(epochs done, history, best evaluated epoch) from the training state; rank 0 reads it
    and sends it (no shared disk needed between nodes)."""
    state = None
    if ranks.main and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    state = ranks.broadcast(state)
    if state is None:
        return 0, [], None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    if "rng" in state:  # the global RNG: dropout and stochastic depth
        torch.set_rng_state(state["rng"])
    _say(ranks, f"resumed from {state_path} after epoch {state['epoch']}")
    return state["epoch"], json.loads(state["history"]), state.get("best")


@dataclass
class _Extras:
    """What a step needs besides the network: teachers and strong augmentation (or None)."""

    teachers: Teachers | None = None
    strong: StrongAugment | None = None


def _extras(args: argparse.Namespace, n_classes: int, teachers: Teachers | None) -> _Extras:
    strong = None
    if args.augment == "strong":
        strong = StrongAugment(
            n_classes, *input_norm(args), policy=args.auto_augment, mixup=args.mixup,
            cutmix=args.cutmix, erase=args.erase,
        )  # fmt: skip
    return _Extras(teachers, strong)


def _epochs(
    args, model, data, device, state_path: Path, ranks: Ranks, teachers=None
) -> tuple[list[dict], dict | None]:
    """Every epoch from the first not done: train, validate when due, save the state.

    Returns the history and, with --keep-best, the evaluated epoch with the best top-1 on the
    selection split: {"epoch", "acc", "model" (its weights on the CPU)}, else None."""
    opt = _optimizer(model, args)
    steps = data.n_train // args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch, history, best = (
        _resume(args, model, opt, gen, state_path, ranks) if args.resume else (0, [], None)
    )
    extras = _extras(args, len(data.classes), teachers)
    net = model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            model, device_ids=[ranks.local_rank] if device.type == "cuda" else None
        )
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        totals = _train_epoch(args, net, opt, data, gen, epoch, steps, device, ranks, extras)
        seen = max(1.0, totals[0].item())
        val_acc = None
        if ranks.main and ((epoch + 1) % max(1, args.eval_every) == 0 or epoch + 1 == args.epochs):
            sizes = eval_sizes(args)
            watch = max(sizes) if len(sizes) == 1 else min(args.img_size + 32, args.cache_size)
            val_acc = data.evaluate(model, watch)
        history.append({
            "epoch": epoch + 1,
            "train_loss": round(totals[2].item() / seen, 4),
            "train_acc": round(100 * totals[1].item() / seen, 2),
            f"{data.select_split}_acc": None if val_acc is None else round(val_acc, 2),
            "seconds": round(time.time() - t_epoch, 1),
        })  # fmt: skip
        if args.keep_best and val_acc is not None and (best is None or val_acc > best["acc"]):
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"epoch": epoch + 1, "acc": val_acc, "model": weights}
        if ranks.main:
            print(json.dumps(history[-1]), flush=True)
            _save_state(state_path, model, opt, gen, epoch + 1, history, best)
    return history, best


def _train_epoch(
    args, net, opt, data, gen, epoch: int, steps: int, device, ranks: Ranks, extras: _Extras
) -> Tensor:
    """One epoch; returns (images, correct, loss sum) over every rank."""
    net.train()
    if args.freeze_bn:
        _freeze_batchnorm(net)
    total, warmup = steps * args.epochs, int(args.warmup_epochs * steps)
    totals = torch.zeros(3, dtype=torch.float64)  # images, correct, loss sum
    bar = tqdm(data.batches(epoch, gen), total=steps, desc=f"epoch {epoch + 1}/{args.epochs}",
               unit="batch", leave=False, disable=not ranks.main)  # fmt: skip
    for b, (images, y) in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch * steps + b, total, warmup, args.lr, args.schedule,
                                args.step_epochs * steps)  # fmt: skip
        x, target = _inputs(args, images, y, gen, ranks, extras.strong)
        totals += _step(args, net, opt, x.to(device, non_blocking=True),
                        target.to(device, non_blocking=True), extras.teachers)  # fmt: skip
        seen = totals[0].item()
        bar.set_postfix(loss=f"{totals[2].item() / seen:.3f}",
                        acc=f"{100 * totals[1].item() / seen:.1f}")  # fmt: skip
    if ranks.world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    return totals


def _inputs(
    args, images: Tensor, y: Tensor, gen: torch.Generator, ranks: Ranks, strong
) -> tuple[Tensor, Tensor]:
    """The network's input and targets for one rank's share of a batch (uint8 crops)."""
    if strong is None:
        return normalize(images, input_norm(args), args.channels_last), y
    # seeds for the whole global batch, so that every rank stays in step with the generator
    seeds = torch.randint(0, 2**62, (args.batch_size + 1,), generator=gen)
    part = slice(ranks.rank * len(y), (ranks.rank + 1) * len(y))
    x, target = strong(images, y, seeds[part], int(seeds[-1]) + ranks.rank)
    return x.contiguous(memory_format=_memory_format(args)), target


def _step(args, net, opt, x: Tensor, target: Tensor, teachers: Teachers | None) -> Tensor:
    """Forward, loss, backward, update: (images, correct, loss sum) of this batch."""
    # the teachers see the image the student sees (augmented and mixed) and give their label
    teacher = teachers.labels(x, *input_norm(args), args.bf16) if teachers is not None else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        output = net(x)
    # the mean over this rank's share; DDP averages the gradients over the ranks,
    # which is the mean over the global batch (equal shares)
    loss = distillation_loss(output, target, teacher, args.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    hard = target if target.ndim == 1 else target.argmax(1)
    correct = (inference_logits(output).argmax(1) == hard).sum().item()
    return torch.tensor([len(hard), correct, loss.item() * len(hard)], dtype=torch.float64)


def _save_state(
    path: Path, model, opt, gen, epochs_done: int, history: list, best: dict | None = None
) -> None:
    """What --resume needs, written atomically after every epoch."""
    buf = io.BytesIO()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "rng": torch.get_rng_state(),
        "epoch": epochs_done,
        "history": json.dumps(history),
    }
    if best is not None:
        state["best"] = best
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _plain_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """SyncBatchNorm layers back to BatchNorm2d (same parameters and statistics)."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum,
                                      child.affine, child.track_running_stats)  # fmt: skip
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            _plain_batchnorm(child)
    return model


def _recipe(args, ranks: Ranks, teachers: Teachers | None) -> dict:
    """The training recipe recorded in the checkpoint (the model card rebuilds commands)."""
    schedule = ("cosine after linear warm-up" if args.schedule == "cosine"
                else f"x0.1 every {args.step_epochs} epochs after linear warm-up")  # fmt: skip
    optimizer = (
        "AdamW betas (0.9, 0.999), " if args.optimizer == "adamw"
        else f"SGD {'nesterov ' if args.nesterov else ''}momentum 0.9, "
    )  # fmt: skip
    augmentation = "random-resized crop + horizontal flip"
    extras = _extras(args, 2, None)
    if extras.strong is not None:
        augmentation += " + " + extras.strong.describe()
    recipe = {k: getattr(args, k) for k in RECIPE_OPTIONS} | {
        "optimizer": optimizer + schedule,
        "augmentation": augmentation,
    }
    if teachers is not None:
        recipe["teachers"] = teachers.records()
        recipe["distillation"] = (
            "hard (DeiT): 0.5 CE(class head, label) + 0.5 CE(distillation head, argmax of the "
            "teachers' mean softmax on the augmented image)"
        )
    return (
        recipe
        | ({"processes": ranks.world} if ranks.world > 1 else {})
        | ({"freeze_bn": True} if args.freeze_bn else {})
        | ({"sync_bn": True} if args.sync_bn else {})
    )


def _model_name(args, attention: str | None) -> str:
    dataset = args.dataset_name or args.data.name
    if args.student is not None:
        return (
            f"timm {args.student.name}" + (" (distilled)" if args.teacher else "") + f" ({dataset})"
        )
    return (
        f"ResNet-{args.depth}" + (f" + {attention.upper()}" if attention else "") + f" ({dataset})"
    )


def _finish(args, init, keep_classifier, model, data, class_names, history, state_path,
            attention, ranks: Ranks, teachers: Teachers | None,
            chosen_epoch: int) -> int:  # fmt: skip
    """Rank 0: choose the test size on the selection split, save, score val/ once."""
    by_size = {s: data.evaluate(model, s) for s in eval_sizes(args)}
    best = max(by_size, key=by_size.get)
    precision = "bf16" if args.bf16 else "float32"
    select_split = data.select_split
    print(
        f"{select_split} top-1 by test size ({precision}): {by_size}; using {best}",
        flush=True,
    )
    resize, crop = eval_geometry(best, args.test_crop_ratio)
    preprocess = Preprocess(resize, crop, *input_norm(args))
    metadata = {
        "name": _model_name(args, attention),
        "dataset": args.dataset_name or str(args.data.name),
        "training": {
            "selection": selection_record(args, select_split, data.n_train, data.n_select)
            | ({"epoch": chosen_epoch} if args.keep_best else {}),
            "recipe": _recipe(args, ranks, teachers),
            "history": history,
            "date": dt.date.today().isoformat(),
            "torch": torch.__version__,
        },
    }
    if init is not None:
        metadata["training"]["init"] = init_record(args.init, init, keep_classifier)
    model = model.to(memory_format=torch.contiguous_format).eval()
    arch = args.student.arch(model, len(class_names)) if args.student is not None else None
    save = dict(class_names=class_names, preprocess=preprocess, arch=arch,
                dtype=torch.float16 if args.float16 else torch.float32)  # fmt: skip
    save_checkpoint(args.out, model, metadata=metadata, **save)
    top1, n = evaluate_checkpoint(args.out, args.data / "val")
    metadata["accuracy"] = {
        "top1": round(top1, 2),
        "split": "val",
        "images": n,
        "test_size": best,
        "resize": resize,
        "selected_on": select_split,
        "measured_on": "stored weights after save/load, float32, checkpoint preprocessing",
        # accuracy per test size on the selection split, training precision
        f"by_test_size_{select_split}": {str(k): round(v, 2) for k, v in by_size.items()},
    }
    sha = save_checkpoint(args.out, model, metadata=metadata, **save)
    print(f"wrote {args.out} (top-1 {top1:.2f}% on {n} val images, sha256 {sha})", flush=True)
    if os.environ.get("KEEP_TRAIN_STATE") != "1":
        state_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
