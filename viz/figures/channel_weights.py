"""Every module's channel weights as a heat map of sorted channels, plus the top-k bars."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from models.probes import kind_style
from viz.engine.maps import DEFAULT_CMAP, to_numpy
from viz.engine.trace import AttentionRecord, AttentionTrace
from viz.figures.canvas import (
    DIFF_CMAP,
    channel_map,
    channel_name,
    colorbar,
    figure_width,
    fit_text,
    literal,
    new_figure,
    pick_image,
    short_label,
    styled,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes


__all__ = ["channel_weights"]


def _resample(rows: list[np.ndarray], length: int) -> np.ndarray:
    """Rows of different lengths resampled (linearly, on relative rank) to one length."""
    out = np.empty((len(rows), length), dtype=np.float32)
    grid = np.linspace(0.0, 1.0, length)
    for i, row in enumerate(rows):
        out[i] = np.interp(grid, np.linspace(0.0, 1.0, len(row)), row) if len(row) > 1 else row[0]
    return out


def _fit(text: str, width: str | float, share: float, lines: int = 2) -> str:
    """An axes title wrapped to the axes' share of the figure width (no overlap, no overflow)."""
    inches = max(0.3, figure_width(width) * share - 0.25)
    return fit_text(text, inches, fontsize=7.0, min_size=7.0, max_lines=lines)[0]


def _row_ticks(ax: Axes, records: list[AttentionRecord]) -> None:
    stages = [r.stage for r in records]
    if len(records) <= 24:
        ax.set_yticks(range(len(records)), [short_label(r) for r in records])
    else:
        firsts = [i for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
        ax.set_yticks(firsts, [f"stage {stages[i]}" for i in firsts])
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            ax.axhline(i - 0.5, color="white", linewidth=0.6)


@styled
def channel_weights(
    trace: AttentionTrace,
    *,
    index: int = 0,
    top_k: int = 10,
    compare: AttentionTrace | None = None,
    compare_index: int = 0,
    labels: Sequence[str] | None = None,
    width: str | float = "double",
    cmap: str = DEFAULT_CMAP,
    resolution: int = 128,
    title: str | None = None,
) -> Figure:
    """Every module's channel weights as a (module x sorted channel) heat map, plus top-k bars.

    Modules have different channel counts C, so each row is sorted (descending) and resampled to
    `resolution` points on the relative rank 0-100 %. The bars show the `top_k` channels of the
    last module. CBAM: M_c; SE: excitation; BAM: sigma(M_c) of its channel branch.

    Args:
        trace: attention trace; image `index` is shown.
        compare: a second trace of the same model (another image, or another target class):
            panels A, B and A - B, with all rows sorted by A so that columns are the same channels.
        compare_index: image of `compare` to show.
        labels: names of the two traces, default ("A", "B").
        resolution: points per resampled row.

    Raises:
        ValueError: no module has channel weights, or `compare` has other modules or widths.
    """
    records = pick_image(trace, index).channel_records
    if not records:
        raise ValueError(
            "channel_weights needs attention modules with channel weights; this model has none"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    name_a, name_b = (list(labels) + ["A", "B"][len(labels or []) :])[:2] if labels else ("A", "B")
    name_a, name_b = literal(name_a), literal(name_b)
    a_rows = [to_numpy(channel_map(r)[0]) for r in records]
    b_rows = None if compare is None else _compared_rows(records, compare, compare_index)
    orders = [np.argsort(-row, kind="stable") for row in a_rows]
    heat_a = _resample([row[o] for row, o in zip(a_rows, orders)], resolution)
    kinds = sorted({r.kind for r in records})
    what = " / ".join(channel_name(k) for k in kinds)
    bars = min(top_k, len(a_rows[-1]))
    # room for the rows of the heat map and for the bars' labels (at least 0.12 in each)
    height = min(9.0, max(0.9 + 0.1 * len(records), 1.0 + 0.13 * bars))
    # a single column: A and B above, A - B and the bars below
    narrow = b_rows is not None and figure_width(width) < 4.5
    if b_rows is None:
        fig = new_figure(width, max(1.8, height))
        ax_heat, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.2]})
        heat_axes = [ax_heat]
        ax_heat.imshow(heat_a, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax_heat.set_title(_fit(f"channel weights: {what}", width, 3 / 4.2))
    else:
        heat_b = _resample([row[o] for row, o in zip(b_rows, orders)], resolution)
        fig, heat_axes, ax_bar = _compared_heat(heat_a, heat_b, (name_a, name_b), width, height,
                                                narrow, cmap)  # fmt: skip
    for i, ax in enumerate(heat_axes):
        _row_ticks(ax, records)
        if i and not (narrow and i == 2):  # row starts keep their labels
            ax.set_yticklabels([])
        ax.set_xticks([0, (resolution - 1) / 2, resolution - 1], ["0", "50", "100"])
        ax.set_xlabel("channel rank, % of C")
    own = all(kind_style(k).own_level for k in kinds)
    heat_axes[0].set_ylabel(f"{kind_style(kinds[0]).label} module" if own else "stage.block")
    colorbar(fig, heat_axes[: 2 if b_rows else 1], cmap, 0.0, 1.0, what, location="bottom")
    top = orders[-1][:bars]
    values = [a_rows[-1][top]] + ([] if b_rows is None else [b_rows[-1][top]])
    _top_bars(ax_bar, top, values, (name_a, name_b), cmap, narrow)
    bar_share = 0.4 if narrow else (1.4 / 7.4 if b_rows is not None else 1.2 / 4.2)
    # "4.1" / "BAM 3": the heat map's own row labels
    ax_bar.set_title(
        _fit(f"top {bars} channels of {short_label(records[-1])}", width, bar_share, lines=3)
    )
    if title:
        fig.suptitle(title)
    return fig


def _compared_rows(records, compare: AttentionTrace, compare_index: int) -> list[np.ndarray]:
    others = pick_image(compare, compare_index).channel_records
    shapes_a = [(r.name, r.channel.shape[1]) for r in records]
    shapes_b = [(r.name, r.channel.shape[1]) for r in others]
    if shapes_a != shapes_b:
        raise ValueError("compare must be a trace of the same model (same modules and widths)")
    return [to_numpy(channel_map(r)[0]) for r in others]


def _compared_heat(heat_a, heat_b, names, width, height: float, narrow: bool, cmap: str):
    """Panels A, B (sorted by A) and A - B; returns (figure, the three heat axes, bar axes)."""
    name_a, name_b = names
    if narrow:
        fig = new_figure(width, 2 * max(2.0, height) + 0.4)
        grid = fig.subplots(2, 2)
        axes, share = [grid[0][0], grid[0][1], grid[1][0], grid[1][1]], 0.4
    else:
        fig = new_figure(width, max(2.0, height))
        axes = list(fig.subplots(1, 4, gridspec_kw={"width_ratios": [2, 2, 2, 1.4]}))
        share = 2 / 7.4
    for ax, data, text in ((axes[0], heat_a, name_a),
                           (axes[1], heat_b, f"{name_b} (sorted by {name_a})")):  # fmt: skip
        ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(_fit(text, width, share, lines=3))
    diff = heat_a - heat_b
    lim = max(float(np.abs(diff).max()), 1e-6)
    axes[2].imshow(
        diff, aspect="auto", cmap=DIFF_CMAP, vmin=-lim, vmax=lim, interpolation="nearest"
    )
    axes[2].set_title(_fit(f"{name_a} − {name_b}", width, share, lines=3))
    # beside the difference panel when it is small (ticks under it would collide)
    colorbar(fig, axes[2], DIFF_CMAP, -lim, lim, "difference",
             location="right" if narrow else "bottom")  # fmt: skip
    return fig, list(axes[:3]), axes[3]


def _top_bars(ax_bar, top, values, names, cmap: str, narrow: bool) -> None:
    """The last module's top channels: one bar each, or A and B side by side."""
    pos = np.arange(len(top))[::-1]
    colour = matplotlib.colormaps[cmap]
    if len(values) == 1:
        ax_bar.barh(pos, values[0], color=colour(0.25), height=0.7)
    else:
        ax_bar.barh(pos + 0.18, values[0], color=colour(0.25), height=0.36, label=names[0])
        ax_bar.barh(pos - 0.18, values[1], color=colour(0.75), height=0.36, hatch="////",
                    edgecolor="0.2", linewidth=0.3, label=names[1])  # fmt: skip
        ax_bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=1 if narrow else 2,
                      frameon=False)  # fmt: skip
    ax_bar.set_yticks(pos, [f"c {int(c)}" for c in top])
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("weight")
    for side in ("top", "right"):
        ax_bar.spines[side].set_visible(False)
