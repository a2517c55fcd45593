"""The checkpoints shipped with Attention Lens: list them and read their metadata without loading weights.

The folder is the repository's `checkpoints/` unless the environment variable
`ATTENTION_LENS_CHECKPOINTS` names another one (the app's tests point it at small generated
checkpoints).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from models.checkpoints.checkpoint import METADATA_KEY
from models.checkpoints.shipped import CHECKPOINT_DIR_ENV, checkpoint_dir, embedded_path
from models.errors import one_line

__all__ = [
    "CHECKPOINT_DIR_ENV",
    "EmbeddedCheckpoint",
    "checkpoint_dir",
    "default_checkpoint",
    "embedded_checkpoints",
    "embedded_path",
]

_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class EmbeddedCheckpoint:
    """One `*.safetensors` file of the checkpoint folder, described from its header only.

    Attributes:
        path: the file.
        size: bytes on disk.
        mtime: modification time (seconds), so callers can tell a rewritten file.
        metadata: the Attention Lens metadata (arch, class names, training, ...); {} if none.
        error: why the header could not be read, or None.
    """

    path: Path
    size: int
    mtime: float
    metadata: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def attention(self) -> str | None:
        arch = self.metadata.get("arch")
        return arch.get("attention") if isinstance(arch, dict) else None

    @property
    def label(self) -> str:
        """A short display name: the metadata's name, else the architecture, plus the file."""
        name = self.metadata.get("name")
        arch = self.metadata.get("arch")
        if not name and isinstance(arch, dict) and "depth" in arch:
            extra = f" + {str(arch['attention']).upper()}" if arch.get("attention") else ""
            name = f"ResNet-{arch['depth']}{extra}"
        name = one_line(name) if name else ""  # text from a file
        return f"{name} ({self.path.name})" if name else self.path.name


def _read_metadata(path: Path) -> dict:
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("file is too short to be safetensors")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= _MAX_HEADER:
            raise ValueError("not a safetensors file (bad header length)")
        header = json.loads(fh.read(length))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    extra = header.get("__metadata__") or {}
    raw = extra.get(METADATA_KEY) if isinstance(extra, dict) else None
    if raw is not None and not isinstance(raw, str):
        raise ValueError("the metadata is not text")
    meta = json.loads(raw) if raw else {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta


def embedded_checkpoints(folder: str | os.PathLike | None = None) -> list[EmbeddedCheckpoint]:
    """Every `*.safetensors` in `folder` (default `checkpoint_dir()`), sorted by file name.

    Hidden files (the temporary files of an atomic write) are skipped. A file whose header
    cannot be read is listed with `error` set rather than dropped, so a user can see why.
    """
    root = Path(folder) if folder is not None else checkpoint_dir()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("*.safetensors")):
        if path.name.startswith(".") or not path.is_file():
            continue
        stat = path.stat()
        try:
            meta, error = _read_metadata(path), None
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            text = " ".join(str(exc).split())[:160]
            meta, error = {}, f"{path.name}: unreadable header ({text})"
        found.append(EmbeddedCheckpoint(path, stat.st_size, stat.st_mtime, meta, error))
    return found


def default_checkpoint(entries: list[EmbeddedCheckpoint]) -> EmbeddedCheckpoint | None:
    """The one to open first: a CBAM model if there is one, else the first readable entry."""
    usable = [e for e in entries if e.error is None]
    for entry in usable:
        if entry.attention == "cbam":
            return entry
    return usable[0] if usable else None
