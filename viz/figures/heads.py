"""Every self-attention head of a transformer: rows are blocks, columns are heads.

A ViT's cell is the class token's attention to the patches in one head (`rec.heads[i, j]`);
a Swin's is the attention each patch receives in its window, one group of rows per stage
(its grid and head count change with the stage). Many small panels: no per-panel titles, only
"block k" beside each row and head numbers above the columns; blocks with few heads (DeiT-tiny's
3) sit side by side, read top to bottom, so the figure is not a narrow strip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from viz.engine.maps import DEFAULT_CMAP, overlay
from viz.engine.trace import AttentionRecord, AttentionTrace
from viz.figures.canvas import (
    Canvas,
    as_image,
    figure_width,
    heat_rgb,
    maps_name,
    pick_image,
    styled,
    text_width,
    value_range,
)

__all__ = ["attention_heads"]

LABEL_PT = 6.0  # row and column labels: the minimum size, the panels are small
NUMBER_ROOM = 0.11  # inches above a line for its head numbers
TITLE_ROOM = 0.17  # inches above a stage's first line for its bold title
GAP = 0.02  # inches between panels
PART_GAP = 0.1  # inches between two blocks side by side (before the second one's label)
MIN_PANEL, MIN_PANEL_WIDE = 0.3, 0.45  # inches: blocks share a row only while panels keep this
MAX_PANEL = 0.6


@dataclass(frozen=True)
class _Part:
    """Heads `first`..`first + count - 1` of record `rec`, side by side in one row."""

    rec: int
    first: int
    count: int
    label: str  # beside it ("" on a wrapped block's continuation)
    numbers: bool  # head numbers above it


@dataclass(frozen=True)
class _Row:
    parts: list[_Part]  # blocks side by side when a block has few heads (newspaper columns)
    title: str  # bold stage title above it (Swin), or ""

    @property
    def count(self) -> int:
        return sum(p.count for p in self.parts)


@styled
def attention_heads(
    image: Image.Image | np.ndarray | Tensor,
    trace: AttentionTrace,
    *,
    index: int = 0,
    on_image: bool = True,
    shared_scale: bool = True,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    width: str | float = "double",
    render: str = "smooth",
    title: str | None = None,
    max_columns: int | None = None,
) -> Figure:
    """Each self-attention head's map, blocks in rows and heads in columns.

    Args:
        image: the crop the network saw (PIL, (H, W, 3) or (3, H, W)).
        trace: attention trace of a batch with self-attention records; image `index` is shown.
        on_image: maps over the image (at `alpha`); False draws the plain maps.
        shared_scale: one colour scale for every head (attention probabilities share a unit);
            False stretches each map to its own min-max.
        width: "single", "double" or inches.
        render: "smooth" (bilinear) or "cells" (one flat block per patch, the grid drawn).
        max_columns: panels per row: a block with more heads wraps onto numbered lines;
            blocks with few heads sit side by side while their panels stay legible (default
            12 at single width, 16 at double).

    Raises:
        ValueError: the trace has no self-attention heads.
    """
    trace = pick_image(trace, index)
    records = [r for r in trace if r.heads is not None]
    if not records:
        raise ValueError("attention_heads needs self-attention records (a ViT or Swin trace)")
    inches = figure_width(width)
    if max_columns is None:
        max_columns = 16 if inches >= 5.0 else 12
    # room for the widest row label, and for "head" beside the head numbers
    label_w = 0.04 + max(text_width(t, LABEL_PT) for t in ["head", *map(_row_label, records)])
    rows = [row for group in _groups(records) for row in
            _group_rows(records, group, max(1, max_columns), inches, label_w)]  # fmt: skip
    canvas = _canvas(rows, width, label_w, bool(title))
    maps = [r.heads[0].float() for r in records]
    vmin, vmax = value_range(maps) if shared_scale else (0.0, 1.0)
    base = _shrunk(as_image(image), canvas.panel) if on_image else None
    for r, row in enumerate(rows):
        cells = [maps[p.rec][p.first + j] for p in row.parts for j in range(p.count)]
        for col, m in enumerate(cells):
            lo, hi = (vmin, vmax) if shared_scale else (float(m.min()), float(m.max()))
            canvas.image(r, col, _panel(base, m, cmap, alpha, lo, hi, render, canvas.panel))
    _labels(canvas, rows, label_w)
    what = maps_name(records).replace(", mean of heads", "")  # every head shown, none averaged
    canvas.colorbar(
        cmap, vmin, vmax, f"{what}, per head" if shared_scale else f"{what}, each map: own min–max"
    )
    if title:
        canvas.title(title)
    return canvas.fig


def _groups(records: list[AttentionRecord]) -> list[list[int]]:
    """A ViT's blocks are one group (one grid, one head count); a Swin's, one per stage."""
    groups: list[list[int]] = []
    for i, rec in enumerate(records):
        if i == 0 or (rec.layer is None and rec.stage != records[i - 1].stage):
            groups.append([])
        groups[-1].append(i)
    return groups


def _group_rows(records, group: list[int], max_columns: int, inches: float, label_w: float):
    """The group's rows: blocks with few heads side by side (as many as keep panels at least
    `MIN_PANEL`), columns read top to bottom; a block with more than `max_columns` heads wraps
    onto even lines, each numbered (they hold other heads than the first line)."""
    first = records[group[0]]
    heads = first.heads.shape[1]
    title = _group_title(first)
    if heads > max_columns:
        per_line = math.ceil(heads / math.ceil(heads / max_columns))
        return [
            _Row([_Part(i, h, min(per_line, heads - h), "" if h else _row_label(records[i]), True)],
                 title if (i == group[0] and h == 0) else "")
            for i in group for h in range(0, heads, per_line)
        ]  # fmt: skip
    side = _side_by_side(len(group), heads, max_columns, inches, label_w)
    height = math.ceil(len(group) / side)
    return [
        _Row([_Part(group[c * height + r], 0, heads, _row_label(records[group[c * height + r]]),
                    r == 0) for c in range(side) if c * height + r < len(group)],
             title if r == 0 else "")
        for r in range(height)
    ]  # fmt: skip


def _side_by_side(blocks: int, heads: int, max_columns: int, inches: float, label_w: float) -> int:
    """How many blocks share a row: the most whose panels stay at least `MIN_PANEL` wide,
    then evened out (12 blocks in 3 rows of 4 rather than 5, 5, 2)."""
    least = MIN_PANEL_WIDE if inches >= 5.0 else MIN_PANEL

    def panel(k: int) -> float:
        return (inches - 0.05 - k * label_w - (k * heads - 1) * GAP - (k - 1) * PART_GAP) / (
            k * heads
        )

    k = 1
    while k < blocks and (k + 1) * heads <= max_columns and panel(k + 1) >= least:
        k += 1
    return math.ceil(blocks / math.ceil(blocks / k))


def _row_label(rec: AttentionRecord) -> str:
    """ "block 7" in a ViT; in Swin the block within its stage (the stage titles its group)."""
    return rec.label if rec.layer is not None else f"block {rec.block}"


def _group_title(rec: AttentionRecord) -> str:
    if rec.layer is not None:  # a ViT: one grid throughout, the colour bar names it
        return ""
    h, w = rec.heads.shape[-2:]
    return f"stage {rec.stage} · {h}×{w} · {rec.heads.shape[1]} heads"


def _canvas(rows: list[_Row], width, label_w: float, titled: bool) -> Canvas:
    """Room on the left for the row labels (and before each block beside another), above each
    row for its head numbers and stage title."""
    numbered = [any(p.numbers for p in row.parts) for row in rows]
    heads = [
        0.03 + NUMBER_ROOM * n + TITLE_ROOM * bool(row.title) for n, row in zip(numbered, rows)
    ]
    gaps = [[(label_w + PART_GAP) if (j == 0 and k) else 0.0
             for k, p in enumerate(row.parts) for j in range(p.count)] for row in rows]  # fmt: skip
    return Canvas(width, [row.count for row in rows], gaps=gaps, left=label_w + 0.08, head=heads,
                  foot=0.0, gap=GAP, footer=0.42, header=0.25 if titled else 0.0,
                  max_panel=MAX_PANEL)  # fmt: skip


def _labels(canvas: Canvas, rows: list[_Row], label_w: float) -> None:
    """Row labels left of each block, head numbers above numbered blocks, stage titles."""
    ax = canvas.ax
    most = max(p.first + p.count for row in rows for p in row.parts)
    step = _number_step(canvas, most)
    for r, row in enumerate(rows):
        col = 0
        for part in row.parts:
            x, y, p = canvas.box(r, col)
            if part.label:
                ax.text(x - 0.04, y + p / 2, part.label, ha="right", va="center",
                        fontsize=LABEL_PT)  # fmt: skip
            if part.numbers:
                _numbers(canvas, r, col, part, step)
            col += part.count
        if row.title:
            x, y, p = canvas.box(r, 0)
            ax.text(x - 0.04 - label_w, y + p + 0.015 + NUMBER_ROOM, row.title, ha="left",
                    va="bottom", fontweight="bold")  # fmt: skip


def _numbers(canvas: Canvas, r: int, col: int, part: _Part, step: int) -> None:
    """ "head" beside the row label, then the numbers of the block's heads above its panels."""
    x, y, p = canvas.box(r, col)
    top = y + p + 0.015
    canvas.ax.text(x - 0.04, top, "head", ha="right", va="bottom", fontsize=LABEL_PT)
    for j in range(part.count):
        if (part.first + j) % step == 0:
            cx = canvas.box(r, col + j)[0] + p / 2
            canvas.ax.text(cx, top, str(part.first + j), ha="center", va="bottom",
                           fontsize=LABEL_PT)  # fmt: skip


def _number_step(canvas: Canvas, most: int) -> int:
    """Number every head when the numbers fit their columns, else every 2nd, 4th, ..."""
    pitch = canvas.panel + canvas.gap
    widest = text_width(str(most - 1), LABEL_PT) + 0.02
    step = 1
    while widest > step * pitch:
        step *= 2
    return step


def _shrunk(img: Image.Image, panel: float) -> Image.Image:
    """The image at about 400 pixels per inch of panel: hundreds of panels stay fast to blend
    and small to save, and still sharp at 300 dpi."""
    side = max(16, min(max(img.size), round(panel * 400)))
    return img.resize((side, side), Image.Resampling.BILINEAR)


def _panel(base, m: Tensor, cmap, alpha, vmin, vmax, render, panel: float):
    """One head's map over the (shrunk) image, or alone at the same pixel size."""
    if base is not None:
        return overlay(base, m, cmap, alpha, vmin=vmin, vmax=vmax, render=render)
    side = max(16, round(panel * 400))
    return heat_rgb(m, (side, side), cmap, vmin, vmax, render)
