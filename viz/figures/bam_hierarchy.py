"""The BAM paper's Figure 1: at each BAM, the feature before, the gate, the feature after."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from viz.engine.maps import DEFAULT_CMAP
from viz.engine.trace import AttentionTrace
from viz.figures.canvas import (
    Canvas,
    as_image,
    heat_rgb,
    kinds_of,
    pick_image,
    styled,
    value_range,
)

__all__ = ["bam_hierarchy"]


@styled
def bam_hierarchy(
    image: Image.Image | np.ndarray | Tensor,
    trace: AttentionTrace,
    *,
    index: int = 0,
    cmap: str = DEFAULT_CMAP,
    width: str | float = "single",
    render: str = "smooth",
    title: str | None = None,
) -> Figure:
    """The BAM paper's Figure 1: at each BAM, the feature before, the attention, the feature after.

    Rows are the BAM modules (after stages 1, 2, 3); columns are the channel-mean |F| entering
    the module, the channel mean of its 3-D gate 1 + M(F), and the channel-mean |F'| leaving it.
    F and F' share one scale per row (so the amplification shows); the gate has its own scale.
    Maps are resized from the stage's resolution to the image: bilinear (`render="smooth"`)
    or as flat cells with the grid drawn (`render="cells"`).

    Raises:
        ValueError: the trace has no BAM module.
    """
    img = as_image(image)
    full = pick_image(trace, index)
    records = [r for r in full if r.kind == "bam"]
    if not records:
        kinds = sorted(kinds_of(full))
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
    canvas = Canvas(width, [4] * len(records), gaps=gaps, left=0.05, footer=0.42,
                     header=0.25 if title else 0.0)  # fmt: skip
    canvas.image(0, 0, img)
    canvas.above(0, 0, "input")
    for r, rec in enumerate(records):
        f_in, gate, f_out = rec.feature_in[0], rec.gate[0], rec.feature_out[0]
        lo, hi = value_range([f_in, f_out])
        glo, ghi = value_range([gate])
        canvas.image(r, 1, heat_rgb(f_in, size, cmap, lo, hi, render))
        canvas.image(r, 2, heat_rgb(gate, size, cmap, glo, ghi, render))
        canvas.image(r, 3, heat_rgb(f_out, size, cmap, lo, hi, render))
        canvas.left_of(r, 1, f"BAM {rec.stage} ({f_in.shape[0]}×{f_in.shape[1]})")
    for col, text in ((1, "F (before)"), (2, "1 + M(F)"), (3, "F′ (after)")):
        canvas.above(0, col, text)
    canvas.colorbar(cmap, 0.0, 1.0, "channel mean; own scale per row, F and F′ shared")
    if title:
        canvas.title(title)
    return canvas.fig
