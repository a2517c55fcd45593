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
for build options, `models.networks.students`), normalised as its pretrained config says.
`--teacher CHECKPOINT` (repeatable) adds DeiT's hard distillation (`models.training.distill`);
`--optimizer adamw` and `--augment strong` (`models.training.augment`: TrivialAugmentWide or RandAugment,
random erasing, MixUp/CutMix) give DeiT's recipe. A distilled student's checkpoint gives the
mean of its two heads, as timm does at inference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.checkpoints.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from models.distributed import Ranks, start_distributed, stop_distributed
from models.networks.attention import ATTENTION
from models.networks.resnet import Arch
from models.networks.students import student_spec
from models.training.augment import POLICIES
from models.training.distill import Teachers
from models.training.run import fail, train

__all__ = ["parse_args", "ARCH_DEFAULTS", "resolve_arch", "main"]

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
    """basic: random-resized crop and flip; strong: DeiT's recipe on top (models.training.augment)."""
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            return fail(f"{args.data / split} is not a folder (need train/ and val/)")
    init = None
    if args.init is not None:
        try:  # before the data: a bad --init fails in a second, not after decoding
            init = load_checkpoint(args.init)
        except CheckpointError as exc:
            return fail(f"--init {args.init}: {exc}")
        if not isinstance(init.arch, Arch):
            return fail(
                f"--init {args.init}: a {init.arch.label}; training continues only our "
                "ResNets (with SE, BAM or CBAM) for now"
            )
    conflict = resolve_arch(args, init)
    if conflict:
        return fail(conflict)
    try:  # before the data, as --init
        teachers = Teachers.load(args.teacher) if args.teacher else None
    except CheckpointError as exc:
        return fail(str(exc))
    ranks = start_distributed(args.device)
    try:
        problem = _check_options(args, ranks)
        if problem:
            return fail(problem)
        return train(args, init, ranks, teachers)
    finally:
        stop_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
