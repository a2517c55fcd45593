"""The training loop: epochs, steps, the optimiser and its learning-rate schedule."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from models.distributed import Ranks
from models.networks.students import adamw_groups
from models.training.augment import StrongAugment
from models.training.data import input_norm, normalize
from models.training.distill import Teachers, distillation_loss, inference_logits
from models.training.evaluation import eval_sizes
from models.training.resume import resume_state, save_state

__all__ = ["lr_at", "memory_format", "StepExtras", "step_extras", "run_epochs"]


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


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def memory_format(args: argparse.Namespace) -> torch.memory_format:
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


@dataclass
class StepExtras:
    """What a step needs besides the network: teachers and strong augmentation (or None)."""

    teachers: Teachers | None = None
    strong: StrongAugment | None = None


def step_extras(args: argparse.Namespace, n_classes: int, teachers: Teachers | None) -> StepExtras:
    strong = None
    if args.augment == "strong":
        strong = StrongAugment(
            n_classes, *input_norm(args), policy=args.auto_augment, mixup=args.mixup,
            cutmix=args.cutmix, erase=args.erase,
        )  # fmt: skip
    return StepExtras(teachers, strong)


def run_epochs(
    args, model, data, device, state_path: Path, ranks: Ranks, teachers=None
) -> tuple[list[dict], dict | None]:
    """Every epoch from the first not done: train, validate when due, save the state.

    Returns the history and, with --keep-best, the evaluated epoch with the best top-1 on the
    selection split: {"epoch", "acc", "model" (its weights on the CPU)}, else None."""
    opt = _optimizer(model, args)
    steps = data.n_train // args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch, history, best = (
        resume_state(args, model, opt, gen, state_path, ranks) if args.resume else (0, [], None)
    )
    extras = step_extras(args, len(data.classes), teachers)
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
            save_state(state_path, model, opt, gen, epoch + 1, history, best)
    return history, best


def _train_epoch(
    args, net, opt, data, gen, epoch: int, steps: int, device, ranks: Ranks, extras: StepExtras
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
    return x.contiguous(memory_format=memory_format(args)), target


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
