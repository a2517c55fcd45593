"""What the command line, the data-set report and the app read from the user, checked.

Image files and folders, labels CSVs, class names or indices, checkpoints, integer options:
each bad input is one `UsageError` line (exit status 2 on the command line, `st.error` in the
app). Nothing here imports the command line, so every front end can use it.
"""

from __future__ import annotations

import argparse
import csv
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from models.images import IMAGE_EXTENSIONS, REFUSED_IMAGE_EXTENSIONS

__all__ = [
    "UsageError",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_FILE_BYTES",
    "collect_images",
    "unique_names",
    "class_index",
    "resolve_target",
    "regular_file",
    "read_labels",
    "parse_labels",
    "label_of",
    "load_checkpoints",
    "check_method",
    "methods_by_checkpoint",
    "unread_attention_lines",
    "FALLBACK_METHOD",
    "int_in",
    "error_line",
]

IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS + REFUSED_IMAGE_EXTENSIONS)  # what folder walks collect


class UsageError(Exception):
    """A problem with the command line or its inputs: exit status 2."""


def collect_images(paths: Sequence[str]) -> tuple[list[tuple[Path, str]], list[Path]]:
    """Image files named by `paths` (files, or folders searched recursively) and the folders.

    Returns:
        ([(file, output name)], folders): files in command-line order, each folder's files
        sorted; names are unique, safe, and keep the folder structure (`cat/01.jpg` -> `cat_01`).

    Raises:
        UsageError: a path does not exist, or nothing was found.
    """
    from viz.text import safe_name

    found: list[tuple[Path, str]] = []
    folders: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            folders.append(path)
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )  # fmt: skip
            found += [(p, safe_name(str(p.relative_to(path).with_suffix("")))) for p in files]
        elif path.is_file():
            found.append((path, safe_name(path.stem)))
        else:
            raise UsageError(f"no such image file or folder: {raw}")
    return [
        (path, name) for path, name in zip((p for p, _ in found), unique_names(n for _, n in found))
    ], folders


def unique_names(names) -> list[str]:
    """`names` made unique (`x`, `x-2`, ...), never taking a name another input has, also on
    case-insensitive file systems: each input gets its own output folder."""
    names = list(names)
    originals = {n.casefold() for n in names}
    used: set[str] = set()
    out = []
    for name in names:
        candidate, count = name, 1
        while candidate.casefold() in used or (
            candidate != name and candidate.casefold() in originals
        ):
            count += 1
            candidate = f"{name}-{count}"
        used.add(candidate.casefold())
        out.append(candidate)
    return out


def class_index(name: str, class_names: Sequence[str]) -> int | None:
    """The index of `name` among `class_names` (case-insensitive, first match), or None."""
    lowered = [n.casefold() for n in class_names]
    key = name.casefold()
    return lowered.index(key) if key in lowered else None


def resolve_target(
    value: str | None, class_names: Sequence[str], option: str = "--target"
) -> int | None:
    """A class given as a name (case-insensitive) or an index -> index; None stays None.

    `option` names where the value came from, for the error message.
    """
    if value is None:
        return None
    by_name = class_index(value.strip(), class_names)
    if by_name is not None:
        return by_name
    try:
        index = int(value)
    except ValueError:
        shown = ", ".join(class_names[:5]) + (", ..." if len(class_names) > 5 else "")
        raise UsageError(
            f"{option} {value!r} is not a class name or index (classes: {shown})"
        ) from None
    if not 0 <= index < len(class_names):
        raise UsageError(f"{option} {index} is out of range 0..{len(class_names) - 1}")
    return index


def regular_file(path: str | Path, what: str, limit: int) -> int:
    """The size of `path`, a regular file of at most `limit` bytes, else a `UsageError`.

    A FIFO or device would block the run forever; a huge (or sparse) file would fill memory.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} {path}: not a regular file")
    if info.st_size > limit:
        raise UsageError(f"{what} {path}: {info.st_size / 2**20:.0f} MB, over {limit // 2**20} MB")
    return info.st_size


MAX_IMAGE_FILE_BYTES = 256 * 2**20


def read_labels(path: str) -> dict[str, str]:
    """A CSV with columns `file` and `label` (a class name or index) -> {file: label}.

    Raises:
        UsageError: unreadable file, missing columns, an empty cell, or a file listed twice
            with different labels.
    """
    regular_file(path, "--labels", limit=50 * 2**20)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--labels {path}: cannot read it ({exc})") from None
    return parse_labels(text, f"--labels {path}")


def parse_labels(text: str, source: str = "labels") -> dict[str, str]:
    """The text of a labels CSV (columns `file`, `label`) -> {file: label}; see `read_labels`.

    `source` names the file in error messages (one line each).
    """
    try:
        reader = csv.DictReader(text.splitlines())
        rows = list(reader)
        columns = reader.fieldnames or []
    except csv.Error as exc:
        raise UsageError(f"{source}: cannot read it ({exc})") from None
    if not {"file", "label"} <= set(columns):
        raise UsageError(f"{source}: needs the columns file,label (has: {columns})")
    labels: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        file, label = (row["file"] or "").strip(), (row["label"] or "").strip()
        if not file or not label:
            raise UsageError(f"{source}: line {line} has an empty file or label")
        if labels.get(file, label) != label:
            raise UsageError(f"{source}: {file} is listed with two labels")
        labels[file] = label
    return labels


def label_of(image: Path, labels: dict[str, str]) -> str | None:
    """The label of `image`, whose CSV row names it by file name or by the end of its path."""
    parts = image.as_posix().split("/")
    for start in range(len(parts) - 1, -1, -1):  # "1.png", then "church/1.png", ...
        label = labels.get("/".join(parts[start:]))
        if label is not None:
            return label
    return None


def load_checkpoints(paths: Sequence[str]) -> list[tuple[str, str, object]]:
    from models.checkpoints.checkpoint import CheckpointError, load_checkpoint
    from viz.text import safe_name

    loaded = []
    for raw in paths:
        try:
            ckpt = load_checkpoint(raw)
        except CheckpointError as exc:
            raise UsageError(f"checkpoint {raw}: {exc}") from None
        loaded.append((raw, safe_name(Path(raw).stem, default="checkpoint"), ckpt))
    names = unique_names(name for _, name, _ in loaded)
    return [(raw, name, ckpt) for (raw, _, ckpt), name in zip(loaded, names)]


def check_method(method: str, checkpoints: Sequence[tuple[str, str, object]]) -> None:
    """--method applies to every model: refused once, before any image is analysed."""
    from viz.engine.cam import CAM_METHODS
    from viz.interactive import methods_for

    for raw, _, ckpt in checkpoints:
        if method not in methods_for(ckpt.model):
            why = (
                "needs a vision transformer's self-attention"
                if CAM_METHODS[method].reads_attention
                else "does not apply to a transformer"
            )
            raise UsageError(f"--method {method} ({CAM_METHODS[method].label}) {why}: {raw}")


FALLBACK_METHOD = "gradcam"
"""What a CNN shows beside a vision transformer under rollout, GAE or LeGrad (as in the app)."""


def methods_by_checkpoint(
    method: str, checkpoints: Sequence[tuple[str, str, object]]
) -> tuple[dict[str, str], str | None]:
    """The CAM method of each model (by name) and a one-line note when some differ.

    A whole-network transformer method (rollout, GAE, LeGrad) with a CNN beside a vision
    transformer: the CNNs fall back to Grad-CAM, as the app's comparison does, and the note
    says which. Refused as `check_method` does (`UsageError`) when no model takes the method or
    a CNN-only method meets a transformer.
    """
    from viz.engine.cam import CAM_METHODS
    from viz.interactive import methods_for

    spec = CAM_METHODS[method]
    takes = {name: method in methods_for(ckpt.model) for _, name, ckpt in checkpoints}
    if not spec.reads_attention or not any(takes.values()) or all(takes.values()):
        check_method(method, checkpoints)
        return {name: method for name in takes}, None
    others = [name for name, ok in takes.items() if not ok]
    fallback = CAM_METHODS[FALLBACK_METHOD].label
    note = (
        f"--method {method} ({spec.label}) needs a vision transformer's self-attention: "
        f"{', '.join(others)} show{'s' if len(others) == 1 else ''} {fallback} instead"
    )
    return {name: method if ok else FALLBACK_METHOD for name, ok in takes.items()}, note


def unread_attention_lines(checkpoints: Sequence[tuple[str, str, object]]) -> list[str]:
    """One line per model whose attention modules no probe reads (`viz.engine.unread`): the
    commands print them once, as warnings, before any image is analysed."""
    from viz.engine.unread import unread_attention_line

    lines = []
    for raw, _, ckpt in checkpoints:
        line = unread_attention_line(ckpt.model)
        if line is not None:
            lines.append(f"{raw}: {line}")
    return lines


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """--method, --layers and --num-samples, the same in `export` and `report`."""
    from viz.engine.cam import CAM_METHODS

    parser.add_argument("--method", default="gradcam", type=_cam_method, metavar="METHOD",
                        help=f"CAM method: {', '.join(CAM_METHODS)} (default: gradcam)")  # fmt: skip
    last = ", ".join(name for name, m in CAM_METHODS.items() if m.default_layers == "last")
    parser.add_argument("--layers", default=None, metavar="LIST",
                        help="comma list of CAM layers (default: each network's stage layers; "
                             f"the last for {last})")  # fmt: skip
    noisy = ", ".join(f"{name} ({m.samples})" for name, m in CAM_METHODS.items() if m.samples)
    parser.add_argument("--num-samples", type=int_in("--num-samples", 1, 10**6), metavar="N",
                        help=f"noisy copies per channel or image of {noisy}")  # fmt: skip


def _cam_method(text: str) -> str:
    """An argparse type: a CAM method's name; a typo gets the nearest names."""
    import difflib

    from viz.engine.cam import CAM_METHODS

    if text in CAM_METHODS:
        return text
    near = difflib.get_close_matches(text, CAM_METHODS, n=2)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise argparse.ArgumentTypeError(
        f"unknown CAM method {text!r}; {hint}choose from {', '.join(CAM_METHODS)}"
    )


def layer_list(text: str | None) -> tuple[str, ...] | None:
    """--layers "layer3, layer4" as names; None when not given (the method's default)."""
    names = tuple(x.strip() for x in (text or "").split(",") if x.strip())
    return names or None


def check_layers(checkpoints: Sequence[tuple[str, str, object]], layers: Sequence[str],
                 method: str = "gradcam") -> None:  # fmt: skip
    """Every --layers name exists in every model, before any image is analysed. CAM needs
    global pooling and a linear layer right after its layer: for it the layers are tried on a
    blank image (a forward per model), so a wrong layer is one line, not an error per image."""
    from PIL import Image

    from viz.engine.cam import analyze, resolve_layers

    for raw, _, ckpt in checkpoints:
        try:
            resolve_layers(ckpt.model, layers)
            if method == "cam":
                blank = ckpt.preprocess.batch([Image.new("RGB", (256, 256), (128, 128, 128))])
                analyze(ckpt.model, blank, 0, list(layers), method="cam")
        except ValueError as exc:
            raise UsageError(f"--layers for {raw}: {exc}") from None


def int_in(what: str, low: int, high: int):
    """An argparse type: an integer from `low` to `high`, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be from {low} to {high}, got {value}")
        return value

    return parse


def error_line(error: BaseException) -> str:
    """An exception as one line: a user's error as its message, anything else with its type."""
    from models.errors import CheckpointError
    from models.images import ImageError

    text = " ".join(str(error).split()) or type(error).__name__
    known = isinstance(
        error, (UsageError, CheckpointError, ImageError, ValueError, FileNotFoundError)
    )
    return text if known else f"{type(error).__name__}: {text}"
