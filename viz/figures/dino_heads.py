"""DINO's attention figure: each head's class-token attention over the patches, and its mask.

Caron et al., ICCV 2021, "Emerging Properties in Self-Supervised Vision Transformers"
(https://arxiv.org/abs/2104.14294), figures 1 and 3: for one block (the last by default), each
head's attention from the class token to the patches, and the smallest set of patches that
holds `mass` (60%) of it. Registers and a distillation token are left out of the patches and
of the mass. Cost: nothing beyond the trace (the records already hold each head's row).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from viz.engine.maps import DEFAULT_CMAP, overlay
from viz.engine.trace import AttentionRecord, AttentionTrace
from viz.figures.canvas import (
    Canvas,
    as_image,
    figure_width,
    literal,
    pick_image,
    styled,
    text_width,
    title_room,
    value_range,
)

__all__ = ["dino_heads", "mass_masks", "class_token_blocks", "dimmed_outside"]

LABEL_PT = 6.0
DIM = 0.25  # brightness of the patches outside a mask


def mass_masks(rows: Tensor, mass: float = 0.6) -> Tensor:
    """(..., h, w) attention -> bool (..., h, w): per map, the fewest cells holding `mass` of
    its total (the cell that crosses the threshold kept; ties in the sort order's favour).

    Raises:
        ValueError: `mass` not in (0, 1].
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    flat = rows.flatten(-2).double()
    values, order = flat.sort(-1, descending=True)
    share = values.cumsum(-1) / values.sum(-1, keepdim=True).clamp_min(1e-30)
    before = share - values / values.sum(-1, keepdim=True).clamp_min(1e-30)
    keep_sorted = before < mass - 1e-12  # everything up to and including the crossing cell
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.view(rows.shape)


def class_token_blocks(trace: AttentionTrace) -> list[AttentionRecord]:
    """The records whose heads are a class token's attention over the patches (ViT blocks)."""
    return [r for r in trace if r.heads is not None and r.layer is not None and r.class_token]


@styled
def dino_heads(
    image: Image.Image | np.ndarray | Tensor,
    trace: AttentionTrace,
    *,
    block: int = -1,
    mass: float = 0.6,
    index: int = 0,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    width: str | float = "double",
    render: str = "smooth",
    title: str | None = None,
    max_columns: int | None = None,
) -> Figure:
    """One block's heads: the class token's attention over the image, and under each, the
    patches holding `mass` of it (the rest dimmed).

    Args:
        image: the crop the network saw (PIL, (H, W, 3) or (3, H, W)).
        trace: a trace with class-token self-attention (a ViT, DeiT, DINO, EVA, ...).
        block: which of those blocks (Python index: -1 the last).
        mass: the share of each head's attention its mask keeps (DINO: 0.6).
        max_columns: heads per line (default 6 at single width, 12 at double); more wrap.

    Raises:
        ValueError: no class-token attention in the trace, `block` out of range, a bad `mass`.
    """
    trace = pick_image(trace, index)
    blocks = class_token_blocks(trace)
    if not blocks:
        raise ValueError(
            "dino-heads needs a class token's self-attention (a ViT with a class token)"
        )
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"block must be one of 0..{len(blocks) - 1} (or -1), got {block}")
    rec = blocks[block]
    heads = rec.heads[0].float()  # (heads, h, w)
    masks = mass_masks(heads, mass)
    count = heads.shape[0]
    if max_columns is None:
        max_columns = 12 if figure_width(width) >= 5.0 else 6
    per_line = math.ceil(count / math.ceil(count / max(1, max_columns)))
    lines = math.ceil(count / per_line)
    kept = f"{mass:.0%} mass"
    label_w = 0.04 + max(text_width(t, LABEL_PT) for t in ("attention", kept))
    counts = [min(per_line, count - (r // 2) * per_line) for r in range(2 * lines)]
    canvas = Canvas(width, counts, left=label_w + 0.06, head=[0.13 if r % 2 == 0 else 0.02
                    for r in range(2 * lines)], foot=0.02, gap=0.02, footer=0.42,
                    header=title_room(title, width), max_panel=0.9)  # fmt: skip
    base = as_image(image)
    side = max(16, min(max(base.size), round(canvas.panel * 400)))
    base = base.resize((side, side), Image.Resampling.BILINEAR)
    vmin, vmax = value_range([heads])
    for h in range(count):
        r, c = 2 * (h // per_line), h % per_line
        canvas.image(r, c, overlay(base, heads[h], cmap, alpha, vmin=vmin, vmax=vmax,
                                   render=render))  # fmt: skip
        canvas.image(r + 1, c, dimmed_outside(base, masks[h]))
        x, y, p = canvas.box(r, c)
        canvas.ax.text(x + p / 2, y + p + 0.015, f"head {h}", ha="center", va="bottom",
                       fontsize=LABEL_PT)  # fmt: skip
    for r in range(2 * lines):
        x, y, p = canvas.box(r, 0)
        canvas.ax.text(x - 0.04, y + p / 2, "attention" if r % 2 == 0 else kept, ha="right",
                       va="center", fontsize=LABEL_PT)  # fmt: skip
    h, w = heads.shape[-2:]
    canvas.colorbar(cmap, vmin, vmax,
                    literal(f"{rec.label}: class token → patches ({h}×{w}), per head"))  # fmt: skip
    if title:
        canvas.title(literal(title))
    return canvas.fig


def dimmed_outside(base: Image.Image, mask: Tensor) -> Image.Image:
    """The image with the mask's patches as they are and the rest dimmed (cells kept sharp)."""
    cells = Image.fromarray(mask.numpy().astype(np.uint8) * 255)
    keep = np.asarray(cells.resize(base.size, Image.Resampling.NEAREST), dtype=np.float32) / 255
    rgb = np.asarray(base.convert("RGB"), dtype=np.float32)
    out = rgb * (DIM + (1 - DIM) * keep[..., None])
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
