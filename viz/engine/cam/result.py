"""What an analysis gives (`Analysis`), and what one pass of it carries between its steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from viz.engine.cam.registry import CAM_METHODS, CamMethod
from viz.engine.cam.targets import Explained
from viz.engine.trace import AttentionTrace
from viz.targets import main_tensor

__all__ = ["Analysis", "Settings", "ForwardBackward", "analysis_of"]


@dataclass(frozen=True)
class Analysis:
    """Everything one forward + backward tells about a batch.

    Attributes:
        logits: (N, K) class logits; None when the target is not a class of class logits
            (a segmentation, detection or embedding score, `viz.targets`).
        probs: (N, K) softmax of the logits, or None likewise.
        target: (N,) class explained by the CAMs, or None likewise.
        trace: attention maps of every attention module, forward order.
        cams: layer name -> (N, h, w) map at the layer's native resolution, ReLU applied,
            not normalised.
        method: the CAM method's name in `CAM_METHODS`.
        cam_stages: layer name -> resolution level (stage) of its map, as the trace's stages;
            0 for a network-wide map at the input's resolution (FullGrad).
        smoothing: "aug" and/or "eigen" when the maps were smoothed (see `analyze`).
        scores: (N,) the explained score of each image (the target class's logit, or the
            target callable's score).
        explained: what the CAMs explain, in words ("class 3", "segment 15 (predicted mask)").
        outlines: per image, the region the target scores, for figures to outline: a mask
            (H, W) of the output's pixels, boxes (K, 4) in the input's pixels, or None; empty
            when the target has none (classes, embeddings).
    """

    logits: Tensor | None
    probs: Tensor | None
    target: Tensor | None
    trace: AttentionTrace
    cams: dict[str, Tensor]
    method: str = "gradcam"
    cam_stages: dict[str, int] = field(default_factory=dict)
    smoothing: tuple[str, ...] = ()
    scores: Tensor | None = None
    explained: str = ""
    outlines: tuple = ()

    @property
    def batch_size(self) -> int:
        """Images in the batch."""
        return len(self.scores) if self.scores is not None else len(self.logits)

    @property
    def explains_classes(self) -> bool:
        """The CAMs explain classes of class logits (else a `viz.targets` score)."""
        return self.target is not None

    @property
    def target_probs(self) -> Tensor:
        """(N,) softmax score of each image's target class (the 'P' of the CBAM paper's figure)."""
        if self.target is None:
            raise ValueError(f"the analysis explains {self.explained}, not a class: no probability")
        return self.probs.gather(1, self.target[:, None])[:, 0]

    @property
    def method_label(self) -> str:
        """The method's display name, e.g. "Grad-CAM++", "Score-CAM (aug + eigen smooth)"."""
        method = CAM_METHODS.get(self.method)
        label = method.label if method else self.method
        if not self.smoothing:
            return label
        return f"{label} ({' + '.join(self.smoothing)} smooth)"

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

        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[pick]

        return Analysis(
            part(self.logits), part(self.probs), part(self.target), self.trace.select(pick),
            {k: v[pick] for k, v in self.cams.items()}, self.method, dict(self.cam_stages),
            self.smoothing, part(self.scores), self.explained,
            self.outlines[pick] if self.outlines else (),
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
    """What the forward and backward gave: `explained` holds the target's scores and, for a
    class of class logits, the classes."""

    trace: AttentionTrace
    output: object
    explained: Explained
    acts: dict[str, Tensor]
    grads: dict[str, Tensor]
    input_grad: Tensor | None = None

    def analysis(self, cams, method, stages, smoothing) -> Analysis:
        """The `Analysis` of this pass with the given maps."""
        return analysis_of(self.trace, self.output, self.explained, cams, method, stages, smoothing)


def analysis_of(trace, output, explained: Explained, cams, method, stages, smoothing) -> Analysis:
    """An `Analysis`: class logits and probabilities when a class was explained."""
    logits = probs = None
    if explained.classes is not None:
        logits = main_tensor(output).detach()
        probs = logits.softmax(1)
    scores = explained.scores.detach()
    return Analysis(logits, probs, explained.classes, trace, cams, method, stages, smoothing,
                    scores, explained.text, explained.outlines)  # fmt: skip
