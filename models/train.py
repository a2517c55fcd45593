"""Train a ResNet (+SE/BAM/CBAM) on an ImageFolder dataset and write an Attention Lens checkpoint.

    python -m models.train --data DIR --depth 18 --attention cbam --out checkpoints/NAME.safetensors

`DIR` holds `train/<class>/*` and `val/<class>/*` (torchvision ImageFolder layout). Images are
decoded once into memory as uint8 (`--cache-size`), then augmented per batch (random-resized crop,
flip), which keeps a small CPU busy with the network rather than with JPEG decoding.
Training state is written after every epoch (`<out>.state.pt`); `--resume` continues from it,
so an interrupted run loses at most one epoch. `--init CHECKPOINT` starts from a checkpoint's
weights (ours, the official release's, a state dict) with a fresh schedule, to continue training
or to fine-tune on another dataset; the new checkpoint records where it started. The final
top-1 is measured on the stored (float16) weights after a save/load round trip, through the
checkpoint's own preprocessing.
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF
from tqdm import tqdm

from viz.images import ImageError, load_image

from .attention import ATTENTION
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .resnet import Arch, ResNet, build_model

__all__ = ["RECIPE_OPTIONS", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.train",
        description="Train a ResNet with optional SE/BAM/CBAM on an ImageFolder dataset.",
    )
    p.add_argument(
        "--data", required=True, type=Path, help="folder with train/ and val/ ImageFolders"
    )
    p.add_argument("--out", required=True, type=Path, help="output .safetensors checkpoint")
    # architecture: unset means "as --init" or, without it, ARCH_DEFAULTS
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
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.3, help="peak learning rate (SGD, nesterov)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--img-size", type=int, default=128, help="training crop size")
    p.add_argument(
        "--cache-size", type=int, default=224, help="images are kept in memory at this size"
    )
    p.add_argument(
        "--eval-sizes",
        default="128,160,192,224",
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
        "--eval-every",
        type=int,
        default=1,
        help="validate every N epochs and after the last (validation is not free on a CPU)",
    )
    p.add_argument("--min-scale", type=float, default=0.25, help="random-resized-crop minimum area")
    p.add_argument(
        "--class-names", default=None, help="comma list or text file, one name per class"
    )
    p.add_argument("--dataset-name", default=None, help="recorded in the metadata")
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
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return p.parse_args(argv)


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
    "test_crop_ratio",
    "eval_sizes",
)
ARCH_DEFAULTS = {"depth": 18, "attention": "none", "stem": "imagenet", "bam_fusion": "product"}


def resolve_arch(args: argparse.Namespace, init: Checkpoint | None) -> str | None:
    """Fill the unset architecture options from `init` (else ARCH_DEFAULTS), in place.

    Returns:
        None, or a one-line reason when an option given on the command line contradicts `init`.
    """
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


def load_split(root: Path, size: int, desc: str) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """Decode an ImageFolder split to uint8 (N, 3, size, size), labels (N,), classes, paths.

    Images go through `viz.images.load_image` (allow-listed Pillow decoders only: a data set
    from the internet may hold an EPS named `.jpg`). Unreadable files are skipped and counted.
    """
    samples, classes = list_split(root)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    labels, paths, skipped = [], [], []
    for path, target in tqdm(samples, desc=desc, unit="img", leave=False):
        try:
            im = load_image(path)
        except ImageError as exc:
            skipped.append(str(exc))
            continue
        im = TF.center_crop(TF.resize(im, size), size)
        images[len(labels)] = TF.pil_to_tensor(im)
        labels.append(target)
        paths.append(path)
    if skipped:
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


def augment(batch: Tensor, out_size: int, min_scale: float, gen: torch.Generator) -> Tensor:
    """Random-resized crop (area in [min_scale, 1], ratio 3/4..4/3) and horizontal flip, uint8."""
    n, _, h, w = batch.shape
    out = torch.empty((n, 3, out_size, out_size), dtype=torch.uint8)
    r = torch.rand((n, 4), generator=gen)
    for i in range(n):
        area = h * w * (min_scale + (1 - min_scale) * r[i, 0].item())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[i, 1].item())
        ch = min(h, int(round(math.sqrt(area / ratio))))
        cw = min(w, int(round(math.sqrt(area * ratio))))
        top = int(r[i, 2].item() * (h - ch + 1))
        left = int(r[i, 3].item() * (w - cw + 1))
        out[i] = TF.resized_crop(batch[i], top, left, ch, cw, [out_size, out_size], antialias=True)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def normalize(batch: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)


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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(normalize(x)).argmax(1)
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


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def eval_sizes(args: argparse.Namespace) -> list[int]:
    """The candidate test sizes, those the cache can serve."""
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
    names = [n.strip() for n in text.splitlines() if n.strip()]
    if len(names) != len(folders):
        raise SystemExit(f"error: {len(names)} class names for {len(folders)} class folders")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            print(
                f"error: {args.data / split} is not a folder (need train/ and val/)",
                file=sys.stderr,
            )
            return 2
    init = None
    if args.init is not None:
        try:  # before the data: a bad --init fails in a second, not after decoding
            init = load_checkpoint(args.init)
        except CheckpointError as exc:
            print(f"error: --init {args.init}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(init.arch, Arch):
            print(
                f"error: --init {args.init}: a {init.arch.label}; training continues only our "
                "ResNets (with SE, BAM or CBAM) for now",
                file=sys.stderr,
            )
            return 2
    conflict = resolve_arch(args, init)
    if conflict:
        print(f"error: {conflict}", file=sys.stderr)
        return 2
    state_path = args.out.with_name(args.out.name + ".state.pt")
    torch.manual_seed(args.seed)
    attention = None if args.attention == "none" else args.attention

    if not 0.0 <= args.holdout < 0.5:
        print("error: --holdout must be in [0, 0.5)", file=sys.stderr)
        return 2
    if not 0.5 <= args.test_crop_ratio <= 1.0:
        print("error: --test-crop-ratio must be in [0.5, 1]", file=sys.stderr)
        return 2
    t0 = time.time()
    train_x, train_y, classes, train_paths = load_split(
        args.data / "train", args.cache_size, "decode train"
    )
    val_classes = list_split(args.data / "val")[1]
    if val_classes != classes:
        print("error: train/ and val/ have different class folders", file=sys.stderr)
        return 2
    if args.holdout > 0:
        # choices are made on images carved from train/; val/ is only scored at the end
        keep, held = holdout_split(train_y, args.holdout, args.holdout_seed)
        select_x, select_y = train_x[held], train_y[held]
        train_x, train_y = train_x[keep], train_y[keep]
        select_split = "holdout"
    else:
        select_x, select_y, _, _ = load_split(args.data / "val", args.cache_size, "decode val")
        select_split = "val"
    class_names = read_class_names(args.class_names, classes)
    print(
        f"data: {len(train_x)} train, {len(select_x)} {select_split} (choices), "
        f"{len(classes)} classes (decoded in {time.time() - t0:.0f}s)",
        flush=True,
    )

    torch.manual_seed(args.seed)
    model = build_model(args.depth, attention, len(classes), args.stem, args.bam_fusion)
    if init is not None:
        try:
            keep_classifier = start_from(model, init)
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(
            f"starting from {args.init} ({init.label}; classifier "
            f"{'kept' if keep_classifier else 'new, class count differs'})",
            flush=True,
        )
    model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = len(train_x) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch, history = 0, []
    if args.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_epoch, history = state["epoch"], json.loads(state["history"])
        print(f"resumed from {state_path} after epoch {start_epoch}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        seen = correct = 0
        loss_sum = 0.0
        t_epoch = time.time()
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            unit="batch",
            leave=False,
        )
        for b in bar:
            step = epoch * steps_per_epoch + b
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            x = normalize(augment(train_x[idx], args.img_size, args.min_scale, gen))
            y = train_y[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        val_acc = None
        if (epoch + 1) % max(1, args.eval_every) == 0 or epoch + 1 == args.epochs:
            sizes = eval_sizes(args)
            watch = max(sizes) if len(sizes) == 1 else min(args.img_size + 32, args.cache_size)
            val_acc = evaluate_cached(
                model, select_x, select_y, watch, args.bf16, crop_ratio=args.test_crop_ratio
            )
        row = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 4),
            "train_acc": round(100 * correct / seen, 2),
            f"{select_split}_acc": None if val_acc is None else round(val_acc, 2),
            "seconds": round(time.time() - t_epoch, 1),
        }
        history.append(row)
        print(json.dumps(row), flush=True)
        buf = io.BytesIO()
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "epoch": epoch + 1,
                "history": json.dumps(history),
            },
            buf,
        )
        atomic_write_bytes(state_path, buf.getvalue())

    by_size = {
        s: evaluate_cached(model, select_x, select_y, s, args.bf16, crop_ratio=args.test_crop_ratio)
        for s in eval_sizes(args)
    }
    best = max(by_size, key=by_size.get)
    precision = "bf16" if args.bf16 else "float32"
    print(
        f"{select_split} top-1 by test size ({precision}, cached): {by_size}; using {best}",
        flush=True,
    )
    resize, crop = eval_geometry(best, args.test_crop_ratio)
    preprocess = Preprocess(resize=resize, crop=crop)
    metadata = {
        "name": f"ResNet-{args.depth}"
        + (f" + {attention.upper()}" if attention else "")
        + f" ({args.dataset_name or args.data.name})",
        "dataset": args.dataset_name or str(args.data.name),
        "training": {
            "selection": selection_record(args, select_split, len(train_x), len(select_x)),
            "recipe": {k: getattr(args, k) for k in RECIPE_OPTIONS}
            | {
                "optimizer": "SGD nesterov momentum 0.9, cosine after linear warm-up",
                "augmentation": "random-resized crop + horizontal flip",
            },
            "history": history,
            "date": dt.date.today().isoformat(),
            "torch": torch.__version__,
        },
    }
    if init is not None:
        metadata["training"]["init"] = init_record(args.init, init, keep_classifier)
    model = model.to(memory_format=torch.contiguous_format).eval()
    dtype = torch.float16 if args.float16 else torch.float32
    save_checkpoint(
        args.out,
        model,
        class_names=class_names,
        preprocess=preprocess,
        metadata=metadata,
        dtype=dtype,
    )
    top1, n = evaluate_checkpoint(args.out, args.data / "val")
    metadata["accuracy"] = {
        "top1": round(top1, 2),
        "split": "val",
        "images": n,
        "test_size": best,
        "resize": resize,
        "selected_on": select_split,
        "measured_on": "stored weights after save/load, float32, checkpoint preprocessing",
        # cached-image accuracy per test size on the selection split, training precision
        f"by_test_size_{select_split}": {str(k): round(v, 2) for k, v in by_size.items()},
    }
    sha = save_checkpoint(
        args.out,
        model,
        class_names=class_names,
        preprocess=preprocess,
        metadata=metadata,
        dtype=dtype,
    )
    print(f"wrote {args.out} (top-1 {top1:.2f}% on {n} val images, sha256 {sha})", flush=True)
    if os.environ.get("KEEP_TRAIN_STATE") != "1":
        state_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
