"""`python -m viz report`: data-set numbers for the maps of one or more checkpoints.

For every image and checkpoint: the explained class (the image's label, else the top-1) and its
probability; deletion and insertion AUC (RISE) of every map; attention <-> CAM agreement per
module; localisation against boxes; and, on the first `--sanity` images, the cascading
randomisation check. Then means with bootstrap intervals, paired differences between models,
and `report.md` / `report.html` (`viz.commands.report_page`).

Work is cut into chunks of `--batch-size` consecutive images (the list order is fixed), each
chunk one batch through every model, so the numbers do not depend on how the work is spread.
Under `torchrun` chunk c goes to rank c mod world size; ranks send their rows to rank 0, which
writes the report. Each finished chunk is saved atomically under `OUT/parts/`; a rerun with the
same inputs and options skips them (a changed one is refused unless `--overwrite`).

Maps (the `map` column): `cam/stageS` (the CAM of `--method` at stage S's layer, the method in
the `method` column; `--layers` chooses the layers, the last per stage counts), or the method's
own name for a whole-network map (`rollout`, `gae`, `legrad`, `fullgrad`), `attention/NAME`
(the spatial gate of module NAME, after its sigmoid where the probe gives a logit, as drawn),
and `random` (uniform noise per pixel, seeded by the image: the chance level of every score).
The default map of `per_image.csv` is the last stage's CAM. Map names with numbers sort by
their numbers (`attention/blocks.9.attn` before `blocks.10`), here and in every table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from models.distributed import Ranks
from viz.commands.inputs import error_line

__all__ = [
    "ReportOptions",
    "ReportInputs",
    "run_report",
    "chunks_of_rank",
    "inputs_for",
    "map_tensors",
    "cam_map_name",
    "is_cam_map",
    "PER_IMAGE_COLUMNS",
    "PER_MAP_COLUMNS",
]

PER_IMAGE_COLUMNS = (
    "checkpoint", "image", "label", "target", "target_name", "predicted", "prob", "correct",
    "score", "deletion_auc", "insertion_auc", "outlier_tokens", "error", "left_out",
)  # fmt: skip
PER_MAP_COLUMNS = (
    "checkpoint", "image", "map", "kind", "method", "stage", "layer", "deletion_auc", "insertion_auc",
    "pearson", "spearman", "iou", "pointing", "energy", "box_iou", "mask_pointing", "mask_energy",
)  # fmt: skip
REPORT_TARGETS = ("segment", "similar-to")  # --target kinds that hold for a whole data set
SANITY_COLUMNS = ("checkpoint", "image", "step", "randomised", "map", "spearman", "ssim")
DELETION_CHOICES = ("all", "default", "off")
_PARTS = "parts"


@dataclass(frozen=True)
class ReportOptions:
    """Everything that changes the numbers (a rerun must match them to reuse finished work)."""

    method: str = "gradcam"
    smoothing: tuple[str, ...] = ()  # of the CAMs: "aug", "eigen"
    layers: tuple[str, ...] | None = None  # CAM layers; None: the method's default layers
    num_samples: int | None = None  # of SS-CAM, IS-CAM, SmoothGrad-CAM++; None: theirs
    deletion: str = "default"  # maps with deletion/insertion: all, default (last CAM), off
    steps: int = 16
    baseline: str = "blur"
    batch_size: int = 16
    sanity: int | None = None  # images checked; None: `default_sanity(method)`
    top_k: float = 0.2
    seed: int = 0
    target: str | None = None  # "segment:K" or "similar-to:IMAGE"; None: each image's class

    def __post_init__(self) -> None:
        from viz.engine.cam import settings_error

        problem = settings_error(self.method, self.smoothing, self.method_options())
        if problem:
            raise ValueError(problem)
        if self.sanity is None:
            object.__setattr__(self, "sanity", default_sanity(self.method))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def method_options(self) -> dict:
        return {} if self.num_samples is None else {"num_samples": self.num_samples}

    def for_model(self, model) -> ReportOptions:
        """These options as `model` runs them: a CNN beside a vision transformer under a
        whole-network method (rollout, GAE, LeGrad) shows Grad-CAM instead, as export and the
        app do; `methods_by_checkpoint` said so once, before any image."""
        from viz.commands.inputs import FALLBACK_METHOD
        from viz.interactive import methods_for

        if self.method in methods_for(model):
            return self
        return replace(self, method=FALLBACK_METHOD, layers=None)


SANITY_IMAGES = 32
SANITY_IMAGES_PASS_METHODS = 2
"""Default images of the sanity check: each of its ~11 steps reruns the method, which for the
methods with extra passes (Score-CAM: 513 forwards per image at a ResNet-18's layer4) would
make the check of 32 images take hours."""


def default_sanity(method: str) -> int:
    from viz.engine.cam import CAM_METHODS

    spec = CAM_METHODS.get(method)
    return SANITY_IMAGES_PASS_METHODS if spec and spec.extra_passes else SANITY_IMAGES


SAMPLE_IMAGES = 4
SAMPLE_CANDIDATES = 8  # maps kept for the first images, so broken ones can be skipped


@dataclass
class ReportInputs:
    """What to run on: checkpoints (name, path, Checkpoint) and images (path, name, label)."""

    checkpoints: list[tuple[str, str, object]]
    images: list[tuple[Path, str, str | None]]
    boxes: dict[str, list] | None = None


# --- chunks and ranks -------------------------------------------------------------------------


def chunks_of_rank(n_images: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Image indices of the chunks rank `rank` of `world` handles: chunk c goes to c mod world."""
    chunks = [list(range(s, min(s + batch_size, n_images))) for s in range(0, n_images, batch_size)]
    return [c for i, c in enumerate(chunks) if i % world == rank]


# --- maps ------------------------------------------------------------------------------------


def cam_map_name(stage: int, layer: str) -> str:
    """The report's name of the CAM at `stage` from `layer`: `cam/stageS`, or the method's name
    for a whole-network map (stage 0: `rollout`, `gae`, `legrad`, `fullgrad`)."""
    from viz.engine.cam import CAM_METHODS

    return layer if stage == 0 and layer in CAM_METHODS else f"cam/stage{stage}"


def is_cam_map(name: str) -> bool:
    """Whether the report's map `name` is a CAM (`cam/stageS` or a whole-network method's)."""
    from viz.engine.cam import CAM_METHODS

    return name.startswith("cam/") or name in CAM_METHODS


def map_tensors(analysis) -> dict[str, tuple[str, int, str, Tensor]]:
    """{map name: (kind, stage, layer, (N, h, w) map)} of an `Analysis`: CAMs, then gates."""
    out: dict[str, tuple[str, int, str, Tensor]] = {}
    for stage, layer in analysis.stage_cams().items():
        out[cam_map_name(stage, layer)] = ("cam", stage, layer, analysis.cams[layer])
    for rec in analysis.trace.spatial_records:
        spatial = rec.spatial.sigmoid() if rec.logits else rec.spatial
        out[f"attention/{rec.name}"] = ("attention", rec.stage, rec.name, spatial)
    return out


def _default_map(maps: dict) -> str | None:
    cams = [k for k, v in maps.items() if v[0] == "cam"]
    return max(cams, key=lambda k: maps[k][1]) if cams else None


# --- one chunk --------------------------------------------------------------------------------


def _number(value: float) -> float | None:
    """A finite value rounded to 6 digits; None (an empty CSV cell) for nan and infinities."""
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


class _Work:
    """Progress through one checkpoint's share of a chunk, counted in forward-pass equivalents
    (a backward costs about two forwards), reported as a fraction of that share.

    Work is planned as `units` of fixed size plus `analyses`: one analysis of one image, worth
    `cost` units — 3 (a forward and a backward) until the first analysis reports its plan,
    which for the methods with extra passes is hundreds; every estimate after uses it."""

    def __init__(self, report: Callable[[float], None] | None, *, units: float = 0.0,
                 analyses: float = 0.0) -> None:  # fmt: skip
        self.report = report
        self.units, self.analyses = units, analyses  # planned
        self.units_done = self.analyses_done = 0.0  # where the next part starts
        self.cost = 3.0

    def plan(self, *, units: float = 0.0) -> None:
        """More work found on the way (e.g. more maps to score)."""
        self.units += units

    def part(self, *, units: float = 0.0, analyses: float = 0.0,
             plans: bool = False) -> Callable[[float, float], None]:  # fmt: skip
        """A (done, of) callback for the next step, worth `units` plus `analyses`; with `plans`
        the step is an `analyze` of `analyses` images, whose `of` (images through the network)
        sets `cost`."""
        start = (self.units_done, self.analyses_done)
        self.units_done += units
        self.analyses_done += analyses

        def step(done: float, of: float) -> None:
            if plans and analyses:
                self.cost = 3.0 + max(0.0, of - analyses) / analyses
            fraction = done / max(of, 1)
            now = start[0] + units * fraction + (start[1] + analyses * fraction) * self.cost
            total = max(1.0, self.units + self.analyses * self.cost)
            if self.report:
                self.report(min(1.0, now / total))

        return step


def _chunk_rows(
    ckpt_name: str,
    ckpt,
    x: Tensor,
    names: list[str],
    labels: list[int | None],
    label_texts: list[str | None],
    boxes: list[list | None],
    chosen: dict[str, list[int]],
    options: ReportOptions,
    advance: Callable[[float], None] | None = None,
    explain=None,
    segments: Tensor | None = None,
) -> dict[str, list[dict]]:
    """Every row one checkpoint gives for one decoded batch; `advance(fraction)` as it goes.
    `chosen`: the batch rows of the sanity check ("sanity") and of the sample figure
    ("samples"); `explain`: a `viz.targets` callable (`--target`), `segments` the pixels it
    scores when it is a segment (each image's predicted ones)."""
    from viz.measures.metrics import random_saliency, seed_of
    from viz.measures.sanity import randomisation_steps

    options = options.for_model(ckpt.model)
    n, size = len(names), x.shape[-1]
    if explain is not None:  # a segment or a concept: the same callable for every image
        target = explain
    else:
        target = torch.tensor(labels) if all(label is not None for label in labels) else None
    seeds = [seed_of(name, options.seed) for name in names]
    deletion = options.deletion != "off"
    per_map = 2 * options.steps + 3  # forwards per image and map (see deletion_insertion)
    sanity_analyses = len(chosen["sanity"]) * len(randomisation_steps(ckpt.model))
    # the maps are known after the pass: two scored maps until then
    work = _Work(advance, units=2 * n * per_map if deletion else 0,
                 analyses=n + sanity_analyses)  # fmt: skip
    analysis = analyze_for_report(ckpt.model, x, target, options,
                                  progress=work.part(analyses=n, plans=True))  # fmt: skip
    maps = map_tensors(analysis)
    maps["random"] = ("random", 0, "", random_saliency(seeds, (size, size)))
    default = _default_map(maps)
    picked = [m for m in (list(maps) if options.deletion == "all" else [default, "random"]) if m]
    if deletion:
        work.plan(units=(len(picked) - 2) * n * per_map)
    followed = analysis.target if explain is None else explain  # what the passes score
    causal = {
        name: _deletion(ckpt.model, x, maps[name][3], followed, seeds, options,
                        work.part(units=n * per_map))
        for name in (picked if deletion else [])
    }  # fmt: skip
    rows = _image_rows(ckpt_name, ckpt, analysis, maps, causal, default, names, label_texts,
                       boxes, size, options, known=explain is None and target is not None,
                       masks=segments)  # fmt: skip
    rows["sanity"] = _sanity_rows(ckpt_name, ckpt.model, x, analysis, maps, names,
                                  chosen["sanity"], options, work.part(analyses=sanity_analyses),
                                  followed)  # fmt: skip
    rows["samples"] = _sample_rows(ckpt_name, maps, names, chosen["samples"])
    return rows


def analyze_for_report(model, x, target, options: ReportOptions, progress=None):
    """`analyze` with the report's method, layers, smoothing, method options and seed."""
    from viz.engine.cam import analyze

    return analyze(model, x, target, options.layers, method=options.method,
                   smoothing=options.smoothing, options=options.method_options(),
                   seed=options.seed, progress=progress)  # fmt: skip


def _deletion(model, x, saliency, target, seeds, options: ReportOptions, progress):
    from viz.measures.metrics import deletion_insertion

    return deletion_insertion(
        model, x, saliency, target, steps=options.steps,
        batch_size=max(options.batch_size, 2 * (options.steps + 1)),
        baseline=options.baseline, tie_seeds=seeds, progress=progress,
    )  # fmt: skip


def _image_rows(
    ckpt_name, ckpt, analysis, maps, causal, default, names, label_texts, boxes, size,
    options: ReportOptions, *, known: bool, masks=None,
) -> dict[str, list[dict]]:  # fmt: skip
    """The per-image and per-map rows of one checkpoint on one batch (`masks`: the (N, H, W)
    segments a segmentation target explains, for the maps' localisation against them)."""
    from viz.measures.metrics import agreement_batch

    outliers = _outlier_tokens(analysis.trace)
    method = "+".join([analysis.method, *analysis.smoothing])  # e.g. "scorecam+eigen"
    stage_cam = {v[1]: v[3] for v in maps.values() if v[0] == "cam"}
    agree = {
        name: agreement_batch(m, stage_cam[stage], top_k=options.top_k)
        for name, (kind, stage, _, m) in maps.items()
        if kind == "attention" and stage in stage_cam
    }
    per_image, per_map = [], []
    for i, image in enumerate(names):
        d = causal.get(default)
        per_image.append({
            "checkpoint": ckpt_name, "image": image, "label": label_texts[i],
            **_explained_columns(analysis, ckpt.class_names, i, known),
            "deletion_auc": _number(float(d.deletion_auc[i])) if d else None,
            "insertion_auc": _number(float(d.insertion_auc[i])) if d else None,
            "outlier_tokens": None if outliers is None else _number(float(outliers[i])),
            "error": "",
        })  # fmt: skip
        for name, (kind, stage, layer, m) in maps.items():
            row = {"checkpoint": ckpt_name, "image": image, "map": name, "kind": kind,
                   "method": method if kind == "cam" else "", "stage": stage,
                   "layer": layer}  # fmt: skip
            if name in causal:
                row["deletion_auc"] = _number(float(causal[name].deletion_auc[i]))
                row["insertion_auc"] = _number(float(causal[name].insertion_auc[i]))
            if name in agree:
                pearson, spearman, iou = (float(t[i]) for t in agree[name])
                row.update(pearson=_number(pearson), spearman=_number(spearman), iou=_number(iou))
            if boxes[i] is not None:
                row.update(_localisation(m[i], boxes[i], size))
            if masks is not None:
                row.update(_in_segment(m[i], masks[i]))
            per_map.append(row)
    return {"per_image": per_image, "per_map": per_map}


def _explained_columns(analysis, class_names, i: int, known: bool) -> dict:
    """Image `i`'s target columns: the class, its P and whether it is the prediction; for a
    segment or a concept, what was explained and its score."""
    if not analysis.explains_classes:
        return {"target_name": analysis.explained, "score": _number(float(analysis.scores[i]))}
    t, predicted = int(analysis.target[i]), int(analysis.logits[i].argmax())
    return {
        "target": t, "target_name": class_names[t], "predicted": predicted,
        "prob": _number(float(analysis.target_probs[i])),
        "correct": int(predicted == t) if known else None,
    }  # fmt: skip


def _in_segment(m: Tensor, mask: Tensor) -> dict:
    from viz.measures.localization import energy_in_mask, pointing_in_mask

    return {"mask_pointing": _number(pointing_in_mask(m, mask)),
            "mask_energy": _number(energy_in_mask(m, mask))}  # fmt: skip


def _outlier_tokens(trace) -> Tensor | None:
    """(N,) the share of the last block's patch tokens above twice the median norm (Darcet et
    al. 2024), or None for a network without global self-attention."""
    from viz.measures.token_norms import norm_blocks, token_norms

    return token_norms(trace).outlier_fraction if norm_blocks(trace) else None


def _localisation(m: Tensor, boxes: list, size: int) -> dict:
    from viz.measures.localization import box_iou, energy_pointing_game, pointing_game

    return {
        "pointing": _number(pointing_game(m, boxes, size)),
        "energy": _number(energy_pointing_game(m, boxes, size)),
        "box_iou": _number(box_iou(m, boxes, size)),
    }


def _sanity_rows(
    ckpt_name,
    model,
    x,
    analysis,
    maps,
    names,
    sanity_rows,
    options: ReportOptions,
    progress,
    followed,
) -> list[dict]:
    """The cascading randomisation check on the chunk's first `--sanity` images; `progress`
    moves within each step's analysis (a pass method's rerun is most of the report's time)."""
    from viz.measures.sanity import cascading_randomisation, randomisation_steps

    if not sanity_rows:
        return []
    pick = torch.tensor(sanity_rows)
    steps, calls = len(randomisation_steps(model)), [0]

    def maps_of(net, images, tgt):
        step = calls[0]
        calls[0] += 1

        def within(done, of):
            progress(step + done / max(of, 1), steps)

        found = map_tensors(analyze_for_report(net, images, tgt, options, progress=within))
        return {k: v[3] for k, v in found.items()}

    trained = {k: v[3][pick] for k, v in maps.items() if v[0] != "random"}
    result = cascading_randomisation(
        model, x[pick], _rows_of(followed, pick), maps_of, seed=options.seed, original=trained
    )
    return [
        {"checkpoint": ckpt_name, "image": names[sanity_rows[r.image]], "step": r.step,
         "randomised": r.randomised, "map": r.map, "spearman": _number(r.spearman),
         "ssim": _number(r.ssim)}
        for r in result
    ]  # fmt: skip


def _rows_of(target, pick: Tensor):
    """The target of the batch rows `pick`: their classes; a segment (its mask taken from each
    image's own output) or a concept is the same callable for any rows."""
    return target[pick] if isinstance(target, Tensor) else target


def report_target(spec: str, ckpt, x: Tensor):
    """`--target` for a batch: (the `viz.targets` callable, the batch rows it explains, why
    the others are left out, and for a segment the (N, H, W) predicted pixels of the category
    in the rows kept: what the target scores). An image without one has nothing to explain."""
    from viz.commands.inputs import MAX_IMAGE_FILE_BYTES
    from viz.commands.targets import parse_output_target
    from viz.engine.model_state import model_lock, preserve_model_state
    from viz.targets import SegmentationScore, main_tensor

    wanted = parse_output_target(spec)
    built = wanted.build(ckpt, None, MAX_IMAGE_FILE_BYTES)
    if not isinstance(built, SegmentationScore):
        return built, list(range(len(x))), "", None
    with model_lock(ckpt.model), preserve_model_state(ckpt.model), torch.inference_mode():
        output = main_tensor(ckpt.model(x))
    if output.ndim != 4:
        raise ValueError(f"--target {spec}: the network returns {tuple(output.shape)}, not a "
                         "segmentation map (N, K, H, W)")  # fmt: skip
    masks = output.argmax(1) == built.category
    keep = [i for i in range(len(x)) if masks[i].any()]
    why = f"no pixel is predicted as {built.describe().split(' (')[0]}: nothing to explain"
    return built, keep, why, masks[keep].clone()


def _sample_rows(ckpt_name, maps, names, sample_rows: list[int]) -> list[dict]:
    """The maps the report's sample figure shows (the last CAM and the last attention map) of
    the batch rows `sample_rows`, kept so the figure needs no second analysis."""
    cams = [k for k, v in maps.items() if v[0] == "cam"]
    gates = [k for k, v in maps.items() if v[0] == "attention"]
    return [
        {"checkpoint": ckpt_name, "image": names[r], "map": key,
         "values": maps[key][3][r].float().tolist()}
        for r in sample_rows
        for key in cams[-1:] + gates[-1:]
    ]  # fmt: skip


# --- decoding ---------------------------------------------------------------------------------


class _Decode(torch.utils.data.Dataset):
    """Image i -> (i, {preprocess key: (3, S, S) tensor}, original size, error)."""

    def __init__(self, paths: list[Path], preprocesses: dict[str, object]) -> None:
        self.paths, self.preprocesses = paths, preprocesses

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from models.images import ImageError, load_image

        try:
            image = load_image(self.paths[i])
        except (ImageError, OSError, ValueError) as exc:
            return i, None, None, " ".join(str(exc).split()) or type(exc).__name__
        tensors = {k: p(image)[0] for k, p in self.preprocesses.items()}
        return i, tensors, image.size, ""


def _collate(items):
    return items


def _preprocess_key(ckpt) -> str:
    return json.dumps(ckpt.preprocess.to_dict(), sort_keys=True)


def _run_chunk(
    items,
    inputs: ReportInputs,
    options: ReportOptions,
    device: torch.device,
    advance: Callable[[float], None] | None = None,
) -> dict[str, list[dict]]:
    """All rows of one chunk (decoded `items`) for every checkpoint; `advance(fraction)`."""
    from viz.commands.inputs import label_of

    result: dict[str, list[dict]] = {"per_image": [], "per_map": [], "sanity": [], "samples": []}
    good = [it for it in items if it[1] is not None]
    for index, _, _, error in items:
        if error:
            for name, _, _ in inputs.checkpoints:
                row = dict.fromkeys(PER_IMAGE_COLUMNS)
                row.update(checkpoint=name, image=inputs.images[index][1], error=error)
                result["per_image"].append(row)
    if not good:
        return result
    names = [inputs.images[i][1] for i, *_ in good]
    models = len(inputs.checkpoints)
    for c, (ckpt_name, _, ckpt) in enumerate(inputs.checkpoints):
        key = _preprocess_key(ckpt)
        x = torch.stack([tensors[key] for _, tensors, _, _ in good]).to(device)
        labels = [inputs.images[i][2] for i, *_ in good]
        targets = [None if lab is None else _label_target(lab, ckpt) for lab in labels]
        boxes = []
        for i, _, size, _ in good:
            if inputs.boxes is None:
                boxes.append(None)
                continue
            raw = label_of(inputs.images[i][0], inputs.boxes) or []
            mapped = [ckpt.preprocess.map_box(b, size) for b in raw]
            boxes.append([b for b in mapped if b is not None])
        chosen = {
            "sanity": [k for k, (i, *_) in enumerate(good) if i < options.sanity],
            "samples": [k for k, (i, *_) in enumerate(good) if i < SAMPLE_CANDIDATES],
        }
        share = None if advance is None else (lambda f, c=c: advance((c + f) / models))
        explain = None
        if options.target:  # a segment or a concept; rows without the segment are said so
            explain, keep, why, segments = report_target(options.target, ckpt, x)
            for k in sorted(set(range(len(good))) - set(keep)):
                result["per_image"].append({**dict.fromkeys(PER_IMAGE_COLUMNS),
                                            "checkpoint": ckpt_name, "image": names[k],
                                            "label": labels[k], "error": "",
                                            "left_out": why})  # fmt: skip
            if not keep:
                continue
            x, names_c, boxes = x[keep], [names[k] for k in keep], [boxes[k] for k in keep]
            targets, labels_c = [targets[k] for k in keep], [labels[k] for k in keep]
            chosen = {key_: [keep.index(k) for k in rows_ if k in keep]
                      for key_, rows_ in chosen.items()}  # fmt: skip
        else:
            names_c, labels_c, segments = names, labels, None
        rows = _chunk_rows(ckpt_name, ckpt, x, names_c, targets, labels_c, boxes, chosen,
                           options, share, explain, segments)  # fmt: skip
        for key_, value in rows.items():
            result[key_] += value
    return result


def _label_target(label: str, ckpt, where: str = "label") -> int:
    """The class index a label names in `ckpt` (a UsageError naming `where` otherwise)."""
    from viz.commands.inputs import resolve_target

    index = resolve_target(label, ckpt.class_names, where)
    assert index is not None
    return index


# --- the run ----------------------------------------------------------------------------------


def _fingerprint(inputs: ReportInputs, options: ReportOptions) -> dict:
    images = hashlib.sha256()
    for path, name, label in inputs.images:
        st = path.stat()
        images.update(f"{name}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    boxes = json.dumps(inputs.boxes, sort_keys=True) if inputs.boxes is not None else ""
    return {
        # tuples as JSON reads them back
        "options": asdict(options)
        | {"smoothing": list(options.smoothing), "layers": options.layers and list(options.layers)},
        "checkpoints": {name: ckpt.sha256 for name, _, ckpt in inputs.checkpoints},
        "images": images.hexdigest(),
        "boxes": hashlib.sha256(boxes.encode()).hexdigest(),
    }


def _write_json(path: Path, value: object) -> None:
    from models.checkpoints.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(value, sort_keys=True).encode())


def _prepare_parts(out: Path, fingerprint: dict, overwrite: bool) -> Path:
    """OUT/parts, checked against this run's fingerprint (or cleared with `overwrite`)."""
    from viz.commands.inputs import UsageError

    parts = out / _PARTS
    stamp = parts / "run.json"
    if parts.exists() and overwrite:
        shutil.rmtree(parts)
    if stamp.exists():
        try:
            before = json.loads(stamp.read_text())
        except (OSError, ValueError):
            before = None
        if before != fingerprint:
            raise UsageError(
                f"{out} holds results of a different run (another checkpoint, image set or "
                "option); use --overwrite to start again, or another --out"
            )
    elif out.exists() and any(p.name != _PARTS for p in out.iterdir()) and not overwrite:
        raise UsageError(f"{out} is not empty and holds no report parts; use --overwrite")
    parts.mkdir(parents=True, exist_ok=True)
    _write_json(stamp, fingerprint)
    return parts


def _check_local_parts(parts: Path, fingerprint: dict, overwrite: bool) -> None:
    """Another rank's parts folder (its own disk, or rank 0's shared one): same run or cleared."""
    from viz.commands.inputs import UsageError

    stamp = parts / "run.json"
    try:
        before = json.loads(stamp.read_text())
    except (OSError, ValueError):
        before = None
    if before is not None and before != fingerprint:
        if not overwrite:
            raise UsageError(f"{parts} holds results of a different run; use --overwrite")
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if before != fingerprint:
        _write_json(stamp, fingerprint)


def run_report(
    inputs: ReportInputs,
    out: str | os.PathLike,
    options: ReportOptions = ReportOptions(),
    *,
    overwrite: bool = False,
    workers: int = 0,
    device: str = "cpu",
    progress: Callable[[float, int], None] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, list[dict]] | None:
    """Run the report's measurements; rank 0 gets every rank's rows (the report is written apart).

    Args:
        inputs: checkpoints and images (see `ReportInputs`).
        out: output folder (its `parts/` keeps finished chunks).
        options: what to measure.
        overwrite: clear earlier parts.
        workers: DataLoader worker processes for decoding (0: decode in this process).
        device: "cpu" or "cuda".
        progress: called with (images done, images of this rank) as the work goes; within a
            chunk the count is fractional (the share of the chunk's forward passes done).
        ranks: this process among the ranks of a torchrun job; default alone.

    Returns:
        On rank 0 the rows ({"per_image", "per_map", "sanity"}, in image order), else None.

    Raises:
        RankFailure: with several ranks, when any of them failed (on every rank).
        UsageError: alone, when `out` holds another run's results.
    """
    ranks = ranks or Ranks()
    out = Path(out)
    parts = out / _PARTS
    error = None
    if ranks.rank == 0:
        try:
            _prepare_parts(out, _fingerprint(inputs, options), overwrite)
        except Exception as exc:
            if ranks.world == 1:
                raise
            error = f"rank 0: {error_line(exc)}"
    ranks.check(error)
    finished: list[int] = []
    try:
        if ranks.rank != 0:  # a node without a shared disk keeps its own parts
            _check_local_parts(parts, _fingerprint(inputs, options), overwrite)
        finished = _run_chunks(inputs, options, parts, workers, device, progress, ranks)
        error = None
    except Exception as exc:
        if ranks.world == 1:
            raise
        error = f"rank {ranks.rank}: {error_line(exc)}"
    ranks.check(error)
    # rows are read back from the parts only now, so memory stays flat while images run
    done = {first: _read_part(parts, first) for first in finished}
    gathered = ranks.gather(done)
    if gathered is None:
        return None
    for other in gathered[1:]:
        for first, rows in other.items():  # type: ignore[union-attr]
            if first not in done:
                _write_json(_part_path(parts, first), rows)
                done[first] = rows
    merged: dict[str, list[dict]] = {"per_image": [], "per_map": [], "sanity": [], "samples": []}
    for first in sorted(done):
        for key, value in done[first].items():
            merged[key] += value
    return merged


def _part_path(parts: Path, first: int) -> Path:
    return parts / f"chunk-{first:08d}.json"


def _read_part(parts: Path, first: int) -> dict:
    return json.loads(_part_path(parts, first).read_text())


def _run_chunks(inputs, options, parts: Path, workers, device, progress, ranks: Ranks):
    """This rank's chunks: those not saved yet are run and saved. Returns every chunk's first."""
    dev = torch.device(device)
    for _, _, ckpt in inputs.checkpoints:
        ckpt.model.to(dev)
    mine = chunks_of_rank(len(inputs.images), options.batch_size, ranks.rank, ranks.world)
    todo = []
    for chunk in mine:
        try:
            _read_part(parts, chunk[0])  # a complete part (written atomically) is kept
        except (OSError, ValueError):
            todo.append(chunk)
    preprocesses = {_preprocess_key(c): c.preprocess for _, _, c in inputs.checkpoints}
    loader = torch.utils.data.DataLoader(
        _Decode([p for p, _, _ in inputs.images], preprocesses), batch_sampler=todo,
        num_workers=workers, collate_fn=_collate, prefetch_factor=4 if workers else None,
    )  # fmt: skip
    total = sum(len(c) for c in mine)
    finished = total - sum(len(c) for c in todo)
    if progress:
        progress(finished, total)
    for items in loader:
        rows = _run_chunk(
            items, inputs, options, dev, _within(progress, finished, len(items), total)
        )
        _write_json(_part_path(parts, items[0][0]), rows)
        finished += len(items)
        if progress:
            progress(finished, total)
    return [c[0] for c in mine]


def _within(progress, before: int, size: int, total: int) -> Callable[[float], None] | None:
    """A chunk's `advance(fraction)` as the run's `progress(images done, total)`."""
    if progress is None:
        return None
    return lambda fraction: progress(before + fraction * size, total)


# --- inputs -----------------------------------------------------------------------------------


def _images_with_labels(folder: str, labels_csv: str | None) -> list[tuple[Path, str, str | None]]:
    """Image files of `folder` with labels from the CSV, from class subfolders, or none."""
    from viz.commands.inputs import UsageError, collect_images, label_of, read_labels

    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--images {folder}: not a folder")
    files, _ = collect_images([folder])
    if labels_csv:
        labels = read_labels(labels_csv)
        out = []
        for path, name in files:
            label = label_of(path, labels)
            if label is None:
                raise UsageError(f"--labels {labels_csv} has no row for {path}")
            out.append((path, name, label))
        return out
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes and all(path.parent != root for path, _ in files):
        return [(path, name, path.relative_to(root).parts[0]) for path, name in files]
    return [(path, name, None) for path, name in files]


def _resolve_folder_labels(images, checkpoints) -> list[tuple[Path, str, str | None]]:
    """ImageFolder class folders -> class names each checkpoint knows (by name or by order)."""
    from viz.commands.inputs import UsageError, class_index

    folders = sorted({lab for _, _, lab in images if lab is not None})
    out_labels: dict[str, str] = {}
    for _, _, ckpt in checkpoints:
        by_name = all(class_index(f, ckpt.class_names) is not None for f in folders)
        by_order = len(folders) == len(ckpt.class_names)
        if not (by_name or by_order):
            raise UsageError(
                f"the class folders ({', '.join(folders[:4])}, ...) match neither the class "
                f"names nor the number of classes ({len(ckpt.class_names)}) of {ckpt.label}; "
                "give --labels"
            )
        for i, f in enumerate(folders):
            # a folder named like a class is that class; else the i-th folder is class i,
            # as torchvision's ImageFolder (and models.training) number them: shown by its name
            # when every model calls class i the same, else by its index
            if by_name:
                out_labels.setdefault(f, f)
                continue
            name = ckpt.class_names[i]
            same = all(class_index(name, c.class_names) == i for _, _, c in checkpoints)
            out_labels.setdefault(f, name if same else str(i))
    return [(p, n, None if lab is None else out_labels[lab]) for p, n, lab in images]


def inputs_for(
    checkpoints: list[tuple[str, str, object]],
    images: str | os.PathLike,
    *,
    labels: str | None = None,
    boxes: str | None = None,
    max_images: int | None = None,
) -> ReportInputs:
    """What a report runs on: the images of a folder with their labels, checked against models.

    Args:
        checkpoints: (name, path, Checkpoint) per model.
        images: an ImageFolder (labels from the class folders) or any folder of images.
        labels: CSV with columns file,label (overrides class folders).
        boxes: box file or folder (`viz.measures.localization.read_boxes`).
        max_images: refuse larger folders.

    Raises:
        UsageError: a missing folder, a label no model knows, a bad box file, too many images.
    """
    from viz.commands.inputs import UsageError
    from viz.measures.localization import BoxError, read_boxes

    found = _images_with_labels(str(images), labels)
    if not labels:
        found = _resolve_folder_labels(found, checkpoints)
    if max_images is not None and len(found) > max_images:
        raise UsageError(f"{len(found)} images in {images}; this server allows {max_images}")
    for _, _, ckpt in checkpoints:  # every label must be a class of every model
        for path, _, label in found:
            if label is not None:
                _label_target(label, ckpt, f"label of {path.name}")
    try:
        box_map = read_boxes(boxes) if boxes else None
    except BoxError as exc:
        raise UsageError(str(exc)) from None
    return ReportInputs(checkpoints, found, box_map)
