"""Attention Lens analysis and figures: attention traces, Grad-CAM, agreement, paper figures.

The library never imports streamlit; the app (`app.py`) is a shell over it.
"""

from .cam import ATTRIBUTION_METHODS, CAM_METHODS, DEFAULT_CAM_LAYERS, Analysis, analyze, attribute
from .images import ImageError, load_image
from .maps import DEFAULT_CMAP, normalize, overlay, upsample
from .trace import AttentionRecord, AttentionTrace, record_attention

__all__ = [
    "ATTRIBUTION_METHODS",
    "Analysis",
    "AttentionRecord",
    "AttentionTrace",
    "CAM_METHODS",
    "DEFAULT_CAM_LAYERS",
    "DEFAULT_CMAP",
    "ImageError",
    "analyze",
    "attribute",
    "load_image",
    "normalize",
    "overlay",
    "record_attention",
    "upsample",
]
