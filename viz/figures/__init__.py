"""Paper-ready figures of attention maps, channel weights and CAMs, one figure per module.

Every function is pure: it returns a new `matplotlib.figure.Figure` built with the
object-oriented API (no pyplot state, nothing global left changed), sized for a paper column
(`SINGLE_COLUMN`, `DOUBLE_COLUMN` inches, or any width). Labels use the papers' vocabulary:

- CBAM (Woo et al., ECCV 2018, https://arxiv.org/abs/1807.06521): channel attention M_c and
  spatial attention M_s, both after their sigmoid; the Grad-CAM figure with the softmax score P.
- BAM (Park et al., BMVC 2018, https://arxiv.org/abs/1807.06514): branches M_c(F), M_s(F) before
  the sigmoid (shown as sigma(.)), the gate 1 + M(F) that multiplies F, and the hierarchy figure.
- SE (Hu et al., CVPR 2018, https://arxiv.org/abs/1709.01507): channel weights (excitation)
  per class.
- Vision transformers (ViT, DeiT, Swin): each block's self-attention (mean of heads) in the
  overview, every head in `attention_heads`, DINO's class-token heads and 60%-mass masks in
  `dino_heads`, output-token norms and their outliers (registers) in `token_norms`, network-wide maps (rollout, GAE, LeGrad) against
  the last block's attention in the Grad-CAM figure.

How each attention kind is named comes from the probe registry (`models.probes.kind_style`), so
a network with other attention modules is drawn with the same figures. The shared canvas,
style and labels live in `canvas`; each figure in its own module. The default colour map is
`viz.engine.maps.DEFAULT_CMAP` (inferno: monotonic lightness, readable in grayscale and by
colour-blind readers).
"""

from viz.figures.attention_vs_gradcam import attention_vs_gradcam
from viz.figures.attribution import attribution_map
from viz.figures.bam_hierarchy import bam_hierarchy
from viz.figures.canvas import (
    DIFF_CMAP,
    DOUBLE_COLUMN,
    FIGURE_STYLE,
    SINGLE_COLUMN,
    STYLE_LOCK,
    channel_map,
    figure_width,
    spatial_map,
    styled,
)
from viz.figures.channel_weights import channel_weights
from viz.figures.class_channel_stats import class_channel_stats
from viz.figures.deletion_curves import RANDOM_LABEL, deletion_insertion_curves
from viz.figures.dino_heads import dino_heads, mass_masks
from viz.figures.heads import attention_heads
from viz.figures.model_grid import model_grid
from viz.figures.spatial_overview import spatial_overview
from viz.figures.token_norms import token_norms

__all__ = [
    "DIFF_CMAP",
    "RANDOM_LABEL",
    "deletion_insertion_curves",
    "dino_heads",
    "mass_masks",
    "DOUBLE_COLUMN",
    "FIGURE_STYLE",
    "SINGLE_COLUMN",
    "STYLE_LOCK",
    "attention_heads",
    "attention_vs_gradcam",
    "attribution_map",
    "bam_hierarchy",
    "channel_map",
    "channel_weights",
    "class_channel_stats",
    "figure_width",
    "model_grid",
    "spatial_map",
    "spatial_overview",
    "styled",
    "token_norms",
]
