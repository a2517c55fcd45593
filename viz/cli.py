"""Command line: `python -m viz export` writes paper figures, raw maps and a manifest in batch.

Exit status: 0 everything exported; 1 some inputs failed (the rest exported, each failure named
on stderr and in the manifest); 2 usage error (bad option, unreadable checkpoint, missing path,
output folder not empty without --overwrite).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cam import stage_layers
from .export import ExportError, FigureSettings
from .inputs import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_FILE_BYTES,
    UsageError,
    class_index,
    collect_images,
    int_in,
    label_of,
    load_checkpoints,
    parse_labels,
    read_labels,
    regular_file,
    resolve_target,
    unique_names,
)
from .maps import DEFAULT_CMAP

__all__ = [
    "main",
    "build_parser",
    "GRID_COLUMNS",
    # re-exported from viz.inputs, where they live
    "collect_images",
    "resolve_target",
    "read_labels",
    "parse_labels",
    "label_of",
    "class_index",
    "load_checkpoints",
    "int_in",
    "unique_names",
    "UsageError",
    "IMAGE_SUFFIXES",
]

GRID_COLUMNS = 6  # images per model-grid figure; more images make more figures

_DESCRIPTION = """\
Export paper-ready figures of what the attention modules (SE, BAM, CBAM) of ResNet checkpoints
do on a set of images, with the raw maps and a manifest, reproducibly (same inputs, same bytes).
"""

_EPILOG = """\
figures (--figure, repeatable; default: overview):
%(figures)s
  model-grid: all checkpoints together, at most %(cols)d images per figure; each column is titled
  with the first checkpoint's target class (the image's own class with --labels, as in the
  paper), every row explains that class and prints its softmax score P under each map.
  bam-hierarchy: BAM checkpoints only (others are skipped with a note). class-stats: needs
  --images folders in ImageFolder layout (one subfolder per class).

output layout (OUT):
  OUT/<checkpoint>/<image>/<figure>.<format>   per image and checkpoint
  OUT/<checkpoint>/<image>/maps.npz            raw attention maps, CAMs, logits, probs, target
  OUT/<checkpoint>/class-stats-<folder>.<format> and .npz
  OUT/model-grid[-NN].<format>
  OUT/manifest.json       checkpoints (path, sha256, arch, format), images (sha256), options,
                          package versions, results, failures, notes, sha256 of every file

exit status: 0 all exported; 1 some inputs failed (the others exported; failures on stderr and
in the manifest); 2 usage error (bad option, unreadable checkpoint, missing path, output folder
not empty without --overwrite).

example:
  python -m viz export --checkpoint checkpoints/resnet50_cbam.safetensors \\
      --checkpoint checkpoints/resnet50.safetensors --images samples/ --out figures/ \\
      --figure overview --figure model-grid --format png,pdf --width double
"""


def _image_targets(args, images, checkpoints) -> dict[str, dict[str, int | None]]:
    """{image name: {checkpoint name: class to explain}}: --target for all, or --labels each."""
    if not args.labels:
        fixed = {
            name: resolve_target(args.target, ckpt.class_names) for _, name, ckpt in checkpoints
        }
        return {image_name: fixed for _, image_name in images}
    labels = read_labels(args.labels)
    targets = {}
    for path, image_name in images:
        label = label_of(path, labels)
        if label is None:
            raise UsageError(f"--labels {args.labels} has no row for {path}")
        targets[image_name] = {
            name: resolve_target(label, ckpt.class_names, f"--labels: {path.name}'s label")
            for _, name, ckpt in checkpoints
        }
    return targets


def _formats(text: str) -> list[str]:
    from .export import FORMATS

    items = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"formats must be a comma list of {', '.join(FORMATS)}, got {text!r}"
        )
    return list(dict.fromkeys(items))


def _width(text: str) -> str | float:
    from .figures import figure_width

    value: str | float = text
    try:
        value = float(text)
    except ValueError:
        pass
    try:
        figure_width(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


_dpi = int_in("dpi", 10, 2400)
_jobs = int_in("jobs", 1, 64)


def _figure_lines() -> str:
    """The figure table (`viz.figures.table.FIGURES`) as --help lines."""
    import textwrap

    from .figures.table import FIGURES

    lines = []
    for name, spec in FIGURES.items():
        text = textwrap.wrap(spec.help, 78)
        lines.append(f"  {name:<14} {text[0]}")
        lines += [f"  {'':<14} {more}" for more in text[1:]]
    return "\n".join(lines).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    from .export import FIGURES

    parser = argparse.ArgumentParser(
        prog="python -m viz", description="Attention Lens command line."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    export = commands.add_parser(
        "export",
        help="export paper figures, raw maps and a manifest",
        description=_DESCRIPTION,
        epilog=_EPILOG % {"cols": GRID_COLUMNS, "figures": _figure_lines()},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help="checkpoint file (.safetensors, .pth, ...); repeat for several models")  # fmt: skip
    export.add_argument("--images", nargs="+", required=True, metavar="PATH",
                        help="image files or folders (searched recursively for image files)")  # fmt: skip
    export.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    export.add_argument("--figure", action="extend", nargs="+", choices=FIGURES, metavar="FIGURE",
                        help=f"figures to make: {', '.join(FIGURES)} (default: overview)")  # fmt: skip
    export.add_argument("--format", type=_formats, default=["png"], metavar="LIST",
                        help="comma list of png, pdf, svg (default: png)")  # fmt: skip
    export.add_argument("--dpi", type=_dpi, default=300, help="raster resolution (default: 300)")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--target", metavar="CLASS",
                       help="class to explain, by name or index (default: each model's top-1)")  # fmt: skip
    which.add_argument("--labels", metavar="CSV",
                       help="explain each image's own class: a CSV with columns file,label "
                            "(file name or end of its path; class name or index)")  # fmt: skip
    export.add_argument("--width", type=_width, default="double", metavar="WIDTH",
                        help="figure width: single (3.3 in), double (6.9 in) or inches (default: double)")  # fmt: skip
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder, replacing files of the same name")  # fmt: skip
    export.add_argument("--method", default="gradcam", metavar="METHOD",
                        help="CAM method: gradcam, gradcam++, hirescam, xgradcam, layercam "
                             "(default: gradcam)")  # fmt: skip
    export.add_argument("--layers", default=None, metavar="LIST",
                        help="comma list of CAM layers (default: each network's stage layers)")  # fmt: skip
    export.add_argument("--cmap", default=DEFAULT_CMAP, metavar="NAME",
                        help=f"colour map of the maps (default: {DEFAULT_CMAP})")  # fmt: skip
    export.add_argument("--alpha", type=float, default=0.5,
                        help="opacity of the maps over the image, 0..1 (default: 0.5)")  # fmt: skip
    export.add_argument("--scale", choices=["shared", "per-map"], default="shared",
                        help="overview and class-stats: one colour scale with real values, or "
                             "each map's own min-max (default: shared). gradcam and model-grid "
                             "always scale each CAM to its own min-max; the manifest records "
                             "each figure's scale (scale_drawn)")  # fmt: skip
    export.add_argument("--render", choices=["smooth", "cells"], default="smooth",
                        help="maps enlarged smoothly (bilinear), or as cells with the grid drawn, "
                             "the resolution the network computed at (default: smooth)")  # fmt: skip
    export.add_argument("--jobs", type=_jobs, default=os.cpu_count() or 1, metavar="N",
                        help="worker processes for images (default: all cores; 1: no workers)")  # fmt: skip
    export.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="your own code registering architectures and attention probes "
                             "(a .py file or a module name; repeatable; trusted code)")  # fmt: skip
    from .report_command import add_report_parser

    add_report_parser(commands)
    return parser


# --- the export run ---------------------------------------------------------------------------


@dataclass
class _Run:
    """What one export run has done so far."""

    out: Path
    files: dict[str, bytes] = field(default_factory=dict)  # relative name -> bytes written
    failures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)

    def write(self, prefix: str, files: dict[str, bytes]) -> None:
        from .export import write_files

        named = {f"{prefix}/{k}" if prefix else k: v for k, v in files.items()}
        try:
            write_files(self.out, named)
        except (OSError, ExportError) as exc:  # only this is "cannot write the output"
            raise OutputError(exc) from exc
        self.files.update(named)

    def fail(
        self, step: str, what: str, error: BaseException, checkpoint: str | None = None
    ) -> None:
        """Record and print (one line) that `step` failed for input `what`."""
        message = _one_line(error)
        self.failures.append(
            {"step": step, "input": what, "checkpoint": checkpoint, "error": message}
        )
        where = f" ({step}, {checkpoint})" if checkpoint else f" ({step})"
        _say(f"error: {what}{where}: {message}")

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            _say(f"note: {text}")


def _say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _one_line(error: BaseException) -> str:
    from .inputs import error_line

    return " ".join(str(error).split()) if isinstance(error, OutputError) else error_line(error)


def _row_labels(checkpoints) -> list[str]:
    labels = [ckpt.label for _, _, ckpt in checkpoints]
    return [
        f"{lab} ({name})" if labels.count(lab) > 1 else lab
        for lab, (_, name, _) in zip(labels, checkpoints)
    ]


def _export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .export import (
        IMAGE_FIGURES,
        build_manifest,
        checkpoint_info,
        export_options,
        manifest_bytes,
        prepare_output,
    )

    figures = list(dict.fromkeys(args.figure or ["overview"]))
    formats, dpi, width = args.format, args.dpi, args.width
    layers = tuple(x.strip() for x in args.layers.split(",") if x.strip()) if args.layers else None
    try:
        settings = FigureSettings(
            method=args.method, layers=layers, cmap=args.cmap, alpha=args.alpha,
            scale=args.scale, width=width, dpi=dpi, render=args.render,
        )  # fmt: skip
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    images, folders = collect_images(args.images)
    if "class-stats" in figures and not folders:
        raise UsageError(
            "class-stats needs --images folders in ImageFolder layout (one subfolder per class)"
        )
    per_image = [f for f in figures if f in IMAGE_FIGURES]
    if (per_image or "model-grid" in figures) and not images:
        raise UsageError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {' '.join(args.images)}"
        )
    checkpoints = load_checkpoints(args.checkpoint)
    analyzed = per_image or "model-grid" in figures
    targets = _image_targets(args, images if analyzed else [], checkpoints)
    try:
        run = _Run(prepare_output(args.out, overwrite=args.overwrite))
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    image_info: list[dict] = []
    grid: dict[str, list] = {name: [] for _, name, _ in checkpoints}  # light analyses per model
    grid_missing: dict[str, set[int]] = {name: set() for _, name, _ in checkpoints}
    grid_images: list[tuple[str, object, str]] = []  # (image name, first model's crop, title)
    if analyzed:
        work = _ImageWork(checkpoints, targets, settings, per_image, formats,
                          "model-grid" in figures)  # fmt: skip
        jobs = max(1, min(args.jobs, len(images)))
        bar = tqdm(total=len(images), desc="export", unit="image", file=sys.stderr, disable=None)
        with bar:
            for (path, image_name), outcome in zip(images, _outcomes(work, images, jobs, args)):
                bar.update(1)
                if outcome["load_error"] is not None:
                    run.fail("load image", str(path), _Reported(outcome["load_error"]))
                    continue
                image_info.append(outcome["info"])
                for name, files, notes, result, error in outcome["runs"]:
                    if error is not None:
                        run.fail("analysis", str(path), _Reported(error), name)
                        continue
                    try:
                        if files is not None:
                            run.write(f"{name}/{image_name}", files)
                    except OutputError as exc:  # one input's failure must not stop the others
                        run.fail("write", str(path), exc, name)
                        continue
                    for text in notes:
                        run.note(text)
                    run.results.append({"checkpoint": name, "image": image_name, **result})
                if outcome["grid"] is not None:
                    crop, title, cells = outcome["grid"]
                    grid_images.append((image_name, crop, title))
                    for (_, name, _), (absent, light) in zip(checkpoints, cells):
                        if absent:  # n/a in the grid, not another class
                            grid_missing[name].add(len(grid[name]))
                        grid[name].append(light)
        if "model-grid" in figures:
            _model_grids(run, checkpoints, grid, grid_images, formats, settings, grid_missing)
    if "class-stats" in figures:
        _class_stats(run, checkpoints, folders, formats, settings)

    labels = None
    if args.labels:
        labels = {
            "file": args.labels,
            "sha256": hashlib.sha256(Path(args.labels).read_bytes()).hexdigest(),
        }
    options = export_options(
        figures, formats, settings, args.target, overwrite=bool(args.overwrite), labels=labels
    )
    manifest = build_manifest(
        checkpoints=[
            {"name": name, **checkpoint_info(ckpt, raw)} for raw, name, ckpt in checkpoints
        ],
        images=image_info,
        options=options,
        results=run.results,
        failures=run.failures,
        notes=run.notes,
        files=run.files,
    )
    run.write("", {"manifest.json": manifest_bytes(manifest)})
    return 1 if run.failures else 0


class OutputError(Exception):
    """Writing a file under --out failed (a full or read-only disk, a folder in the way)."""

    def __init__(self, cause: OSError | ExportError) -> None:
        what = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
        where = f" ({cause.filename})" if isinstance(cause, OSError) and cause.filename else ""
        super().__init__(f"cannot write the output{where}: {what}")


class _Reported(ValueError):
    """A failure already put in one line (by a worker process)."""


@dataclass
class _ImageWork:
    """Everything one image needs, for every model: analysis, figures, grid cells.

    Called in this process (`--jobs 1`) or in worker processes; it returns plain data (bytes,
    dicts, tensors) and one-line error texts, and the caller writes files in input order, so the
    output is the same whatever `--jobs`.
    """

    checkpoints: list
    targets: dict
    settings: FigureSettings
    per_image: list
    formats: list
    grid: bool

    def __call__(self, item: tuple[Path, str]) -> dict:
        from models.images import load_image

        from .export import render_image, result_info
        from .session import analyze_images

        path, image_name = item
        try:
            regular_file(path, "image", MAX_IMAGE_FILE_BYTES)
            data = path.read_bytes()
            pil = load_image(data)
        except (OSError, ValueError, UsageError) as exc:
            return {"load_error": _one_line(exc)}
        info = {"name": image_name, "path": str(path), "sha256": hashlib.sha256(data).hexdigest()}
        runs, lights = [], []
        for _, name, ckpt in self.checkpoints:
            try:
                analysis = analyze_images(
                    ckpt, [pil], self.targets[image_name][name],
                    method=self.settings.method, layers=self.settings.layers,
                )  # fmt: skip
                files, notes = None, []
                if self.per_image:
                    files, notes = render_image(pil, ckpt, analysis, figures=self.per_image,
                                                formats=self.formats, settings=self.settings)  # fmt: skip
                runs.append((name, files, notes, result_info(analysis, ckpt.class_names), None))
                lights.append(_light(analysis))
            except Exception as exc:  # one input's failure must not stop the others
                runs.append((name, None, [], None, _one_line(exc)))
                lights.append(None)
        grid = None
        if self.grid and all(light is not None for light in lights):
            first = self.checkpoints[0][2]
            title = first.class_names[int(lights[0].target[0])]
            cells = [
                (title not in ckpt.class_names, _same_class(ckpt, pil, light, title))
                for (_, _, ckpt), light in zip(self.checkpoints, lights)
            ]
            grid = (first.preprocess.display_crop(pil), title, cells)
        return {"load_error": None, "info": info, "runs": runs, "grid": grid}


def _start_worker(work: _ImageWork, paths: list, plugins: list[str]) -> _ImageWork:
    """In a worker process: the plugins, the checkpoints (read again), one thread."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.plugins import load_plugins

    torch.set_num_threads(1)
    load_plugins(plugins)
    checkpoints = [(raw, name, load_checkpoint(raw)) for raw, name in paths]
    return _ImageWork(checkpoints, work.targets, work.settings, work.per_image,
                      work.formats, work.grid)  # fmt: skip


def _worker_died(item: tuple[Path, str], exit_code: int | None) -> dict:
    return {"load_error": f"the worker process on this image stopped (exit code {exit_code})"}


def _outcomes(work: _ImageWork, images: list, jobs: int, args: argparse.Namespace):
    """Each image's outcome, in input order: here, or here and in `jobs - 1` worker processes
    (`viz.parallel`), each process at one thread.

    Workers get the settings, not the models: they read the checkpoints again (spawned
    processes share nothing).
    """
    if jobs <= 1:
        yield from map(work, images)
        return
    import torch

    from models.plugins import plugins_from_env

    from .parallel import ordered_map

    bare = _ImageWork([], work.targets, work.settings, work.per_image, work.formats, work.grid)
    paths = [(raw, name) for raw, name, _ in work.checkpoints]
    plugins = plugins_from_env() + list(getattr(args, "plugin", []))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per process, this one included
    try:
        yield from ordered_map(work, images, jobs, initializer=_start_worker,
                               initargs=(bare, paths, plugins), on_crash=_worker_died)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _light(analysis):
    """The part of an analysis the model grid needs: logits, target and the last-stage CAM."""
    import dataclasses

    from .trace import AttentionTrace

    stages = analysis.stage_cams()
    last = stages[max(stages)]
    return dataclasses.replace(
        analysis,
        trace=AttentionTrace(),
        cams={last: analysis.cams[last]},
        cam_stages={last: analysis.cam_stages[last]},
    )


def _same_class(ckpt, image, light, class_name: str):
    """A grid row explains its column's class (as in the CBAM paper), not its own top-1."""
    from .session import analyze_images

    names = ckpt.class_names
    if class_name not in names or names[int(light.target[0])] == class_name:
        return light
    last = stage_layers(ckpt.model)[-1]
    return _light(
        analyze_images(ckpt, [image], names.index(class_name), method=light.method, layers=(last,))
    )


def _model_grids(run: _Run, checkpoints, grid, grid_images, formats, settings, missing) -> None:
    from .export import figure_bytes
    from .figures import model_grid
    from .session import comparison_order, stack_analyses

    if not grid_images:
        return
    # rows as in the papers: plain, SE, BAM, CBAM, then other networks (stable otherwise)
    checkpoints = sorted(checkpoints, key=lambda c: comparison_order(c[2]))
    labels = _row_labels(checkpoints)
    chunks = [grid_images[i : i + GRID_COLUMNS] for i in range(0, len(grid_images), GRID_COLUMNS)]
    for c, chunk in enumerate(chunks):
        start = c * GRID_COLUMNS
        rows = [(label, stack_analyses(grid[name][start : start + len(chunk)]))
                for label, (_, name, _) in zip(labels, checkpoints)]  # fmt: skip
        try:
            absent = [[c - start for c in missing[name] if start <= c < start + len(chunk)]
                      for _, name, _ in checkpoints]  # fmt: skip
            fig = model_grid([crop for _, crop, _ in chunk], rows,
                             column_titles=[title for _, _, title in chunk], width=settings.width,
                             cmap=settings.cmap, alpha=settings.alpha, missing=absent,
                             render=settings.render)  # fmt: skip
            stem = "model-grid" if len(chunks) == 1 else f"model-grid-{c + 1:02d}"
            run.write(
                "", {f"{stem}.{fmt}": figure_bytes(fig, fmt, dpi=settings.dpi) for fmt in formats}
            )
        except Exception as exc:
            run.fail("model-grid", ", ".join(n for n, _, _ in chunk), exc)


def _class_stats(run: _Run, checkpoints, folders, formats, settings) -> None:
    from tqdm import tqdm

    from .export import figure_bytes, npz_bytes, safe_name
    from .figures import class_channel_stats
    from .metrics import channel_statistics

    for folder in folders:
        stem = f"class-stats-{safe_name(folder.resolve().name, default='images')}"
        for _, name, ckpt in checkpoints:
            bar = tqdm(desc=f"class-stats {name}", unit="img", file=sys.stderr, disable=None)

            def progress(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.update(done - bar.n)

            try:
                with bar:
                    stats = channel_statistics(
                        ckpt.model, folder, ckpt.preprocess, batch_size=16, progress=progress
                    )
                if not stats.means:
                    run.note(f"class-stats skipped for {ckpt.label}: no attention modules")
                    continue
                fig = class_channel_stats(
                    stats, width=settings.width, cmap=settings.cmap,
                    shared_scale=settings.shared_scale,
                )  # fmt: skip
                files = {
                    f"{stem}.{fmt}": figure_bytes(fig, fmt, dpi=settings.dpi) for fmt in formats
                }
                arrays = {
                    "class_names": _str_array(stats.class_names),
                    "counts": stats.counts.numpy(),
                }
                arrays.update({f"means/{k}": v.float().numpy() for k, v in stats.means.items()})
                files[f"{stem}.npz"] = npz_bytes(arrays)
                run.write(name, files)
            except Exception as exc:
                run.fail("class-stats", str(folder), exc, name)


def _str_array(items: Sequence[str]):
    import numpy as np

    return np.asarray(list(items), dtype=str)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from models.plugins import load_plugins, plugins_from_env

    failures = load_plugins(plugins_from_env() + list(getattr(args, "plugin", [])))
    if failures:
        for line in failures:
            print(f"error: {line}", file=sys.stderr)
        return 2
    try:
        if args.command == "report":
            from .report_command import report_command

            return report_command(args)
        return _export(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:
        print(f"error: {exc}; files written before are complete", file=sys.stderr)
        return 1
    except (OSError, ExportError) as exc:  # e.g. an input that vanished while we read it
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: files written so far are complete; no manifest was written",
            file=sys.stderr,
        )
        return 130
