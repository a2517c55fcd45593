"""Paper-ready figures of attention maps, channel weights and Grad-CAM.

Every function is pure: it returns a new `matplotlib.figure.Figure` built with the
object-oriented API (no pyplot state, nothing global left changed), sized for a paper column
(`SINGLE_COLUMN`, `DOUBLE_COLUMN` inches, or any width). Labels use the papers' vocabulary:

- CBAM (Woo et al., ECCV 2018, https://arxiv.org/abs/1807.06521): channel attention M_c and
  spatial attention M_s, both after their sigmoid; the Grad-CAM figure with the softmax score P.
- BAM (Park et al., BMVC 2018, https://arxiv.org/abs/1807.06514): branches M_c(F), M_s(F) before
  the sigmoid (shown as sigma(.)), the gate 1 + M(F) that multiplies F, and the hierarchy figure.
- SE (Hu et al., CVPR 2018, https://arxiv.org/abs/1709.01507): channel weights (excitation)
  per class.

Maps are turned into RGB overlays once (vectorised, `viz.maps.overlay`) and shown with `imshow`,
so a figure of a ResNet-50 with 16 modules draws in well under a second. The default colour map
is `viz.maps.DEFAULT_CMAP` (inferno: monotonic lightness, readable in grayscale and by
colour-blind readers).
"""

from __future__ import annotations

import functools
import math
import textwrap
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

from .maps import DEFAULT_CMAP, overlay, to_numpy, upsample
from .probes import kind_style
from .trace import AttentionRecord, AttentionTrace

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .cam import Analysis

__all__ = [
    "SINGLE_COLUMN",
    "DOUBLE_COLUMN",
    "FIGURE_STYLE",
    "figure_width",
    "spatial_overview",
    "channel_weights",
    "attention_vs_gradcam",
    "model_grid",
    "bam_hierarchy",
    "class_channel_stats",
]

SINGLE_COLUMN = 3.3  # inches: one column of a two-column paper
DOUBLE_COLUMN = 6.9  # inches: full text width
DIFF_CMAP = "RdBu_r"  # diverging and colour-blind safe, for differences only

# Applied while a figure is built and saved (rcParams are read when an artist is created).
FIGURE_STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: same glyphs on every machine
    "mathtext.fontset": "dejavusans",
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "figure.titlesize": 8,
    "axes.linewidth": 0.5,
    "xtick.major.width": 0.5,
    "ytick.major.width": 0.5,
    "xtick.major.size": 2,
    "ytick.major.size": 2,
    "figure.dpi": 100,
    "image.interpolation": "antialiased",
    "image.composite_image": False,  # vector files keep each panel's image at its own pixels
    "figure.constrained_layout.h_pad": 0.02,
    "figure.constrained_layout.w_pad": 0.02,
    "figure.constrained_layout.hspace": 0.02,
    "figure.constrained_layout.wspace": 0.02,
}

# rc_context changes the process-wide rcParams for a while; figures are built one at a time so
# that threads (the app's browser sessions) never restore each other's values.
STYLE_LOCK = threading.RLock()


def styled(func: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a figure builder with `FIGURE_STYLE` in effect, under `STYLE_LOCK`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> Figure:
        with STYLE_LOCK, matplotlib.rc_context(FIGURE_STYLE):
            return func(*args, **kwargs)

    return wrapper


# --- small shared helpers ---------------------------------------------------------------------


def figure_width(width: str | float) -> float:
    """Inches for `width`: "single" (3.3), "double" (6.9) or a positive number."""
    if isinstance(width, str):
        named = {"single": SINGLE_COLUMN, "double": DOUBLE_COLUMN}
        if width not in named:
            raise ValueError(f"width must be 'single', 'double' or inches, got {width!r}")
        return named[width]
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 1.0 <= width <= 40.0:
        raise ValueError(f"width must be 'single', 'double' or 1-40 inches, got {width!r}")
    return float(width)


def _new_figure(width: str | float, height: float) -> Figure:
    return Figure(figsize=(figure_width(width), max(0.8, height)), layout="constrained")


def _as_image(image: Image.Image | np.ndarray | Tensor) -> Image.Image:
    """A PIL RGB image from PIL, (H, W, 3) uint8 / float in [0, 1] arrays, or (3, H, W) tensors."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        image = (
            image.permute(1, 2, 0) if image.ndim == 3 and image.shape[0] == 3 else image
        ).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _check_index(index: int, n: int) -> None:
    if not -n <= index < n:
        raise IndexError(f"index {index} is out of range for a batch of {n} images")


def _pick(trace: AttentionTrace, index: int) -> AttentionTrace:
    """The trace of image `index` (an empty trace, of a model without attention, stays empty)."""
    if not len(trace):
        return trace
    n = next(iter(trace)).channel.shape[0]
    _check_index(index, n)
    return trace.select(index % n)


def _colorbar(fig: Figure, axes, cmap: str, vmin: float, vmax: float, label: str, **kw) -> None:
    """A colour bar beside `axes` (for figures under the constrained layout engine)."""
    mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes, label=label, fraction=0.05, pad=0.02, aspect=30, **kw)
    bar.outline.set_linewidth(0.5)


class _Canvas:
    """Square image panels placed in inches on one full-figure Axes (no layout engine).

    Row r holds `counts[r]` panels; `gaps[r][c]` is extra space (inches) before panel c of row
    r (to separate groups). Each row reserves `head` inches above its panels (titles) and `foot`
    (one number, or one per row) below (labels under a panel); `left` is room for row labels, `footer` for a colour bar,
    `header` for the figure title. Images, titles and notes are drawn on a single Axes whose
    data units are inches, so a figure of many panels builds and draws fast.
    """

    def __init__(
        self,
        width: str | float,
        counts: Sequence[int],
        *,
        gaps: Sequence[Sequence[float]] | None = None,
        left: float = 0.2,
        head: float = 0.15,
        foot: float | Sequence[float] = 0.03,
        gap: float = 0.04,
        footer: float = 0.0,
        header: float = 0.0,
        max_panel: float = 1.5,
    ) -> None:
        self.width = figure_width(width)
        self.gaps = [list(g) for g in gaps] if gaps is not None else [[0.0] * n for n in counts]
        ncols = max(counts)
        extra = max(sum(g) for g in self.gaps)
        avail = self.width - left - 0.05 - gap * (ncols - 1) - extra
        self.panel = p = max(0.2, min(max_panel, avail / ncols))
        used = ncols * p + gap * (ncols - 1) + extra
        self.x0 = left + max(0.0, (self.width - left - 0.05 - used) / 2)
        self.gap, self.head, self.footer, self.header = gap, head, footer, header
        feet = [float(foot)] * len(counts) if isinstance(foot, (int, float)) else list(foot)
        heights = [head + p + f for f in feet]
        self.row_tops = [header + sum(heights[:r]) for r in range(len(counts))]  # from the top
        self.height = header + sum(heights) + footer + 0.03
        self.fig = Figure(figsize=(self.width, self.height))
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_xlim(0, self.width)
        self.ax.set_ylim(0, self.height)
        self.ax.set_autoscale_on(False)
        self.ax.set_axis_off()

    def box(self, row: int, col: int) -> tuple[float, float, float]:
        """(left, bottom, size) of a panel, in inches."""
        x = self.x0 + col * (self.panel + self.gap) + sum(self.gaps[row][: col + 1])
        top = self.height - self.row_tops[row] - self.head
        return x, top - self.panel, self.panel

    def image(self, row: int, col: int, rgb: Image.Image | np.ndarray) -> None:
        x, y, p = self.box(row, col)
        self.ax.imshow(np.asarray(rgb), extent=(x, x + p, y, y + p), aspect="auto")

    def note(self, row: int, col: int, text: str, *, span: float = 1.0) -> None:
        """A grey panel that says `text` (`span` panels wide)."""
        x, y, p = self.box(row, col)
        w = p * span + self.gap * (span - 1)
        self.ax.add_patch(Rectangle((x, y), w, p, facecolor="0.93", edgecolor="none"))
        self.ax.text(x + w / 2, y + p / 2, text, ha="center", va="center", multialignment="center")

    def above(
        self, row: int, col: int, text: str, *, span: float = 1.0, lift: float = 0.02, **kw
    ) -> None:
        x, y, p = self.box(row, col)
        w = p * span + self.gap * (span - 1)
        self.ax.text(x + w / 2, y + p + lift, text, ha="center", va="bottom", **kw)

    def below(self, row: int, col: int, text: str, **kw) -> None:
        x, y, p = self.box(row, col)
        self.ax.text(x + p / 2, y - 0.02, text, ha="center", va="top", **kw)

    def left_of(self, row: int, col: int, text: str, **kw) -> None:
        x, y, p = self.box(row, col)
        self.ax.text(x - 0.03, y + p / 2, text, ha="right", va="center", rotation=90,
                     multialignment="center", **kw)  # fmt: skip

    def right_of(self, row: int, col: int, text: str, **kw) -> None:
        x, y, p = self.box(row, col)
        self.ax.text(x + p + 0.06, y + p / 2, text, ha="left", va="center", **kw)

    def colorbar(self, cmap: str, vmin: float, vmax: float, label: str) -> None:
        """A horizontal colour bar centred in the footer (needs `footer` >= 0.4)."""
        span = min(3.0, 0.7 * (self.width - self.x0))
        x = (self.width + self.x0 - span) / 2
        rect = (
            x / self.width,
            (self.footer - 0.1) / self.height,
            span / self.width,
            0.07 / self.height,
        )
        cax = self.fig.add_axes(rect)
        mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
        bar = self.fig.colorbar(mappable, cax=cax, orientation="horizontal", label=label)
        bar.outline.set_linewidth(0.5)
        cax.xaxis.labelpad = 1

    def title(self, text: str) -> None:
        self.ax.text(self.width / 2, self.height - 0.04, text, ha="center", va="top",
                     fontsize="large")  # fmt: skip


def _heat_rgb(m: Tensor, size: tuple[int, int], cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """A (h, w) map resized to `size` (H, W) and colour-mapped to uint8 RGB."""
    resized = upsample(m.float(), size).numpy()
    scaled = np.clip((resized - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return np.round(matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def _range(maps: Sequence[Tensor]) -> tuple[float, float]:
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    return lo, (hi if hi > lo else lo + 1e-6)


def _literal(text: object) -> str:
    """Text from a file drawn as itself: matplotlib reads `$...$` as mathtext (and can fail)."""
    return str(text).replace("$", r"\$")


def _stage_label(rec: AttentionRecord) -> str:
    return rec.label


def _short_label(rec: AttentionRecord) -> str:
    style = kind_style(rec.kind)
    return f"{style.label} {rec.stage}" if style.own_level else f"{rec.stage}.{rec.block}"


def _panel_label(rec: AttentionRecord) -> str:
    """The label above one map in its stage's group."""
    return f"after stage {rec.stage}" if kind_style(rec.kind).own_level else f"block {rec.block}"


def _group_label(rec: AttentionRecord) -> str:
    style = kind_style(rec.kind)
    return f"{style.label} {rec.stage}" if style.own_level else f"stage {rec.stage}"


def spatial_map(rec: AttentionRecord) -> Tensor | None:
    """The (N, H, W) spatial attention in [0, 1]: CBAM M_s, BAM sigma(M_s); None for SE."""
    return rec.spatial_weights


def channel_map(rec: AttentionRecord) -> Tensor | None:
    """The (N, C) channel weights in [0, 1]: CBAM M_c, SE excitation, BAM sigma(M_c)."""
    return rec.channel_weights


def _spatial_name(kind: str) -> str:
    return kind_style(kind).spatial


def _channel_name(kind: str) -> str:
    return kind_style(kind).channel


def _kinds(trace: AttentionTrace) -> set[str]:
    return {r.kind for r in trace}


# --- 1. spatial overview ----------------------------------------------------------------------


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
    title: str | None = None,
    max_columns: int = 9,
) -> Figure:
    """The input and every module's spatial attention map overlaid on it, grouped by stage.

    Stages are packed left to right into rows of at most `max_columns` panels (a stage longer
    than a row wraps), each group labelled "stage s" above its "block b" panels.

    Args:
        image: the RGB crop the network saw (`Preprocess.crop_image`), PIL or (H, W, 3).
        trace: attention trace of a batch; image `index` of it is shown.
        shared_scale: one colour scale for all maps (comparable colours, one colour bar);
            False scales each map to its own min-max.
        cmap: colour map of the maps.
        alpha: opacity of the maps over the image, in [0, 1].
        width: "single", "double" or inches.
        title: optional figure title.
        max_columns: panels per row, the input included.

    Returns:
        A Figure. CBAM shows M_s; BAM shows sigma(M_s) of its spatial branch. An SE model (no
        spatial maps) or a plain model gets a note panel beside the image instead.
    """
    img = _as_image(image)
    trace = _pick(trace, index)
    records = trace.spatial_records
    header = 0.25 if title else 0.0
    if not records:
        canvas = _Canvas(width, [3], header=header, max_panel=1.2)
        canvas.image(0, 0, img)
        canvas.above(0, 0, "input")
        if trace.channel_records:
            names = "/".join(sorted(kind_style(k).label for k in _kinds(trace)))
            text = f"{names} modules have no spatial map:\nthey reweight channels only\n(see the channel-weight figure)."
        else:
            text = "This model has no attention modules:\nno spatial maps to show."
        canvas.note(0, 1, text, span=2)
        if title:
            canvas.title(title)
        return canvas.fig
    if max_columns < 2:
        raise ValueError(f"max_columns must be at least 2, got {max_columns}")

    maps = [spatial_map(r)[0] for r in records]
    vmin, vmax = _range(maps) if shared_scale else (0.0, 1.0)
    scale = {"vmin": vmin, "vmax": vmax} if shared_scale else {}

    # groups of panels: (label, record indices); the input (None) is a group of its own
    stages: dict[int, list[int]] = {}
    for i, rec in enumerate(records):
        stages.setdefault(rec.stage, []).append(i)
    groups: list[tuple[str, list[int | None]]] = [("", [None])]
    for members in stages.values():
        label = _group_label(records[members[0]])
        for start in range(0, len(members), max_columns):
            groups.append(
                (label + (" (cont.)" if start else ""), members[start : start + max_columns])
            )
    rows: list[list[tuple[str, list[int | None]]]] = [[]]
    for group in groups:
        if rows[-1] and sum(len(g[1]) for g in rows[-1]) + len(group[1]) > max_columns:
            rows.append([])
        rows[-1].append(group)
    gaps = [[0.08 if (k == 0 and g) else 0.0 for g, (_, members) in enumerate(row) for k in range(len(members))]
            for row in rows]  # fmt: skip
    counts = [sum(len(members) for _, members in row) for row in rows]
    canvas = _Canvas(width, counts, gaps=gaps, left=0.05, head=0.29, footer=0.42, header=header)
    for r, row in enumerate(rows):
        col = 0
        for label, members in row:
            if label:
                canvas.above(r, col, label, span=len(members), lift=0.155, fontweight="bold")
            for item in members:
                if item is None:
                    canvas.image(r, col, img)
                    canvas.above(r, col, "input")
                else:
                    rec = records[item]
                    canvas.image(r, col, overlay(img, maps[item], cmap, alpha, **scale))
                    canvas.above(r, col, _panel_label(rec))
                col += 1
    kinds = sorted({r.kind for r in records})
    what = " / ".join(_spatial_name(k) for k in kinds)
    canvas.colorbar(cmap, vmin, vmax, what if shared_scale else f"{what}, each map: own min–max")
    if title:
        canvas.title(title)
    return canvas.fig


# --- 2. channel weights -----------------------------------------------------------------------


def _resample(rows: list[np.ndarray], length: int) -> np.ndarray:
    """Rows of different lengths resampled (linearly, on relative rank) to one length."""
    out = np.empty((len(rows), length), dtype=np.float32)
    grid = np.linspace(0.0, 1.0, length)
    for i, row in enumerate(rows):
        out[i] = np.interp(grid, np.linspace(0.0, 1.0, len(row)), row) if len(row) > 1 else row[0]
    return out


def _row_ticks(ax: Axes, records: list[AttentionRecord]) -> None:
    stages = [r.stage for r in records]
    if len(records) <= 24:
        ax.set_yticks(range(len(records)), [_short_label(r) for r in records])
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
    records = _pick(trace, index).channel_records
    if not records:
        raise ValueError(
            "channel_weights needs attention modules with channel weights; this model has none"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    name_a, name_b = (list(labels) + ["A", "B"][len(labels or []) :])[:2] if labels else ("A", "B")
    name_a, name_b = _literal(name_a), _literal(name_b)
    a_rows = [to_numpy(channel_map(r)[0]) for r in records]
    b_rows = None
    if compare is not None:
        others = _pick(compare, compare_index).channel_records
        shapes_a = [(r.name, r.channel.shape[1]) for r in records]
        shapes_b = [(r.name, r.channel.shape[1]) for r in others]
        if shapes_a != shapes_b:
            raise ValueError("compare must be a trace of the same model (same modules and widths)")
        b_rows = [to_numpy(channel_map(r)[0]) for r in others]
    orders = [np.argsort(-row, kind="stable") for row in a_rows]
    heat_a = _resample([row[o] for row, o in zip(a_rows, orders)], resolution)
    kinds = sorted({r.kind for r in records})
    what = " / ".join(_channel_name(k) for k in kinds)

    n = len(records)
    height = min(9.0, 0.9 + 0.1 * n)
    if b_rows is None:
        fig = _new_figure(width, max(1.8, height))
        ax_heat, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.2]})
        heat_axes = [ax_heat]
        ax_heat.imshow(heat_a, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax_heat.set_title(f"channel weights: {what}")
    else:
        heat_b = _resample([row[o] for row, o in zip(b_rows, orders)], resolution)
        diff = heat_a - heat_b
        fig = _new_figure(width, max(2.0, height))
        axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [2, 2, 2, 1.4]})
        heat_axes, ax_bar = list(axes[:3]), axes[3]
        for ax, data, name in ((axes[0], heat_a, name_a), (axes[1], heat_b, name_b)):
            ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{name} (sorted by {name_a})" if data is heat_b else name)
        lim = max(float(np.abs(diff).max()), 1e-6)
        axes[2].imshow(
            diff, aspect="auto", cmap=DIFF_CMAP, vmin=-lim, vmax=lim, interpolation="nearest"
        )
        axes[2].set_title(f"{name_a} − {name_b}")
        _colorbar(fig, axes[2], DIFF_CMAP, -lim, lim, "difference", location="bottom")
    for i, ax in enumerate(heat_axes):
        _row_ticks(ax, records)
        if i:
            ax.set_yticklabels([])
        ax.set_xticks([0, (resolution - 1) / 2, resolution - 1], ["0", "50", "100"])
        ax.set_xlabel("channel rank, % of C")
    own = all(kind_style(k).own_level for k in kinds)
    heat_axes[0].set_ylabel(f"{kind_style(kinds[0]).label} module" if own else "stage.block")
    _colorbar(fig, heat_axes[: 2 if b_rows else 1], cmap, 0.0, 1.0, what, location="bottom")

    last = records[-1]
    k = min(top_k, len(a_rows[-1]))
    top = orders[-1][:k]
    pos = np.arange(k)[::-1]
    colour = matplotlib.colormaps[cmap]
    if b_rows is None:
        ax_bar.barh(pos, a_rows[-1][top], color=colour(0.25), height=0.7)
    else:
        ax_bar.barh(pos + 0.18, a_rows[-1][top], color=colour(0.25), height=0.36, label=name_a)
        ax_bar.barh(pos - 0.18, b_rows[-1][top], color=colour(0.75), height=0.36, hatch="////",
                    edgecolor="0.2", linewidth=0.3, label=name_b)  # fmt: skip
        ax_bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    ax_bar.set_yticks(pos, [f"c {int(c)}" for c in top])
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("weight")
    ax_bar.set_title(f"top {k}: {_stage_label(last)}")
    for side in ("top", "right"):
        ax_bar.spines[side].set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


# --- 3. attention vs Grad-CAM -----------------------------------------------------------------


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
    title: str | None = None,
) -> Figure:
    """Per stage: the attention map, that stage's Grad-CAM, and their agreement.

    The attention map of stage s is the spatial map of its last module (CBAM: M_s of the last
    block; BAM: sigma(M_s) of the BAM after stage s). The agreement is
    `viz.metrics.agreement_table`'s: Pearson r, Spearman rho and the IoU of the two maps'
    top-`top_k` fractions (the same numbers as the app's agreement table; for BAM, Pearson is
    taken on the logit M_s). Each map is scaled to its own min-max.

    Args:
        analysis: from `viz.cam.analyze`; one row per stage that has a CAM (`layer1`...`layer4`
            for a ResNet, the stage layers of any network by default).
        class_names: names of the classes, to title the figure with the target and P.
    """
    from .metrics import agreement_table

    img = _as_image(image)
    _check_index(index, analysis.logits.shape[0])
    one = analysis.select(index % analysis.logits.shape[0])
    scores = {
        layer: (one.trace[name], score) for name, layer, score in agreement_table(one, top_k=top_k)
    }
    stage_layers = [(s, layer) for s, layer in one.stage_cams().items() if s >= 1]
    if not stage_layers:
        raise ValueError(f"attention_vs_gradcam needs CAMs at stages 1-4; got {sorted(one.cams)}")
    target = int(one.target[0])
    name = class_names[target] if class_names and target < len(class_names) else f"class {target}"
    name = _literal(name)
    canvas = _Canvas(
        width, [3] * len(stage_layers), left=0.18, footer=0.42, header=0.22, max_panel=1.3
    )
    channel_only = sorted({kind_style(r.kind).label for r in one.trace if r.spatial is None})
    for r, (stage, layer) in enumerate(stage_layers):
        rec, score = scores.get(layer, (None, None))
        if rec is None:
            why = (
                f"{'/'.join(channel_only)}: no spatial map"
                if channel_only
                else "no spatial\nattention"
            )
            canvas.note(r, 0, f"{why}\nin stage {stage}")
            canvas.note(r, 2, "agreement:\nn/a")
        else:
            canvas.image(r, 0, overlay(img, spatial_map(rec)[0], cmap, alpha))
            canvas.ax.text(
                canvas.box(r, 2)[0] + 0.02, canvas.box(r, 2)[1] + canvas.panel / 2,
                f"Pearson r = {score.pearson:.2f}\nSpearman ρ = {score.spearman:.2f}\n"
                f"IoU (top {score.top_k:.0%}) = {score.iou:.2f}",
                ha="left", va="center", fontsize=6,
            )  # fmt: skip
        canvas.image(r, 1, overlay(img, one.cams[layer][0], cmap, alpha))
        canvas.left_of(r, 0, f"stage {stage}")
    symbols = {kind_style(r.kind).symbol for r in one.trace.spatial_records}
    attention = f"attention {symbols.pop()}".strip() if len(symbols) == 1 else "attention"
    for col, text in enumerate((attention, one.method_label, "agreement")):
        canvas.above(0, col, text)
    canvas.colorbar(cmap, 0.0, 1.0, "each map: own min–max")
    canvas.title(title or f"target: {name}, P={float(one.target_probs[0]):.5f}")
    return canvas.fig


# --- 4. model grid ----------------------------------------------------------------------------


@styled
def model_grid(
    images: Sequence[Image.Image | np.ndarray | Tensor],
    rows: Sequence[tuple[str, Analysis]],
    *,
    column_titles: Sequence[str],
    layer: str | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    width: str | float = "double",
    decimals: int = 5,
    title: str | None = None,
) -> Figure:
    """The CBAM paper's Grad-CAM figure: images in columns, one row of Grad-CAMs per model.

    Args:
        images: the RGB crops shown (one per column), e.g. the first model's `crop_image`.
        rows: (row label, Analysis over all `images`, in the same order), e.g.
            ("ResNet-50 + CBAM", analysis). Models may differ in depth, attention and input
            size: each CAM is resized to its column's image.
        column_titles: one title per image (the class name).
        layer: CAM layer shown; default each row's deepest stage (`layer4` in a ResNet,
            whatever its name in another network).
        decimals: digits of the softmax score printed under each map, "P=0.96340".

    Raises:
        ValueError: counts do not match, or a row has no CAM for `layer`.
    """
    pics = [_as_image(im) for im in images]
    if not pics:
        raise ValueError("model_grid needs at least one image")
    if len(column_titles) != len(pics):
        raise ValueError(f"{len(column_titles)} column titles for {len(pics)} images")
    shown: list[str] = []
    for label, analysis in rows:
        row_layer = layer if layer is not None else _deepest_cam(analysis)
        if row_layer not in analysis.cams:
            raise ValueError(
                f"row {label!r} has no CAM for {row_layer!r}; it has {sorted(analysis.cams)}"
            )
        shown.append(row_layer)
        if analysis.logits.shape[0] != len(pics):
            raise ValueError(
                f"row {label!r} covers {analysis.logits.shape[0]} images, not {len(pics)}"
            )
    labels = _wrap_row_labels(
        [_literal(label) for label, _ in rows], width, len(pics), max_panel=1.4
    )
    lines = max(label.count("\n") + 1 for label in labels) if labels else 1
    canvas = _Canvas(
        width, [len(pics)] * (1 + len(rows)), left=0.08 + 0.12 * lines, foot=[0.03] + [0.15] * len(rows), header=0.25 if title else 0.0,
        max_panel=1.4,
    )  # fmt: skip
    for c, (pic, name) in enumerate(zip(pics, map(_literal, column_titles))):
        canvas.image(0, c, pic)
        canvas.above(0, c, name)
    canvas.left_of(0, 0, "input")
    for r, ((_, analysis), label, row_layer) in enumerate(zip(rows, labels, shown), start=1):
        cams = analysis.cams[row_layer]
        probs = analysis.target_probs
        for c, pic in enumerate(pics):
            canvas.image(r, c, overlay(pic, cams[c], cmap, alpha))
            canvas.below(r, c, f"P={float(probs[c]):.{decimals}f}")
        canvas.left_of(r, 0, label)
    if title:
        canvas.title(title)
    return canvas.fig


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
    return [textwrap.fill(label, chars, break_long_words=False) for label in labels]


# --- 5. BAM hierarchy -------------------------------------------------------------------------


@styled
def bam_hierarchy(
    image: Image.Image | np.ndarray | Tensor,
    trace: AttentionTrace,
    *,
    index: int = 0,
    cmap: str = DEFAULT_CMAP,
    width: str | float = "single",
    title: str | None = None,
) -> Figure:
    """The BAM paper's Figure 1: at each BAM, the feature before, the attention, the feature after.

    Rows are the BAM modules (after stages 1, 2, 3); columns are the channel-mean |F| entering
    the module, the channel mean of its 3-D gate 1 + M(F), and the channel-mean |F'| leaving it.
    F and F' share one scale per row (so the amplification shows); the gate has its own scale.
    Maps are resized (bilinear) from the stage's resolution to the image.

    Raises:
        ValueError: the trace has no BAM module.
    """
    img = _as_image(image)
    full = _pick(trace, index)
    records = [r for r in full if r.kind == "bam"]
    if not records:
        kinds = sorted(_kinds(full))
        has = (
            f"it has {', '.join(k.upper() for k in kinds)} modules"
            if kinds
            else "it has no attention modules"
        )
        raise ValueError(f"bam_hierarchy needs a model with BAM modules; {has}")
    if records[0].feature_in is None:
        raise ValueError(
            "bam_hierarchy needs the feature maps: trace with "
            "record_attention(model, feature_means=True) or use analyze"
        )
    size = (img.height, img.width)
    gaps = [[0.0, 0.16, 0.0, 0.0]] * len(records)
    canvas = _Canvas(width, [4] * len(records), gaps=gaps, left=0.05, footer=0.42,
                     header=0.25 if title else 0.0)  # fmt: skip
    canvas.image(0, 0, img)
    canvas.above(0, 0, "input")
    for r, rec in enumerate(records):
        f_in, gate, f_out = rec.feature_in[0], rec.gate[0], rec.feature_out[0]
        lo, hi = _range([f_in, f_out])
        glo, ghi = _range([gate])
        canvas.image(r, 1, _heat_rgb(f_in, size, cmap, lo, hi))
        canvas.image(r, 2, _heat_rgb(gate, size, cmap, glo, ghi))
        canvas.image(r, 3, _heat_rgb(f_out, size, cmap, lo, hi))
        canvas.left_of(r, 1, f"BAM {rec.stage} ({f_in.shape[0]}×{f_in.shape[1]})")
    for col, text in ((1, "F (before)"), (2, "1 + M(F)"), (3, "F′ (after)")):
        canvas.above(0, col, text)
    canvas.colorbar(cmap, 0.0, 1.0, "channel mean; own scale per row, F and F′ shared")
    if title:
        canvas.title(title)
    return canvas.fig


# --- 6. class x channel statistics ------------------------------------------------------------


def _default_modules(names: Sequence[str], stages: dict[str, int]) -> list[str]:
    """The last module of each stage (the SENet paper's choice of deep and shallow blocks)."""
    if not stages:
        return list(names)
    last: dict[int, str] = {}
    for name in names:
        last[stages.get(name, 0)] = name
    return [last[s] for s in sorted(last)]


def _module_title(name: str, labels: dict[str, str]) -> str:
    return _literal(f"{labels[name]} ({name})" if name in labels else name)


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
        stats: a `viz.metrics.ChannelStats` (`class_names`, `counts` (K,), `means`: module name
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
    stages, titles = getattr(stats, "stages", {}), getattr(stats, "labels", {})
    chosen = list(modules) if modules is not None else _default_modules(names, stages)
    missing = [m for m in chosen if m not in stats.means]
    if missing or not chosen:
        raise ValueError(f"unknown modules {missing}; statistics have: {', '.join(names)}")
    counts = to_numpy(torch.as_tensor(stats.counts)).astype(np.float64)
    panels = []
    for name in chosen:
        means = to_numpy(stats.means[name]).astype(np.float64)  # (K, C)
        weights = counts if counts.sum() > 0 else np.ones_like(counts)
        valid = np.isfinite(means).all(1) & (weights > 0)
        overall = (means[valid] * weights[valid, None]).sum(0) / max(weights[valid].sum(), 1e-12)
        order = np.argsort(-overall, kind="stable")
        data = means[:, order].copy()
        data[counts <= 0] = np.nan
        panels.append((name, data))
    finite = [p[1][np.isfinite(p[1])] for p in panels]
    values = np.concatenate(finite) if any(f.size for f in finite) else np.zeros(1)
    vmin, vmax = float(values.min()), float(values.max())
    vmax = vmax if vmax > vmin else vmin + 1e-6
    ncols = 1 if figure_width(width) < 4.5 or len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    k = len(stats.class_names)
    panel_h = min(2.2, 0.5 + 0.1 * k)
    fig = _new_figure(width, nrows * panel_h + 0.5 + (0.15 if title else 0.0))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = matplotlib.colormaps[cmap].with_extremes(bad="0.8")
    for ax, (name, data) in zip(axes, panels):
        lo, hi = (vmin, vmax) if shared_scale else _range([torch.from_numpy(np.nan_to_num(data))])
        ax.imshow(data, aspect="auto", cmap=colours, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(_module_title(name, titles))
        ax.set_xlabel(f"channel (sorted by overall mean, C = {data.shape[1]})")
        ax.set_xticks([])
        if k <= 30:
            ax.set_yticks(
                range(k), [f"{_literal(c)} ({int(n)})" for c, n in zip(stats.class_names, counts)]
            )
        else:
            ax.set_yticks([])
            ax.set_ylabel(f"{k} classes")
        if not shared_scale:
            _colorbar(fig, ax, cmap, lo, hi, "mean weight")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if shared_scale:
        _colorbar(fig, axes[: len(panels)].tolist(), cmap, vmin, vmax, "mean channel weight per class",
                  location="bottom")  # fmt: skip
    if title:
        fig.suptitle(title)
    return fig
