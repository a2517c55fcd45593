"""The figure kinds and the settings they are drawn with: one table for the export, the
command line and the app, so a figure is drawn from `FigureSettings` in one place.

A new figure is a function in its own module of `viz.figures` and one `FigureSpec` here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.figure import Figure
from PIL import Image

from viz.engine.maps import DEFAULT_CMAP, RENDERS
from viz.figures.attention_vs_gradcam import attention_vs_gradcam
from viz.figures.bam_hierarchy import bam_hierarchy
from viz.figures.canvas import figure_width
from viz.figures.channel_weights import channel_weights
from viz.figures.dino_heads import class_token_blocks, dino_heads
from viz.figures.heads import attention_heads
from viz.figures.spatial_overview import spatial_overview
from viz.figures.token_norms import token_norms
from viz.measures.token_norms import norm_blocks

if TYPE_CHECKING:
    from viz.engine.cam import Analysis

__all__ = [
    "ExportError",
    "FIGURES",
    "FigureSettings",
    "FigureSpec",
    "IMAGE_FIGURES",
    "SCALES",
    "draw_image_figure",
    "scales_drawn",
]

SCALES = ("shared", "per-map")


class ExportError(ValueError):
    """A figure, a setting or an export cannot proceed; the message is one line to act on."""


@dataclass(frozen=True)
class FigureSettings:
    """Everything that decides how maps are computed and drawn: one object drives the app's
    screen, every download, the zip, `python -m viz export` and the manifest.

    Attributes:
        method: CAM method (`viz.engine.cam.CAM_METHODS`).
        layers: CAM layers, or None for the network's stage layers.
        smoothing: the CAMs' smoothing, "aug" and/or "eigen" (`viz.engine.cam.analyze`).
        num_samples: noisy copies of SS-CAM, IS-CAM and SmoothGrad-CAM++; None: the method's
            default.
        cmap: colour map of the maps.
        alpha: opacity of the maps over the image, in [0, 1].
        scale: "shared" (one colour scale, real values) or "per-map" (each map's own min-max);
            the figures that follow it are those whose `FigureSpec.scale` is None.
        width: "single", "double" or inches.
        dpi: raster resolution of PNG files.
        render: "smooth" (bilinear) or "cells" (each map cell flat, the grid drawn).
    """

    method: str = "gradcam"
    layers: tuple[str, ...] | None = None
    smoothing: tuple[str, ...] = ()
    num_samples: int | None = None
    cmap: str = DEFAULT_CMAP
    alpha: float = 0.5
    scale: str = "shared"
    width: str | float = "double"
    dpi: int = 300
    render: str = "smooth"

    def __post_init__(self) -> None:
        from viz.engine.cam import CAM_METHODS, settings_error

        if self.method not in CAM_METHODS:
            raise ExportError(
                f"method must be one of {', '.join(CAM_METHODS)}, got {self.method!r}"
            )
        problem = settings_error(self.method, self.smoothing, self.method_options())
        checks = [
            (problem is None, problem),
            (self.num_samples is None or (isinstance(self.num_samples, int)
                                          and self.num_samples >= 1),
             f"num_samples must be an integer >= 1, got {self.num_samples!r}"),
            (self.cmap in matplotlib.colormaps,
             f"unknown colour map {self.cmap!r} (any matplotlib colormap name)"),
            (0.0 <= float(self.alpha) <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.scale in SCALES,
             f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}"),
            (self.render in RENDERS,
             f"render must be one of {', '.join(RENDERS)}, got {self.render!r}"),
            (10 <= int(self.dpi) <= 2400, f"dpi must be from 10 to 2400, got {self.dpi}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ExportError(message)
        try:
            figure_width(self.width)
        except ValueError as exc:
            raise ExportError(str(exc)) from None

    def method_options(self) -> dict:
        """`analyze`'s `options` for these settings."""
        return {} if self.num_samples is None else {"num_samples": self.num_samples}

    @property
    def shared_scale(self) -> bool:
        return self.scale == "shared"

    def to_dict(self) -> dict:
        return {
            "cam_method": self.method,
            "cam_layers": None if self.layers is None else list(self.layers),
            "cam_smoothing": list(self.smoothing),
            "cam_num_samples": self.num_samples,
            "cmap": self.cmap,
            "alpha": float(self.alpha),
            "scale": self.scale,
            "width": self.width,
            "width_inches": figure_width(self.width),
            "dpi": int(self.dpi),
            "render": self.render,
        }


# (crop, analysis, class names, settings, extra keyword arguments) -> Figure
Draw = Callable[[Image.Image, "Analysis", Sequence[str], FigureSettings, dict], Figure]


@dataclass(frozen=True)
class FigureSpec:
    """One figure kind.

    Attributes:
        name: its `--figure` name and file stem.
        help: one line for `--help`.
        draw: for a figure of one image and one model; None for the figures drawn from
            several models (model-grid) or a folder (class-stats).
        unavailable: why a model cannot show it ("no BAM modules"), or None when it can.
        scale: how its colours are scaled when that is not `FigureSettings.scale`.
        cams: it draws CAMs, so the network's output must be explained (a class, or a
            target); the others draw attention alone and work on any network.
    """

    name: str
    help: str
    draw: Draw | None = None
    unavailable: Callable[[Analysis], str | None] = lambda analysis: None
    scale: str | None = None
    cams: bool = False

    @property
    def per_image(self) -> bool:
        return self.draw is not None


def _overview(crop, analysis, class_names, s: FigureSettings, extra: dict) -> Figure:
    return spatial_overview(crop, analysis.trace, cmap=s.cmap, alpha=s.alpha, width=s.width,
                            shared_scale=s.shared_scale, render=s.render, **extra)  # fmt: skip


def _channels(crop, analysis, class_names, s: FigureSettings, extra: dict) -> Figure:
    return channel_weights(analysis.trace, cmap=s.cmap, width=s.width, **extra)


def _gradcam(crop, analysis, class_names, s: FigureSettings, extra: dict) -> Figure:
    return attention_vs_gradcam(crop, analysis, class_names=class_names, cmap=s.cmap,
                                alpha=s.alpha, width=s.width, render=s.render, **extra)  # fmt: skip


def _bam(crop, analysis, class_names, s: FigureSettings, extra: dict) -> Figure:
    return bam_hierarchy(crop, analysis.trace, cmap=s.cmap, width=s.width, render=s.render,
                         **extra)  # fmt: skip


def _heads(crop, analysis, class_names, s: FigureSettings, extra: dict) -> Figure:
    return attention_heads(crop, analysis.trace, cmap=s.cmap, alpha=s.alpha, width=s.width,
                           shared_scale=s.shared_scale, render=s.render, **extra)  # fmt: skip


def _no_heads(analysis: Analysis) -> str | None:
    if any(r.heads is not None for r in analysis.trace):
        return None
    return "no self-attention heads (a ViT's or Swin's figure)"


def _dino(crop, analysis, class_names, s: FigureSettings, extra: dict) -> Figure:
    return dino_heads(crop, analysis.trace, cmap=s.cmap, alpha=s.alpha, width=s.width,
                      render=s.render, **extra)  # fmt: skip


def _no_dino(analysis: Analysis) -> str | None:
    if class_token_blocks(analysis.trace):
        return None
    return "no class token's self-attention (a ViT's figure: DINO, DeiT, EVA, ...)"


def _norms(crop, analysis, class_names, s: FigureSettings, extra: dict) -> Figure:
    return token_norms(crop, analysis.trace, cmap=s.cmap, width=s.width, **extra)


def _no_norms(analysis: Analysis) -> str | None:
    if norm_blocks(analysis.trace):
        return None
    return "no global self-attention blocks (a ViT's figure)"


def _no_channels(analysis: Analysis) -> str | None:
    return None if analysis.trace.channel_records else "no channel attention"


def _no_bam(analysis: Analysis) -> str | None:
    return None if any(r.kind == "bam" for r in analysis.trace) else "the model has no BAM modules"


_SPECS = (
    FigureSpec("overview", "every module's spatial attention (CBAM M_s, BAM sigma(M_s); a "
               "transformer's self-attention per block) over the image", _overview),
    FigureSpec("heads", "a transformer's self-attention per head: blocks in rows, heads in "
               "columns", _heads, _no_heads),
    FigureSpec("dino-heads", "DINO's figure: one block's class-token attention per head and "
               "the patches holding 60% of it", _dino, _no_dino,
               scale="shared (attention probabilities of the block's heads)"),
    FigureSpec("token-norms", "the registers paper's figure: one block's output-token norms, "
               "high-norm outliers outlined", _norms, _no_norms,
               scale="own min-max (token norms)"),
    FigureSpec("channels", "every module's channel weights, sorted, and the last module's top "
               "channels", _channels, _no_channels, scale="fixed 0-1 (sigmoid weights)"),
    FigureSpec("gradcam", "per CAM layer: attention map, CAM, their agreement (Pearson, "
               "Spearman, IoU)", _gradcam,
               scale="per-map (each map its own min-max: CAMs of different layers share no unit)",
               cams=True),
    FigureSpec("model-grid", "the CBAM paper's figure: images in columns, one CAM row per "
               "checkpoint",
               scale="per-map (each map its own min-max: CAMs of different networks share no unit)",
               cams=True),
    FigureSpec("dino-grid", "DINO's masks per checkpoint: images in columns, one row per "
               "checkpoint, its last block's class-token attention and the patches holding 60% "
               "of it (n/a for a network without a class token)",
               scale="per-map (each map its own min-max)"),
    FigureSpec("bam-hierarchy", "the BAM paper's figure: feature before, attention 1 + M(F), "
               "feature after", _bam, _no_bam, scale="per-row (F and F' shared)"),
    FigureSpec("class-stats", "mean channel weight per class (the SENet excitation plot)"),
)  # fmt: skip
FIGURES: dict[str, FigureSpec] = {spec.name: spec for spec in _SPECS}
IMAGE_FIGURES = tuple(name for name, spec in FIGURES.items() if spec.per_image)


def draw_image_figure(
    name: str,
    crop: Image.Image,
    analysis: Analysis,
    class_names: Sequence[str],
    settings: FigureSettings,
    **extra: Any,
) -> Figure:
    """Figure `name` of one image and one model, drawn with `settings`.

    Args:
        crop: the photo under the maps (the network's square cut of the original).
        analysis: of this image (a batch of one, or pass `index` in `extra`).
        extra: the figure function's own options (e.g. `top_k`, `compare` for channels).

    Raises:
        ExportError: an unknown or not per-image figure, or one this model cannot show.
    """
    spec = FIGURES.get(name)
    if spec is None or spec.draw is None:
        raise ExportError(
            f"unknown per-image figure {name!r}; choose from {', '.join(IMAGE_FIGURES)}"
        )
    reason = spec.unavailable(analysis)
    if reason is not None:
        raise ExportError(f"{name} cannot be drawn: {reason}")
    return spec.draw(crop, analysis, class_names, settings, extra)


def scales_drawn(figures: Sequence[str], scale: str) -> dict[str, str]:
    """{figure: the colour scale it was drawn with}, recorded beside the --scale setting."""
    return {f: FIGURES[f].scale or scale for f in figures}
