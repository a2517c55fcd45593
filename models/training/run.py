"""One training run, start to end: data, network, epochs, then the checkpoint and its record."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

import torch

from models.checkpoints.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from models.distributed import Ranks, say
from models.networks.resnet import build_model
from models.preprocess import Preprocess
from models.training.batches import CachedData, StreamData
from models.training.data import eval_geometry, input_norm, read_class_names
from models.training.distill import Teachers, set_distilled_training
from models.training.evaluation import eval_sizes, evaluate_checkpoint
from models.training.loop import memory_format, run_epochs
from models.training.recipe import model_name, selection_record, training_recipe
from models.training.resume import init_record, start_from

__all__ = ["fail", "train"]


def fail(message: str) -> int:
    """Say `message` on stderr; the exit status of a refused run."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def train(
    args: argparse.Namespace, init: Checkpoint | None, ranks: Ranks, teachers: Teachers | None
) -> int:
    state_path = args.out.with_name(args.out.name + ".state.pt")
    # the same command, run again after it finished, must not start over and overwrite it
    finished = args.resume and ranks.main and args.out.exists() and not state_path.is_file()
    if ranks.broadcast(finished):
        return fail(f"--resume: {args.out} is finished (no {state_path.name} to continue)")
    torch.manual_seed(args.seed)
    attention = None if args.attention == "none" else args.attention
    device = (
        torch.device("cuda", ranks.local_rank) if args.device == "cuda" else torch.device("cpu")
    )
    data = StreamData(args, ranks) if args.data_loading == "stream" else CachedData(args, ranks)
    if data.val_classes != data.classes:
        return fail("train/ and val/ have different class folders")
    class_names = read_class_names(args.class_names, data.classes)
    problem = teachers.check_classes(class_names) if teachers is not None else None
    if problem:
        return fail(problem)
    say(ranks, (
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
            return fail(str(exc))
        say(ranks, (
            f"starting from {args.init} ({init.label}; classifier "
            f"{'kept' if keep_classifier else 'new, class count differs'})"
        ))  # fmt: skip
    model = model.to(device, memory_format=memory_format(args))
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if teachers is not None:
        teachers.to(device)
    history, best = run_epochs(args, model, data, device, state_path, ranks, teachers)
    if not ranks.main:
        return 0
    if args.sync_bn:
        model = _plain_batchnorm(model)
    model = model.cpu()
    chosen = len(history)
    if args.keep_best and best is not None:
        model.load_state_dict(best["model"])
        chosen = best["epoch"]
        say(ranks, f"keeping epoch {chosen} ({data.select_split} top-1 {best['acc']:.2f}%)")
    return _finish(args, init, keep_classifier, model, data, class_names, history, state_path,
                   attention, ranks, teachers, chosen)  # fmt: skip


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
        "name": model_name(args, attention),
        "dataset": args.dataset_name or str(args.data.name),
        "training": {
            "selection": selection_record(args, select_split, data.n_train, data.n_select)
            | ({"epoch": chosen_epoch} if args.keep_best else {}),
            "recipe": training_recipe(args, ranks, teachers),
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
