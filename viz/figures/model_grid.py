"""The CBAM paper's Grad-CAM figure: images in columns, one row of CAMs per model."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from viz.engine.maps import DEFAULT_CMAP, overlay
from viz.figures.canvas import (
    FIGURE_STYLE,
    Canvas,
    as_image,
    figure_width,
    literal,
    styled,
    text_width,
)

if TYPE_CHECKING:
    from viz.engine.cam import Analysis

__all__ = ["model_grid"]

MAX_PANEL = 1.9  # inches: three images fill a double column, six share it


@styled
def model_grid(
    images: Sequence[Image.Image | np.ndarray | Tensor],
    rows: Sequence[tuple[str, Analysis]],
    *,
    column_titles: Sequence[str],
    layer: str | None = None,
    stage: int | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    width: str | float = "double",
    render: str = "smooth",
    decimals: int = 5,
    title: str | None = None,
    missing: Sequence[Sequence[int]] | None = None,
) -> Figure:
    """The CBAM paper's Grad-CAM figure: images in columns, one row of Grad-CAMs per model.

    Args:
        images: the RGB crops shown (one per column), e.g. the first model's `display_crop`.
        rows: (row label, Analysis over all `images`, in the same order), e.g.
            ("ResNet-50 + CBAM", analysis). Models may differ in depth, attention and input
            size: each CAM is resized to its column's image.
        column_titles: one title per image (the class name).
        layer: CAM layer shown; default each row's deepest stage (`layer4` in a ResNet,
            whatever its name in another network).
        stage: show each row's CAM at this stage (1..4) instead, whatever the layer is called
            in that network (rows of different networks); ignored when `layer` is given.
        decimals: digits of the softmax score printed under each map, "P=0.96340".
        missing: per row, the columns whose class that model does not have: drawn as "n/a"
            rather than explaining another class under the column's title.
        render: "smooth" (bilinear, as the papers) or "cells" (one flat block per map cell,
            the grid drawn: the resolution the network computed at).

    Raises:
        ValueError: counts do not match, or a row has no CAM for `layer`.
    """
    pics = [as_image(im) for im in images]
    if not pics:
        raise ValueError("model_grid needs at least one image")
    if len(column_titles) != len(pics):
        raise ValueError(f"{len(column_titles)} column titles for {len(pics)} images")
    shown = [_row_layer(label, analysis, layer, stage, len(pics)) for label, analysis in rows]
    absent = [set(m) for m in missing] if missing is not None else [set() for _ in rows]
    if len(absent) != len(rows):
        raise ValueError(f"missing has {len(absent)} entries for {len(rows)} rows")
    methods = {analysis.method_label for _, analysis in rows}
    # rows of different methods (a CNN's Grad-CAM beside a ViT's rollout) each say which
    named = [label if len(methods) == 1 else f"{label} ({a.method_label})" for label, a in rows]
    labels = _wrap_row_labels([literal(n) for n in named], width, len(pics), max_panel=MAX_PANEL)
    titles = [literal(t) for t in column_titles]
    canvas = _canvas(width, labels, titles, len(rows), bool(title))
    # as many digits of P as fit under a panel (at least 2; 5 as in the CBAM paper when room)
    digits = next(
        (d for d in range(decimals, 1, -1) if text_width("P=0." + "0" * d, 6.0) <= canvas.panel),
        2,
    )
    for c, (pic, name) in enumerate(zip(pics, titles)):
        canvas.image(0, c, pic)
        canvas.above(0, c, name, max_lines=2)
    canvas.left_of(0, 0, "input")
    for r, ((_, analysis), label, row_layer) in enumerate(zip(rows, labels, shown), start=1):
        cams = analysis.cams[row_layer]
        probs = analysis.target_probs
        for c, pic in enumerate(pics):
            if c in absent[r - 1]:
                canvas.note(r, c, "n/a:\nclass not\nin this model")
                continue
            canvas.image(r, c, overlay(pic, cams[c], cmap, alpha, render=render))
            canvas.below(r, c, f"P={float(probs[c]):.{digits}f}")
        canvas.left_of(r, 0, label)
    # each CAM is stretched to its own range, as in the papers: the bar says so
    method = f"{methods.pop()}, " if len(methods) == 1 else ""  # else each row names its own
    canvas.colorbar(cmap, 0.0, 1.0, f"{method}each map: own min–max")
    if title:
        canvas.title(title)
    return canvas.fig


def _row_layer(label: str, analysis: Analysis, layer, stage, columns: int) -> str:
    """The CAM layer a row shows: `layer`, the row's layer at `stage`, or its deepest."""
    if layer is not None:
        row_layer = layer
    elif stage is not None:
        by_stage = analysis.stage_cams()
        # a whole-network map (a ViT's rollout, GAE, LeGrad: stage 0) belongs to no one stage,
        # so the row shows it whatever the stage asked for
        whole = by_stage.get(0) if set(by_stage) == {0} else None
        row_layer = whole or by_stage.get(stage, f"(no stage {stage})")
    else:
        row_layer = _deepest_cam(analysis)
    if row_layer not in analysis.cams:
        raise ValueError(
            f"row {label!r} has no CAM for {row_layer!r}; it has {sorted(analysis.cams)}"
        )
    if analysis.logits.shape[0] != columns:
        raise ValueError(f"row {label!r} covers {analysis.logits.shape[0]} images, not {columns}")
    return row_layer


def _canvas(width, labels: list[str], titles: list[str], rows: int, titled: bool) -> Canvas:
    """Room for the row labels' lines and, when one line is too narrow, two-line titles."""
    lines = max(label.count("\n") + 1 for label in labels) if labels else 1
    guess = (figure_width(width) - 0.1 - 0.12 * lines) / len(titles)
    two = any(text_width(t, 6.0) > min(guess, MAX_PANEL) for t in titles)
    return Canvas(
        width, [len(titles)] * (1 + rows), left=0.08 + 0.12 * lines, head=0.24 if two else 0.15,
        foot=[0.03] + [0.15] * rows, header=0.25 if titled else 0.0, max_panel=MAX_PANEL, footer=0.42,
    )  # fmt: skip


def _deepest_cam(analysis: Analysis) -> str:
    """The CAM layer of the deepest stage (the last CAM when stages are unknown)."""
    by_stage = analysis.stage_cams()
    if by_stage:
        return by_stage[max(by_stage)]
    return list(analysis.cams)[-1] if analysis.cams else "(none)"


def _wrap_row_labels(
    labels: Sequence[str], width: str | float, ncols: int, max_panel: float
) -> list[str]:
    """Break rotated row labels into lines no taller than a panel (no label runs off a row)."""
    panel = min(max_panel, (figure_width(width) - 0.5 - 0.04 * (ncols - 1)) / ncols)
    chars = max(8, int(panel / (0.6 * FIGURE_STYLE["font.size"] / 72)))  # average glyph width
    return [
        textwrap.fill(label, chars, break_long_words=False, break_on_hyphens=False)
        for label in labels
    ]
