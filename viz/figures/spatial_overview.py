"""The input and every module's spatial attention map overlaid on it, grouped by stage."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from models.probes import kind_style
from viz.engine.maps import DEFAULT_CMAP, overlay
from viz.engine.trace import AttentionTrace
from viz.figures.canvas import (
    Canvas,
    as_image,
    figure_width,
    fits_bold,
    group_label,
    kinds_of,
    maps_name,
    panel_label,
    pick_image,
    spatial_map,
    styled,
    text_width,
    value_range,
)

__all__ = ["spatial_overview"]


@styled
def spatial_overview(
    image: Image.Image | np.ndarray | Tensor,
    trace: AttentionTrace,
    *,
    index: int = 0,
    shared_scale: bool = True,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    width: str | float = "double",
    render: str = "smooth",
    title: str | None = None,
    max_columns: int | None = None,
) -> Figure:
    """The input and every module's spatial attention map overlaid on it, grouped by stage.

    Stages are packed left to right into rows of at most `max_columns` panels (a stage longer
    than a row wraps), each group labelled "stage s" above its "block b" panels. A ViT (one
    grid throughout) has no stages: its blocks fill even rows, each labelled "block k".

    Args:
        image: the crop the network saw (`Preprocess.display_crop`: at the original's resolution), PIL or (H, W, 3).
        trace: attention trace of a batch; image `index` of it is shown.
        shared_scale: one colour scale for all maps (comparable colours, one colour bar);
            False scales each map to its own min-max.
        cmap: colour map of the maps.
        render: "smooth" (bilinear, as the papers) or "cells" (one flat block per map cell,
            the grid drawn: the resolution the network computed at).
        alpha: opacity of the maps over the image, in [0, 1].
        width: "single", "double" or inches.
        title: optional figure title.
        max_columns: panels per row, the input included (default: 9 at double width, 6 at
            single width, so that labels stay legible).

    Returns:
        A Figure. CBAM shows M_s; BAM shows sigma(M_s) of its spatial branch. An SE model (no
        spatial maps) or a plain model gets a note panel beside the image instead.
    """
    img = as_image(image)
    trace = pick_image(trace, index)
    records = trace.spatial_records
    header = 0.25 if title else 0.0
    if not records:
        canvas = _without_maps(img, trace, width, header)
    else:
        if max_columns is None:
            max_columns = 9 if figure_width(width) >= 5.0 else 6
        if max_columns < 2:
            raise ValueError(f"max_columns must be at least 2, got {max_columns}")
        maps = [spatial_map(r)[0] for r in records]
        units, ranges = _scales(records, maps, shared_scale)
        rows = _rows(records, max_columns)
        labels, two_lines = _bar_labels(records, units, ranges, shared_scale, width)
        canvas = _canvas(rows, width, header, two_lines)
        for r, row in enumerate(rows):
            col = 0
            for label, members in row:
                if label:
                    if not fits_bold(label, canvas.span_width(len(members))):
                        label = label.replace(" · ", "\n", 1)
                    canvas.above(r, col, label, span=len(members), lift=0.155,
                                 fontweight="bold", max_lines=2)  # fmt: skip
                for item in members:
                    if item is None:
                        canvas.image(r, col, img)
                        canvas.above(r, col, "input")
                    else:
                        vmin, vmax = ranges[units[item]]
                        scale = {"vmin": vmin, "vmax": vmax} if shared_scale else {}
                        shown = overlay(img, maps[item], cmap, alpha, render=render, **scale)
                        canvas.image(r, col, shown)
                        canvas.above(r, col, panel_label(records[item]))
                    col += 1
        canvas.colorbars(cmap, [(*ranges[u], labels[u]) for u in ranges])
    if title:
        canvas.title(title)
    return canvas.fig


def _bar_labels(records, units: list[str], ranges: dict, shared_scale: bool, width):
    """Each colour bar's label (by unit), and whether a label may need two lines: two bars
    side by side, or one whose label is wider than the figure."""
    inches = figure_width(width)
    labels = {
        u: _bar_label([r for r, v in zip(records, units) if v == u], shared_scale,
                      inches / len(ranges))
        for u in ranges
    }  # fmt: skip
    return labels, len(ranges) > 1 or text_width(labels[units[0]], 7.0) > inches - 0.1


def _bar_label(records, shared_scale: bool, width: float) -> str:
    """The colour bar's label, the longest that fits: a ViT's names its patch grid (no group
    label does); self-attention says its maps are the mean of heads."""
    what = maps_name(records)
    scale = "" if shared_scale else ", each map: own min–max"
    grid = "{}×{} patches".format(*records[0].spatial.shape[-2:])
    longest = what.replace("class-token attention", f"class-token attention to {grid}")
    if not all(r.layer is not None for r in records):
        longest = what
    for label in (longest, what, what.replace(", mean of heads", "")):
        if text_width(label + scale, 7.0) <= width - 0.2:
            break
    return label + scale


Group = tuple[str, list[int | None]]  # (label, record indices); None is the input image


def _without_maps(img: Image.Image, trace: AttentionTrace, width, header: float) -> Canvas:
    """The image and a note saying why there is no spatial map."""
    canvas = Canvas(width, [3], header=header, max_panel=1.2)
    canvas.image(0, 0, img)
    canvas.above(0, 0, "input")
    if trace.channel_records:
        names = "/".join(sorted(kind_style(k).label for k in kinds_of(trace)))
        text = f"{names} modules have no spatial map:\nthey reweight channels only\n(see the channel-weight figure)."
    else:
        text = "This model has no attention modules:\nno spatial maps to show."
    canvas.note(0, 1, text, span=2)
    return canvas


def _rows(records, max_columns: int) -> list[list[Group]]:
    """Stages packed left to right into rows of at most `max_columns` panels, the input first;
    a stage longer than a row wraps ("(cont.)")."""
    if all(r.layer is not None for r in records):
        return _block_rows(len(records), max_columns)
    stages: dict[int, list[int]] = {}
    for i, rec in enumerate(records):
        stages.setdefault(rec.stage, []).append(i)
    groups: list[Group] = [("", [None])]
    for members in stages.values():
        first = records[members[0]]
        h, w = first.spatial.shape[-2:]
        label = f"{group_label(first)} · {h}×{w}"  # the map's real grid
        for start in range(0, len(members), max_columns):
            groups.append(
                (label + (" (cont.)" if start else ""), members[start : start + max_columns])
            )
    rows: list[list[Group]] = [[]]
    for group in groups:
        if rows[-1] and sum(len(g[1]) for g in rows[-1]) + len(group[1]) > max_columns:
            rows.append([])
        rows[-1].append(group)
    return rows


def _block_rows(n: int, max_columns: int) -> list[list[Group]]:
    """A ViT's blocks in reading order, rows as even as they can be: its depth quarters are no
    real stages (one grid throughout), so no group labels."""
    items: list[int | None] = [None, *range(n)]
    per_row = math.ceil(len(items) / math.ceil(len(items) / max_columns))
    return [[("", items[i : i + per_row])] for i in range(0, len(items), per_row)]


def _scales(records, maps, shared: bool) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """Each map's unit, and each unit's colour range. A shared scale is shared within a unit:
    a hybrid's gates (0-1) and its attention probabilities (about 1/tokens) each get their
    own, and their own colour bar."""
    if not shared:  # each map its own min-max: one 0-1 bar says it for all
        return ["any"] * len(records), {"any": (0.0, 1.0)}
    units = ["probabilities" if r.kind == "self-attention" else "gate" for r in records]
    ranges = {
        u: value_range([m for m, v in zip(maps, units) if v == u]) for u in dict.fromkeys(units)
    }
    return units, ranges


def _canvas(rows: list[list[Group]], width, header: float, two_lines: bool = False) -> Canvas:
    """Panels with a gap between groups; taller headers when a group's label needs two lines;
    a taller footer when a colour bar's label may take two lines (two bars, or a narrow
    figure)."""
    gaps = [[0.08 if (k == 0 and g) else 0.0 for g, (_, members) in enumerate(row) for k in range(len(members))]
            for row in rows]  # fmt: skip
    counts = [sum(len(members) for _, members in row) for row in rows]
    footer = 0.52 if two_lines else 0.42
    shape = {"gaps": gaps, "left": 0.05, "footer": footer, "header": header, "center_rows": True}
    groups = [group for row in rows for group in row]
    if not any(label for label, _ in groups):  # a ViT's blocks: panel labels only
        return Canvas(width, counts, head=0.15, **shape)
    canvas = Canvas(width, counts, head=0.29, **shape)
    if all(fits_bold(label, canvas.span_width(len(members))) for label, members in groups):
        return canvas
    # a one-panel group ("BAM 1 · 56×56") gets its grid on a second line, not cut
    return Canvas(width, counts, head=0.4, **shape)
