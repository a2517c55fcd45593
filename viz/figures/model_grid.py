"""The CBAM paper's Grad-CAM figure: images in columns, one row of CAMs per model."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from viz.engine.cam import CAM_METHODS
from viz.engine.maps import DEFAULT_CMAP, overlay
from viz.figures.canvas import (
    Canvas,
    as_image,
    figure_width,
    fit_text,
    literal,
    panel_size,
    styled,
    text_width,
)
from viz.figures.dino_heads import class_token_blocks, dimmed_outside, mass_masks
from viz.measures.metrics import is_constant

if TYPE_CHECKING:
    from viz.engine.cam import Analysis

__all__ = ["model_grid"]

MAX_PANEL = 1.9  # inches: three images fill a double column, six share it
LABEL_SIZES = (7.0, 6.0)  # points: the row labels' size, smaller only when they need it
MAX_LABEL_LINES = 7  # lines of a rotated row label (each takes width from the panels)
FOOT = 0.15  # inches under a row's panels (P)
LABEL_GAP = 0.06  # inches between the row labels of two rows
CONSTANT = "constant\nCAM"  # said on a panel whose map has no contrast (as the Grad-CAM figure)


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
    decimals: int = 2,
    title: str | None = None,
    missing: Sequence[Sequence[int]] | None = None,
    class_token_mass: float | None = None,
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
        decimals: digits of the softmax score printed under each map, "P=0.96".
        missing: per row, the columns whose class that model does not have: drawn as "n/a"
            rather than explaining another class under the column's title.
        render: "smooth" (bilinear, as the papers) or "cells" (one flat block per map cell,
            the grid drawn: the resolution the network computed at).
        title: a title of the figure's own, before the method and stage shown.
        class_token_mass: instead of the CAMs, DINO's masks (Caron et al. 2021, figure 1):
            each row's last block's class-token attention (the mean of its heads), the
            patches outside the fewest holding this share of it (0.6 in DINO) dimmed. A row
            without a class token's attention (a CNN, Swin) is drawn as n/a.

    The header says which CAM method and stage (or layer) the rows show; a row label too long
    for its row is wrapped (also inside long names, after "_", "-", "/") and set smaller, never
    into the next row; a map with no contrast (all zero, say) is drawn as the photo and said
    to be constant, as the Grad-CAM figure does.

    Raises:
        ValueError: counts do not match, or a row has no CAM for `layer`.
    """
    pics, absent = _checked(images, rows, column_titles, missing)
    maps, methods, shows = _what_rows_show(rows, layer, stage, len(pics), class_token_mass)
    # rows of different methods (a CNN's Grad-CAM beside a ViT's rollout) each say which, in
    # short: the heading names them in full
    named = [(literal(label), "" if len(methods) == 1 else f"({literal(_short(a))})")
             for label, a in rows]  # fmt: skip
    head = _title_head(column_titles, width, len(pics))
    labels, size, left = fit_row_labels(named, width, len(pics), head)
    titles = [literal(t) for t in column_titles]
    shows = literal(shows)
    heading = f"{literal(title)} · {shows}" if title else shows
    # the heading in one line at 8.4 pt (as Canvas.title sets it), else two at 7 pt
    one_line = text_width(heading, 8.4) <= figure_width(width) - 0.1
    canvas = Canvas(
        width, [len(pics)] * (1 + len(rows)), left=left, head=head, foot=[0.03] + [FOOT] * len(rows),
        header=0.22 if one_line else 0.34, max_panel=MAX_PANEL, footer=0.42,
    )  # fmt: skip
    for c, (pic, name) in enumerate(zip(pics, titles)):
        canvas.image(0, c, pic)
        canvas.above(0, c, name, max_lines=2)
    canvas.left_of(0, 0, "input")
    for r, ((_, analysis), label, (cams, masks)) in enumerate(zip(rows, labels, maps), start=1):
        _draw_row(canvas, r, pics, analysis, cams, absent[r - 1], cmap, alpha, render,
                  decimals, masks)  # fmt: skip
        canvas.left_of(r, 0, label, fontsize=size)
    # each CAM is stretched to its own range, as in the papers: the bar says so
    canvas.colorbar(cmap, 0.0, 1.0, "each map: own min–max")
    canvas.title(heading)
    return canvas.fig


def _checked(images, rows, column_titles, missing) -> tuple[list, list[set[int]]]:
    """The images as PIL and each row's n/a columns, the counts checked."""
    pics = [as_image(im) for im in images]
    if not pics:
        raise ValueError("model_grid needs at least one image")
    if len(column_titles) != len(pics):
        raise ValueError(f"{len(column_titles)} column titles for {len(pics)} images")
    absent = [set(m) for m in missing] if missing is not None else [set() for _ in rows]
    if len(absent) != len(rows):
        raise ValueError(f"missing has {len(absent)} entries for {len(rows)} rows")
    return pics, absent


def _draw_row(canvas: Canvas, r: int, pics, analysis: Analysis, cams: Tensor | None,
              absent: set[int], cmap: str, alpha: float, render: str, decimals: int,
              masks: Tensor | None) -> None:  # fmt: skip
    """One model's row: each column's CAM over its image (the patches outside `masks`
    dimmed) and P under it (n/a, constant); without maps (no class token), n/a."""
    if cams is None:
        for c in range(len(pics)):
            canvas.note(r, c, "n/a: no class\ntoken's\nattention")
        return
    # P where the row explains classes (a segment's or an embedding's row has none)
    probs = analysis.target_probs if analysis.explains_classes else None
    for c, pic in enumerate(pics):
        if c in absent:
            canvas.note(r, c, "n/a:\nclass not\nin this model")
            continue
        if is_constant(cams[c].detach().float().flatten()):
            # no contrast to draw: the photo as it is, and the map said to be constant
            canvas.image(r, c, pic)
            x, y, p = canvas.box(r, c)
            canvas.ax.text(x + p / 2, y + p / 2, CONSTANT, ha="center", va="center", fontsize=6,
                           multialignment="center",
                           bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                                 "edgecolor": "none", "alpha": 0.85})  # fmt: skip
        else:
            drawn = overlay(pic, cams[c], cmap, alpha, render=render)
            canvas.image(r, c, drawn if masks is None else dimmed_outside(drawn, masks[c]))
        if probs is not None:
            canvas.below(r, c, f"P={float(probs[c]):.{decimals}f}")


def _short(analysis: Analysis) -> str:
    """The method's label without its authors: "GAE", "Grad-CAM (aug smooth)"."""
    label = analysis.method_label
    method = CAM_METHODS.get(analysis.method)
    return label.replace(method.label, method.label.split(" (")[0]) if method else label


def _shown_text(rows, shown: list[str], layer: str | None) -> str:
    """What the rows show, e.g. "Grad-CAM at stage 4", "Grad-CAM at stage 4 · attention rollout
    for the whole network", "Grad-CAM at layer3"."""
    parts: list[str] = []
    for (_, analysis), row_layer in zip(rows, shown):
        stage = analysis.cam_stages.get(row_layer)
        if layer is not None:
            where = f"at {layer}"
        elif stage == 0:
            where = "for the whole network"
        elif stage is None:
            where = f"at {row_layer}"
        else:
            where = f"at stage {stage}"
        part = f"{analysis.method_label} {where}"
        if part not in parts:
            parts.append(part)
    return " · ".join(parts)


def _what_rows_show(rows, layer, stage, columns: int, mass: float | None) -> tuple:
    """Per row its (maps, DINO masks or None), the set of methods, and the heading's words."""
    if mass is not None:
        for label, analysis in rows:
            _check_columns(label, analysis, columns)
        words = (f"class-token attention of the last block (mean of its heads), the patches "
                 f"holding {mass:.0%} of it")  # fmt: skip
        return [_dino_maps(analysis, mass) for _, analysis in rows], {"DINO"}, words
    shown = [_row_layer(label, analysis, layer, stage, columns) for label, analysis in rows]
    maps = [(analysis.cams[row_layer], None) for (_, analysis), row_layer in zip(rows, shown)]
    methods = {analysis.method_label for _, analysis in rows}
    return maps, methods, _shown_text(rows, shown, layer)


def _dino_maps(analysis: Analysis, mass: float) -> tuple[Tensor | None, Tensor | None]:
    """(N, h, w) the last class-token block's attention (mean of heads) and its mass masks."""
    blocks = class_token_blocks(analysis.trace)
    if not blocks:
        return None, None
    attention = blocks[-1].heads.float().mean(1)
    return attention, mass_masks(attention, mass)


def _check_columns(label: str, analysis: Analysis, columns: int) -> None:
    if analysis.batch_size != columns:
        raise ValueError(f"row {label!r} covers {analysis.batch_size} images, not {columns}")


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
            f"row {label!r} has no CAM for {row_layer!r}; it has {list(analysis.cams)}"
        )
    _check_columns(label, analysis, columns)
    return row_layer


def _title_head(titles: Sequence[str], width, columns: int) -> float:
    """Room above the image row: one line of column titles, two when one is too long."""
    guess = panel_size(width, 0.2, columns, MAX_PANEL)
    return 0.24 if any(text_width(t, 6.0) > guess for t in titles) else 0.15


def _deepest_cam(analysis: Analysis) -> str:
    """The CAM layer of the deepest stage (the last CAM when stages are unknown)."""
    by_stage = analysis.stage_cams()
    if by_stage:
        return by_stage[max(by_stage)]
    return list(analysis.cams)[-1] if analysis.cams else "(none)"


class _NameWrapper(textwrap.TextWrapper):
    """Breaks at spaces and after "_", "-" and "/": a timm name wraps between its parts."""

    wordsep_re = re.compile(r"(\s+|(?<=[_/-])(?=[^\s_/-]))")


# how a label may break, best first: at spaces; also inside names after "_", "-", "/"; anywhere
_BREAKS = (
    lambda chars: textwrap.TextWrapper(chars, break_long_words=False, break_on_hyphens=False),
    lambda chars: _NameWrapper(chars, break_long_words=False),
    lambda chars: _NameWrapper(chars, break_long_words=True),
)


def fit_row_labels(
    labels: Sequence[tuple[str, str]], width: str | float, columns: int, head: float
) -> tuple[list[str], float, float]:
    """Row labels (rotated, beside their row) that fit it: (wrapped labels, font size, inches
    of the left margin) for (label, suffix) pairs, the suffix ("(GAE)") after the label.

    A line is at most as long as a row is tall (head, panel and foot) less `LABEL_GAP`: centred
    on its panel, no label runs into the next row's. Tried in turn: breaks at spaces only, then inside names,
    then anywhere; for each, 7 pt then 6 pt; for each, one line more at a time (each takes
    width from the panels). A label that fits in none of these is cut with an ellipsis, its
    suffix kept.
    """
    texts = [f"{label} {suffix}".strip() for label, suffix in labels]
    for breaks in _BREAKS:
        for size in LABEL_SIZES:
            for lines in range(1, MAX_LABEL_LINES + 1):
                left, room = _label_room(width, columns, head, size, lines)
                wrapped = [_wrap(text, room, size, breaks) for text in texts]
                if all(w is not None and w.count("\n") < lines for w in wrapped):
                    return wrapped, size, left
    size = LABEL_SIZES[-1]
    left, room = _label_room(width, columns, head, size, MAX_LABEL_LINES)
    cut = []
    for label, suffix in labels:
        kept = MAX_LABEL_LINES - 1 if suffix else MAX_LABEL_LINES
        text = fit_text(label, room, fontsize=size, min_size=size, max_lines=kept)[0]
        cut.append(f"{text}\n{fit_text(suffix, room, fontsize=size)[0]}" if suffix else text)
    return cut, size, left


def _label_room(width, columns: int, head: float, size: float, lines: int) -> tuple:
    """(left margin, inches a label line may take) with `lines` lines at `size` points."""
    left = 0.1 + 1.2 * size / 72 * lines  # a line of rotated text takes 1.2 em across
    return left, panel_size(width, left, columns, MAX_PANEL) + head + FOOT - LABEL_GAP


def _wrap(text: str, inches: float, size: float, breaks) -> str | None:
    """`text` in lines of at most `inches` at `size` points with the wrapper `breaks` makes,
    or None when a line stays longer."""
    chars = max(4, int(inches / text_width("x", size)))
    lines = breaks(chars).wrap(text)
    return "\n".join(lines) if all(len(line) <= chars for line in lines) else None
