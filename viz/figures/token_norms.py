"""The registers figure: one block's output-token norms with the high-norm outliers marked.

Darcet et al., ICLR 2024, "Vision Transformers Need Registers"
(https://arxiv.org/abs/2309.16588), figures 2-3: the norm of every patch token a block
outputs, on the patch grid; patches above `ratio` x the median norm are outlined, and the line
under the panels gives their count and, where the model has other prefix tokens (registers),
their share of the class token's attention. Cost: nothing beyond the trace.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

from viz.engine.maps import DEFAULT_CMAP
from viz.engine.trace import AttentionTrace
from viz.figures.canvas import (
    Canvas,
    as_image,
    fit_text,
    heat_rgb,
    literal,
    pick_image,
    styled,
    title_room,
)
from viz.measures.token_norms import TokenNorms
from viz.measures.token_norms import token_norms as read_token_norms

__all__ = ["token_norms"]

OUTLINE = "#00e5ff"  # cyan: apart from every sequential colour map's hues


@styled
def token_norms(
    image: Image.Image | np.ndarray | Tensor,
    trace: AttentionTrace,
    *,
    block: int = -1,
    ratio: float = 2.0,
    index: int = 0,
    cmap: str = DEFAULT_CMAP,
    width: str | float = "double",
    title: str | None = None,
) -> Figure:
    """The image and one block's output-token norm map, outliers outlined on both.

    Args:
        image: the crop the network saw.
        trace: a trace of a ViT with global self-attention (records with `token_norms`).
        block: which block (Python index among them; -1 the last).
        ratio: outliers are patches above `ratio` x the image's median patch norm.

    Raises:
        ValueError: no token norms in the trace, `block` out of range, `ratio` not above 1.
    """
    trace = pick_image(trace, index)
    norms = read_token_norms(trace, block=block, ratio=ratio)
    canvas = Canvas(width, [2], left=0.05, head=0.2, foot=0.05, gap=0.08, footer=0.75,
                    header=title_room(title, width), max_panel=2.4)  # fmt: skip
    side = max(64, min(512, round(canvas.panel * 300)))
    photo = as_image(image).resize((side, side), Image.Resampling.BILINEAR)
    grid = norms.patches[0].float()
    vmin, vmax = float(grid.min()), float(grid.max())
    canvas.image(0, 0, photo)
    canvas.image(0, 1, heat_rgb(grid, (side, side), cmap, vmin, vmax, "cells"))
    for col in (0, 1):
        _outline(canvas, col, norms.outliers[0])
    canvas.above(0, 0, "image, outliers outlined")
    canvas.above(0, 1, f"‖token‖ after {norms.block}")
    canvas.colorbar(cmap, vmin, vmax, f"output-token L2 norm ({grid.shape[0]}×{grid.shape[1]})")
    text, size = fit_text(_summary(norms), canvas.width - 0.2, max_lines=3)
    canvas.ax.text(canvas.width / 2, 0.06, text, ha="center", va="bottom", fontsize=size,
                   multialignment="center")  # fmt: skip
    if title:
        canvas.title(literal(title))
    return canvas.fig


def _summary(norms: TokenNorms) -> str:
    count = int(norms.outliers[0].sum())
    total = norms.outliers[0].numel()
    line = (
        f"{count} of {total} patches ({count / total:.1%}) above {norms.ratio:g}× the median "
        f"norm ({float(norms.median[0]):.3g})"
    )
    if norms.prefix_share is not None:
        plural = "s" if norms.others > 1 else ""
        line += (
            f" · {norms.others} other prefix token{plural} (registers): "
            f"{float(norms.prefix_share[0]):.0%} of the class token's attention"
        )
    return line


def _outline(canvas: Canvas, col: int, outliers: Tensor) -> None:
    """A box around each outlier cell of panel `col` (row 0 of the grid at the top)."""
    x, y, p = canvas.box(0, col)
    h, w = outliers.shape
    ch, cw = p / h, p / w
    for i, j in outliers.nonzero().tolist():
        canvas.ax.add_patch(Rectangle((x + j * cw, y + p - (i + 1) * ch), cw, ch, fill=False,
                                      edgecolor=OUTLINE, linewidth=0.8))  # fmt: skip
