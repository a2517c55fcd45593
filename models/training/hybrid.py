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

A seeded, stratified 10% of train/ is held out: the epoch shipped is the one with the best
hold-out top-1; val/ is scored once, at the end, through the checkpoint's own preprocessing.
Cost on 2 CPU cores (bfloat16 autocast): features and teachers about 15 minutes, an epoch of
the transformer (6 blocks) about 3 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from models.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from models.networks.hybrid import HYBRID_NAME, HybridShape, build_hybrid
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
    p.add_argument("--limit", type=int, default=0, help="use only N training images (smoke tests)")
    p.add_argument("--dataset-name", default="imagenette2")
    p.add_argument("--class-names", default="checkpoints/imagenette_classes.txt")
    return p.parse_args(argv)


@torch.no_grad()
def trunk_features(trunk: nn.Module, images: Tensor, size: int, batch: int = 64) -> Tensor:
    """uint8 (N, 3, s, s) -> bfloat16 (N, 2, 256, g, g), g = size / 16: each image and its mirror."""
    trunk.eval()
    out = torch.empty((len(images), 2, 256, size // 16, size // 16), dtype=torch.bfloat16)
    for i in range(0, len(images), batch):
        x = TF.resize(images[i : i + batch], [size, size], antialias=True)
        x = normalize(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[i : i + batch, 0] = trunk(x)
            out[i : i + batch, 1] = trunk(x.flip(-1))
        print(
            f"\rfeatures {size} px {min(i + batch, len(images))}/{len(images)}", end="", flush=True
        )
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


def random_windows(scales: list[Tensor], idx: Tensor, gen: torch.Generator) -> Tensor:
    """For each image in `idx`: a random scale, then a random 14 x 14 window of its plain or
    mirrored feature grid at that scale."""
    n, c = len(idx), scales[0].shape[2]
    pick = torch.randint(0, len(scales), (n,), generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen)
    out = torch.empty((n, c, WINDOW, WINDOW), dtype=scales[0].dtype)
    for i in range(n):
        grid = scales[pick[i]]
        room = grid.shape[-1] - WINDOW + 1
        y, x = torch.randint(0, room, (2,), generator=gen).tolist()
        out[i] = grid[idx[i], flip[i], :, y : y + WINDOW, x : x + WINDOW]
    return out


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


def train_epoch(model, opt, scales, labels, targets, args, gen, step0: int, total: int) -> dict:
    """One pass over the training features (one grid per scale); returns the epoch's history row."""
    model.train()
    model.patch_embed.backbone.eval()  # frozen trunk: its batch norms keep their statistics
    order = torch.randperm(len(labels), generator=gen)
    seen = correct = 0
    loss_sum, started = 0.0, time.time()
    warmup = len(labels) // args.batch_size
    for b, i in enumerate(range(0, len(order), args.batch_size)):
        idx = order[i : i + args.batch_size]
        for group in opt.param_groups:
            group["lr"] = _lr(step0 + b, total, warmup, args.lr)
        x = random_windows(scales, idx, gen).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head_logits(model, x).float()
        log_p = logits.log_softmax(1)
        loss = 0.5 * F.cross_entropy(logits, labels[idx], label_smoothing=0.1)
        loss = loss + 0.5 * F.kl_div(log_p, targets[idx], reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(idx)
        correct += (logits.argmax(1) == labels[idx]).sum().item()
        loss_sum += loss.item() * len(idx)
    return {"train_loss": round(loss_sum / seen, 4), "train_acc": round(100.0 * correct / seen, 2),
            "seconds": round(time.time() - started, 1)}  # fmt: skip


def _recipe(args: argparse.Namespace, teachers: list[Path]) -> dict:
    return {
        "command": "python -m models.train_hybrid",
        "network": f"{HYBRID_NAME}: ResNet-18 + CBAM stem and stages 1-3 (frozen, from "
        f"{args.trunk.name}), 1x1 projection to {HybridShape.embed_dim} channels, class token, "
        f"{args.depth} timm ViT blocks ({HybridShape.num_heads} heads), linear head",
        "trunk": args.trunk.name,
        "teachers": [t.name for t in teachers],
        "distillation": "soft (Hinton): 0.5 CE(label, smoothing 0.1) + 0.5 KL(teachers' mean "
        "softmax on the 224-px image || student)",
        "augmentation": f"random scale of the image ({args.scales} px), random 224-px crop at "
        "16-px steps (a 14 x 14 window of its feature grid) + horizontal flip",
        "scales": [int(s) for s in args.scales.split(",")],
        "optimizer": "AdamW betas (0.9, 0.999), cosine after 1 epoch of linear warm-up",
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "drop_path_rate": args.drop_path, "depth": args.depth,
        "holdout": args.holdout, "holdout_seed": args.seed, "eval_every": args.eval_every,
        "bf16": True, "img_size": HybridShape.img_size,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    teachers = args.teacher or [args.trunk]
    images, labels, folders, _ = load_split(args.data / "train", 224, "train")
    classes = read_class_names(args.class_names, folders)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    keep, held = holdout_split(labels, args.holdout, args.seed)
    trunk_ckpt = load_checkpoint(args.trunk)
    model = build_hybrid(len(classes), depth=args.depth, drop_path_rate=args.drop_path)
    trunk_state = {
        k: v for k, v in trunk_ckpt.model.state_dict().items() if not k.startswith(("layer4", "fc"))
    }
    model.patch_embed.backbone.load_state_dict(trunk_state)
    for p in model.patch_embed.backbone.parameters():
        p.requires_grad_(False)
    started = time.time()
    sizes = [int(s) for s in args.scales.split(",")]
    if any(s % 16 or s < HybridShape.img_size for s in sizes):
        raise SystemExit(
            f"--scales: each size must be a multiple of 16, at least 224 (got {sizes})"
        )
    trunk = model.patch_embed.backbone
    held_x = trunk_features(trunk, images[held], FEATURE_SIZE)
    train_scales = [trunk_features(trunk, images[keep], s) for s in sizes]
    targets = soft_targets([load_checkpoint(t).model for t in teachers], images[keep])
    train_y, held_y = labels[keep], labels[held]
    del images
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)  # fmt: skip
    steps = math.ceil(len(train_y) / args.batch_size)
    history, best, best_state = [], -1.0, None
    for epoch in range(1, args.epochs + 1):
        row = train_epoch(model, opt, train_scales, train_y, targets, args, gen, (epoch - 1) * steps,
                          args.epochs * steps)  # fmt: skip
        evaluated = epoch % args.eval_every == 0 or epoch == args.epochs
        row = {
            "epoch": epoch,
            **row,
            "holdout_acc": holdout_top1(model, held_x, held_y) if evaluated else None,
        }
        history.append(row)
        print(f"epoch {epoch}: {row}", flush=True)
        if row["holdout_acc"] is not None and row["holdout_acc"] > best:
            best, best_state = (
                row["holdout_acc"],
                {k: v.clone() for k, v in model.state_dict().items()},
            )
    chosen = max(
        (r for r in history if r["holdout_acc"] is not None), key=lambda r: r["holdout_acc"]
    )
    model.load_state_dict(best_state)
    return _finish(
        args, model, classes, history, chosen["epoch"], teachers, len(keep), len(held), started
    )


def _finish(args, model, classes, history, chosen_epoch, teachers, n_train, n_held, started) -> int:
    from models.checkpoints.architectures import ForeignArch, attention_kind

    model.eval()
    arch = ForeignArch(HYBRID_NAME, "attention-lens", len(classes), attention_kind(model))
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
