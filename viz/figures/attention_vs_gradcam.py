"""Per CAM layer: the attention map of its stage, the CAM, and how much they agree.

At a single column the layers are rows (attention, CAM, numbers); from 5 inches on they are
columns (attention above the CAM, numbers below), so a double-column figure uses its width.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from models.probes import kind_style
from viz.engine.maps import DEFAULT_CMAP, overlay
from viz.figures.canvas import (
    Canvas,
    as_image,
    check_index,
    figure_width,
    literal,
    spatial_map,
    styled,
    text_width,
)
from viz.figures.outline import outlined

if TYPE_CHECKING:
    from viz.engine.cam import Analysis
    from viz.engine.trace import AttentionRecord
    from viz.measures.metrics import Agreement

__all__ = ["attention_vs_gradcam"]

WIDE = 5.0  # inches from which the layers are laid out as columns
NO_ATTENTION = "agreement n/a:\nno attention map\nat this stage"


def name_tail(name: str, chars: int) -> str:
    """A dotted module name as it fits `chars`: whole, else its last parts after "…"
    ("…backbone.layer3"); "" when not even its last part fits."""
    if len(name) <= chars:
        return name
    parts = name.split(".")
    for k in range(1, len(parts)):
        tail = "…" + ".".join(parts[k:])
        if len(tail) <= chars:
            return tail
    return ""


@dataclass(frozen=True)
class _Layer:
    """One CAM layer of the figure with its stage's attention map and their agreement."""

    stage: int
    name: str
    cam: Tensor  # (h, w)
    attention: AttentionRecord | None
    score: Agreement | None

    @property
    def heading(self) -> str:
        """For a row's side: a long layer name (a detector's backbone.body.12) gets a line of
        its own, as the heading runs up a row, which is short in a single-column figure."""
        return self.heading_joined(" · " if len(name_tail(self.name, 22)) <= 8 else "\n")

    @property
    def column_heading(self) -> str:
        """Above a column: stage and layer on one line."""
        return self.heading_joined(" · ")

    def heading_joined(self, joint: str) -> str:
        grid = f"{self.cam.shape[-2]}×{self.cam.shape[-1]}"
        layer = name_tail(self.name, 22)
        where = "whole network" if self.stage == 0 else f"stage {self.stage}{joint}{layer}"
        if self.attention is not None and (self.stage == 0 or self.attention.layer is not None):
            # a ViT's "stages" are depth quarters: name the block whose attention is shown
            where = "whole network" if self.stage == 0 else layer
            return f"{where}\n{grid} vs {self.attention.label}"
        if self.attention is not None and not kind_style(self.attention.kind).own_level:
            # a stage holds a module per block (CBAM, Swin): say which one's map is shown, by
            # the end of its name that fits a row's side (a hybrid's layer3.1.cbam, Swin's
            # blocks.1.attn), so it is not mistaken for a transformer's "block 1"
            name = name_tail(self.attention.name, 16) or f"block {self.attention.block}"
            return f"{where}\n{grid} vs {name}"
        return f"{where}\n{grid}"

    def absent(self, missing: str) -> str:
        """What the attention panel says when there is no map to draw."""
        if self.stage == 0:  # FullGrad: one map at the input's resolution
            return "one map for\nthe network"
        return f"{missing}\nin stage {self.stage}"

    def numbers(self, missing: str) -> str:
        """The agreement as text (or why there is none)."""
        if self.stage == 0 and self.attention is None:
            return "no single stage\nto compare with"
        if self.attention is None or self.score is None:
            return missing
        cells = self.attention.spatial[0].numel()
        coarse = f"\nonly {cells} cells: coarse" if cells < 64 else f"\n{cells} cells"
        if self.score.reason is not None:
            # "constant attention map" in a column as narrow as "IoU (top 20%) = 0.25"
            return f"agreement n/a:\n{textwrap.fill(self.score.reason, 18)}{coarse}"
        return (
            f"Pearson r = {self.score.pearson:.2f}\nSpearman ρ = {self.score.spearman:.2f}\n"
            f"IoU (top {self.score.top_k:.0%}) = {self.score.iou:.2f}{coarse}"
        )


def _layers(one: Analysis, top_k: float) -> list[_Layer]:
    """Every CAM layer (block layers too) in stage order, with its agreement; a network-wide
    map (stage 0, FullGrad) is drawn without one."""
    from viz.measures.metrics import agreement_table

    scores = {layer: (one.trace[name], s) for name, layer, s in agreement_table(one, top_k=top_k)}
    named = [(one.cam_stages.get(n), n) for n in one.cams]
    staged = sorted(((s, n) for s, n in named if s is not None and s >= 0), key=lambda t: t[0])
    scores |= _network_wide_scores(one, [n for s, n in staged if s == 0], top_k)
    return [_Layer(s, n, one.cams[n][0], *scores.get(n, (None, None))) for s, n in staged]


def _network_wide_scores(one: Analysis, names: list[str], top_k: float) -> dict:
    """A transformer's network-wide map (rollout, GAE, LeGrad) against its last block's
    self-attention: the map the methods build on; a CNN's FullGrad has no such partner."""
    from viz.measures.metrics import agreement

    records = one.trace.spatial_records
    if not names or not records or any(r.kind != "self-attention" for r in records):
        return {}
    last = records[-1]
    return {n: (last, agreement(last.spatial[0], one.cams[n][0], top_k=top_k)) for n in names}


@styled
def attention_vs_gradcam(
    image: Image.Image | np.ndarray | Tensor,
    analysis: Analysis,
    *,
    index: int = 0,
    top_k: float = 0.2,
    class_names: Sequence[str] | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    width: str | float = "single",
    render: str = "smooth",
    title: str | None = None,
) -> Figure:
    """Per CAM layer: its stage's attention map, the CAM, and their agreement.

    The attention map of stage s is the spatial map of its last module (CBAM: M_s of the last
    block; BAM: sigma(M_s) of the BAM after stage s). The agreement is
    `viz.measures.metrics.agreement_table`'s: Pearson r, Spearman rho and the IoU of the two maps'
    top-`top_k` fractions (the same numbers as the app's agreement table; for BAM, Pearson is
    taken on the logit M_s); a constant map has none, and the figure says so. Each map is
    scaled to its own min-max (CAMs of different layers and networks have no common unit).

    Args:
        analysis: from `viz.engine.cam.analyze`; every CAM layer at stage 1-4 is drawn, block layers
            such as `layer4.0` beside the stage layers.
        class_names: names of the classes, to title the figure with the target and P.
        render: "smooth" (bilinear, as the papers) or "cells" (one flat block per map cell,
            the grid drawn: the resolution the network computed at).
    """
    img = as_image(image)
    check_index(index, analysis.batch_size)
    one = analysis.select(index % analysis.batch_size)
    layers = _layers(one, top_k)
    if not layers:
        raise ValueError(f"attention_vs_gradcam needs CAMs with a stage; got {sorted(one.cams)}")
    channel_only = sorted({kind_style(r.kind).label for r in one.trace if r.spatial is None})
    missing = (
        f"{'/'.join(channel_only)}:\nno spatial map" if channel_only else "no spatial\nattention"
    )
    kinds = {r.kind for r in one.trace.spatial_records}
    symbols = {kind_style(k).symbol for k in kinds}
    attention = f"attention {symbols.pop()}".strip() if len(symbols) == 1 else "attention"
    if kinds == {"self-attention"}:
        attention = "self-attention"
    # one layer in a column would leave most of a wide figure empty: a row uses it better
    draw = _columns if figure_width(width) >= WIDE and len(layers) > 1 else _rows
    outline = one.outlines[0] if one.outlines else None

    def shown(m) -> Image.Image:  # a map over the image, the explained region outlined
        return outlined(overlay(img, m, cmap, alpha, render=render), outline)

    canvas = draw(layers, width, missing, (attention, one.method_label), shown)
    canvas.colorbar(cmap, 0.0, 1.0, "each map: own min–max")
    canvas.title(title or _explained(one, class_names))
    return canvas.fig


def _explained(one: Analysis, class_names: Sequence[str] | None) -> str:
    """The title: the class and its P, or what else was explained and its score."""
    if not one.explains_classes:
        return f"explained: {literal(one.explained)}, score={float(one.scores[0]):.4g}"
    target = int(one.target[0])
    name = class_names[target] if class_names and target < len(class_names) else f"class {target}"
    return f"target: {literal(name)}, P={float(one.target_probs[0]):.3f}"


def _rows(layers, width, missing, heads, shown) -> Canvas:
    """One row per layer: attention, CAM, numbers (a single column, or one layer)."""
    # one row may take the whole width of a double-column figure; several keep it short
    largest = 1.3 if len(layers) > 1 else 2.1
    # a heading naming the attention compared gets a line of its own: a row is short
    headings = [layer.heading.replace(" vs ", "\nvs ") for layer in layers]
    # rotated lines take about 1.2 em (7 pt) across each: room for the longest heading
    left = 0.06 + 0.125 * max(h.count("\n") + 1 for h in headings)
    canvas = Canvas(width, [3] * len(layers), left=left, footer=0.42, header=0.22,
                    max_panel=largest)  # fmt: skip
    for r, layer in enumerate(layers):
        if layer.attention is None:
            canvas.note(r, 0, layer.absent(missing))
        else:
            canvas.image(r, 0, shown(spatial_map(layer.attention)[0]))
        canvas.image(r, 1, shown(layer.cam))
        x, y, p = canvas.box(r, 2)
        canvas.ax.text(x + 0.02, y + p / 2, layer.numbers(NO_ATTENTION), ha="left",
                       va="center", fontsize=6)  # fmt: skip
        # the map's real grid: a 7x7 map drawn smooth over a photo still has 49 values
        canvas.left_of(r, 0, headings[r])
    for col, text in enumerate((*heads, "agreement")):  # a smoothing on a line of its own
        wide = text_width(text, 7.0) > canvas.box(0, col)[2]
        canvas.above(0, col, text.replace(" (", "\n(", 1) if wide else text, max_lines=2)
    return canvas


def _columns(layers, width, missing, heads, shown) -> Canvas:
    """One column per layer: attention above the CAM, the numbers below (double column)."""
    n = len(layers)
    canvas = Canvas(width, [n, n], left=0.3, head=[0.3, 0.06], foot=[0.03, 0.5], footer=0.45,
                    header=0.22, max_panel=1.9)  # fmt: skip
    for c, layer in enumerate(layers):
        canvas.above(0, c, layer.column_heading, max_lines=2)
        if layer.attention is None:
            canvas.note(0, c, layer.absent(missing))
        else:
            canvas.image(0, c, shown(spatial_map(layer.attention)[0]))
        canvas.image(1, c, shown(layer.cam))
        x, y, p = canvas.box(1, c)
        canvas.ax.text(x + p / 2, y - 0.03, layer.numbers(NO_ATTENTION), ha="center",
                       va="top", fontsize=6, multialignment="center")  # fmt: skip
    for row, text in enumerate(heads):
        canvas.left_of(row, 0, text)
    return canvas
