"""Deterministic export: figures as PNG/PDF/SVG bytes, raw maps as .npz, a manifest, zip bundles.

The same input gives byte-identical files: PDF fonts are embedded as TrueType (Type 42) and SVG
keeps text as text; no file carries a date or the matplotlib version (PNG `Software`, PDF
`Producer`/`Creator`, SVG `Creator` are fixed, PDF `CreationDate` and SVG `Date` left out, SVG
ids salted with a fixed string); archives use a fixed timestamp and sorted members; the manifest
is JSON with sorted keys and no timestamps.

    files = image_bundle(path_or_image, checkpoint, figures=("overview", "gradcam"),
                         formats=("png", "pdf"))
    zip_bundle(files)        # one deterministic .zip, e.g. for a download button

`python -m viz export` (see `viz.commands.cli`) writes the same files into a folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import zipfile
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from models.checkpoints.checkpoint import Checkpoint, atomic_write_bytes
from models.images import ImageSource, load_image
from viz.engine.cam import Analysis
from viz.figures import STYLE_LOCK, figure_width
from viz.figures.registry import (
    FIGURES,
    IMAGE_FIGURES,
    SCALES,
    ExportError,
    FigureSettings,
    draw_image_figure,
    scales_drawn,
)
from viz.text import safe_name

__all__ = [
    "FigureSettings",
    "SCALES",
    "FORMATS",
    "FIGURES",
    "IMAGE_FIGURES",
    "ExportError",
    "figure_bytes",
    "write_atomic",
    "write_files",
    "prepare_output",
    "analysis_arrays",
    "npz_bytes",
    "zip_bundle",
    "package_versions",
    "checkpoint_info",
    "result_info",
    "build_manifest",
    "manifest_bytes",
    "render_image",
    "image_bundle",
    "export_options",
]

FORMATS = ("png", "pdf", "svg")
MANIFEST_VERSION = 1
SOFTWARE = "Attention Lens"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold
_PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "matplotlib": "matplotlib",
    "numpy": "numpy",
    "captum": "captum",
    "pillow": "pillow",
}
_SAVE_RC = {
    "pdf.fonttype": 42,  # TrueType embedded: text stays editable and searchable
    "ps.fonttype": 42,
    "svg.fonttype": "none",  # text as <text>, not paths
    "svg.hashsalt": "attention-lens",  # fixed ids in SVG
    "pdf.compression": 6,
}
_METADATA = {
    "png": {"Software": SOFTWARE},
    "pdf": {"Creator": SOFTWARE, "Producer": SOFTWARE, "CreationDate": None},
    "svg": {"Creator": SOFTWARE, "Date": None},
}
# --- figures and files ------------------------------------------------------------------------


def figure_bytes(fig: Figure, fmt: str, *, dpi: int = 300) -> bytes:
    """Render `fig` to PNG, PDF or SVG bytes, the same bytes for the same figure.

    Args:
        fig: a matplotlib Figure (e.g. from `viz.figures`).
        fmt: "png", "pdf" or "svg".
        dpi: resolution of raster output (PNG, and images inside PDF/SVG); recorded in the PNG.

    Global rcParams are left as they were (`matplotlib.rc_context`, under the figures' lock).
    """
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 10 <= dpi <= 2400:
        raise ExportError(f"dpi must be an integer from 10 to 2400, got {dpi!r}")
    buf = io.BytesIO()
    with STYLE_LOCK, matplotlib.rc_context(_SAVE_RC):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=_METADATA[fmt], facecolor="white")
    return buf.getvalue()


def deletion_insertion_csv(results: Mapping[str, Any], index: int = 0) -> bytes:
    """Deletion/insertion curves of several maps as CSV: one row per fraction of pixels.

    Columns: `fraction`, then `<map> deletion` and `<map> insertion` per map (P(target)).
    """
    import csv

    labels = list(results)
    if not labels:
        raise ExportError("no deletion/insertion results to write")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fraction"] + [f"{m} {c}" for m in labels for c in ("deletion", "insertion")])
    fractions = results[labels[0]].fractions
    for step, fraction in enumerate(fractions.tolist()):
        row = [f"{fraction:.6f}"]
        for m in labels:
            res = results[m]
            row += [f"{float(res.deletion_curve[index, step]):.6f}",
                    f"{float(res.insertion_curve[index, step]):.6f}"]  # fmt: skip
        writer.writerow(row)
    return buf.getvalue().encode("utf-8")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: never a half-written file."""
    atomic_write_bytes(Path(path), data)


def _relative(name: str) -> PurePosixPath:
    """`name` as a relative path whose every part is already a safe name."""
    path = PurePosixPath(name)
    if not path.parts or path.is_absolute() or any(part != safe_name(part) for part in path.parts):
        raise ExportError(f"unsafe file name in bundle: {name!r}")
    return path


def prepare_output(folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Create the output folder; refuse one that exists and holds files unless `overwrite`.

    With `overwrite`, files of the same name are replaced; other files are left alone.
    """
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ExportError(f"output {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(
            f"output folder {str(path)!r} is not empty; choose another or pass --overwrite"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(
            f"cannot create output folder {str(path)!r}: {exc.strerror or exc}"
        ) from None
    return path


def write_files(folder: str | os.PathLike, files: Mapping[str, bytes]) -> list[str]:
    """Write bundle `files` (relative POSIX name -> bytes) under `folder`, each atomically.

    Returns:
        The names written, sorted.

    Raises:
        ExportError: a name is absolute, holds `..` or anything `safe_name` would change.
    """
    root = Path(folder)
    names = sorted(files)
    for name in names:
        _relative(name)
    for name in names:
        write_atomic(_inside(root, _relative(name).parts), files[name])
    return names


def _inside(root: Path, parts: tuple[str, ...]) -> Path:
    """root/parts, refusing any symbolic link on the way: nothing is written outside `root`.

    A link in place of the file itself is replaced (the rename does not follow it); a link in
    place of a folder would lead elsewhere, so it is an error.
    """
    path = root
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink():
            raise ExportError(f"{str(path)!r} is a symbolic link; refusing to write through it")
        if path.exists() and not path.is_dir():
            raise ExportError(f"{str(path)!r} is in the way of a folder")
    target = path / parts[-1]
    if target.is_dir() and not target.is_symlink():
        raise ExportError(f"{str(target)!r} is a folder in the way of a file")
    return target


# --- raw maps and archives --------------------------------------------------------------------


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def analysis_arrays(analysis: Analysis, index: int = 0) -> dict[str, np.ndarray]:
    """Every raw map of image `index`, batch dimension dropped, values as recorded.

    Keys and shapes:
        `score`: () float32, the explained score; for a class of class logits `logits`,
        `probs`: (K,) float32 and `target`: () int64; for a mask or box target `outline`:
        the mask (H, W) or the boxes (K, 4) it scores.
        `cam/<layer>`: (h, w) Grad-CAM at the layer's resolution (ReLU applied, not normalised).
        `attention/<module>/channel`: (C,); CBAM M_c and SE weights after the sigmoid, BAM M_c
        before it. `attention/<module>/spatial`: (H, W); CBAM M_s after the sigmoid, BAM M_s
        before it (absent for SE). `attention/<module>/gate`, `feature_in`, `feature_out`:
        (H, W) channel means of the 3-D gate, |F| and |F'|.
    """
    n = analysis.batch_size
    if not -n <= index < n:
        raise IndexError(f"index {index} is out of range for a batch of {n} images")
    one = analysis.select(index % n)
    arrays: dict[str, np.ndarray] = {"score": np.asarray(float(one.scores[0]), dtype=np.float32)}
    if one.explains_classes:
        arrays |= {
            "logits": _np(one.logits[0]).astype(np.float32),
            "probs": _np(one.probs[0]).astype(np.float32),
            "target": np.asarray(int(one.target[0]), dtype=np.int64),
        }
    if one.outlines and one.outlines[0] is not None:
        arrays["outline"] = _np(one.outlines[0]).astype(np.float32)
    for layer, cam in one.cams.items():
        arrays[f"cam/{layer}"] = _np(cam[0]).astype(np.float32)
    for rec in one.trace:
        parts = {"channel": rec.channel, "spatial": rec.spatial, "gate": rec.gate,
                 "feature_in": rec.feature_in, "feature_out": rec.feature_out}  # fmt: skip
        for part, value in parts.items():
            if value is not None:
                arrays[f"attention/{rec.name}/{part}"] = _np(value[0]).astype(np.float32)
    return arrays


def _zip(members: Mapping[str, bytes]) -> bytes:
    """A zip of `members` in name order, fixed dates and permissions: same input, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, members[name], compresslevel=6)
    return buf.getvalue()


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A compressed .npz (readable by `numpy.load`, no pickles) with deterministic bytes."""
    members = {}
    for key, value in arrays.items():
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.asarray(value, order="C"), allow_pickle=False)
        members[f"{key}.npy"] = buf.getvalue()
    return _zip(members)


def zip_bundle(files: Mapping[str, bytes], *, root: str | None = None) -> bytes:
    """One deterministic .zip of bundle `files` (e.g. from `image_bundle`), under `root/` if given."""
    prefix = f"{safe_name(root)}/" if root else ""
    for name in files:
        _relative(name)
    return _zip({prefix + name: data for name, data in files.items()})


# --- manifest ---------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages that shape the output (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in _PACKAGES.items():
        try:
            versions[key] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def checkpoint_info(checkpoint: Checkpoint, path: str | os.PathLike | None = None) -> dict:
    """What the manifest records of a checkpoint: path, sha256, architecture, format, label."""
    return {
        "path": None if path is None else str(path),
        "sha256": checkpoint.sha256,
        "arch": checkpoint.arch.to_dict(),
        "format": checkpoint.format,
        "label": checkpoint.label,
    }


def result_info(analysis: Analysis, class_names: Sequence[str], index: int = 0) -> dict:
    """Target, prediction (class indices, names, softmax scores) and the CAM method and layers;
    for a target that is not a class, what was explained and its score."""
    cam = {
        "cam_method": analysis.method,
        "cam_smoothing": list(analysis.smoothing),
        "cam_layers": list(analysis.cams),
        "cam_stages": {k: int(v) for k, v in analysis.cam_stages.items()},
    }
    if not analysis.explains_classes:
        score = float(analysis.scores[index])
        return {"explained": analysis.explained, "score": None if score != score else score, **cam}
    probs = analysis.probs[index]
    target, predicted = int(analysis.target[index]), int(probs.argmax())

    def name(i: int) -> str:
        return class_names[i] if i < len(class_names) else f"class {i}"

    return {
        "target": target,
        "target_name": name(target),
        "P": float(probs[target]),
        "predicted": predicted,
        "predicted_name": name(predicted),
        "predicted_P": float(probs[predicted]),
        **cam,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def build_manifest(
    *,
    checkpoints: Sequence[dict],
    images: Sequence[dict],
    options: Mapping[str, Any],
    results: Sequence[dict] = (),
    failures: Sequence[dict] = (),
    notes: Sequence[str] = (),
    files: Mapping[str, bytes] | None = None,
    tool: str = "attention-lens export",
) -> dict:
    """The manifest of an export: inputs with their hashes, options, versions, outcomes, files.

    `files` (name -> bytes) is recorded as name -> sha256. Nothing time-dependent is recorded.
    """
    return {
        "tool": tool,
        "manifest_version": MANIFEST_VERSION,
        "checkpoints": list(checkpoints),
        "images": list(images),
        "options": dict(options),
        "versions": package_versions(),
        "results": list(results),
        "failures": list(failures),
        "notes": list(notes),
        "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted((files or {}).items())},
    }


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """JSON with sorted keys and a final newline (non-finite floats become null)."""
    text = json.dumps(
        _jsonable(manifest), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False
    )
    return (text + "\n").encode("utf-8")


# --- one image, one model ---------------------------------------------------------------------


def _check_options(figures: Sequence[str], formats: Sequence[str], width: str | float) -> None:
    unknown = [f for f in figures if f not in IMAGE_FIGURES]
    if unknown:
        raise ExportError(
            f"unknown per-image figures {unknown}; choose from {', '.join(IMAGE_FIGURES)}"
        )
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"formats must be among {', '.join(FORMATS)}, got {list(formats)}")
    try:
        figure_width(width)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def render_image(
    image: Image.Image,
    checkpoint: Checkpoint,
    analysis: Analysis,
    *,
    figures: Sequence[str] = ("overview",),
    formats: Sequence[str] = ("png",),
    settings: FigureSettings | None = None,
) -> tuple[dict[str, bytes], list[str]]:
    """Figures and raw maps of one image analysed by one model.

    Args:
        image: the image as loaded (it is cropped with the checkpoint's own `Preprocess`).
        analysis: of this image (batch of one), e.g. `viz.interactive.analyze_images`.
        figures: among `IMAGE_FIGURES`.
        settings: colour map, opacity, scale, width and dpi (default `FigureSettings()`).

    Returns:
        (files, notes): files `<figure>.<format>` and `maps.npz`; notes say which figures were
        skipped because the model cannot show them (bam-hierarchy without BAM, channels
        without channel weights).
    """
    s = settings or FigureSettings()
    _check_options(figures, formats, s.width)
    # the photo under the maps at the original's resolution (not the enlarged network input)
    crop = checkpoint.preprocess.display_crop(image)
    files: dict[str, bytes] = {}
    notes: list[str] = []
    for name in figures:
        reason = FIGURES[name].unavailable(analysis)
        if reason is not None:
            notes.append(f"{name} skipped for {checkpoint.label}: {reason}")
            continue
        fig = draw_image_figure(name, crop, analysis, checkpoint.class_names, s)
        for fmt in formats:
            files[f"{name}.{fmt}"] = figure_bytes(fig, fmt, dpi=s.dpi)
    files["maps.npz"] = npz_bytes(analysis_arrays(analysis))
    return files, notes


def _image_input(image: Image.Image | ImageSource) -> tuple[Image.Image, dict]:
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
        return rgb, {"sha256": digest, "sha256_of": "pixels"}
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes() if Path(image).is_file() else None
        if data is None:
            return load_image(image), {}  # raises ImageError naming the file
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        data = image.read()
    return load_image(data), {"sha256": hashlib.sha256(data).hexdigest(), "sha256_of": "file"}


def image_bundle(
    image: Image.Image | ImageSource,
    checkpoint: Checkpoint,
    *,
    name: str = "image",
    figures: Sequence[str] = ("overview",),
    formats: Sequence[str] = ("png",),
    settings: FigureSettings | None = None,
    target: int | None = None,
    analysis: Analysis | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    manifest: bool = True,
) -> dict[str, bytes]:
    """Everything exported for one image and one model, in memory (for the app's download).

    Args:
        image: a PIL image, or a path / bytes / binary file (then its sha256 is the file's).
        checkpoint: the model.
        name: the image's name in the manifest.
        figures: among `IMAGE_FIGURES`; formats: among `FORMATS`.
        settings: method, layers, colour map, opacity, scale, width, dpi — the same object
            that drew the screen, recorded in the manifest.
        target: class to explain (None: the top-1 prediction).
        analysis: reuse an analysis of this image (batch of one) instead of computing it; it
            must have been computed with `settings.method` and `settings.layers`.
        checkpoint_path: recorded in the manifest.
        manifest: add `manifest.json`.

    Returns:
        File name -> bytes: `<figure>.<format>`, `maps.npz` and `manifest.json`; give it to
        `zip_bundle` for one archive. The same inputs give the same bytes.

    Raises:
        ExportError: unknown figure or format, or an analysis made with other settings;
        models.images.ImageError: unreadable image; ValueError: target outside the classes.
    """
    from viz.interactive import analyze_images

    s = settings or FigureSettings()
    _check_options(figures, formats, s.width)
    pil, digest = _image_input(image)
    if analysis is None:
        analysis = analyze_images(checkpoint, [pil], target, method=s.method, layers=s.layers,
                                  smoothing=s.smoothing, options=s.method_options())  # fmt: skip
    elif (
        analysis.method != s.method
        or tuple(analysis.smoothing) != tuple(s.smoothing)
        or (s.layers is not None and list(analysis.cams) != list(s.layers))
    ):
        raise ExportError(
            "the analysis was made with another CAM method or layers than the settings"
        )
    files, notes = render_image(
        pil, checkpoint, analysis, figures=figures, formats=formats, settings=s
    )
    if manifest:
        info = build_manifest(
            checkpoints=[checkpoint_info(checkpoint, checkpoint_path)],
            images=[{"name": name, **digest}],
            options=export_options(figures, formats, s, target),
            results=[
                {
                    "checkpoint": checkpoint.label,
                    "image": name,
                    **result_info(analysis, checkpoint.class_names),
                }
            ],
            notes=notes,
            files=files,
        )
        files["manifest.json"] = manifest_bytes(info)
    return files


def export_options(
    figures: Sequence[str],
    formats: Sequence[str],
    settings: FigureSettings,
    target: object,
    **extra: Any,
) -> dict:
    """The options recorded in a manifest (what, with which settings, each figure's scale)."""
    return {
        "figures": list(figures),
        "formats": list(formats),
        "target": target,
        **settings.to_dict(),
        "scale_drawn": scales_drawn(figures, settings.scale),
        **extra,
    }
