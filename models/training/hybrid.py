"""Train the hybrid CNN + ViT (`models.networks.hybrid`) on an ImageFolder, start to end on a CPU.

    python -m models.train_hybrid --data imagenette2-224 --out checkpoints/NAME.safetensors

The trunk (stem and stages 1-3 of the embedded ResNet-18 + CBAM) is copied in and frozen, so
its features are computed once: every training image at each of --scales (default 256 px, the
shipped recipe; e.g. 224,256,288 adds scale jitter) and its mirror image (a 16 x 16 grid of
256-channel cells at 256 px). Each step takes, for each image, a random scale and a random
14 x 14 window of it (a 224-px crop at a 16-px offset, flipped or not) and trains the
projection, tokens, blocks and head on it.
The teachers (the embedded ResNets, given by --teacher) label each image once: the mean of their
softmaxes on the 224-px image is the soft target (Hinton et al. 2015), mixed half and half with
the label's cross-entropy.

An optional second stage (--tune-layer3-epochs N, default 0: the recipe above alone) then
fine-tunes the trunk's layer3 and the transformer jointly at a small learning rate, with the
same loss and the same augmentation. For it the trunk's layer2 output (layer3's input: a
32 x 32 grid of 128 channels at 256 px, each image and its mirror, bfloat16, about 4.5 GB for
8,522 images) is cached once, after the first stage, so that each tuning epoch runs only layer3
and the transformer. Layer3's batch norms stay in eval mode (their running statistics frozen,
those of the CBAM checkpoint); its convolutions, CBAM gates and batch-norm scales and shifts
learn. The stem, layer1 and layer2 stay frozen.

With --view-teacher-weight w (default 0), the soft target becomes (1 - w) x the teachers' mean
softmax on the whole image + w x the trunk's own ResNet's softmax on the exact window the
student sees ("consistent teaching", Beyer et al. 2022): that ResNet's layer4 and head run once
on every window of the cached layer3 grid (about 7 minutes at 256 px).

With --mix p (default 0), each first-stage batch is, with probability p, mixed in feature space
(Zhang et al. 2018, Mixup; Yun et al. 2019, CutMix; one or the other per batch, as DeiT): the
windows of the batch with those of its own shuffle, by a random share lambda (Mixup: the whole
window; CutMix: a rectangle of cells). The label's cross-entropy and the teachers' whole-image
target take lambda and 1 - lambda of the two images; with --view-teacher-weight w, w x the trunk's
ResNet's softmax on the mixed window itself (layer4 and head run on it each step: "function
matching", Beyer et al. 2022) replaces the view teacher's table. The second stage is not mixed.

A seeded, stratified 10% of train/ is held out: the epoch shipped is the one with the best
hold-out top-1 over both stages; val/ is scored once, at the end, through the checkpoint's own
preprocessing. Cost on 2 CPU cores (bfloat16 autocast): features and teachers about 15 minutes,
an epoch of the transformer (6 blocks) about 3 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from models.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from models.images import load_image
from models.networks.hybrid import (
    HYBRID_NAME,
    MAX_DEPTH,
    HybridShape,
    build_hybrid,
    hybrid_options,
)
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from models.training.data import holdout_split, load_split, normalize, read_class_names
from models.training.evaluation import evaluate_checkpoint

__all__ = ["main"]

FEATURE_SIZE = 256  # px: the hold-out's scale (resize 256, centre crop 224), a 16 x 16 grid
WINDOW = HybridShape.img_size // 16  # 14 cells: a 224-px crop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.train_hybrid", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--trunk", type=Path, default=Path("checkpoints/resnet18_cbam_imagenette.safetensors")
    )
    p.add_argument("--teacher", type=Path, action="append", default=[],
                   help="a teacher checkpoint (repeat); default: the trunk's network")  # fmt: skip
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--scales", default="256",
                   help="image sizes (px, multiples of 16, >= 224) whose trunk features are cached")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--depth", type=int, default=HybridShape.depth)
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--tune-layer3-epochs", type=int, default=0,
                   help="then N epochs fine-tuning the trunk's layer3 + the transformer (0: none)")  # fmt: skip
    p.add_argument("--tune-lr", type=float, default=1e-4,
                   help="the second stage's peak lr for the transformer (AdamW)")  # fmt: skip
    p.add_argument("--tune-layer3-lr", type=float, default=5e-5,
                   help="the second stage's peak lr for layer3 (AdamW)")  # fmt: skip
    p.add_argument("--view-teacher-weight", type=float, default=0.0,
                   help="mix the trunk's ResNet's softmax on the student's exact window into the "
                   "soft target with this weight (consistent teaching; 0: teachers on the whole "
                   "image only)")  # fmt: skip
    p.add_argument("--mix", type=float, default=0.0,
                   help="probability that a first-stage batch is mixed (Mixup or CutMix of the "
                   "feature windows; 0: none)")  # fmt: skip
    p.add_argument("--limit", type=int, default=0, help="use only N training images (smoke tests)")
    p.add_argument("--dataset-name", default="imagenette2")
    p.add_argument("--class-names", default="checkpoints/imagenette_classes.txt")
    args = p.parse_args(argv)
    if not 0 <= args.view_teacher_weight <= 1:
        p.error(f"--view-teacher-weight: a weight between 0 and 1 (got {args.view_teacher_weight})")
    if not 0 <= args.mix <= 1:
        p.error(f"--mix: a probability between 0 and 1 (got {args.mix})")
    if not 1 <= args.depth <= MAX_DEPTH:
        p.error(f"--depth: between 1 and {MAX_DEPTH} blocks (got {args.depth})")
    return args


def _decode(paths: list[str]) -> Tensor:
    """uint8 (N, 3, 224, 224) images decoded again from disk, exactly as `load_split` did."""
    return torch.stack(
        [TF.pil_to_tensor(TF.center_crop(TF.resize(load_image(p), 224), 224)) for p in paths]
    )


def _layer2(trunk: nn.Module, x: Tensor) -> Tensor:
    """The trunk up to layer2 (layer3's input): (N, 3, H, W) -> (N, 128, H / 8, W / 8)."""
    return trunk.layer2(trunk.layer1(trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))))


@torch.no_grad()
def trunk_features(
    trunk: nn.Module, images: Tensor | list[str], size: int, batch: int = 64, *,
    upto: str = "layer3", views: int = 2, rows: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """uint8 (N, 3, s, s) -> bfloat16 (N, views, C, g, g): each image (and its mirror if views is
    2) through the trunk up to `upto`: layer3 (C 256, g = size / 16) or layer2 (C 128, size / 8).
    `images` may be the images' paths, with `rows` (then decoded batch by batch: the cache is
    the only thing held in memory); `rows`: only those images, in that order."""
    trunk.eval()
    run, c, stride = (trunk, 256, 16) if upto == "layer3" else (partial(_layer2, trunk), 128, 8)
    g, n = size // stride, len(images) if rows is None else len(rows)
    out = torch.empty((n, views, c, g, g), dtype=torch.bfloat16)
    for i in range(0, n, batch):
        if rows is None:
            part = images[i : i + batch]
        elif isinstance(images, Tensor):
            part = images[rows[i : i + batch]]
        else:
            part = _decode([images[r] for r in rows[i : i + batch].tolist()])
        x = TF.resize(part, [size, size], antialias=True)
        x = normalize(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[i : i + batch, 0] = run(x)
            if views == 2:
                out[i : i + batch, 1] = run(x.flip(-1))
        print(
            f"\r{upto} features {size} px {min(i + batch, n)}/{n}",
            end="", flush=True,
        )  # fmt: skip
    print()
    return out


@torch.no_grad()
def soft_targets(teachers: list[nn.Module], images: Tensor, batch: int = 64) -> Tensor:
    """The teachers' mean softmax (N, K) on the images as they are (224 px)."""
    total = None
    for t in teachers:
        t.eval()
        probs = []
        for i in range(0, len(images), batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                probs.append(t(normalize(images[i : i + batch])).float().softmax(1))
        total = torch.cat(probs) if total is None else total + torch.cat(probs)
        print(f"teacher done ({len(images)} images)", flush=True)
    return total / len(teachers)


def head_logits(model: nn.Module, features: Tensor) -> Tensor:
    """The hybrid from its trunk's output on: (N, 256, h, w) -> logits (N, K)."""
    tokens = model.patch_embed.proj(features).flatten(2).transpose(1, 2)
    tokens = model.norm_pre(model._pos_embed(tokens))
    return model.forward_head(model.norm(model.blocks(tokens)))


class WindowPlaces(NamedTuple):
    """Where each image's training window was taken: the cached scale, plain or mirrored, and
    the window's top-left cell in that scale's layer3 grid."""

    scale: Tensor
    flip: Tensor
    y: Tensor
    x: Tensor


def random_windows(
    scales: list[Tensor], idx: Tensor, gen: torch.Generator
) -> tuple[Tensor, WindowPlaces]:
    """For each image in `idx`: a random scale, then a random 14 x 14 window of its plain or
    mirrored feature grid at that scale. Returns the windows and where they were taken."""
    n, c = len(idx), scales[0].shape[2]
    pick = torch.randint(0, len(scales), (n,), generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen)
    out = torch.empty((n, c, WINDOW, WINDOW), dtype=scales[0].dtype)
    ys, xs = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for i in range(n):
        grid = scales[pick[i]]
        room = grid.shape[-1] - WINDOW + 1
        y, x = torch.randint(0, room, (2,), generator=gen).tolist()
        ys[i], xs[i] = y, x
        out[i] = grid[idx[i], flip[i], :, y : y + WINDOW, x : x + WINDOW]
    return out, WindowPlaces(pick, flip, ys, xs)


def centre_windows(features: Tensor) -> Tensor:
    """The centre 14 x 14 window of the plain grid: what a 256-px resize, 224-px crop sees."""
    off = (features.shape[-1] - WINDOW) // 2
    return features[:, 0, :, off : off + WINDOW, off : off + WINDOW]


@torch.no_grad()
def holdout_top1(model: nn.Module, features: Tensor, labels: Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(features), 256):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = head_logits(model, centre_windows(features[i : i + 256]).float()).argmax(1)
        correct += (pred == labels[i : i + 256]).sum().item()
    return round(100.0 * correct / len(features), 2)


def _lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def tuned_windows(
    layer3: nn.Module, grids: list[Tensor], idx: Tensor, gen: torch.Generator
) -> tuple[Tensor, WindowPlaces]:
    """The second stage's `random_windows`: for each image in `idx` a random scale and view
    (plain or mirrored) of its cached layer2 grid, through layer3 (with gradients), then a random
    14 x 14 window of the layer3 grid: the same crops as the first stage, layer3 now learning."""
    n = len(idx)
    pick = torch.randint(0, len(grids), (n,), generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen)
    corner = torch.rand((n, 2), generator=gen)
    rooms = torch.tensor([grid.shape[-1] // 2 - WINDOW + 1 for grid in grids])[pick]  # layer3: /2
    yx = (corner * rooms[:, None]).long().clamp(max=(rooms - 1)[:, None])
    windows: list[Tensor | None] = [None] * n
    for s, grid in enumerate(grids):
        rows = (pick == s).nonzero().flatten()
        if not len(rows):
            continue
        feats = layer3(grid[idx[rows], flip[rows]].float())  # (k, 256, g, g), g = scale / 16
        for j, r in enumerate(rows.tolist()):
            y, x = yx[r].tolist()
            windows[r] = feats[j, :, y : y + WINDOW, x : x + WINDOW]
    return torch.stack(windows), WindowPlaces(pick, flip, yx[:, 0], yx[:, 1])


@torch.no_grad()
def resnet_head_probs(teacher: nn.Module, windows: Tensor) -> Tensor:
    """The trunk's ResNet from layer3's output on (layer4, pooling, head): softmax (N, K)."""
    teacher.eval()
    pooled = teacher.avgpool(teacher.layer4(windows.float())).flatten(1)
    return teacher.fc(pooled).float().softmax(1)


@torch.no_grad()
def view_teacher_probs(teacher: nn.Module, scales: list[Tensor], batch: int = 256) -> list[Tensor]:
    """Consistent teaching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient
    and consistent"): the trunk's own ResNet (layer4, pooling and head on top of the same frozen
    layer3 features) labels every window a step can draw, so the soft target matches the window
    the student sees. Per scale: softmax (N, plain/mirrored, room, room, K), room = grid - 14 + 1
    (3 x 3 windows at 256 px: about 7 minutes for 8,522 images on 2 cores; more at larger scales).
    """
    teacher.eval()
    out = []
    for grid in scales:
        n, flips, _, g, _ = grid.shape
        room = g - WINDOW + 1
        probs = torch.empty((n, flips, room, room, teacher.fc.out_features))
        for v in range(flips):
            for y in range(room):
                for x in range(room):
                    for i in range(0, n, batch):
                        part = grid[i : i + batch, v, :, y : y + WINDOW, x : x + WINDOW]
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            probs[i : i + batch, v, y, x] = resnet_head_probs(teacher, part)
            print(f"view teacher: scale {g * 16} px, {('plain', 'mirrored')[v]} done", flush=True)
        out.append(probs)
    return out


def soft_target_of(
    targets: Tensor, view_probs: list[Tensor] | None, weight: float
) -> Callable[[Tensor, WindowPlaces], Tensor]:
    """The KL target of a batch: the teachers' mean softmax on the whole image, mixed with
    weight `weight` with the view teacher's softmax on the window drawn (`view_teacher_probs`)."""

    def target(idx: Tensor, places: WindowPlaces) -> Tensor:
        if view_probs is None:
            return targets[idx]
        on_view = torch.empty_like(targets[idx])
        for s, probs in enumerate(view_probs):
            at = places.scale == s
            on_view[at] = probs[idx[at], places.flip[at], places.y[at], places.x[at]]
        return (1 - weight) * targets[idx] + weight * on_view

    return target


MIXUP_ALPHA, CUTMIX_ALPHA = 0.8, 1.0  # DeiT's; a mixed batch is one or the other, evenly
LABEL_SMOOTHING = 0.1


def smoothed_labels(labels: Tensor, classes: int) -> Tensor:
    """The cross-entropy's target for the labels: one-hot with smoothing 0.1, as probabilities."""
    return F.one_hot(labels, classes).float() * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / classes


class Mixing(NamedTuple):
    """How a batch is mixed with its own shuffle: lambda of each image and 1 - lambda of its
    `partner`; `box` (y0, y1, x0, x1) is CutMix's rectangle of cells, None for Mixup."""

    lam: float
    partner: Tensor
    box: tuple[int, int, int, int] | None

    def windows(self, windows: Tensor) -> Tensor:
        other = windows[self.partner]
        if self.box is None:
            return self.lam * windows + (1 - self.lam) * other
        y0, y1, x0, x1 = self.box
        out = windows.clone()
        out[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        return out

    def targets(self, probs: Tensor) -> Tensor:
        return self.lam * probs + (1 - self.lam) * probs[self.partner]


def draw_mixing(n: int, gen: torch.Generator) -> Mixing:
    """Mixup or CutMix (evenly) of n windows of WINDOW x WINDOW cells. CutMix's lambda is the
    share of cells each image keeps once its partner's rectangle is clipped to the window."""
    partner = torch.randperm(n, generator=gen)
    # Python's Beta sampler, seeded from gen: a run repeats with its --seed
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
    if rng.random() < 0.5:
        return Mixing(rng.betavariate(MIXUP_ALPHA, MIXUP_ALPHA), partner, None)
    side = math.sqrt(1 - rng.betavariate(CUTMIX_ALPHA, CUTMIX_ALPHA)) * WINDOW
    cy, cx = rng.uniform(0, WINDOW), rng.uniform(0, WINDOW)
    y0, y1 = max(0, round(cy - side / 2)), min(WINDOW, round(cy + side / 2))
    x0, x1 = max(0, round(cx - side / 2)), min(WINDOW, round(cx + side / 2))
    return Mixing(1 - (y1 - y0) * (x1 - x0) / WINDOW**2, partner, (y0, y1, x0, x1))


class FunctionMatching(NamedTuple):
    """--mix: the chance a batch is mixed, the teachers' whole-image targets (mixed as the
    images are), and the trunk's ResNet that labels each mixed window (None: no view teacher)
    with its weight in the soft target."""

    chance: float
    whole: Tensor
    teacher: nn.Module | None
    weight: float

    def target(self, idx: Tensor, mixing: Mixing, mixed: Tensor) -> Tensor:
        whole = mixing.targets(self.whole[idx])
        if self.teacher is None:
            return whole
        return (1 - self.weight) * whole + self.weight * resnet_head_probs(self.teacher, mixed)


def train_epoch(model, opt, batch_of, args, gen, n: int, steps: tuple) -> dict:
    """One pass over the n training images; `batch_of(idx)` gives the batch's logits (under
    bfloat16 autocast), its labels (or, for a mixed batch, the mixed smoothed labels as
    probabilities; accuracy then counts the larger share) and its soft target, and `steps` is
    (first step, total steps, warm-up steps) of the stage's schedule, each parameter group going
    to its own peak lr. Returns the epoch's history row."""
    model.train()
    model.patch_embed.backbone.eval()  # trunk batch norms keep their statistics (layer3's too)
    order = torch.randperm(n, generator=gen)
    seen = correct = 0
    loss_sum, started = 0.0, time.time()
    step0, total, warmup = steps
    for b, i in enumerate(range(0, len(order), args.batch_size)):
        idx = order[i : i + args.batch_size]
        for group in opt.param_groups:
            group["lr"] = _lr(step0 + b, total, warmup, group["peak_lr"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, labels, target = batch_of(idx)
            logits = logits.float()
        if labels.is_floating_point():  # mixed: smoothed already
            loss = 0.5 * F.cross_entropy(logits, labels)
            labels = labels.argmax(1)
        else:
            loss = 0.5 * F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING)
        loss = loss + 0.5 * F.kl_div(logits.log_softmax(1), target, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(idx)
        correct += (logits.argmax(1) == labels).sum().item()
        loss_sum += loss.item() * len(idx)
    return {"train_loss": round(loss_sum / seen, 4), "train_acc": round(100.0 * correct / seen, 2),
            "seconds": round(time.time() - started, 1)}  # fmt: skip


def _adamw(groups: list[tuple[list[nn.Parameter], float]], weight_decay: float):
    """AdamW over (parameters, peak lr) groups; weight decay on matrices and kernels only."""
    params = []
    for group, peak in groups:
        decay = [p for p in group if p.ndim > 1]
        no_decay = [p for p in group if p.ndim <= 1]
        params += [{"params": decay, "weight_decay": weight_decay, "peak_lr": peak},
                   {"params": no_decay, "weight_decay": 0.0, "peak_lr": peak}]  # fmt: skip
    return torch.optim.AdamW(params, lr=groups[0][1])


def _keep_best(model: nn.Module, row: dict, history: list[dict], best: dict) -> None:
    """Record the epoch's row; keep a copy of the weights if its hold-out top-1 is the best yet."""
    history.append(row)
    print(f"epoch {row['epoch']}: {row}", flush=True)
    if row["holdout_acc"] is not None and row["holdout_acc"] > best["acc"]:
        best["acc"] = row["holdout_acc"]
        best["state"] = {k: v.clone() for k, v in model.state_dict().items()}


def _evaluated(args: argparse.Namespace, epoch: int, last: int) -> bool:
    return epoch % args.eval_every == 0 or epoch == last


def tune_layer3(model, args, paths, keep, held, train_y, held_y, target_of, gen, history, best):
    """The second stage: layer3 and the transformer learn jointly, from the first stage's last
    weights, on cached layer2 features (layer3 + transformer per step). Appends to `history`.
    The images are decoded again from `paths`, batch by batch, so that only the cache (about
    4.5 GB for 8,522 images at 256 px) is held, not the decoded images besides.

    AdamW, not SGD: the transformer was trained with AdamW (a fresh SGD would need another lr
    search for its LayerNorm/attention weights), and Adam's per-parameter step size makes one
    small peak lr per group (--tune-lr, --tune-layer3-lr) a step of about that size for the
    pretrained convolutions too; the moments start afresh, so the schedule warms up for half
    an epoch, then follows a cosine to 0 over the N epochs.
    """
    trunk = model.patch_embed.backbone
    held_l2 = trunk_features(trunk, paths, FEATURE_SIZE, upto="layer2", views=1, rows=held)
    grids = [trunk_features(trunk, paths, s, upto="layer2", rows=keep) for s in _sizes(args)]
    layer3 = trunk.layer3
    for p in layer3.parameters():
        p.requires_grad_(True)
    in_layer3 = {id(p) for p in layer3.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in in_layer3]
    opt = _adamw([(head, args.tune_lr), (list(layer3.parameters()), args.tune_layer3_lr)],
                 args.weight_decay)  # fmt: skip
    steps = math.ceil(len(train_y) / args.batch_size)
    total, warmup = args.tune_layer3_epochs * steps, max(1, steps // 2)
    first, last = args.epochs + 1, args.epochs + args.tune_layer3_epochs
    for epoch in range(first, last + 1):
        windows_of = partial(tuned_windows, layer3, grids)
        row = train_epoch(
            model, opt, partial(_on_windows, model, windows_of, target_of, train_y, gen),
            args, gen, len(train_y), ((epoch - first) * steps, total, warmup),
        )  # fmt: skip
        acc = None
        if _evaluated(args, epoch, last):
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                held_x = torch.cat([layer3(held_l2[i : i + 128, 0].float())
                                    for i in range(0, len(held_l2), 128)])  # fmt: skip
            acc = holdout_top1(model, held_x.to(torch.bfloat16).unsqueeze(1), held_y)
        _keep_best(model, {"epoch": epoch, "stage": 2, **row, "holdout_acc": acc}, history, best)


def _sizes(args: argparse.Namespace) -> list[int]:
    sizes = [int(s) for s in args.scales.split(",")]
    if any(s % 16 or s < HybridShape.img_size for s in sizes):
        raise SystemExit(
            f"--scales: each size must be a multiple of 16, at least 224 (got {sizes})"
        )
    return sizes


def _distillation_text(view_weight: float) -> str:
    whole = "teachers' mean softmax on the 224-px image"
    if not view_weight:
        return f"soft (Hinton): 0.5 CE(label, smoothing 0.1) + 0.5 KL({whole} || student)"
    return (
        f"soft (Hinton): 0.5 CE(label, smoothing 0.1) + 0.5 KL(target || student), the target "
        f"being {1 - view_weight:g} x the {whole} + {view_weight:g} x the trunk's ResNet's softmax "
        f"on the window the student sees (consistent teaching, Beyer et al. 2022)"
    )


def _recipe(args: argparse.Namespace, teachers: list[Path]) -> dict:
    trunk = (
        f"stem and stages 1-2 (frozen) and stage 3 (layer3: frozen, then fine-tuned in a second "
        f"stage), from {args.trunk.name}"
        if args.tune_layer3_epochs
        else f"stem and stages 1-3 (frozen, from {args.trunk.name})"
    )
    recipe = {
        "command": "python -m models.train_hybrid",
        "network": f"{HYBRID_NAME}: ResNet-18 + CBAM {trunk}, 1x1 projection to "
        f"{HybridShape.embed_dim} channels, class token, {args.depth} timm ViT "
        f"blocks ({HybridShape.num_heads} heads), linear head",
        "trunk": args.trunk.name,
        "teachers": [t.name for t in teachers],
        "distillation": _distillation_text(args.view_teacher_weight),
        "augmentation": f"random scale of the image ({args.scales} px), random 224-px crop at "
        "16-px steps (a 14 x 14 window of its feature grid) + horizontal flip",
        "scales": [int(s) for s in args.scales.split(",")],
        "optimizer": "AdamW betas (0.9, 0.999), cosine after 1 epoch of linear warm-up",
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "drop_path_rate": args.drop_path, "depth": args.depth,
        "holdout": args.holdout, "holdout_seed": args.seed, "eval_every": args.eval_every,
        "bf16": True, "img_size": HybridShape.img_size,
    }  # fmt: skip
    if args.view_teacher_weight:  # absent otherwise: earlier recipes' records are unchanged
        recipe["view_teacher_weight"] = args.view_teacher_weight
    if args.mix:  # absent otherwise: earlier recipes' records are unchanged
        recipe["mix"] = {
            "chance": args.mix, "mixup_alpha": MIXUP_ALPHA, "cutmix_alpha": CUTMIX_ALPHA,
            "switch": "Mixup or CutMix, evenly, one per batch, with its own shuffle",
            "where": "the cached layer3 windows (feature space), first stage only",
            "targets": "label cross-entropy and the teachers' whole-image target mixed by lambda"
            + (f"; the soft target {1 - args.view_teacher_weight:g} x that mixed target + "
               f"{args.view_teacher_weight:g} x the trunk's ResNet's softmax on the mixed window "
               "itself (function matching, Beyer et al. 2022)"
               if args.view_teacher_weight else ""),
        }  # fmt: skip
    if args.tune_layer3_epochs:  # absent otherwise: the one-stage recipe's record is unchanged
        recipe["tune_layer3"] = {
            "epochs": args.tune_layer3_epochs, "lr": args.tune_lr, "layer3_lr": args.tune_layer3_lr,
            "optimizer": "AdamW betas (0.9, 0.999), fresh moments, cosine after half an epoch of "
            "linear warm-up",
            "weight_decay": args.weight_decay,
            "unfrozen": "the trunk's layer3 (convolutions, CBAM gates, batch-norm scales and "
            "shifts; batch norms in eval mode, their running statistics frozen) and the whole "
            "transformer; stem, layer1 and layer2 frozen",
            "cached": "the trunk's layer2 output (layer3's input), each image and its mirror",
            "start": "the first stage's last weights",
        }  # fmt: skip
    return recipe


def _hybrid(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """A new hybrid with the trunk's checkpoint copied in (layer4 and fc dropped), frozen."""
    trunk_ckpt = load_checkpoint(args.trunk)
    model = build_hybrid(num_classes, depth=args.depth, drop_path_rate=args.drop_path)
    trunk_state = {
        k: v for k, v in trunk_ckpt.model.state_dict().items() if not k.startswith(("layer4", "fc"))
    }
    model.patch_embed.backbone.load_state_dict(trunk_state)
    for p in model.patch_embed.backbone.parameters():
        p.requires_grad_(False)
    return model


def _view_teacher(args: argparse.Namespace, classes: list[str]) -> nn.Module | None:
    """The trunk's ResNet, which labels the student's windows (--view-teacher-weight), checked
    before any feature is computed; None without that option."""
    if not args.view_teacher_weight:
        return None
    trunk = load_checkpoint(args.trunk)
    if trunk.class_names != classes:
        raise SystemExit(
            f"--view-teacher-weight: {args.trunk.name} was trained on other classes "
            f"({len(trunk.class_names)}) than the data's ({len(classes)}): its head cannot "
            "label the student's windows"
        )
    return trunk.model


def _on_windows(model, windows_of, target_of, labels, gen, idx, matching=None):
    """The batch's logits, labels and soft target, on windows from `windows_of(idx, gen)`;
    with `matching` (--mix), the batch is mixed with that chance (labels: mixed
    probabilities)."""
    windows, places = windows_of(idx, gen)
    if matching is None or float(torch.rand((), generator=gen)) >= matching.chance:
        return head_logits(model, windows.float()), labels[idx], target_of(idx, places)
    mixing = draw_mixing(len(idx), gen)
    mixed = mixing.windows(windows.float())
    logits = head_logits(model, mixed)
    label_probs = mixing.targets(smoothed_labels(labels[idx], logits.shape[1]))
    return logits, label_probs, matching.target(idx, mixing, mixed)


def first_stage(model, args, train_scales, held_x, train_y, held_y, target_of, gen, history, best,
                matching: FunctionMatching | None = None):  # fmt: skip
    """The transformer alone (trunk frozen) on the cached layer3 features (mixed with --mix)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw([(trainable, args.lr)], args.weight_decay)
    steps = math.ceil(len(train_y) / args.batch_size)
    warmup = len(train_y) // args.batch_size  # one epoch (rounded down, as it always was)
    for epoch in range(1, args.epochs + 1):
        windows_of = partial(random_windows, train_scales)
        row = train_epoch(
            model, opt, partial(_on_windows, model, windows_of, target_of, train_y, gen,
                                matching=matching),
            args, gen, len(train_y), ((epoch - 1) * steps, args.epochs * steps, warmup),
        )  # fmt: skip
        evaluated = _evaluated(args, epoch, args.epochs)
        acc = holdout_top1(model, held_x, held_y) if evaluated else None
        _keep_best(model, {"epoch": epoch, **row, "holdout_acc": acc}, history, best)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    teachers = args.teacher or [args.trunk]
    images, labels, folders, paths = load_split(args.data / "train", 224, "train")
    classes = read_class_names(args.class_names, folders)
    view_teacher = _view_teacher(args, classes)
    if args.limit:
        images, labels, paths = images[: args.limit], labels[: args.limit], paths[: args.limit]
    keep, held = holdout_split(labels, args.holdout, args.seed)
    model = _hybrid(args, len(classes))
    started = time.time()
    sizes = _sizes(args)
    trunk = model.patch_embed.backbone
    held_x = trunk_features(trunk, images[held], FEATURE_SIZE)
    train_scales = [trunk_features(trunk, images[keep], s) for s in sizes]
    targets = soft_targets([load_checkpoint(t).model for t in teachers], images[keep])
    # the view teacher's table labels unmixed windows: none when every first-stage batch is
    # mixed and no second stage follows
    tabled = view_teacher is not None and (args.mix < 1 or args.tune_layer3_epochs)
    view_probs = view_teacher_probs(view_teacher, train_scales) if tabled else None
    target_of = soft_target_of(targets, view_probs, args.view_teacher_weight)
    train_y, held_y = labels[keep], labels[held]
    del images  # the second stage decodes them again (from `paths`) for its layer2 cache
    history: list[dict] = []
    best: dict = {"acc": -1.0, "state": None}
    matching = None
    if args.mix:
        matching = FunctionMatching(args.mix, targets, view_teacher, args.view_teacher_weight)
    first_stage(model, args, train_scales, held_x, train_y, held_y, target_of, gen, history, best,
                matching)  # fmt: skip
    if args.tune_layer3_epochs:
        del train_scales, held_x  # layer3's cache gives way to layer2's
        tune_layer3(model, args, paths, keep, held, train_y, held_y, target_of, gen, history, best)
    chosen = max(
        (r for r in history if r["holdout_acc"] is not None), key=lambda r: r["holdout_acc"]
    )
    model.load_state_dict(best["state"])
    return _finish(
        args, model, classes, history, chosen["epoch"], teachers, len(keep), len(held), started
    )


def _finish(args, model, classes, history, chosen_epoch, teachers, n_train, n_held, started) -> int:
    from models.checkpoints.architectures import ForeignArch, attention_kind

    model.eval()
    arch = ForeignArch(HYBRID_NAME, "attention-lens", len(classes), attention_kind(model),
                       hybrid_options(args.depth))  # fmt: skip
    preprocess = Preprocess(256, HybridShape.img_size, IMAGENET_MEAN, IMAGENET_STD)
    metadata = {
        "name": f"ResNet-18 + CBAM + ViT hybrid ({args.dataset_name})",
        "dataset": args.dataset_name,
        "training": {
            "selection": {
                "split": "holdout",
                "fraction": args.holdout,
                "seed": args.seed,
                "stratified": True,
                "images": n_held,
                "train_images": n_train,
                "note": "carved from train/; val/ scored once, after training",
                "epoch": chosen_epoch,
                **({"layer3_tuned": chosen_epoch > args.epochs} if args.tune_layer3_epochs else {}),
            },  # fmt: skip
            "recipe": _recipe(args, teachers),
            "history": history,
            "date": dt.date.today().isoformat(),
            "torch": torch.__version__,
            "wall_seconds": None,
        },
    }
    save = dict(class_names=classes, preprocess=preprocess, arch=arch, dtype=torch.float16)
    save_checkpoint(args.out, model, metadata=metadata, **save)
    top1, n = evaluate_checkpoint(args.out, args.data / "val")
    metadata["training"]["wall_seconds"] = round(time.time() - started)
    metadata["accuracy"] = {
        "top1": round(top1, 2), "split": "val", "images": n, "test_size": HybridShape.img_size,
        "resize": 256, "selected_on": "holdout",
        "measured_on": "stored weights after save/load, float32, checkpoint preprocessing",
        "by_test_size_holdout": {str(HybridShape.img_size): max(r["holdout_acc"] or 0 for r in history)},
    }  # fmt: skip
    sha = save_checkpoint(args.out, model, metadata=metadata, **save)
    print(f"wrote {args.out} (top-1 {top1:.2f}% on {n} val images, sha256 {sha})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
