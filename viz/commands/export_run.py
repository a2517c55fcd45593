"""The `python -m viz export` run: every image through every model, figures, grids, manifest.

Each image is analysed and drawn here or in worker processes (`viz.commands.parallel`); outcomes come
back as plain data in input order and are written here, so the files are the same whatever
`--jobs`. A failing input is a one-line error and the others go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from viz.commands.export import ExportError, FigureSettings
from viz.commands.inputs import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_FILE_BYTES,
    UsageError,
    check_layers,
    collect_images,
    error_line,
    label_of,
    layer_list,
    load_checkpoints,
    methods_by_checkpoint,
    read_labels,
    regular_file,
    resolve_target,
    unread_attention_lines,
)
from viz.commands.targets import OutputTarget, class_value, parse_output_target
from viz.engine.cam import stage_layers
from viz.engine.unread import UnreadAttentionWarning

__all__ = ["GRID_COLUMNS", "OutputError", "export_command"]

GRID_COLUMNS = 6  # images per model-grid figure; more images make more figures
GRID_FIGURES = ("model-grid", "dino-grid")  # one figure of every checkpoint's rows
DINO_MASS = 0.6  # the share of the class token's attention DINO's masks keep


def export_command(args: argparse.Namespace) -> int:
    """Run an export; returns the exit status (0 all exported, 1 some inputs failed)."""
    from viz.commands.export import IMAGE_FIGURES

    figures = list(dict.fromkeys(args.figure or ["overview"]))
    settings = _settings(args)
    per_image = [f for f in figures if f in IMAGE_FIGURES]
    grids = [f for f in GRID_FIGURES if f in figures]
    analyzed = bool(per_image) or bool(grids)
    images, folders = _inputs(args, figures, analyzed)
    parse_output_target(args.target)  # malformed: said before anything loads
    checkpoints = load_checkpoints(args.checkpoint)
    methods, fallback = {name: settings.method for _, name, _ in checkpoints}, None
    if analyzed:
        methods, fallback = methods_by_checkpoint(settings.method, checkpoints)
    if settings.layers is not None:
        check_layers(checkpoints, settings.layers, settings.method)
    for line in unread_attention_lines(checkpoints):
        _say(f"warning: {line}")
    targets = _image_targets(args, images if analyzed else [], checkpoints)
    run = _open_run(args)
    if fallback is not None:  # once, on stderr and in the manifest's notes
        run.note(fallback)
    grid = _Grid({name: [] for _, name, _ in checkpoints})
    if analyzed:
        work = _ImageWork(checkpoints, targets, settings, per_image, args.format, tuple(grids),
                          methods=methods)  # fmt: skip
        _run_images(run, work, images, args, grid)
        for kind in grids:
            _model_grids(run, checkpoints, grid, args.format, settings, kind)
    if "class-stats" in figures:
        _class_stats(run, checkpoints, folders, args.format, settings)
    _write_manifest(run, args, figures, settings, checkpoints, methods)
    failed = (
        f", {len(run.failures)} input(s) failed (see above and the manifest)"
        if run.failures
        else ""
    )
    files = f"{len(run.files)} file{'' if len(run.files) == 1 else 's'}"
    _say(f"wrote {files} to {run.out}{failed}")
    return 1 if run.failures else 0


def _settings(args: argparse.Namespace) -> FigureSettings:
    layers = layer_list(args.layers)
    try:
        return FigureSettings(
            method=args.method, layers=layers, smoothing=tuple(args.smooth),
            num_samples=args.num_samples, cmap=args.cmap,
            alpha=args.alpha,
            scale=args.scale, width=args.width, dpi=args.dpi, render=args.render,
        )  # fmt: skip
    except ExportError as exc:
        raise UsageError(str(exc)) from None


def _inputs(args, figures: list[str], analyzed: bool) -> tuple[list, list]:
    """The image files and folders of --images, checked against what the figures need."""
    images, folders = collect_images(args.images)
    if "class-stats" in figures and not folders:
        raise UsageError(
            "class-stats needs --images folders in ImageFolder layout (one subfolder per class)"
        )
    if analyzed and not images:
        raise UsageError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {' '.join(args.images)}"
        )
    return images, folders


def _open_run(args) -> _Run:
    from viz.commands.export import prepare_output

    try:
        return _Run(prepare_output(args.out, overwrite=args.overwrite))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@dataclass
class _Grid:
    """The model grid's columns as the images come in."""

    cells: dict[str, list]  # model name -> light analysis per column
    missing: dict[str, set[int]] = field(default_factory=dict)  # columns drawn as n/a
    images: list[tuple[str, object, str]] = field(default_factory=list)  # (name, crop, title)

    def add(self, checkpoints, image_name: str, grid) -> None:
        crop, title, cells = grid
        self.images.append((image_name, crop, title))
        for (_, name, _), (absent, light) in zip(checkpoints, cells):
            if absent:  # n/a in the grid, not another class
                self.missing.setdefault(name, set()).add(len(self.cells[name]))
            self.cells[name].append(light)


def _run_images(run: _Run, work: _ImageWork, images: list, args, grid: _Grid) -> None:
    """Every image's outcome, in input order, written as it comes."""
    from tqdm import tqdm

    jobs = max(1, min(args.jobs, len(images)))
    bar = tqdm(total=len(images), desc="export", unit="image", file=sys.stderr, disable=None)
    done = [0]

    def show(value: float) -> None:
        bar.n = round(value, 2)
        bar.refresh()

    if jobs == 1:
        work.progress = lambda passes, total: show(done[0] + passes / max(total, 1))
    with bar:
        for (path, image_name), outcome in zip(images, _outcomes(work, images, jobs, args, show)):
            done[0] += 1
            bar.n = max(bar.n, done[0])  # the workers may be further on
            bar.refresh()
            if outcome["load_error"] is not None:
                run.fail("load image", str(path), _Reported(outcome["load_error"]))
                continue
            run.images.append(outcome["info"])
            for name, files, notes, result, error in outcome["runs"]:
                _keep(run, path, image_name, name, files, notes, result, error)
            if outcome["grid"] is not None:
                grid.add(work.checkpoints, image_name, outcome["grid"])


def _keep(run: _Run, path: Path, image_name: str, name, files, notes, result, error) -> None:
    """One model's outcome for one image: its files, notes and result, or its failure."""
    if error is not None:
        run.fail("analysis", str(path), _Reported(error), name)
        return
    try:
        if files is not None:
            run.write(f"{name}/{image_name}", files)
    except OutputError as exc:  # one input's failure must not stop the others
        run.fail("write", str(path), exc, name)
        return
    for text in notes:
        run.note(text)
    run.results.append({"checkpoint": name, "image": image_name, **result})


def _write_manifest(
    run: _Run, args, figures, settings: FigureSettings, checkpoints, methods: dict[str, str]
) -> None:
    from viz.commands.export import build_manifest, checkpoint_info, export_options, manifest_bytes

    labels = None
    if args.labels:
        digest = hashlib.sha256(Path(args.labels).read_bytes()).hexdigest()
        labels = {"file": args.labels, "sha256": digest}
    options = export_options(figures, args.format, settings, args.target,
                             overwrite=bool(args.overwrite), labels=labels)  # fmt: skip
    manifest = build_manifest(
        checkpoints=[{"name": n, **checkpoint_info(ckpt, raw), "cam_method": methods[n]}
                     for raw, n, ckpt in checkpoints],  # fmt: skip
        images=run.images, options=options, results=run.results, failures=run.failures,
        notes=run.notes, files=run.files,
    )  # fmt: skip
    run.write("", {"manifest.json": manifest_bytes(manifest)})


def _image_targets(args, images, checkpoints) -> dict[str, dict[str, int | OutputTarget | None]]:
    """{image name: {checkpoint name: what to explain}}: --target for all, or --labels each.

    A class is resolved here; a mask, box or concept target (`OutputTarget`) per image, later.
    """
    output_target = parse_output_target(args.target)
    if output_target is not None:
        for _, _, ckpt in checkpoints:  # a category outside a model's classes: said up front
            output_target.check(ckpt)
        return {
            image_name: {n: output_target for _, n, _ in checkpoints} for _, image_name in images
        }
    if not args.labels:
        fixed = {
            name: resolve_target(class_value(args.target), ckpt.class_names)
            for _, name, ckpt in checkpoints
        }
        return {image_name: fixed for _, image_name in images}
    labels = read_labels(args.labels)
    targets = {}
    for path, image_name in images:
        label = label_of(path, labels)
        if label is None:
            raise UsageError(f"--labels {args.labels} has no row for {path}")
        targets[image_name] = {
            name: resolve_target(
                class_value(label), ckpt.class_names, f"--labels: {path.name}'s label"
            )  # fmt: skip
            for _, name, ckpt in checkpoints
        }
    return targets


@dataclass
class _Run:
    """What one export run has done so far."""

    out: Path
    files: dict[str, bytes] = field(default_factory=dict)  # relative name -> bytes written
    failures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)  # each image's name, path and sha256

    def write(self, prefix: str, files: dict[str, bytes]) -> None:
        from viz.commands.export import write_files

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
        message = error_line(error)
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


class OutputError(ValueError):
    """Writing a file under --out failed (a full or read-only disk, a folder in the way); a
    ValueError, so `error_line` shows its message alone."""

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
    grids: tuple[str, ...]  # the grid figures asked for: their cells are kept per image
    # (done, total) passes of the current analysis, so the bar moves inside an image for the
    # slow CAM methods (with --jobs N, each process reports to the parent's bar)
    progress: Callable[[int, int], None] | None = None
    # checkpoint name -> its CAM method where it is not the settings' (a CNN's Grad-CAM beside
    # a vision transformer's rollout, GAE or LeGrad)
    methods: dict[str, str] = field(default_factory=dict)

    def settings_for(self, name: str) -> FigureSettings:
        """The figure settings of checkpoint `name`: its own CAM method."""
        method = self.methods.get(name, self.settings.method)
        if method == self.settings.method:
            return self.settings
        return dataclasses.replace(self.settings, method=method)

    def _analysis(self, ckpt, pil, target, settings: FigureSettings):
        """The image's analysis; attention alone when no figure asked for needs a CAM and the
        network's output is not class logits (a DINOv2 embedding: its dino-heads figure)."""
        from viz.engine.cam import NoTargetError, attention_only
        from viz.figures.registry import FIGURES
        from viz.interactive import analyze_images

        if isinstance(target, OutputTarget):  # made on this image (a box's label, ...)
            target = target.build(ckpt, pil, MAX_IMAGE_FILE_BYTES)
        try:
            return analyze_images(
                ckpt, [pil], target, method=settings.method, layers=settings.layers,
                smoothing=settings.smoothing, options=settings.method_options(),
                progress=self.progress,
            )  # fmt: skip
        except NoTargetError:
            if "model-grid" in self.grids or any(FIGURES[f].cams for f in self.per_image):
                raise
            return attention_only(ckpt.model, ckpt.preprocess.batch([pil]))

    def __call__(self, item: tuple[Path, str]) -> dict:
        from models.images import load_image
        from viz.commands.export import render_image, result_info

        path, image_name = item
        try:
            regular_file(path, "image", MAX_IMAGE_FILE_BYTES)
            data = path.read_bytes()
            pil = load_image(data)
        except (OSError, ValueError, UsageError) as exc:
            return {"load_error": error_line(exc)}
        info = {"name": image_name, "path": str(path), "sha256": hashlib.sha256(data).hexdigest()}
        runs, lights = [], []
        for _, name, ckpt in self.checkpoints:
            settings = self.settings_for(name)
            try:
                analysis = self._analysis(ckpt, pil, self.targets[image_name][name], settings)
                files, notes = None, []
                if self.per_image:
                    files, notes = render_image(pil, ckpt, analysis, figures=self.per_image,
                                                formats=self.formats, settings=settings)  # fmt: skip
                runs.append((name, files, notes, result_info(analysis, ckpt.class_names), None))
                lights.append(_light(analysis))
            except Exception as exc:  # one input's failure must not stop the others
                runs.append((name, None, [], None, error_line(exc)))
                lights.append(None)
        grid = None
        if self.grids and all(light is not None for light in lights):
            first = self.checkpoints[0][2]
            if lights[0].explains_classes and "model-grid" in self.grids:
                title = first.class_names[int(lights[0].target[0])]
                cells = [
                    (
                        title not in ckpt.class_names,
                        _same_class(ckpt, pil, light, title, self.settings.method_options()),
                    )
                    for (_, _, ckpt), light in zip(self.checkpoints, lights)
                ]
            else:  # DINO's grid alone (attention is the same whatever the class), or a target
                title = (
                    first.class_names[int(lights[0].target[0])]
                    if lights[0].explains_classes
                    else image_name  # a segment, a box, a concept: the column is its image
                )
                cells = [(False, light) for light in lights]
            grid = (first.preprocess.display_crop(pil), title, cells)
        return {"load_error": None, "info": info, "runs": runs, "grid": grid}


def _start_worker(work: _ImageWork, paths: list, plugins: list[str]) -> _ImageWork:
    """In a worker process: the plugins, the checkpoints (read again), one thread."""
    import torch

    from models.checkpoints.checkpoint import load_checkpoint
    from models.checkpoints.plugins import load_plugins

    torch.set_num_threads(1)
    load_plugins(plugins)
    checkpoints = [(raw, name, load_checkpoint(raw)) for raw, name in paths]
    warnings.simplefilter("ignore", UnreadAttentionWarning)  # the parent said it once
    return _ImageWork(checkpoints, work.targets, work.settings, work.per_image,
                      work.formats, work.grids, progress=_passes_reported,
                      methods=work.methods)  # fmt: skip


def _passes_reported(passes: int, total: int) -> None:
    """An analysis's progress in a process of a parallel export, for the parent's bar."""
    from viz.commands.parallel import report_fraction

    report_fraction(passes / max(total, 1))


def _worker_died(item: tuple[Path, str], exit_code: int | None) -> dict:
    return {"load_error": f"the worker process on this image stopped (exit code {exit_code})"}


def _outcomes(work: _ImageWork, images: list, jobs: int, args: argparse.Namespace, show=None):
    """Each image's outcome, in input order: here, or here and in `jobs - 1` worker processes
    (`viz.commands.parallel`), each process at one thread; `show(images done, fractional)`
    as every process goes through its image's passes.

    Workers get the settings, not the models: they read the checkpoints again (spawned
    processes share nothing).
    """
    if jobs <= 1:
        yield from map(work, images)
        return
    import torch

    from models.checkpoints.plugins import plugins_from_env
    from viz.commands.parallel import ordered_map

    work.progress = _passes_reported
    bare = _ImageWork([], work.targets, work.settings, work.per_image, work.formats, work.grids,
                      methods=work.methods)  # fmt: skip
    paths = [(raw, name) for raw, name, _ in work.checkpoints]
    plugins = plugins_from_env() + list(getattr(args, "plugin", []))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per process, this one included
    try:
        yield from ordered_map(work, images, jobs, initializer=_start_worker,
                               initargs=(bare, paths, plugins), on_crash=_worker_died,
                               on_progress=show)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _light(analysis):
    """The part of an analysis the grids need: logits, target, the last-stage CAM and the last
    class-token block's heads (DINO's grid)."""
    from viz.engine.trace import AttentionTrace
    from viz.figures.dino_heads import class_token_blocks

    blocks = class_token_blocks(analysis.trace)
    trace = AttentionTrace(
        [dataclasses.replace(blocks[-1], attention_source=None, token_norms=None)] if blocks else []
    )
    stages = analysis.stage_cams()
    if not stages:  # attention alone: no CAM for a grid
        return dataclasses.replace(analysis, trace=trace, cams={}, cam_stages={})
    last = stages[max(stages)]
    return dataclasses.replace(
        analysis,
        trace=trace,
        cams={last: analysis.cams[last]},
        cam_stages={last: analysis.cam_stages[last]},
    )


def _same_class(ckpt, image, light, class_name: str, options: dict):
    """A grid row explains its column's class (as in the CBAM paper), not its own top-1."""
    from viz.interactive import analyze_images

    names = ckpt.class_names
    if class_name not in names or names[int(light.target[0])] == class_name:
        return light
    last = stage_layers(ckpt.model)[-1]
    return _light(
        analyze_images(
            ckpt,
            [image],
            names.index(class_name),
            method=light.method,
            layers=(last,),
            smoothing=light.smoothing,
            options=options,
        )  # fmt: skip
    )


def _model_grids(
    run: _Run, checkpoints, grid: _Grid, formats, settings: FigureSettings, kind: str
) -> None:
    """The model grid (CAMs) or DINO's grid (`kind`), `GRID_COLUMNS` images per figure."""
    from viz.commands.export import figure_bytes
    from viz.figures import model_grid
    from viz.interactive import GridModel, model_grid_rows

    chunks = [grid.images[i : i + GRID_COLUMNS] for i in range(0, len(grid.images), GRID_COLUMNS)]
    for c, chunk in enumerate(chunks):
        start, end = c * GRID_COLUMNS, c * GRID_COLUMNS + len(chunk)
        try:
            rows, absent = model_grid_rows([
                GridModel(ckpt.label, name, ckpt, grid.cells[name][start:end],
                          [i - start for i in grid.missing.get(name, ()) if start <= i < end])
                for _, name, ckpt in checkpoints
            ])  # fmt: skip
            # a --target's rows explain it, not the columns' classes: the heading says what
            explained = rows[0][1].explained if not rows[0][1].explains_classes else None
            fig = model_grid([crop for _, crop, _ in chunk], rows, title=explained,
                             column_titles=[title for _, _, title in chunk], width=settings.width,
                             cmap=settings.cmap, alpha=settings.alpha, missing=absent,
                             render=settings.render,
                             class_token_mass=DINO_MASS if kind == "dino-grid" else None)  # fmt: skip
            stem = kind if len(chunks) == 1 else f"{kind}-{c + 1:02d}"
            run.write(
                "", {f"{stem}.{fmt}": figure_bytes(fig, fmt, dpi=settings.dpi) for fmt in formats}
            )
        except Exception as exc:
            run.fail(kind, ", ".join(n for n, _, _ in chunk), exc)


def _class_stats(run: _Run, checkpoints, folders, formats, settings) -> None:
    from tqdm import tqdm

    from viz.commands.export import figure_bytes, npz_bytes
    from viz.figures import class_channel_stats
    from viz.measures.metrics import channel_statistics
    from viz.text import safe_name

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
