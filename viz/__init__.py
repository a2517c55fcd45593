"""Attention Lens analysis and figures: attention traces, Grad-CAM, agreement, paper figures.

The library never imports streamlit; the app (`app.py`) is a shell over it.
"""

from models.images import ImageError, load_image
from models.probes import (
    AttentionProbe,
    register_attention,
    registered_attention,
    unregister_attention,
)

from .cam import (
    ATTRIBUTION_METHODS,
    CAM_METHODS,
    DEFAULT_CAM_LAYERS,
    Analysis,
    CamMethod,
    analyze,
    attribute,
    register_cam_method,
    stage_layers,
)
from .export import ExportError, figure_bytes, image_bundle, safe_name, write_atomic, zip_bundle
from .figures import (
    DOUBLE_COLUMN,
    SINGLE_COLUMN,
    attention_vs_gradcam,
    bam_hierarchy,
    channel_weights,
    class_channel_stats,
    model_grid,
    spatial_overview,
)
from .levels import NetworkLevels, network_levels
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
from .state import model_lock, preserve_model_state
from .trace import AttentionRecord, AttentionTrace, attention_hooks, record_attention

__all__ = [
    "ATTRIBUTION_METHODS",
    "AttentionProbe",
    "CamMethod",
    "NetworkLevels",
    "model_lock",
    "network_levels",
    "preserve_model_state",
    "register_attention",
    "register_cam_method",
    "registered_attention",
    "stage_layers",
    "unregister_attention",
    "Agreement",
    "Analysis",
    "AttentionRecord",
    "AttentionTrace",
    "CAM_METHODS",
    "ChannelStats",
    "DEFAULT_CAM_LAYERS",
    "DEFAULT_CMAP",
    "DOUBLE_COLUMN",
    "DeletionInsertion",
    "ExportError",
    "ImageError",
    "SINGLE_COLUMN",
    "agreement",
    "agreement_table",
    "analyze",
    "attention_vs_gradcam",
    "attribute",
    "bam_hierarchy",
    "channel_statistics",
    "channel_weights",
    "class_channel_stats",
    "deletion_insertion",
    "figure_bytes",
    "image_bundle",
    "load_image",
    "model_grid",
    "normalize",
    "overlay",
    "record_attention",
    "attention_hooks",
    "safe_name",
    "spatial_overview",
    "upsample",
    "write_atomic",
    "zip_bundle",
]
