"""Where the shipped (embedded) checkpoints live, and how a name finds one from any folder.

The folder is the package's `checkpoints/` (beside `models/`, in a checkout and in an installed
copy alike) unless `ATTENTION_LENS_CHECKPOINTS` names another one (the app's tests point it at
small generated checkpoints).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKPOINT_DIR_ENV", "checkpoint_dir", "embedded_path"]

CHECKPOINT_DIR_ENV = "ATTENTION_LENS_CHECKPOINTS"
_PACKAGE_CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def checkpoint_dir() -> Path:
    """The folder of embedded checkpoints: `$ATTENTION_LENS_CHECKPOINTS` or `checkpoints/`."""
    env = os.environ.get(CHECKPOINT_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else _PACKAGE_CHECKPOINTS


def embedded_path(name: str) -> Path | None:
    """The embedded checkpoint called `name` ("resnet18_cbam_imagenette", with or without
    ".safetensors"), or None: how a name given from any folder finds the shipped file."""
    if not name or any(sep in name for sep in ("/", "\\")) or name.startswith("."):
        return None
    stem = name.removesuffix(".safetensors")
    path = checkpoint_dir() / f"{stem}.safetensors"
    return path if path.is_file() else None
