"""Mean channel weight per class and module: the SENet paper's excitation plot as heat maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from viz.engine.maps import DEFAULT_CMAP, to_numpy
from viz.figures.canvas import (
    colorbar,
    figure_width,
    fit_text,
    literal,
    new_figure,
    styled,
    value_range,
)

__all__ = ["class_channel_stats", "default_modules"]


def default_modules(stats: Any) -> list[str]:
    """The last module of each stage (the SENet paper's choice of deep and shallow blocks)."""
    names, stages = list(stats.means), getattr(stats, "stages", {})
    if not stages:
        return names
    last: dict[int, str] = {}
    for name in names:
        last[stages.get(name, 0)] = name
    return [last[s] for s in sorted(last)]


def _cut(text: str, chars: int = 22) -> str:
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"


def _sorted_panel(means: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(K, C) means with channels sorted by their mean over all images (classes weighted by
    their image counts); classes without images are nan (drawn grey)."""
    means = means.astype(np.float64)
    weights = counts if counts.sum() > 0 else np.ones_like(counts)
    valid = np.isfinite(means).all(1) & (weights > 0)
    overall = (means[valid] * weights[valid, None]).sum(0) / max(weights[valid].sum(), 1e-12)
    data = means[:, np.argsort(-overall, kind="stable")].copy()
    data[counts <= 0] = np.nan
    return data


def _module_title(name: str, labels: dict[str, str]) -> str:
    return literal(f"{labels[name]} ({name})" if name in labels else name)


@styled
def class_channel_stats(
    stats: Any,
    *,
    modules: Sequence[str] | None = None,
    cmap: str = DEFAULT_CMAP,
    width: str | float = "double",
    shared_scale: bool = True,
    title: str | None = None,
) -> Figure:
    """Mean channel weight per class, per module: the SENet paper's excitation plot as heat maps.

    Args:
        stats: a `viz.measures.metrics.ChannelStats` (`class_names`, `counts` (K,), `means`: module name
            -> (K, C) mean channel weight of each class).
        modules: module names to show; default the last module of each stage.
        shared_scale: one colour scale for all panels.

    Each panel is class x channel, channels sorted by their mean over all images (classes
    weighted by their image counts). Classes without images are grey; each class name is followed
    by its image count.
    """
    names = list(stats.means)
    if not names:
        raise ValueError("channel statistics hold no attention module")
    titles = getattr(stats, "labels", {})
    chosen = list(modules) if modules is not None else default_modules(stats)
    missing = [m for m in chosen if m not in stats.means]
    if missing or not chosen:
        raise ValueError(f"unknown modules {missing}; statistics have: {', '.join(names)}")
    counts = to_numpy(torch.as_tensor(stats.counts)).astype(np.float64)
    panels = [(name, _sorted_panel(to_numpy(stats.means[name]), counts)) for name in chosen]
    finite = [p[1][np.isfinite(p[1])] for p in panels]
    values = np.concatenate(finite) if any(f.size for f in finite) else np.zeros(1)
    vmin, vmax = float(values.min()), float(values.max())
    vmax = vmax if vmax > vmin else vmin + 1e-6
    ncols = 1 if figure_width(width) < 4.5 or len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    k = len(stats.class_names)
    panel_h = min(2.2, 0.5 + 0.1 * k)
    fig = new_figure(width, nrows * panel_h + 0.5 + (0.15 if title else 0.0))
    fig.get_layout_engine().set(h_pad=0.1)  # room between a panel's x label and the next title
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = matplotlib.colormaps[cmap].with_extremes(bad="0.8")
    for ax, (name, data) in zip(axes, panels):
        lo, hi = (
            (vmin, vmax) if shared_scale else value_range([torch.from_numpy(np.nan_to_num(data))])
        )
        ax.imshow(data, aspect="auto", cmap=colours, vmin=lo, vmax=hi, interpolation="nearest")
        panel_inches = figure_width(width) / ncols - 1.2
        ax.set_title(
            fit_text(_module_title(name, titles), panel_inches, min_size=6.0, max_lines=2)[0]
        )
        ax.set_xlabel(f"channels by mean (C = {data.shape[1]})")
        ax.set_xticks([])
        if k <= 30:
            # class names cut to a readable length, so the heat map keeps its width
            ax.set_yticks(
                range(k),
                [f"{_cut(literal(c))} ({int(n)})" for c, n in zip(stats.class_names, counts)],
            )
        else:
            ax.set_yticks([])
            ax.set_ylabel(f"{k} classes")
        if not shared_scale:
            colorbar(fig, ax, cmap, lo, hi, "mean weight")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if shared_scale:
        colorbar(fig, axes[: len(panels)].tolist(), cmap, vmin, vmax, "mean channel weight per class",
                  location="bottom")  # fmt: skip
    if title:
        fig.suptitle(title)
    return fig
