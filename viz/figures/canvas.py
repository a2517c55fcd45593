"""The shared canvas and style of Attention Lens figures: sizes, fonts, panels, labels.

Every figure module builds on these; none of them keeps state between calls.
"""

from __future__ import annotations

import functools
import re
import textwrap
import threading
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torch import Tensor

from models.probes import kind_style
from viz.engine.maps import resize_map, with_cell_grid
from viz.engine.trace import AttentionRecord, AttentionTrace

__all__ = [
    "fit_text",
    "text_width",
    "SINGLE_COLUMN",
    "DOUBLE_COLUMN",
    "DIFF_CMAP",
    "FIGURE_STYLE",
    "STYLE_LOCK",
    "styled",
    "figure_width",
    "new_figure",
    "as_image",
    "check_index",
    "pick_image",
    "colorbar",
    "Canvas",
    "panel_size",
    "heat_rgb",
    "value_range",
    "literal",
    "stage_label",
    "short_label",
    "panel_label",
    "group_label",
    "spatial_map",
    "channel_map",
    "spatial_name",
    "maps_name",
    "channel_name",
    "kinds_of",
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


def new_figure(width: str | float, height: float) -> Figure:
    return Figure(figsize=(figure_width(width), max(0.8, height)), layout="constrained")


def as_image(image: Image.Image | np.ndarray | Tensor) -> Image.Image:
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


def check_index(index: int, n: int) -> None:
    if not -n <= index < n:
        raise IndexError(f"index {index} is out of range for a batch of {n} images")


def pick_image(trace: AttentionTrace, index: int) -> AttentionTrace:
    """The trace of image `index` (an empty trace, of a model without attention, stays empty)."""
    if not len(trace):
        return trace
    # every record has a gate (channel is None for self-attention)
    n = next(iter(trace)).gate.shape[0]
    check_index(index, n)
    return trace.select(index % n)


def colorbar(fig: Figure, axes, cmap: str, vmin: float, vmax: float, label: str, **kw) -> None:
    """A colour bar beside `axes` (for figures under the constrained layout engine)."""
    mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes, label=label, fraction=0.05, pad=0.02, aspect=30, **kw)
    bar.outline.set_linewidth(0.5)
    ticks = MaxNLocator(nbins=2, symmetric=vmin < 0 < vmax).tick_values(vmin, vmax)
    bar.set_ticks([t for t in ticks if vmin - 1e-12 <= t <= vmax + 1e-12])  # few, inside


CHAR_WIDTH = 0.56  # average glyph width of DejaVu Sans, in ems: a safe estimate for labels
BOLD_WIDTH = 1.15  # DejaVu Sans Bold is this much wider


def fits_bold(text: str, inches: float) -> bool:
    """Whether bold `text` fits `inches` on one line, at least at the 6-pt minimum."""
    return text_width(text, 6.0) * BOLD_WIDTH <= inches


def _shown_length(line: str) -> int:
    """Characters a line shows: a mathtext command such as \\sigma is one glyph."""
    if "$" in line:
        line = re.sub(r"\\[A-Za-z]+", "x", line)
        line = re.sub(r"[${}_^]", "", line)
    return len(line)


def text_width(text: str, fontsize: float) -> float:
    """Estimated width in inches of the longest line of `text` at `fontsize` points."""
    longest = max((_shown_length(line) for line in str(text).split("\n")), default=0)
    return longest * CHAR_WIDTH * fontsize / 72


def fit_text(
    text: str, inches: float, *, fontsize: float = 7.0, max_lines: int = 1, min_size: float = 6.0
) -> tuple[str, float]:
    """`text` made to fit `inches`: at `fontsize`, else at `min_size`, wrapped to `max_lines`
    lines, the last one cut with an ellipsis. Returns (text, font size)."""
    for size in (fontsize, min_size):
        if text_width(text, size) <= inches:
            return text, size
    chars = max(3, int(inches / (CHAR_WIDTH * min_size / 72)))
    lines = textwrap.wrap(str(text), chars, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, chars - 1)].rstrip() + "…"
    return "\n".join(lines), min_size


def panel_size(
    width: str | float, left: float, columns: int, max_panel: float, *, gap: float = 0.04,
    extra: float = 0.0,
) -> float:  # fmt: skip
    """Inches of a square panel of a `Canvas` with `columns` panels a row (`left` for the row
    labels, `gap` between panels, `extra` for group gaps), at most `max_panel`."""
    avail = figure_width(width) - left - 0.05 - gap * (columns - 1) - extra
    return max(0.2, min(max_panel, avail / columns))


class Canvas:
    """Square image panels placed in inches on one full-figure Axes (no layout engine).

    Row r holds `counts[r]` panels; `gaps[r][c]` is extra space (inches) before panel c of row
    r (to separate groups). Each row reserves `head` inches above its panels (titles) and `foot`
    below (labels under a panel), each one number or one per row; `center_rows` centres a row
    shorter than the widest; `left` is room for row labels, `footer` for a colour bar,
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
        head: float | Sequence[float] = 0.15,
        foot: float | Sequence[float] = 0.03,
        gap: float = 0.04,
        footer: float = 0.0,
        header: float = 0.0,
        max_panel: float = 1.5,
        center_rows: bool = False,
    ) -> None:
        self.width = figure_width(width)
        self.gaps = [list(g) for g in gaps] if gaps is not None else [[0.0] * n for n in counts]
        ncols = max(counts)
        extra = max(sum(g) for g in self.gaps)
        self.panel = p = panel_size(width, left, ncols, max_panel, gap=gap, extra=extra)
        used = ncols * p + gap * (ncols - 1) + extra
        self.used = used  # inches the panels take, from x0
        self.x0 = left + max(0.0, (self.width - left - 0.05 - used) / 2)
        self.gap, self.footer, self.header = gap, footer, header
        feet = [float(foot)] * len(counts) if isinstance(foot, (int, float)) else list(foot)
        self.heads = [float(head)] * len(counts) if isinstance(head, (int, float)) else list(head)
        self.shift = [
            (used - (n * p + gap * (n - 1) + sum(g))) / 2 if center_rows else 0.0
            for n, g in zip(counts, self.gaps)
        ]  # fmt: skip
        heights = [h + p + f for h, f in zip(self.heads, feet)]
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
        x = (
            self.x0
            + self.shift[row]
            + col * (self.panel + self.gap)
            + sum(self.gaps[row][: col + 1])
        )
        top = self.height - self.row_tops[row] - self.heads[row]
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

    def span_width(self, span: int) -> float:
        """Inches of text room above `span` panels side by side."""
        return self.panel * span + self.gap * (span - 1) + self.gap * 0.5

    def above(
        self,
        row: int,
        col: int,
        text: str,
        *,
        span: float = 1.0,
        lift: float = 0.02,
        max_lines: int = 1,
        **kw,
    ) -> None:
        """Text centred above a panel (or `span` panels), fitted to their width."""
        x, y, p = self.box(row, col)
        w = p * span + self.gap * (span - 1)
        room = (w + self.gap * 0.5) / (BOLD_WIDTH if kw.get("fontweight") == "bold" else 1.0)
        text, size = fit_text(text, room, max_lines=max_lines)
        self.ax.text(x + w / 2, y + p + lift, text, ha="center", va="bottom", fontsize=size,
                     multialignment="center", **kw)  # fmt: skip

    def below(self, row: int, col: int, text: str, **kw) -> None:
        """Text centred under a panel, fitted to its width."""
        x, y, p = self.box(row, col)
        text, size = fit_text(text, p + self.gap * 0.5)
        self.ax.text(x + p / 2, y - 0.02, text, ha="center", va="top", fontsize=size, **kw)

    def left_of(self, row: int, col: int, text: str, **kw) -> None:
        x, y, p = self.box(row, col)
        self.ax.text(x - 0.03, y + p / 2, text, ha="right", va="center", rotation=90,
                     multialignment="center", **kw)  # fmt: skip

    def right_of(self, row: int, col: int, text: str, **kw) -> None:
        x, y, p = self.box(row, col)
        self.ax.text(x + p + 0.06, y + p / 2, text, ha="left", va="center", **kw)

    def colorbar(self, cmap: str, vmin: float, vmax: float, label: str) -> None:
        """A horizontal colour bar centred under the panels, in the footer (`footer` >= 0.4)."""
        self.colorbars(cmap, [(vmin, vmax, label)])

    def colorbars(self, cmap: str, scales: Sequence[tuple[float, float, str]]) -> None:
        """Colour bars side by side under the panels, one per (vmin, vmax, label): maps of
        different units (gates, attention probabilities) each on their own scale. Labels
        wrap to two lines where a bar is narrow (`footer` >= 0.5 then)."""
        gap = 0.3
        total = min(3.0 * len(scales), 0.7 * (self.width - self.x0), max(1.5, self.used))
        span = (total - gap * (len(scales) - 1)) / len(scales)
        x0 = min(max(0.05, self.x0 + (self.used - total) / 2), self.width - total - 0.05)
        # side by side, the labels fit their bars at one size, the smallest any needs; a bar
        # alone has the figure's width
        room = span + gap - 0.05
        size = min(fit_text(label, room, max_lines=2)[1] for *_, label in scales)
        for i, (vmin, vmax, label) in enumerate(scales):
            rect = (
                (x0 + i * (span + gap)) / self.width,
                (self.footer - 0.1) / self.height,
                span / self.width,
                0.07 / self.height,
            )
            cax = self.fig.add_axes(rect)
            mappable = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
            bar = self.fig.colorbar(mappable, cax=cax, orientation="horizontal")
            if len(scales) == 1:  # its room is the figure's width: wrapped, never cut
                text, alone = fit_text(label, self.width - 0.1, max_lines=2)
                bar.set_label(text, fontsize=alone)
            else:
                text = fit_text(label, room, fontsize=size, min_size=size, max_lines=2)[0]
                bar.set_label(text, fontsize=size)
            bar.outline.set_linewidth(0.5)
            _thin_ticks(bar, span, vmin, vmax)
            cax.xaxis.labelpad = 1

    def title(self, text: str) -> None:
        """The figure title: one line at 8.4 pt if it fits, else up to two lines at 7 pt."""
        room = self.width - 0.1
        if text_width(text, 8.4) <= room:
            text, size = text, 8.4
        else:
            text, size = fit_text(text, room, fontsize=7.0, min_size=7.0, max_lines=2)
        self.ax.text(self.width / 2, self.height - 0.04, text, ha="center", va="top",
                     fontsize=size, multialignment="center")  # fmt: skip


def title_room(title: str | None, width: str | float) -> float:
    """Inches a `Canvas` needs above its panels (`header`) for `Canvas.title(title)`."""
    if not title:
        return 0.0
    return 0.22 if text_width(title, 8.4) <= figure_width(width) - 0.1 else 0.36


def _thin_ticks(bar, span: float, vmin: float, vmax: float) -> None:
    """Fewer ticks when their labels would touch (attention probabilities: "0.01925")."""
    ticks = [t for t in bar.get_ticks() if vmin - 1e-12 <= t <= vmax + 1e-12]
    room = max((text_width(f"{t:.6g}", 6.0) for t in ticks), default=0.0) + 0.1
    if len(ticks) * room <= span:
        return
    thinned = MaxNLocator(nbins=max(1, int(span / room))).tick_values(vmin, vmax)
    bar.set_ticks([t for t in thinned if vmin - 1e-12 <= t <= vmax + 1e-12])


def heat_rgb(
    m: Tensor, size: tuple[int, int], cmap: str, vmin: float, vmax: float, render: str = "smooth"
) -> np.ndarray:
    """A (h, w) map resized to `size` (H, W) (smooth or as cells) and colour-mapped to uint8 RGB."""
    resized = resize_map(m.float(), size, render).numpy()
    scaled = np.clip((resized - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgb = matplotlib.colormaps[cmap](scaled)[..., :3]
    if render == "cells":
        rgb = with_cell_grid(rgb, tuple(m.shape[-2:]))
    return np.round(rgb * 255).astype(np.uint8)


def value_range(maps: Sequence[Tensor]) -> tuple[float, float]:
    """The shared colour scale of `maps`; maps that are all flat (an untrained gate at 0.5)
    sit mid-scale on a range of one around their value, so they read as flat, not as zero."""
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    if hi - lo <= 1e-4 * max(1.0, abs(hi), abs(lo)):
        middle = (hi + lo) / 2
        return middle - 0.5, middle + 0.5
    return lo, hi


def literal(text: object) -> str:
    """Text from a file drawn as itself: matplotlib reads `$...$` as mathtext (and can fail)."""
    return str(text).replace("$", r"\$")


def stage_label(rec: AttentionRecord) -> str:
    return rec.label


def short_label(rec: AttentionRecord) -> str:
    style = kind_style(rec.kind)
    return f"{style.label} {rec.stage}" if style.own_level else f"{rec.stage}.{rec.block}"


def panel_label(rec: AttentionRecord) -> str:
    """The label above one map in its stage's group ("block 7": a ViT block's own index)."""
    if rec.layer is not None:
        return rec.label
    return f"after stage {rec.stage}" if kind_style(rec.kind).own_level else f"block {rec.block}"


def group_label(rec: AttentionRecord) -> str:
    style = kind_style(rec.kind)
    return f"{style.label} {rec.stage}" if style.own_level else f"stage {rec.stage}"


def spatial_map(rec: AttentionRecord) -> Tensor | None:
    """The (N, H, W) spatial attention in [0, 1]: CBAM M_s, BAM sigma(M_s); None for SE."""
    return rec.spatial_weights


def channel_map(rec: AttentionRecord) -> Tensor | None:
    """The (N, C) channel weights in [0, 1]: CBAM M_c, SE excitation, BAM sigma(M_c)."""
    return rec.channel_weights


def spatial_name(kind: str) -> str:
    return kind_style(kind).spatial


def maps_name(records: Sequence[AttentionRecord]) -> str:
    """What the records' spatial maps are, for a colour-bar label. Self-attention names its
    reading: a ViT's class token looks at the patches; a Swin window has no class token, so
    its map is the attention each patch receives."""
    names = []
    for kind in sorted({r.kind for r in records}):
        if kind != "self-attention":
            names.append(spatial_name(kind))
        elif any(r.kind == kind and r.attention_source is None and r.layer is None
                 for r in records):  # fmt: skip
            names.append("attention each patch receives, mean of heads")
        else:
            names.append("class-token attention, mean of heads")
    return " / ".join(names)


def channel_name(kind: str) -> str:
    return kind_style(kind).channel


def kinds_of(trace: AttentionTrace) -> set[str]:
    return {r.kind for r in trace}
