"""Small pure helpers for interactive front ends (the Streamlit app): no streamlit imported here.

They keep the app a thin shell: it keys its caches with `digest`, runs the one image -> tensor
-> analysis path through `analyze_images`, and shows what `describe_checkpoint`,
`top_predictions` and `find_classes` return.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

from models.checkpoints.architectures import ForeignArch
from models.checkpoints.checkpoint import Checkpoint, parse_class_names
from models.images import IMAGE_EXTENSIONS
from viz.engine.cam import CAM_METHODS, Analysis, analyze, resolve_layers, stage_layers
from viz.engine.tokens import token_layout

if TYPE_CHECKING:
    from viz.engine.trace import AttentionTrace

__all__ = [
    "IMAGE_TYPES",
    "KeptUploads",
    "NETWORK_MAP",
    "network_map",
    "Prediction",
    "Sample",
    "StandIn",
    "analyze_images",
    "cam_layer_choices",
    "carry_saliency_choice",
    "grid_stand_in",
    "no_spatial_maps",
    "shown_at_stage",
    "comparison_order",
    "GridModel",
    "model_grid_rows",
    "default_cam_layers",
    "check_upload_size",
    "describe_checkpoint",
    "digest",
    "find_classes",
    "parse_class_names",
    "sample_images",
    "stack_analyses",
    "top_predictions",
]

IMAGE_TYPES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
"""File extensions offered by upload widgets (`models.images.load_image` reads them all)."""


@dataclass(frozen=True)
class Prediction:
    """One class of a ranking: its index, name and softmax probability."""

    index: int
    name: str
    prob: float


@dataclass(frozen=True)
class Sample:
    """A sample image and its ground-truth class name ('' when unknown)."""

    path: Path
    label: str


def digest(data: bytes) -> str:
    """SHA-256 hex digest of `data` (the cache key of an image or checkpoint)."""
    return hashlib.sha256(data).hexdigest()


def check_upload_size(size: int, limit: int, name: str = "file") -> None:
    """Raise ValueError with one line if `size` bytes exceeds `limit`."""
    if size > limit:
        raise ValueError(
            f"{name} is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit"
        )


_ROW_ORDER = {None: 0, "se": 1, "bam": 2, "cbam": 3}


def comparison_order(ckpt: Checkpoint) -> int:
    """Where a model goes in a comparison: plain, SE, BAM, CBAM (as the papers), then others."""
    return _ROW_ORDER.get(ckpt.arch.attention, len(_ROW_ORDER))


def describe_checkpoint(ckpt: Checkpoint, source: str = "") -> dict[str, str]:
    """What was detected in a checkpoint, as display rows (label -> value)."""
    arch = ckpt.arch
    rows = {"Model": ckpt.label}
    if isinstance(arch, ForeignArch):
        rows["Architecture"] = f"{arch.name} ({arch.source})"
    else:
        rows["Depth"] = str(arch.depth)
    attention = arch.attention or "none"
    # module names in capitals (CBAM, SE), words as they are: "CBAM + self-attention"
    rows["Attention"] = " + ".join(
        part if part in ("none", "self-attention") else part.upper()
        for part in attention.split("+")
    )
    rows["Classes"] = str(arch.num_classes)
    rows["Input"] = f"{ckpt.preprocess.crop} px (resize {ckpt.preprocess.resize})"
    if not isinstance(arch, ForeignArch):
        rows["Stem"] = arch.stem
    rows["Format"] = ckpt.format
    rows["SHA-256"] = ckpt.sha256[:12]
    if arch.attention == "bam":
        rows["BAM fusion"] = arch.bam_fusion
    if source:
        rows["Source"] = source
    return rows


def top_predictions(
    probs: torch.Tensor, class_names: Sequence[str], k: int = 5
) -> list[Prediction]:
    """The `k` most probable classes of one image.

    Args:
        probs: (K,) or (1, K) softmax scores.
        class_names: K names.
        k: how many to return (capped at K).
    """
    p = probs.detach().reshape(-1).float()
    if p.numel() != len(class_names):
        raise ValueError(f"{p.numel()} scores for {len(class_names)} class names")
    values, indices = p.topk(min(k, p.numel()))
    return [Prediction(int(i), class_names[int(i)], float(v)) for v, i in zip(values, indices)]


def find_classes(class_names: Sequence[str], query: str, limit: int | None = None) -> list[int]:
    """Indices of the classes whose name contains `query` (case-insensitive); all for ''.

    Names that start with the query come first, then the other matches, each in class order.
    """
    q = query.strip().casefold()
    if not q:
        hits = list(range(len(class_names)))
    else:
        starts = [i for i, n in enumerate(class_names) if n.casefold().startswith(q)]
        inside = [
            i for i, n in enumerate(class_names) if q in n.casefold() and i not in set(starts)
        ]
        hits = starts + inside
    return hits[:limit] if limit is not None else hits


def default_cam_layers(model: nn.Module, method: str = "gradcam") -> list[str]:
    """The layers `method` explains unless told otherwise: the network's stage layers, or the
    last of them for the methods that run a forward per channel (as `analyze`); [] when the
    stages cannot be found (the user picks)."""
    try:
        stages = stage_layers(model)
    except ValueError:
        return []
    return stages[-1:] if CAM_METHODS[method].default_layers == "last" else stages


def layers_for_method(model: nn.Module, method: str, layers: Sequence[str]) -> tuple[list, str]:
    """The chosen layers `method` can explain, and a note when some were dropped: CAM exists
    only where global pooling and the classifier follow, so of several layers it keeps the
    deepest (in `cam_layer_choices` order)."""
    layers = list(layers)
    if method != "cam" or len(layers) < 2:
        return layers, ""
    order = cam_layer_choices(model)
    deepest = max(layers, key=lambda name: order.index(name) if name in order else -1)
    note = (
        f"CAM needs the classifier right after its layer: shown at {deepest} only "
        "(Grad-CAM works at every layer)."
    )
    return [deepest], note


def methods_for(model: nn.Module) -> list[str]:
    """The CAM methods that apply to `model`: for a CNN every layer method; for a transformer
    the layer methods that work on tokens, and rollout, GAE, LeGrad for a ViT (global
    self-attention)."""
    layout = token_layout(model)
    if layout is None:
        return [name for name, m in CAM_METHODS.items() if not m.reads_attention]
    vit = layout.family == "vit"
    return [name for name, m in CAM_METHODS.items()
            if not m.cnn_only and (not m.reads_attention or vit)]  # fmt: skip


def cam_layer_choices(model: nn.Module) -> list[str]:
    """Layers a user may pick for a CAM: the stage layers, then the blocks inside them.

    Stage layers come from the network's resolution levels (`viz.engine.cam.stage_layers`), so any
    CNN gets sensible choices: `layer1`..`layer4` and `layer3.1` in a ResNet, `features.5` and
    `features.5.2` in an EfficientNet. A ViT offers each block's first norm (last first),
    a hybrid CNN + ViT its CNN stages before them.
    """
    layout = token_layout(model)
    try:
        stages = stage_layers(model)
    except ValueError:
        stages = None
    if layout is not None and layout.family == "vit":  # each block's first norm, last first
        container, _, norm = layout.last_norm.rsplit(".", 2)
        children = [c for c, _ in model.get_submodule(container).named_children()]
        blocks = [f"{container}.{c}.{norm}" for c in reversed(children)]
        # a hybrid's CNN stages before its tokens (the CBAM trunk's layer1-3) come first
        return [s for s in stages or [] if s not in blocks] + blocks
    if stages is None:
        return [n for n, _ in model.named_modules() if n and "." not in n]
    blocks = []
    for stage in stages:
        module = model.get_submodule(stage)
        blocks += [f"{stage}.{child}" for child, _ in module.named_children()]
    return stages + blocks


def analyze_images(
    ckpt: Checkpoint,
    images: Sequence[Image.Image],
    target: int | Sequence[int] | Callable[[object], torch.Tensor] | None = None,
    *,
    method: str = "gradcam",
    layers: Sequence[str] | None = None,
    smoothing: Sequence[str] = (),
    options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Preprocess RGB images with the checkpoint's own recipe and analyse them in one batch.

    Args:
        ckpt: a loaded checkpoint.
        images: PIL images (any size; cropped as the checkpoint says).
        target: class to explain (one for all, one per image) or None for each top-1, or a
            callable of the network's output (`viz.targets`; `viz.engine.cam.analyze`).
        method: one of `viz.engine.cam.CAM_METHODS`.
        layers: CAM layers (default the network's stage layers, `layer1`..`layer4` in a ResNet).
        smoothing: "aug" and/or "eigen" (`viz.engine.cam.analyze`).
        options: method options (`num_samples`, ...; `viz.engine.cam.analyze`).
        progress: `progress(done, total)` in images through the network (the pass methods).

    Raises:
        ValueError: an unknown method or layer, or a target outside the classes, named.
    """
    if not images:
        raise ValueError("no images to analyse")
    if method not in CAM_METHODS:
        raise ValueError(f"Grad-CAM method must be one of {list(CAM_METHODS)}, got {method!r}")
    if layers is not None:
        layers = list(layers)
        if not layers:
            raise ValueError("choose at least one CAM layer")
        resolve_layers(ckpt.model, layers)
    x = ckpt.preprocess.batch(list(images))
    return analyze(ckpt.model, x, target, layers, method=method, smoothing=smoothing,
                   options=options, progress=progress)  # fmt: skip


@dataclass(frozen=True)
class GridModel:
    """One model's row of the model grid: its analysis of each column and the n/a columns."""

    label: str
    tell_apart: str  # added to the label when two rows would read the same (a file, a source)
    checkpoint: Checkpoint
    analyses: Sequence[Analysis]
    absent: Sequence[int] = ()  # columns whose class this model does not have


def model_grid_rows(
    models: Sequence[GridModel],
) -> tuple[list[tuple[str, Analysis]], list[list[int]]]:
    """The model grid's rows (label, one batch of analyses) and n/a columns, for the command line
    and the app alike: in the papers' order (plain, SE, BAM, CBAM, then others, stable), with
    labels that tell two rows of the same architecture apart."""
    ordered = sorted(models, key=lambda m: comparison_order(m.checkpoint))
    labels = [m.label for m in ordered]
    rows = [
        (f"{m.label} ({m.tell_apart})" if labels.count(m.label) > 1 else m.label,
         stack_analyses(m.analyses))
        for m in ordered
    ]  # fmt: skip
    return rows, [sorted(m.absent) for m in ordered]


def _lazy_cat(records: Sequence) -> object:
    """The records' full attention matrices joined on the batch, computed when first read."""
    from viz.engine.trace import LazyTensor

    if records[0].attention_source is None:
        return None
    return LazyTensor(lambda: torch.cat([r.attention for r in records], 0))


def stack_analyses(analyses: Sequence[Analysis]) -> Analysis:
    """Join single-image analyses of one model (same method and layers) into one batch."""
    from viz.engine.trace import AttentionTrace

    if not analyses:
        raise ValueError("no analyses to stack")
    first = analyses[0]
    if any(
        a.method != first.method
        or a.smoothing != first.smoothing
        or list(a.cams) != list(first.cams)
        for a in analyses
    ):
        raise ValueError("analyses to stack must share the Grad-CAM method and layers")

    def cat(items):
        items = list(items)
        return None if items[0] is None else torch.cat(items, 0)

    records = [
        dataclasses.replace(
            rec,
            channel=cat(a.trace[i].channel for a in analyses),
            spatial=cat(a.trace[i].spatial for a in analyses),
            gate=cat(a.trace[i].gate for a in analyses),
            feature_in=cat(a.trace[i].feature_in for a in analyses),
            feature_out=cat(a.trace[i].feature_out for a in analyses),
            attention_source=_lazy_cat([a.trace[i] for a in analyses]),
            heads=cat(a.trace[i].heads for a in analyses),
        )
        for i, rec in enumerate(first.trace)
    ]
    return dataclasses.replace(
        first,
        logits=cat(a.logits for a in analyses),
        probs=cat(a.probs for a in analyses),
        target=cat(a.target for a in analyses),
        scores=cat(a.scores for a in analyses),
        trace=AttentionTrace(records),
        cams={k: cat(a.cams[k] for a in analyses) for k in first.cams},
    )


@dataclass(frozen=True)
class StandIn:
    """The layer a model-grid row shows for a stage its network does not have, and in words."""

    layer: str
    note: str  # e.g. "no stage 3 (one resolution throughout): block 9 of 12 (blocks.8.norm1)"


def grid_stand_in(model: nn.Module, analysis: Analysis, stage: int) -> StandIn | None:
    """What a model-grid row shows at `stage` when its network has no such stage.

    A plain ViT keeps one resolution throughout (all its blocks are the last stage): stage s of
    four is shown at the block s/4 of the way down (stage 3 of a 12-block DeiT: block 9,
    `blocks.8.norm1`). Another network without that stage shows its nearest stage.

    Args:
        model: the row's network.
        analysis: the row's analysis at its own stage layers (`layers=None`).
        stage: the stage the grid shows, 1..4.

    Returns:
        None when the analysis has a CAM at `stage`, or one map for the whole network (rollout,
        GAE, LeGrad, FullGrad: the row shows it whatever the stage); else the stand-in layer
        (not necessarily among `analysis.cams`: analyse it, then `shown_at_stage`).
    """
    by_stage = analysis.stage_cams()
    if stage in by_stage or set(by_stage) == {0} or not by_stage:
        return None
    layout = token_layout(model)
    if layout is not None and layout.family == "vit" and set(by_stage) == {max(by_stage)}:
        blocks = cam_layer_choices(model)[::-1]  # first to last
        k = min(len(blocks), max(1, math.ceil(stage * len(blocks) / 4)))
        layer = blocks[k - 1]
        return StandIn(layer, f"no stage {stage} (one resolution throughout): block {k} of "
                              f"{len(blocks)} ({layer}), at the same depth")  # fmt: skip
    nearest = min(by_stage, key=lambda s: (abs(s - stage), -s))
    layer = by_stage[nearest]
    return StandIn(layer, f"no stage {stage}: its nearest, stage {nearest} ({layer})")


def shown_at_stage(analysis: Analysis, layer: str, stage: int) -> Analysis:
    """`analysis` with `layer`'s CAM only, filed under `stage`: a row of the model grid at the
    layer standing in for a stage its network does not have (`grid_stand_in`)."""
    if layer not in analysis.cams:
        raise ValueError(f"no CAM for {layer!r}; the analysis has {sorted(analysis.cams)}")
    return dataclasses.replace(
        analysis, cams={layer: analysis.cams[layer]}, cam_stages={layer: stage}
    )


NETWORK_MAP = "cam:(network"
"""The start of the saliency-map choice of a whole-network method's map (rollout, GAE, LeGrad,
FullGrad): `network_map(method)`; a layer's CAM is `cam:<layer>`, a module's map
`attention:<name>`."""


def network_map(method: str) -> str:
    """The saliency-map choice of `method`'s whole-network map, e.g. "cam:(network gae)": one
    value per method, so a box never shows one method's name for another's map."""
    return f"{NETWORK_MAP} {method})"


def carry_saliency_choice(
    before: Sequence[str] | None,
    offered: Sequence[str],
    *,
    whole: bool,
    was_whole: bool | None,
    layer_picks: Sequence[str] = (),
) -> list[str]:
    """The saliency maps chosen for deletion/insertion once the page changed (method, layers or
    model): the user's choice where it still applies, the method's map first.

    Args:
        before: the choice before the change (None: no choice yet).
        offered: the maps on offer now: the method's (`cam:<layer>`, or `network_map(method)`
            for a whole-network method) first, then the attention modules' (`attention:<name>`).
        whole: the method in use gives one map for the whole network.
        was_whole: the method `before` was chosen under did (None: not known).
        layer_picks: the layer CAMs last chosen under a layer method; they come back when one
            is chosen again after a whole-network method.

    Returns:
        The choice (a subset of `offered`, the method's maps first). Switching between a layer
        method and a whole-network one offers the new method's map(s); a choice is never emptied
        by a switch (the default then: the deepest CAM and the last attention module).
    """
    cams = [m for m in offered if m.startswith("cam:")]
    default = cams[-1:] + [m for m in offered if m.startswith("attention:")][-1:]
    if before is None:
        return default
    if whole and was_whole is False:  # a layer method -> a whole-network one
        mine = cams
    elif not whole and was_whole:  # and back: the user's layer CAMs, else the deepest
        mine = [m for m in layer_picks if m in offered] or cams[-1:]
    elif whole and was_whole:  # one whole-network method -> another: its map, if one was chosen
        mine = cams if any(m.startswith(NETWORK_MAP) for m in before) else []
    else:
        mine = [m for m in before if m.startswith("cam:") and m in offered]
    picked = mine + [m for m in before if m.startswith("attention:") and m in offered]
    return picked or (default if before else [])


def no_spatial_maps(label: str, trace: AttentionTrace) -> str:
    """Why a model has no spatial attention map, in one line (said instead of an empty figure)."""
    if trace.spatial_records:
        raise ValueError(f"{label} has spatial attention maps")
    if trace.channel_records:
        kinds = sorted({r.kind.upper() for r in trace.channel_records})
        return (f"{label}'s {'/'.join(kinds)} modules have no spatial map: they reweight "
                "channels only (see the Channel attention view).")  # fmt: skip
    return f"{label} has no attention modules: no spatial attention maps to show."


class KeptUploads:
    """Uploaded files kept on the server under a random key, for a page that is reloaded (a
    browser reload starts a new app session with empty upload boxes).

    Bounded: at most `max_bytes` in all (the least recently used go first) and `ttl` seconds
    after they were last put or read; files over the bound are not kept. Thread-safe: one
    store serves every session of a server.
    """

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.ttl, self._clock = max_bytes, ttl, clock
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, tuple[float, list[tuple[str, bytes]]]] = OrderedDict()

    @staticmethod
    def new_key() -> str:
        """A key no one can guess (128 bits)."""
        return secrets.token_urlsafe(16)

    def put(self, key: str, files: Sequence[tuple[str, bytes]]) -> bool:
        """Keep `files` (name, bytes) under `key`, replacing what it held; False: too large."""
        files = [(str(name), bytes(data)) for name, data in files]
        size = sum(len(data) for _, data in files)
        with self._lock:
            self._kept.pop(key, None)
            if size > self.max_bytes:
                return False
            self._expire()
            while self._kept and self._size() + size > self.max_bytes:
                self._kept.popitem(last=False)
            self._kept[key] = (self._clock(), files)
            return True

    def get(self, key: str) -> list[tuple[str, bytes]]:
        """The files kept under `key` ([] when none, or expired)."""
        with self._lock:
            self._expire()
            if key not in self._kept:
                return []
            _, files = self._kept.pop(key)
            self._kept[key] = (self._clock(), files)  # used: kept longest
            return list(files)

    def drop(self, key: str) -> None:
        with self._lock:
            self._kept.pop(key, None)

    def _size(self) -> int:
        return sum(len(data) for _, files in self._kept.values() for _, data in files)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (when, _) in self._kept.items() if now - when > self.ttl]:
            del self._kept[key]


def sample_images(folder: str | Path) -> list[Sample]:
    """The sample images of `folder`, with labels from its `labels.csv` (file,wnid,label) if any."""
    root = Path(folder)
    if not root.is_dir():
        return []
    labels: dict[str, str] = {}
    table = root / "labels.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("file"):
                    labels[row["file"]] = row.get("label", "") or ""
    files = sorted(
        p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    return [Sample(p, labels.get(p.name, "")) for p in files]
