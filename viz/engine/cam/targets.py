"""What a CAM explains: a class of a classifier's logits, or any score of the network's output.

`explained_by` turns `analyze`'s `target` into an `Explained`: the score function every method
differentiates or compares (one forward and one backward, whatever the output), the classes when
the output is class logits, and a line saying what was explained. A network whose output is not
class logits never gets a silent argmax: without a target it is refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from viz.targets import TARGET_HELPERS, ClassScore, main_tensor

__all__ = [
    "ATTENTION_WORDS",
    "Explained",
    "NoTargetError",
    "explained_by",
    "nothing_explained",
    "resolve_targets",
    "is_headless",
]

ATTENTION_WORDS = "attention only (no target for this network's output)"
"""What a map made of attention alone explains (rollout, `attention_only`)."""

Score = Callable[[object], Tensor]


class NoTargetError(ValueError):
    """The network's output is not class logits and no target callable was given (one line)."""


@dataclass(frozen=True)
class Explained:
    """One score per image from the network's output, and what it is.

    Attributes:
        score: the batch's output -> (N,) differentiable scores.
        classes: (N,) the classes explained when the output is class logits, else None.
        text: what was explained, for figures and manifests ("class 3", "SegmentationScore(…)").
        scores: (N,) the score of the images it was made on, their graph kept.
        per_image: image index -> the score of a batch of copies of that image (the pass
            methods run many masked copies of one image).
        outlines: per image, what the figures outline: a mask (H, W), boxes (K, 4) or None.
    """

    score: Score
    classes: Tensor | None
    text: str
    scores: Tensor
    per_image: Callable[[int], Score]
    outlines: tuple = ()


def nothing_explained(n: int) -> Explained:
    """No score at all (NaN for each of `n` images): what attention alone explains."""
    nan = torch.full((n,), float("nan"))
    return Explained(lambda out: nan, None, ATTENTION_WORDS, nan, lambda i: lambda out: nan)


def resolve_targets(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
    """(N,) classes from an int, one per image, or None (the argmax) over (N, C) logits."""
    n, k = logits.shape
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, dtype=torch.long).flatten()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for a batch of {n} images")
    if (t < 0).any() or (t >= k).any():
        raise ValueError(f"target class out of range 0..{k - 1}: {t.tolist()}")
    return t.clone()


def is_headless(model: nn.Module) -> bool:
    """The network ends without a classifier (timm's `num_classes=0`, a head replaced by
    `nn.Identity`): its (N, D) output is an embedding, not class logits."""
    if getattr(model, "num_classes", None) == 0:
        return True
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            if isinstance(get_classifier(), nn.Identity):
                return True
        except (AttributeError, TypeError):  # a model's own method with other needs
            pass
    heads = [getattr(model, name, None) for name in ("fc", "head", "heads", "classifier")]
    return any(isinstance(h, nn.Identity) for h in heads)


def explained_by(target, output: object, n: int, model: nn.Module | None = None) -> Explained:
    """What `target` explains on `output`, the network's return value for `n` images.

    Args:
        target: a class (int, one per image, a tensor of them, or None for the argmax) of a
            classifier's (N, C) logits; or a callable `target(output) -> (N,)` (`viz.targets`).
        output: what the network returned (its graph kept: the score is checked to depend on it).
        n: images in the batch.
        model: the network, to tell an embedding network's (N, D) output from class logits.

    Raises:
        ValueError: one line: no target for an output that is not class logits, a target of
            the wrong shape, a score that does not depend on the output differentiably.
    """
    if isinstance(target, ClassScore):  # a class: the int target's path (CAM, aug smoothing)
        target = target.k
    if callable(target) and not isinstance(target, Tensor):
        return _callable_target(target, output, n)
    logits = _class_logits(output, model)
    classes = resolve_targets(target, logits)

    def score(out: object) -> Tensor:
        return main_tensor(out).gather(1, classes[:, None].to(logits.device))[:, 0]

    def per_image(i: int) -> Score:
        k = int(classes[i])
        return lambda out: main_tensor(out)[:, k]

    names = sorted({int(c) for c in classes})
    text = f"class {names[0]}" if len(names) == 1 else "classes " + ", ".join(map(str, names))
    return Explained(score, classes, text, score(output), per_image)


def _class_logits(output: object, model: nn.Module | None) -> Tensor:
    refusal = (
        f"give a target: one of {TARGET_HELPERS} (viz.targets), or any output -> (N,) "
        "function (command line: --target segment:K, box:x0,y0,x1,y1 or similar-to:IMAGE)"
    )
    if isinstance(output, (list, tuple)) and output and not isinstance(output[0], Tensor):
        raise NoTargetError(
            f"the network returned a list of {type(output[0]).__name__} (a detector's?), "
            f"not class logits; {refusal}"
        )
    try:
        logits = main_tensor(output)
    except ValueError as err:
        raise NoTargetError(f"{err}, not class logits; {refusal}") from None
    if logits.ndim != 2:
        raise NoTargetError(
            f"the network returned {tuple(logits.shape)}, not class logits (N, C); {refusal}"
        )
    if model is not None and is_headless(model):
        raise NoTargetError(
            f"the network has no classifier: its {tuple(logits.shape)} output is an embedding, "
            f"not class logits; {refusal}"
        )
    return logits


def _callable_target(target: Callable, output: object, n: int) -> Explained:
    """The caller's score, checked once on the batch's output, and fixed where it reads the
    output (a segmentation target's predicted mask) so every pass scores the same thing."""
    fixed = getattr(target, "fixed_on", None)
    bound = fixed(output) if callable(fixed) else target
    scores = bound(output)
    name = getattr(target, "describe", None)
    text = name() if callable(name) else getattr(target, "__name__", type(target).__name__)
    if not isinstance(scores, Tensor) or scores.shape != (n,):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"the target {text} returned {got}; it must return one score per image ({n},)"
        )
    if torch.is_grad_enabled() and not scores.requires_grad and _has_graph(output):
        raise ValueError(
            f"the target {text} gives scores that do not depend on the network's output "
            "differentiably (argmax, .item() or .detach() inside?)"
        )
    one_image = getattr(bound, "for_image", None)

    def per_image(i: int) -> Score:
        return one_image(i) if callable(one_image) else bound

    outline = getattr(bound, "outline", None)
    outlines = tuple(outline(i) for i in range(n)) if callable(outline) else ()
    return Explained(bound, None, text, scores, per_image, outlines)


def _has_graph(output: object) -> bool:
    """Whether any tensor in the output carries a graph (else nothing could be differentiated)."""
    if isinstance(output, Tensor):
        return output.requires_grad
    if isinstance(output, dict):
        return any(_has_graph(v) for v in output.values())
    if isinstance(output, (list, tuple)):
        return any(_has_graph(v) for v in output)
    logits = getattr(output, "logits", None)
    return isinstance(logits, Tensor) and logits.requires_grad
