"""Attention Lens analysis and figures: attention traces, Grad-CAM, agreement, paper figures.

The library never imports streamlit; the app (`app.py`) is a shell over it.
"""

from .cam import ATTRIBUTION_METHODS, CAM_METHODS, DEFAULT_CAM_LAYERS, Analysis, analyze, attribute
from .images import ImageError, load_image
from .maps import DEFAULT_CMAP, normalize, overlay, upsample
from .metrics import (
    Agreement,
    ChannelStats,
    DeletionInsertion,
    agreement,
    agreement_table,
    channel_statistics,
    deletion_insertion,
)
from .trace import AttentionRecord, AttentionTrace, record_attention

__all__ = [
    "ATTRIBUTION_METHODS",
    "Agreement",
    "Analysis",
    "AttentionRecord",
    "AttentionTrace",
    "CAM_METHODS",
    "ChannelStats",
    "DEFAULT_CAM_LAYERS",
    "DEFAULT_CMAP",
    "DeletionInsertion",
    "ImageError",
    "agreement",
    "agreement_table",
    "analyze",
    "attribute",
    "channel_statistics",
    "deletion_insertion",
    "load_image",
    "normalize",
    "overlay",
    "record_attention",
    "upsample",
]
