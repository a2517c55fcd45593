"""CAM methods: the registry, their weights, layer choice, `analyze` and Captum's attributions.

`registry` declares each method and what it needs (gradients, extra passes, one map for the whole
network, a transformer's attention, noisy samples, smoothings) once; `weights` and `extra_passes`
compute the channel weights; `layers` chooses and resolves the layers; `analyze` runs one forward
and one backward for the trace and every CAM; `network` gives the whole-network maps (rollout,
GAE, LeGrad, FullGrad); `attribution` the input-resolution attributions (Captum).
"""

from viz.engine.cam.analyze import ATTENTION_ONLY, AUGMENTATIONS, analyze, attention_only
from viz.engine.cam.attribution import ATTRIBUTION_METHODS, attribute
from viz.engine.cam.extra_passes import NUM_SAMPLES
from viz.engine.cam.layers import DEFAULT_CAM_LAYERS, resolve_layers, stage_layers
from viz.engine.cam.registry import (
    CAM_METHODS,
    CNN_ONLY,
    NEEDS,
    SMOOTHINGS,
    CamMethod,
    checked_options,
    register_cam_method,
    settings_error,
    smoothings_for,
)
from viz.engine.cam.result import Analysis
from viz.engine.cam.targets import NoTargetError, resolve_targets

__all__ = [
    "ATTENTION_ONLY",
    "ATTRIBUTION_METHODS",
    "AUGMENTATIONS",
    "Analysis",
    "CAM_METHODS",
    "CNN_ONLY",
    "CamMethod",
    "DEFAULT_CAM_LAYERS",
    "NEEDS",
    "NUM_SAMPLES",
    "NoTargetError",
    "SMOOTHINGS",
    "analyze",
    "attention_only",
    "attribute",
    "checked_options",
    "register_cam_method",
    "resolve_layers",
    "resolve_targets",
    "settings_error",
    "smoothings_for",
    "stage_layers",
]
