"""An input-resolution attribution (Captum: Guided Grad-CAM, Integrated Gradients, Occlusion).

Pixel attributions are heavy-tailed: a few pixels hold most of the magnitude, so a min-max
scale leaves Integrated Gradients nearly black. The map is |attribution| clipped at a
percentile (99th by default, as in the Integrated Gradients and SmoothGrad papers' figures),
and the colour bar says so.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from viz.engine.maps import DEFAULT_CMAP, overlay
from viz.figures.canvas import Canvas, as_image, fit_text, styled

__all__ = ["attribution_map", "clipped_magnitude"]


def clipped_magnitude(attribution: Tensor, percentile: float = 99.0) -> tuple[Tensor, float]:
    """|attribution| (H, W) clipped at its `percentile`; returns (map, clip value)."""
    if not 50.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be within [50, 100], got {percentile}")
    magnitude = attribution.detach().float().abs()
    clip = float(torch.quantile(magnitude.flatten(), percentile / 100.0))
    if not np.isfinite(clip) or clip <= 0.0:
        clip = float(magnitude.max()) or 1.0  # an all-zero map stays zero
    return magnitude.clamp(max=clip), clip


@styled
def attribution_map(
    image: Image.Image | np.ndarray | Tensor,
    attribution: Tensor,
    *,
    method_label: str,
    percentile: float = 99.0,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    width: str | float = "single",
) -> Figure:
    """The network's input and |attribution| over it, clipped at `percentile`, with a colour bar.

    Args:
        image: the network's input crop (the attribution's pixels).
        attribution: (H, W) attribution of that crop, e.g. `viz.engine.cam.attribute(...)[0]`.
        method_label: how the method is named in the title.
        percentile: |attribution| above this percentile is drawn at the top of the scale.
    """
    if attribution.ndim != 2:
        raise ValueError(f"attribution must be (H, W), got {tuple(attribution.shape)}")
    img = as_image(image).resize(tuple(attribution.shape[::-1]), Image.BILINEAR)
    shown, clip = clipped_magnitude(attribution, percentile)
    canvas = Canvas(width, [2], left=0.05, head=0.2, footer=0.45, header=0.2, max_panel=2.6)
    canvas.image(0, 0, img)
    canvas.image(0, 1, overlay(img, shown, cmap, alpha, vmin=0.0, vmax=clip))
    canvas.above(0, 0, "input")
    canvas.above(0, 1, f"|attribution|, clipped at p{percentile:g}")
    canvas.colorbar(cmap, 0.0, clip, "|attribution|")
    title, _ = fit_text(method_label, canvas.width - 0.1)
    canvas.title(title)
    return canvas.fig
