"""The CAM method registry: each method, what it needs and costs, declared once."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from viz.engine.cam.extra_passes import NUM_SAMPLES, PASS_WEIGHTS, PassContext
from viz.engine.cam.weights import (
    activations_only,
    first_component,
    gradcam,
    gradcam_elementwise,
    gradcam_pp,
    grads_times_acts,
    hirescam,
    layercam,
    xgradcam,
)

__all__ = [
    "SMOOTHINGS",
    "NEEDS",
    "CamMethod",
    "CAM_METHODS",
    "register_cam_method",
    "CNN_ONLY",
    "smoothings_for",
    "settings_error",
    "checked_options",
]

SMOOTHINGS = ("aug", "eigen")
"""`analyze`'s smoothing options: test-time augmentation, first principal component."""
NEEDS = ("gradients", "activations", "classifier", "passes", "network", "attention")
"""What a CAM method needs, cheapest first: the shared backward's gradients at the layer; the
layer's activations only; those and the classifier's weights; extra passes of its own
(`viz.engine.cam.extra_passes`); every bias layer's gradient and the input's (one map for the network);
a transformer's self-attention (`viz.engine.transformer`: one map for the network)."""


@dataclass(frozen=True)
class CamMethod:
    """One CAM method.

    Attributes:
        name, label: registry key and display name ("scorecam", "Score-CAM").
        needs: one of `NEEDS`.
        contributions: (acts, grads) -> (N, C, h, w) weighted activations, summed over channels
            for the map; None for the methods that weigh channels with extra passes or the
            classifier (their contributions are weights x activations).
        project: the map is the first principal component of the contributions (Eigen-CAM).
        relu: ReLU on the map (all but CAM, which keeps negative evidence as Zhou et al.).
        cost: passes through the network, for the docs ("1 forward + 1 backward").
        peer: the implementation its maps equal, if any.
        default_layers: "stages" (one layer per stage) or "last" (the last stage's only) when
            `analyze` is given no layers.
        cnn_only: not offered for transformers (no linear classifier right after a token
            layer for CAM, hardly any conv or norm biases for FullGrad, no feature maps to
            ablate for Ablation-CAM).
        samples: the default count of noisy samples (`num_samples`); 0 for the methods that
            take none.
        gradients: takes gradients of the class score (a backward pass); False for the
            methods that run forwards only.

    What the app and the commands ask of a method is read here (the fields and properties
    below), never re-derived from its name.
    """

    name: str
    label: str
    needs: str = "gradients"
    contributions: Callable[[Tensor, Tensor], Tensor] | None = None
    paper: str = ""
    project: bool = False
    relu: bool = True
    cost: str = "1 forward + 1 backward"
    peer: str = ""
    default_layers: str = "stages"
    channel_weights: Callable[[PassContext], Tensor] | None = None
    cnn_only: bool = False
    samples: int = 0
    gradients: bool = True

    @property
    def whole_network(self) -> bool:
        """One map for the whole network (FullGrad, rollout, GAE, LeGrad): no layers to pick."""
        return self.needs in ("network", "attention")

    @property
    def same_for_every_class(self) -> bool:
        """Its map does not depend on the class explained: Eigen-CAM (activations only) and
        attention rollout (attention only, no gradient)."""
        return self.needs == "activations" or (self.reads_attention and not self.gradients)

    @property
    def reads_attention(self) -> bool:
        """Reads a vision transformer's self-attention (rollout, GAE, LeGrad)."""
        return self.needs == "attention"

    @property
    def extra_passes(self) -> bool:
        """Weighs channels with passes of its own (Score-CAM and kin): slow."""
        return self.needs == "passes"

    @property
    def smoothings(self) -> tuple[str, ...]:
        """The smoothings that change its maps: "aug" for all; "eigen" not for a principal
        component already (Eigen-CAM, EigenGrad-CAM) nor for maps without channels (rollout,
        GAE, LeGrad)."""
        eigen = not self.project and not self.reads_attention
        return tuple(s for s in SMOOTHINGS if s != "eigen" or eigen)

    def weigh(
        self, acts: Tensor, grads: Tensor | None, *, weights: Tensor | None = None,
        eigen_smooth: bool = False,
    ) -> Tensor:  # fmt: skip
        """(N, h, w) map from a layer's activations and gradients, or per-channel `weights`
        (N, C) for the pass and classifier methods; `eigen_smooth`: the first principal
        component of the contributions instead of their sum (pytorch-grad-cam's option)."""
        if weights is not None:
            parts = weights[:, :, None, None].to(acts.dtype) * acts
        elif self.contributions is not None:
            parts = self.contributions(acts, grads)
        else:
            raise ValueError(f"{self.label} weighs channels with extra passes: use analyze")
        if parts.ndim == 3:  # a user's method that returns the map itself
            m = parts
        else:
            m = first_component(parts) if self.project or eigen_smooth else parts.sum(1)
        return torch.relu(m) if self.relu else m


CAM_METHODS: dict[str, CamMethod] = {}


def register_cam_method(
    name: str,
    weigh: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    contributions: Callable[[Tensor, Tensor], Tensor] | None = None,
    label: str = "",
    paper: str = "",
    needs: str = "gradients",
    **details,
) -> CamMethod:
    """Add a CAM method computed from one layer's activations and gradients (N, C, h, w).

    Give either `weigh(acts, grads) -> (N, h, w)` map (ReLU is applied to it), or
    `contributions(acts, grads) -> (N, C, h, w)`, summed over channels (then `eigen_smooth`
    works too). `needs` is "gradients" or "activations" (then `grads` is None and the backward
    is skipped when no other method needs it). `details`: other `CamMethod` fields.
    """
    own_computation = ("passes", "classifier", "network", "attention")
    if (weigh is None) == (contributions is None) and needs not in own_computation:
        raise ValueError("give one of weigh or contributions")
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {', '.join(NEEDS)}, got {needs!r}")
    details.setdefault("gradients", needs not in ("activations", "classifier", "passes"))
    method = CamMethod(name, label or name, needs, contributions or weigh, paper, **details)
    CAM_METHODS[name] = method
    return method


_PGC = "pytorch-grad-cam 1.5"


def _register_builtins() -> None:
    def add(name, contributions, label, paper, **more):
        register_cam_method(name, contributions=contributions, label=label, paper=paper, **more)

    add("gradcam", gradcam, "Grad-CAM", "arXiv:1610.02391", peer=_PGC)
    add("gradcam++", gradcam_pp, "Grad-CAM++", "arXiv:1710.11063", peer=_PGC)
    add("hirescam", hirescam, "HiResCAM", "arXiv:2011.08891", peer=_PGC)
    add("xgradcam", xgradcam, "XGrad-CAM", "arXiv:2008.02312", peer=_PGC)
    add("layercam", layercam, "LayerCAM", "doi:10.1109/TIP.2021.3089943", peer=_PGC)
    add("gradcamelementwise", gradcam_elementwise, "Grad-CAM element-wise",
        "pytorch-grad-cam (Gildenblat et al.)", peer=_PGC)  # fmt: skip
    add("eigencam", activations_only, "Eigen-CAM", "arXiv:2008.00299", needs="activations",
        project=True, cost="1 forward", peer=_PGC + " (up to the SVD's sign)")  # fmt: skip
    add("eigengradcam", grads_times_acts, "EigenGrad-CAM", "pytorch-grad-cam (Gildenblat et al.)",
        project=True, peer=_PGC + " (up to the SVD's sign)")  # fmt: skip
    register_cam_method("cam", label="CAM", paper="arXiv:1512.04150", needs="classifier",
                        relu=False, cost="1 forward", peer="TorchCAM 0.5",
                        default_layers="last", cnn_only=True)  # fmt: skip
    # C full forwards per layer: by default at the last stage only (all four: ~2x the passes)
    for name, label, paper, cost, peer, layers in (
        ("scorecam", "Score-CAM", "arXiv:2003.06871", "1 forward + C forwards", _PGC, "last"),
        ("sscam", "SS-CAM", "arXiv:2006.14255", "1 forward + 35 C forwards (num_samples)", "",
         "last"),
        ("iscam", "IS-CAM", "arXiv:2010.03023", "1 forward + 10 C forwards (num_samples)",
         "TorchCAM 0.5", "last"),
        ("ablationcam", "Ablation-CAM", "doi:10.1109/WACV45572.2020.9093360",
         "1 forward + C forwards of the layers after the layer", _PGC, "stages"),
        ("smoothgradcam++", "SmoothGrad-CAM++", "arXiv:1908.01224",
         "1 forward + 4 forwards + 4 backwards (num_samples)", "", "stages"),
    ):  # fmt: skip
        register_cam_method(name, label=label, paper=paper, needs="passes", cost=cost, peer=peer,
                            channel_weights=PASS_WEIGHTS[name], default_layers=layers,
                            samples=NUM_SAMPLES.get(name, 0), cnn_only=name == "ablationcam",
                            gradients=name == "smoothgradcam++")  # fmt: skip
    register_cam_method("fullgrad", label="FullGrad", paper="arXiv:1905.00780", needs="network",
                        cost="1 forward + 1 backward to the input", peer=_PGC,
                        cnn_only=True)  # fmt: skip
    register_cam_method("rollout", label="attention rollout", paper="arXiv:2005.00928",
                        needs="attention", cost="1 forward", relu=False,
                        gradients=False)  # fmt: skip
    register_cam_method("gae", label="GAE (Chefer et al.)", paper="arXiv:2103.15679",
                        needs="attention", cost="1 forward + 1 backward to the input")  # fmt: skip
    register_cam_method("legrad", label="LeGrad", paper="arXiv:2404.03214", needs="attention",
                        cost="1 forward + 1 short backward per block",
                        peer="TorchCAM 0.5 LeGrad")  # fmt: skip


_register_builtins()

CNN_ONLY = tuple(name for name, m in CAM_METHODS.items() if m.cnn_only)
"""The built-in methods not offered for transformers (`CamMethod.cnn_only`)."""


def smoothings_for(method: str) -> tuple[str, ...]:
    """The smoothings that change `method`'s maps: "aug" for all; "eigen" not for Eigen-CAM
    and EigenGrad-CAM (a principal component already) nor rollout, GAE, LeGrad (no channels)."""
    return CAM_METHODS[method].smoothings


def settings_error(
    method: str, smoothing: Sequence[str] = (), options: dict | None = None
) -> str | None:
    """Why `smoothing` (names) or `options` do not apply to `method`, in one line; None if they
    do. A setting that would change nothing (eigen smoothing of a principal component, a
    noisy-sample count for a method without noise) is an error, not a silent record."""
    unknown = sorted(set(smoothing) - set(SMOOTHINGS))
    if unknown:
        return f"smoothing must be among {', '.join(SMOOTHINGS)}, got {unknown}"
    label = CAM_METHODS[method].label
    if set(smoothing) - set(smoothings_for(method)):
        return (
            f"{label} takes no eigen smoothing: its map is a principal component already, or "
            "it has no channels to take one of"
        )
    if "num_samples" in (options or {}) and not CAM_METHODS[method].samples:
        noisy = [name for name, m in CAM_METHODS.items() if m.samples]
        return f"num_samples applies to {', '.join(noisy)} only, not to {label}"
    return None


def _checked_by_rollout(_value: object) -> bool:
    return True  # `rollout` checks its own arguments (head_fusion, discard, start_block)


_OPTION_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "num_samples": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1"),
    "std": (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, "a number >= 0"),
    "head_fusion": (_checked_by_rollout, ""),
    "discard": (_checked_by_rollout, ""),
    "start_block": (_checked_by_rollout, ""),
}


def checked_options(options: dict | None) -> dict:
    """The method options, each known and valid (a typo must not silently run the defaults)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTION_CHECKS))
    if unknown:
        raise ValueError(f"unknown method option(s) {unknown}; known: {', '.join(_OPTION_CHECKS)}")
    for name, value in options.items():
        valid, wanted = _OPTION_CHECKS[name]
        if isinstance(value, bool) or not valid(value):
            raise ValueError(f"option {name} must be {wanted}, got {value!r}")
    return options
