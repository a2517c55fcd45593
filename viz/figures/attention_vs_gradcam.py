"""Per stage: the attention map, the same stage's CAM, and how much they agree."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from ..maps import DEFAULT_CMAP, overlay
from ..probes import kind_style
from .canvas import (
    Canvas,
    as_image,
    check_index,
    literal,
    spatial_map,
    styled,
)

if TYPE_CHECKING:
    from ..cam import Analysis

__all__ = ["attention_vs_gradcam"]


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
    render: str = "smooth",
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
        render: "smooth" (bilinear, as the papers) or "cells" (one flat block per map cell,
            the grid drawn: the resolution the network computed at).
    """
    from ..metrics import agreement_table

    img = as_image(image)
    check_index(index, analysis.logits.shape[0])
    one = analysis.select(index % analysis.logits.shape[0])
    scores = {
        layer: (one.trace[name], score) for name, layer, score in agreement_table(one, top_k=top_k)
    }
    stage_layers = [(s, layer) for s, layer in one.stage_cams().items() if s >= 1]
    if not stage_layers:
        raise ValueError(f"attention_vs_gradcam needs CAMs at stages 1-4; got {sorted(one.cams)}")
    target = int(one.target[0])
    name = class_names[target] if class_names and target < len(class_names) else f"class {target}"
    name = literal(name)
    canvas = Canvas(
        width, [3] * len(stage_layers), left=0.3, footer=0.42, header=0.22, max_panel=1.3
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
            canvas.image(r, 0, overlay(img, spatial_map(rec)[0], cmap, alpha, render=render))
            cells = rec.spatial[0].numel()
            coarse = f"\nonly {cells} cells: coarse" if cells < 64 else f"\n{cells} cells"
            canvas.ax.text(
                canvas.box(r, 2)[0] + 0.02, canvas.box(r, 2)[1] + canvas.panel / 2,
                f"Pearson r = {score.pearson:.2f}\nSpearman ρ = {score.spearman:.2f}\n"
                f"IoU (top {score.top_k:.0%}) = {score.iou:.2f}{coarse}",
                ha="left", va="center", fontsize=6,
            )  # fmt: skip
        cam = one.cams[layer][0]
        canvas.image(r, 1, overlay(img, cam, cmap, alpha, render=render))
        # the map's real grid: a 7x7 map drawn smooth over a photo still has 49 values
        canvas.left_of(r, 0, f"stage {stage} · {layer}\n{cam.shape[-2]}×{cam.shape[-1]}")
    symbols = {kind_style(r.kind).symbol for r in one.trace.spatial_records}
    attention = f"attention {symbols.pop()}".strip() if len(symbols) == 1 else "attention"
    for col, text in enumerate((attention, one.method_label, "agreement")):
        canvas.above(0, col, text)
    canvas.colorbar(cmap, 0.0, 1.0, "each map: own min–max")
    canvas.title(title or f"target: {name}, P={float(one.target_probs[0]):.5f}")
    return canvas.fig
