"""What an analysis gives (`Analysis`), and what one pass of it carries between its steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from viz.engine.cam.registry import CAM_METHODS, CamMethod
from viz.engine.trace import AttentionTrace

__all__ = ["Analysis", "Settings", "ForwardBackward"]


@dataclass(frozen=True)
class Analysis:
    """Everything one forward + backward tells about a batch.

    Attributes:
        logits: (N, K).
        probs: (N, K) softmax of the logits.
        target: (N,) class explained by the CAMs.
        trace: attention maps of every attention module, forward order.
        cams: layer name -> (N, h, w) map at the layer's native resolution, ReLU applied,
            not normalised.
        method: the CAM method's name in `CAM_METHODS`.
        cam_stages: layer name -> resolution level (stage) of its map, as the trace's stages;
            0 for a network-wide map at the input's resolution (FullGrad).
        smoothing: "aug" and/or "eigen" when the maps were smoothed (see `analyze`).
    """

    logits: Tensor
    probs: Tensor
    target: Tensor
    trace: AttentionTrace
    cams: dict[str, Tensor]
    method: str = "gradcam"
    cam_stages: dict[str, int] = field(default_factory=dict)
    smoothing: tuple[str, ...] = ()

    @property
    def target_probs(self) -> Tensor:
        """(N,) softmax score of each image's target class (the 'P' of the CBAM paper's figure)."""
        return self.probs.gather(1, self.target[:, None])[:, 0]

    @property
    def method_label(self) -> str:
        """The method's display name, e.g. "Grad-CAM++", "Score-CAM (aug smooth)"."""
        method = CAM_METHODS.get(self.method)
        label = method.label if method else self.method
        if not self.smoothing:
            return label
        return f"{label} ({', '.join(s + ' smooth' for s in self.smoothing)})"

    def stage_cams(self) -> dict[int, str]:
        """Stage -> the name of the (last requested) CAM layer at that stage."""
        by_stage: dict[int, str] = {}
        for name in self.cams:
            if name in self.cam_stages:
                by_stage[self.cam_stages[name]] = name
        return dict(sorted(by_stage.items()))

    def select(self, index: int | slice) -> Analysis:
        """The analysis of image `index` (or a slice of the batch), batch dimension kept."""
        pick = index if isinstance(index, slice) else slice(index, index + 1)
        return Analysis(
            self.logits[pick], self.probs[pick], self.target[pick], self.trace.select(pick),
            {k: v[pick] for k, v in self.cams.items()}, self.method, dict(self.cam_stages),
            self.smoothing,
        )  # fmt: skip


@dataclass(frozen=True)
class Settings:
    spec: CamMethod
    eigen_smooth: bool
    options: dict
    seed: int
    progress: Callable[[int, int], None] | None

    @property
    def smoothing(self) -> tuple[str, ...]:
        return ("eigen",) if self.eigen_smooth else ()


@dataclass
class ForwardBackward:
    """What the forward and backward gave."""

    trace: AttentionTrace
    logits: Tensor
    targets: Tensor
    acts: dict[str, Tensor]
    grads: dict[str, Tensor]
    input_grad: Tensor | None = None
