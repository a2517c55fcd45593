"""Write the model card `checkpoints/README.md` from the embedded checkpoints' own metadata.

    python -m models.card [--folder checkpoints] [--out checkpoints/README.md]

The card is generated, so its numbers (accuracy, recipe, sha256) are always those of the files.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .zoo import EmbeddedCheckpoint, checkpoint_dir, embedded_checkpoints

__all__ = ["model_card", "main"]

_INTRO = """# Embedded checkpoints

ResNet-18 plain, + SE, + BAM and + CBAM, trained from scratch by Attention Lens on
Imagenette v2 (fast.ai's 10-class ImageNet subset, Apache-2.0; 9,469 training and 3,439
validation images, 224 px copy), all with the same recipe so the four are comparable.
They ship with the project so the app and the tests work offline. Weights are stored in
float16 (loading gives float32); each accuracy below was measured on the stored weights after a
save/load round trip, through the checkpoint's own preprocessing, on the full validation split.
The test resolution was chosen among 128/160/192/224 px on that same split (a mild selection).

**Status:** the project's goal is at least 85% top-1 for each; after 18 epochs from scratch some
of the checkpoints below fall short of it by a few points (longer training is the obvious next
step), and a model of the four that is not listed below has not been trained yet. Each recipe line says
whether training used bfloat16 autocast (on machines that support it) or float32; the recipe is
otherwise identical.

This file is generated from the checkpoints' metadata: `python -m models.card`.
Retrain one with the command under it: about 18 x 4 minutes on 2 AVX2 CPU cores in float32
(`--no-bf16 --eval-every 3`), much less with a GPU or a CPU with AMX/AVX512-BF16.
"""

_OFFICIAL = """## Adding the official ImageNet checkpoints

Attention Lens cannot download weights. Get them yourself from the official BAM/CBAM release
(github.com/Jongchan/attention-module): `RESNET50_CBAM_new_name_wrap.pth` (ResNet-50 + CBAM,
top-1 77.622) and `RESNET50_IMAGENET_BAM_best.pth.tar` (ResNet-50 + BAM, top-1 76.860). Then
either open them in the app (upload, or type the server path), or in Python:

```python
from models import load_checkpoint
ckpt = load_checkpoint("RESNET50_CBAM_new_name_wrap.pth")   # format "official"
```

They are read safely (tensors only), get the 1000 ImageNet class names and the official
validation preprocessing (resize 256, centre crop 224). To make one appear in the app's list of
embedded models, convert it once:

```python
from models import load_checkpoint, save_checkpoint
c = load_checkpoint("RESNET50_CBAM_new_name_wrap.pth")
save_checkpoint("checkpoints/resnet50_cbam_imagenet.safetensors", c.model,
                class_names=c.class_names, preprocess=c.preprocess,
                metadata={"name": "ResNet-50 + CBAM (official, ImageNet)"})
```

timm SE-ResNets (`seresnet18`, `seresnet50`, ...) load the same way from their state dict
(`torch.save(timm_model.state_dict(), "seresnet50.pth")`), since our SE keys are timm's.
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _section(entry: EmbeddedCheckpoint) -> str:
    meta = entry.metadata
    arch = meta.get("arch", {})
    acc = meta.get("accuracy", {})
    training = meta.get("training", {})
    recipe = training.get("recipe", {})
    history = training.get("history", [])
    attention = arch.get("attention") or "none"
    lines = [
        f"## {entry.path.name}",
        "",
        f"- Model: {meta.get('name', entry.label)}; ResNet-{arch.get('depth')}, attention "
        f"`{attention}`, `{arch.get('stem')}` stem, {arch.get('num_classes')} classes"
        + (f", BAM fusion `{arch.get('bam_fusion')}`" if attention == "bam" else ""),
        f"- Data: {meta.get('dataset', '?')}; classes: {', '.join(meta.get('class_names', []))}",
        f"- **Top-1: {acc.get('top1', '?')}%** on {acc.get('images', '?')} {acc.get('split', '?')} "
        f"images at {acc.get('test_size', '?')} px ({acc.get('measured_on', '')})",
        f"- Recipe: {recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}, "
        f"{recipe.get('optimizer')}, peak lr {recipe.get('lr')}, weight decay "
        f"{recipe.get('weight_decay')}, label smoothing {recipe.get('label_smoothing')}, "
        f"{recipe.get('augmentation')} at {recipe.get('img_size')} px, seed {recipe.get('seed')}, "
        f"bfloat16 autocast {recipe.get('bf16')}",
        f"- Trained: {training.get('date', '?')} with torch {training.get('torch', '?')}"
        + (f"; last epoch train loss {history[-1]['train_loss']}" if history else ""),
        f"- Size: {entry.size / 2**20:.1f} MiB; sha256 `{_sha256(entry.path)}`",
        "- Command: `python -m models.train --data imagenette2-224 --depth 18 "
        f"--attention {attention} --epochs {recipe.get('epochs')} --dataset-name imagenette2-224 "
        + ("" if recipe.get("bf16", True) else "--no-bf16 ")
        + f"--class-names checkpoints/imagenette_classes.txt --out checkpoints/{entry.path.name}`",
        "",
    ]
    return "\n".join(lines)


def model_card(folder: Path | None = None) -> str:
    """The markdown model card for every checkpoint in `folder`."""
    entries = [e for e in embedded_checkpoints(folder) if e.error is None and e.metadata]
    summary = ["| checkpoint | attention | top-1 (val) | test size |", "|---|---|---:|---:|"]
    for e in entries:
        acc = e.metadata.get("accuracy", {})
        summary.append(
            f"| `{e.path.name}` | {e.attention or 'none'} | {acc.get('top1', '?')}% | "
            f"{acc.get('test_size', '?')} px |"
        )
    body = "\n".join(_section(e) for e in entries)
    return "\n".join([_INTRO, *summary, "", body, _OFFICIAL])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.card", description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=None, help="checkpoint folder")
    p.add_argument("--out", type=Path, default=None, help="default: <folder>/README.md")
    args = p.parse_args(argv)
    folder = args.folder or checkpoint_dir()
    out = args.out or folder / "README.md"
    atomic_write_bytes(out, model_card(folder).encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
