"""What a checkpoint records about its training: the recipe, the selection split, its name."""

from __future__ import annotations

import argparse

from models.distributed import Ranks
from models.training.distill import Teachers
from models.training.loop import step_extras

__all__ = ["RECIPE_OPTIONS", "selection_record", "training_recipe", "model_name"]

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


def training_recipe(args, ranks: Ranks, teachers: Teachers | None) -> dict:
    """The training recipe recorded in the checkpoint (the model card rebuilds commands)."""
    schedule = ("cosine after linear warm-up" if args.schedule == "cosine"
                else f"x0.1 every {args.step_epochs} epochs after linear warm-up")  # fmt: skip
    optimizer = (
        "AdamW betas (0.9, 0.999), " if args.optimizer == "adamw"
        else f"SGD {'nesterov ' if args.nesterov else ''}momentum 0.9, "
    )  # fmt: skip
    augmentation = "random-resized crop + horizontal flip"
    extras = step_extras(args, 2, None)
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


def model_name(args, attention: str | None) -> str:
    dataset = args.dataset_name or args.data.name
    if args.student is not None:
        return (
            f"timm {args.student.name}" + (" (distilled)" if args.teacher else "") + f" ({dataset})"
        )
    return (
        f"ResNet-{args.depth}" + (f" + {attention.upper()}" if attention else "") + f" ({dataset})"
    )
