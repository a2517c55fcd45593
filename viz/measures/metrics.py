"""Numbers about maps: agreement with Grad-CAM, deletion/insertion, channel statistics.

- `agreement` compares an attention map with a Grad-CAM map (Selvaraju et al., ICCV 2017,
  https://arxiv.org/abs/1610.02391): Pearson and Spearman correlation over pixels and the IoU
  of their top-k% regions; `agreement_table` does it stage by stage for an `Analysis` of a
  CBAM (Woo et al., ECCV 2018, https://arxiv.org/abs/1807.06521) or BAM (Park et al.,
  BMVC 2018, https://arxiv.org/abs/1807.06514) network.
- `deletion_insertion` scores a saliency map by the causal metrics of RISE (Petsiuk et al.,
  BMVC 2018, https://arxiv.org/abs/1806.07421): how fast the class probability falls when the
  most salient pixels are removed first, and how fast it rises when they are put back first.
- `channel_statistics` averages every attention module's channel weights per class over a
  folder of images, the quantity the SENet paper plots for its excitations (Hu et al.,
  CVPR 2018, https://arxiv.org/abs/1709.01507, Fig. 6).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from models.images import image_folder, load_image
from viz.engine.cam import Analysis, resolve_targets
from viz.engine.cam.targets import explained_by
from viz.engine.maps import upsample
from viz.engine.model_state import preserve_model_state
from viz.engine.trace import AttentionRecord, AttentionTrace, record_attention
from viz.targets import ClassScore

__all__ = [
    "Agreement",
    "ChannelStats",
    "DeletionInsertion",
    "BASELINES",
    "agreement",
    "agreement_batch",
    "agreement_table",
    "channel_statistics",
    "deletion_insertion",
    "is_constant",
    "random_saliency",
    "seed_of",
]

BASELINES = ("blur", "zero")
# a map whose span is within float32 rounding of its magnitude counts as constant
_CONSTANT_RTOL = 8 * torch.finfo(torch.float32).eps
# blur baseline: sigma = longest image side / 20 (about 11 px at 224), kernel of 3 sigma each side
_BLUR_SIDE_FRACTION = 1 / 20


# --- agreement --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How much two maps agree, pixel by pixel.

    Attributes:
        pearson: linear correlation of the values, in [-1, 1]; nan when a map is constant.
        spearman: correlation of the ranks (ties share their average rank), in [-1, 1];
            nan when a map is constant.
        iou: intersection over union of the two top-k regions, in [0, 1]; nan when a map is
            constant (it has no top region), so every score counts the same maps.
        top_k: the fraction of pixels that made each top-k region.
        constant: which maps were constant ("attention", "cam"): the reason for the nans.
    """

    pearson: float
    spearman: float
    iou: float
    top_k: float
    constant: tuple[str, ...] = ()

    @property
    def reason(self) -> str | None:
        """Why the scores are n/a ("constant attention map"), None when they are defined."""
        if self.constant:
            names = {"attention": "attention map", "cam": "CAM"}
            return "constant " + " and ".join(names[c] for c in self.constant)
        if any(math.isnan(v) for v in (self.pearson, self.spearman, self.iou)):
            return "nan or infinite values"
        return None


def _as_tensor(m: Tensor | np.ndarray) -> Tensor:
    return m.detach() if isinstance(m, Tensor) else torch.as_tensor(np.asarray(m))


def _as_map(m: Tensor | np.ndarray, what: str) -> Tensor:
    t = _as_tensor(m)
    if t.ndim != 2 or t.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 2-D map (h, w), got shape {tuple(t.shape)}")
    return t.float().cpu()


def is_constant(v: Tensor) -> bool:
    """Whether the values of `v` (any shape) are one value, to float32 rounding: a map with
    no contrast, whose scores are n/a and which figures say is constant."""
    lo, hi = v.min(), v.max()
    return bool(hi - lo <= _CONSTANT_RTOL * max(float(lo.abs()), float(hi.abs())))


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a.dot(a)) * float(b.dot(b)))
    if denom == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(a.dot(b)) / denom))


def _ranks(v: Tensor) -> Tensor:
    """1-based ranks of the values of `v` (n,), tied values sharing their average rank."""
    _, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
    end = counts.cumsum(0).to(torch.float64)  # last 1-based rank of each distinct value
    average = end - (counts.to(torch.float64) - 1) / 2
    return average[inverse]


def _top_k_membership(v: Tensor, k: int) -> Tensor:
    """Membership in [0, 1] of the k largest values; pixels tied at the cut share what is left."""
    cut = torch.topk(v, k).values[-1]
    above, tied = v > cut, v == cut
    share = (k - int(above.sum())) / int(tied.sum())
    return above.to(v.dtype) + tied.to(v.dtype) * share


def agreement(
    attention: Tensor | np.ndarray,
    cam: Tensor | np.ndarray,
    *,
    size: tuple[int, int] | None = None,
    top_k: float = 0.2,
) -> Agreement:
    """Compare an attention map with a CAM (or any two maps) over their pixels.

    Both maps are bilinearly resized (`viz.engine.maps.upsample`) to `size`, by default to the
    larger of the two on each side, so maps of different resolutions can be compared.

    Args:
        attention: (h1, w1) map, tensor or array.
        cam: (h2, w2) map, tensor or array.
        size: (H, W) to compare at; default (max(h1, h2), max(w1, w2)).
        top_k: fraction of pixels, in (0, 1], that makes each map's top region for the IoU;
            the region holds round(top_k * H * W) pixels (at least one).

    Returns:
        An `Agreement`. A map that is constant (up to float32 rounding), such as an untrained
        gate or an all-zero CAM, has no correlation and no top region: all three scores are
        nan and `constant` names it. Pixels tied at the top-k cut share the remaining
        membership equally (fuzzy IoU, sum of minima over sum of maxima), so the IoU never
        depends on the pixel order. Maps holding nan or infinite values give nan everywhere.
        Nothing here raises for such maps.

    Raises:
        ValueError: a map is not 2-D, `size` is not two positive integers, or `top_k` is
            outside (0, 1].
    """
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be within (0, 1], got {top_k}")
    a, b = _as_map(attention, "attention"), _as_map(cam, "cam")
    if size is None:
        size = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    elif len(size) != 2 or any(not isinstance(s, (int, np.integer)) or s < 1 for s in size):
        raise ValueError(f"size must be two positive integers (H, W), got {size!r}")
    size = (int(size[0]), int(size[1]))
    a, b = (m if tuple(m.shape) == size else upsample(m, size) for m in (a, b))
    a, b = a.flatten().double(), b.flatten().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return Agreement(math.nan, math.nan, math.nan, top_k)
    const_a, const_b = is_constant(a), is_constant(b)
    if const_a or const_b:
        which = tuple(name for name, c in (("attention", const_a), ("cam", const_b)) if c)
        return Agreement(math.nan, math.nan, math.nan, top_k, which)
    pearson, spearman = _pearson(a, b), _pearson(_ranks(a), _ranks(b))
    k = max(1, round(top_k * a.numel()))
    ma, mb = _top_k_membership(a, k), _top_k_membership(b, k)
    iou = float(torch.minimum(ma, mb).sum() / torch.maximum(ma, mb).sum())
    return Agreement(pearson, spearman, iou, top_k)


def agreement_batch(
    attention: Tensor, cam: Tensor, *, top_k: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """`agreement` for a batch of map pairs at once: (pearson, spearman, iou), each (N,).

    The same numbers as calling `agreement(attention[i], cam[i], top_k=top_k)` for every i
    (tested), computed with batched tensor operations (the data-set report's inner loop).

    Args:
        attention: (N, h1, w1) maps.
        cam: (N, h2, w2) maps.
        top_k: as in `agreement`.
    """
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be within (0, 1], got {top_k}")
    if attention.ndim != 3 or cam.ndim != 3 or attention.shape[0] != cam.shape[0]:
        raise ValueError(
            f"need (N, h, w) maps of the same N, got {tuple(attention.shape)} and {tuple(cam.shape)}"
        )
    size = (max(attention.shape[1], cam.shape[1]), max(attention.shape[2], cam.shape[2]))
    a, b = (
        (m.detach().float().cpu() if tuple(m.shape[1:]) == size else upsample(m.detach().float().cpu(), size))
        .flatten(1).double()
        for m in (attention, cam)
    )  # fmt: skip
    finite = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
    a, b = torch.where(finite[:, None], a, 0.0), torch.where(finite[:, None], b, 0.0)
    const_a, const_b = _constant_rows(a), _constant_rows(b)
    pearson = _pearson_rows(a, b)
    spearman = _pearson_rows(_rank_rows(a), _rank_rows(b))
    undefined = const_a | const_b
    k = max(1, round(top_k * a.shape[1]))
    ma, mb = _top_k_rows(a, k), _top_k_rows(b, k)
    iou = torch.minimum(ma, mb).sum(1) / torch.maximum(ma, mb).sum(1)
    for score in (pearson, spearman, iou):  # a constant map: no score, as in `agreement`
        score[undefined] = math.nan
    nan = torch.full_like(iou, math.nan)
    return (
        torch.where(finite, pearson, nan),
        torch.where(finite, spearman, nan),
        torch.where(finite, iou, nan),
    )


def _constant_rows(v: Tensor) -> Tensor:
    lo, hi = v.min(1).values, v.max(1).values
    return hi - lo <= _CONSTANT_RTOL * torch.maximum(lo.abs(), hi.abs())


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denom = torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    r = (a * b).sum(1) / denom
    return torch.where(denom == 0, torch.full_like(r, math.nan), r.clamp(-1.0, 1.0))


def _rank_rows(v: Tensor) -> Tensor:
    """1-based ranks along each row, tied values sharing their average rank (as `_ranks`)."""
    n, p = v.shape
    values, order = v.sort(1)
    starts_run = torch.ones_like(values, dtype=torch.bool)
    starts_run[:, 1:] = values[:, 1:] != values[:, :-1]
    run = starts_run.long().cumsum(1) - 1  # run index of each sorted position
    position = torch.arange(p, dtype=torch.float64).expand(n, p)
    first = torch.full((n, p), float(p), dtype=torch.float64).scatter_reduce(
        1, run, position, "amin"
    )
    last = torch.zeros((n, p), dtype=torch.float64).scatter_reduce(1, run, position, "amax")
    average = (first + last) / 2 + 1
    ranks = torch.empty_like(average)
    return ranks.scatter_(1, order, average.gather(1, run))


def _top_k_rows(v: Tensor, k: int) -> Tensor:
    cut = torch.topk(v, k, dim=1).values[:, -1:]
    above, tied = v > cut, v == cut
    share = (k - above.sum(1, keepdim=True)) / tied.sum(1, keepdim=True)
    return above.to(v.dtype) + tied.to(v.dtype) * share


def agreement_table(
    analysis: Analysis, index: int = 0, *, top_k: float = 0.2
) -> list[tuple[str, str, Agreement]]:
    """Agreement of each stage's last spatial attention map with the same stage's CAM.

    Stages are resolution levels (`viz.engine.levels`), so this works for any network: the spatial
    map of the last attention module at a level (CBAM: M_s after its sigmoid of the stage's
    last block, e.g. `layer2.1.cbam`; BAM: the spatial branch M_s of `bamK`, a logit —
    Spearman and IoU do not change under the sigmoid, Pearson does) is paired with the CAM of
    every CAM layer at the same level (`layer2`; `layerK`, which BAM follows; a block layer
    such as `layer4.0` when it was asked for). Stages whose CAM was not computed are left out,
    as are channel-only modules (SE, ECA).

    Args:
        analysis: from `viz.engine.cam.analyze`.
        index: which image of the batch.
        top_k: passed to `agreement`.

    Returns:
        (attention module name, CAM layer name, `Agreement`) per stage, in forward order;
        a transformer's whole-network map (rollout, GAE, LeGrad; stage 0) is paired with the
        last block's attention; empty for a network without spatial attention.

    Raises:
        IndexError: `index` is outside the batch.
    """
    n = analysis.batch_size
    if not -n <= index < n:
        raise IndexError(f"image index {index} is out of range for a batch of {n}")
    last: dict[int, AttentionRecord] = {}
    for rec in analysis.trace.spatial_records:
        last[rec.stage] = rec  # forward order: the stage's last module wins
    rows = []
    for stage, rec in last.items():
        for layer in analysis.cams:  # every requested layer at this stage, block layers too
            if analysis.cam_stages.get(layer) == stage:
                result = agreement(rec.spatial[index], analysis.cams[layer][index], top_k=top_k)
                rows.append((rec.name, layer, result))
    # a transformer's whole-network map (rollout, GAE, LeGrad) against its last block's map
    final = analysis.trace.spatial_records[-1:] if analysis.trace.spatial_records else []
    for layer in analysis.cams:
        network_map = analysis.cams[layer]
        if (analysis.cam_stages.get(layer) == 0 and final and final[0].kind == "self-attention"
                and network_map.shape[-2:] == final[0].spatial.shape[-2:]):  # fmt: skip
            result = agreement(final[0].spatial[index], network_map[index], top_k=top_k)
            rows.append((final[0].name, layer, result))
    return rows


# --- deletion and insertion -------------------------------------------------------------------


@dataclass(frozen=True)
class DeletionInsertion:
    """Causal scores of saliency maps (RISE): lower deletion and higher insertion AUC are better.

    Attributes:
        deletion_auc: (N,) area under the deletion curve.
        insertion_auc: (N,) area under the insertion curve.
        fractions: (steps + 1,) fraction of pixels deleted or inserted at each step, 0 to 1.
        deletion_curve: (N, steps + 1) target probability as the most salient pixels are
            replaced by the baseline.
        insertion_curve: (N, steps + 1) target probability as the most salient pixels are
            put back on the baseline.
        target: (N,) the class whose probability was followed; None for a target callable,
            whose raw score the curves follow instead.
        explained: what the curves follow, in words ("class 3", "segment 2 (predicted mask)").
    """

    deletion_auc: Tensor
    insertion_auc: Tensor
    fractions: Tensor
    deletion_curve: Tensor
    insertion_curve: Tensor
    target: Tensor | None
    explained: str = ""


def _gaussian_blur(x: Tensor) -> Tensor:
    """Strong separable Gaussian blur of (N, C, H, W), edges replicated: (N, C, H, W)."""
    sigma = max(1.0, _BLUR_SIDE_FRACTION * max(x.shape[-2:]))
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _saliency_ranks(
    saliency: Tensor, size: tuple[int, int], tie_seeds: Sequence[int] | None = None
) -> Tensor:
    """(N, h, w) saliency -> (N, H, W) rank of each pixel, 0 = most salient."""
    s = saliency.float()
    if tuple(s.shape[-2:]) != size:
        s = upsample(s, size)
    flat = torch.nan_to_num(s.reshape(s.shape[0], -1), nan=-math.inf)
    if tie_seeds is None:
        # stable: equal saliencies keep row-major pixel order, the same every time
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    else:
        # equal saliencies in a seeded random order: a constant map is a random ordering
        shuffle = torch.stack([
            torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(int(seed)))
            for seed in tie_seeds
        ]).to(flat.device)  # fmt: skip
        within = torch.sort(flat.gather(1, shuffle), dim=1, descending=True, stable=True).indices
        order = shuffle.gather(1, within)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.view(-1, *size)


def _probabilities(
    model: nn.Module, images: Tensor, targets: Tensor | None, batch_size: int
) -> Tensor:
    """Softmax (N, K), or (N,) probability of `targets`, in batches; no grad, model as it is."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        probs = model(images[start : start + batch_size]).float().softmax(1)
        if targets is not None:
            probs = probs.gather(1, targets[start : start + batch_size, None])[:, 0]
        out.append(probs)
    return torch.cat(out)


def deletion_insertion(
    model: nn.Module,
    x: Tensor,
    saliency: Tensor | np.ndarray,
    target: int | Sequence[int] | Tensor | Callable[[object], Tensor] | None = None,
    *,
    steps: int = 32,
    batch_size: int = 32,
    baseline: str = "blur",
    tie_seeds: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DeletionInsertion:
    """Deletion and insertion curves of saliency maps (Petsiuk et al., RISE, BMVC 2018).

    Pixels are ordered by saliency, most salient first; equal saliencies keep row-major pixel
    order, or a random order seeded per image by `tie_seeds` (nan counts as least salient). At step i of `steps`, the first floor(i * H * W / steps)
    pixels are, for deletion, replaced by the baseline in the image and, for insertion, copied
    from the image onto the baseline. Every step's image is scored by the softmax probability of
    the target class; each AUC is the trapezoid rule over the fractions in [0, 1].

    Args:
        model: the classifier; run in eval mode under `torch.no_grad`, its `training` flags are
            restored afterwards. It must live on `x`'s device.
        x: images (N, 3, H, W), preprocessed.
        saliency: (N, h, w) maps, any resolution (bilinearly resized to (H, W)).
        target: class to follow: an int for all images, one per image, or None for each
            image's predicted class; or a callable of the network's output (`viz.targets`:
            a mask's, box's or concept's score), whose raw score the curves then follow (the
            target fixed on the images as given, e.g. the predicted mask).
        steps: number of deletion/insertion steps; the curves have steps + 1 points.
        batch_size: perturbed images per forward pass.
        baseline: "blur" (a strong Gaussian blur of `x`, sigma = max(H, W) / 20) or "zero"
            (zeros, i.e. the mean colour once normalised).
        tie_seeds: one seed per image to break ties at random (a constant map then scores as
            a random one, in expectation); None keeps row-major order.
        progress: called with (perturbed images scored, their number) after every batch.

    Returns:
        A `DeletionInsertion` on the CPU.

    Cost: N + 2 * N * (steps + 1) images through the model, `batch_size` at a time; memory
    holds one batch of perturbed images.

    Raises:
        ValueError: bad shapes, `steps` or `batch_size` below 1, an unknown baseline, or a
            target out of range.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be images (N, 3, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    sal = _as_tensor(saliency)
    if sal.ndim != 3 or sal.shape[0] != n:
        raise ValueError(f"saliency must be (N={n}, h, w) maps, got shape {tuple(sal.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
    x = x.detach()
    pixels = h * w
    counts = torch.tensor([i * pixels // steps for i in range(steps + 1)], device=x.device)
    if tie_seeds is not None and len(tie_seeds) != n:
        raise ValueError(f"tie_seeds needs one seed per image ({n}), got {len(tie_seeds)}")
    ranks = _saliency_ranks(sal.to(x.device), (h, w), tie_seeds)
    points = steps + 1
    with preserve_model_state(model), torch.no_grad():
        base = _gaussian_blur(x) if baseline == "blur" else torch.zeros_like(x)
        scores, targets, text = _curve_scores(
            model, x, base, ranks, counts, target, batch_size, progress
        )
    curves = scores.view(n, 2, points).cpu()
    fractions = counts.cpu().double().div(pixels).float()
    deletion, insertion = curves[:, 0], curves[:, 1]
    auc = [torch.trapezoid(c, fractions, dim=1) for c in (deletion, insertion)]
    targets = None if targets is None else targets.cpu()
    return DeletionInsertion(*auc, fractions, deletion, insertion, targets, text)


def _curve_scores(model, x, base, ranks, counts, target, batch_size: int, progress):
    """(scores of every perturbed image, the classes followed or None, what was followed)."""
    if isinstance(target, ClassScore):  # a class: its probability, as the int target
        target = target.k
    if callable(target) and not isinstance(target, Tensor):
        explained = explained_by(target, model(x), len(x), model)

        def by_target(image: Tensor, batch: Tensor) -> Tensor:  # copies of one image
            return explained.per_image(int(image[0]))(model(batch)).float()

        scores = _perturbed_scores(x, base, ranks, counts, by_target, batch_size, progress, True)
        return scores, None, explained.text
    targets = resolve_targets(target, _probabilities(model, x, None, batch_size))

    def by_class(image: Tensor, batch: Tensor) -> Tensor:
        return _probabilities(model, batch, targets[image], batch_size)

    scores = _perturbed_scores(x, base, ranks, counts, by_class, batch_size, progress, False)
    return scores, targets, "classes"


def _perturbed_scores(x, base, ranks, counts, score, batch_size: int, progress, by_image: bool):
    """`score(image indices, batch)` of every perturbed image: per image, the deletion steps,
    then the insertion steps (`counts[i]` most salient pixels from the baseline or from `x`).
    `by_image`: a batch never mixes images (a target callable scores copies of one image)."""
    points = counts.shape[0]
    per = 2 * points
    total = x.shape[0] * per
    scores = torch.empty(total, device=x.device)
    ends = range(per, total + 1, per) if by_image else [total]
    for end in ends:
        for start in range(end - (per if by_image else total), end, batch_size):
            item = torch.arange(start, min(start + batch_size, end), device=x.device)
            image, insertion, step = item // per, item // points % 2, item % points
            first = ranks[image] < counts[step].view(-1, 1, 1)  # (b, H, W)
            use_base = first ^ insertion.bool().view(-1, 1, 1)
            batch = torch.where(use_base[:, None], base[image], x[image])
            scores[start : start + len(item)] = score(image, batch)
            if progress:
                progress(start + len(item), total)
    return scores


def random_saliency(seeds: Sequence[int], size: tuple[int, int]) -> Tensor:
    """(N, H, W) uniform noise, one map per seed: the chance level of every saliency score.

    Seeded per image (not per batch), so a map does not depend on how images are batched.
    """
    return torch.stack(
        [torch.rand(size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def seed_of(text: str, seed: int = 0) -> int:
    """A 32-bit seed from a name (an image's file name or hash) and a run seed, stable anywhere."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{text}".encode()).digest()[:4], "little")


# --- channel statistics -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelStats:
    """Mean channel attention per class.

    Attributes:
        class_names: the K class names, in label order.
        counts: (K,) number of images of each class.
        means: attention module name -> (K, C) mean channel weight per class, in forward order;
            a class without images has a row of nan.
        labels: attention module name -> its label in figures, e.g. "stage 2 · block 1".
        stages: attention module name -> its stage (resolution level).
    """

    class_names: list[str]
    counts: Tensor
    means: dict[str, Tensor]
    labels: dict[str, str] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)


def _read_image(path: str) -> Image.Image:
    """Load one image file as RGB through the allow-listed decoder (`models.images.load_image`)."""
    return load_image(path)


class _ToTensor:
    """PIL image -> (3, H, W) through a `Preprocess` (which returns a batch of one) or a callable."""

    def __init__(self, preprocess: Callable[[Image.Image], Tensor]) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> Tensor:
        out = self.preprocess(image)
        return out[0] if out.ndim == 4 and out.shape[0] == 1 else out


class _Folder(Dataset):
    """The images of an ImageFolder layout, found by `models.images.image_folder` (bounded)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return self.transform(_read_image(path)), label


def _as_dataset(
    source: str | os.PathLike | Dataset,
    preprocess: Callable[[Image.Image], Tensor] | None,
    max_images: int,
) -> tuple[Dataset, list[str]]:
    if not isinstance(source, (str, os.PathLike)):
        return source, [str(c) for c in getattr(source, "classes", [])]
    if not Path(source).is_dir():
        raise FileNotFoundError(f"no such folder: {os.fspath(source)}")
    if preprocess is None:
        raise ValueError("a folder of images needs a preprocess (e.g. the checkpoint's)")
    samples, classes = image_folder(source, max_images=max_images)
    return _Folder(samples, _ToTensor(preprocess)), classes


def _grow_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def channel_statistics(
    model: nn.Module,
    dataset_or_folder: str | os.PathLike | Dataset,
    preprocess: Callable[[Image.Image], Tensor] | None,
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], object] | None = None,
    num_workers: int = 0,
    max_images: int = 20_000,
    max_seconds: float | None = None,
) -> ChannelStats:
    """Per-class mean of every attention module's channel weights over a set of images.

    Channel weights are what `viz.engine.trace.record_attention` records as `channel`: the sigmoid
    weights of SE and CBAM. BAM records M_c, a logit, so sigmoid(M_c) is averaged instead: the
    channel attention of the BAM paper (with the official product fusion, the gate applied to
    the features is 1 + sigmoid(M_c * M_s), which also depends on M_s).

    Images stream through a `DataLoader`; only the running per-class sums are kept, so memory
    does not grow with the number of images.

    Args:
        model: the network; run in eval mode without gradients, its flags restored.
        dataset_or_folder: a folder in ImageFolder layout (one subfolder per class, images
            loaded with `models.images.load_image`), or a `Dataset` yielding (image (3, H, W),
            integer label). Class names come from the folders, or the dataset's `classes`
            attribute, else the label numbers.
        preprocess: PIL image -> tensor (1, 3, H, W) or (3, H, W), e.g. a `models.Preprocess`;
            needed for a folder, unused for a dataset (its items are already tensors).
        batch_size: images per forward pass.
        progress: called as progress(images done, total images) after every batch.
        num_workers: DataLoader worker processes that decode images.
        max_images: refuse a folder with more images (a server's limit per run).
        max_seconds: stop with a `TimeoutError` once a run has taken longer.

    Returns:
        A `ChannelStats`; `means` is empty for a network without attention modules.

    Raises:
        FileNotFoundError: the folder does not exist or has no class subfolders.
        ValueError: no images, no preprocess for a folder, or a negative label.
        models.images.ImageError: an image in the folder cannot be read.
    """
    dataset, class_names = _as_dataset(dataset_or_folder, preprocess, max_images)
    started = time.monotonic()
    total = len(dataset)
    if total == 0:
        raise ValueError("no images to compute channel statistics on")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = _model_device(model)
    sums = _ClassSums(torch.zeros(len(class_names), dtype=torch.long))
    done = 0
    for images, labels in loader:
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if (labels < 0).any():
            raise ValueError(f"labels must be non-negative integers, got {labels.tolist()}")
        # a new trace each batch: records of earlier batches are freed as soon as they are summed
        with torch.no_grad(), record_attention(model) as trace:
            model(images.to(device))
        sums.add(labels, trace)
        done += len(labels)
        if progress is not None:
            progress(done, total)
        if max_seconds is not None and done < total and time.monotonic() - started > max_seconds:
            raise TimeoutError(
                f"stopped after {max_seconds:g} s, the limit for one run ({done} of {total} "
                "images done); choose a smaller folder"
            )
    return sums.stats(class_names)


@dataclass
class _ClassSums:
    """Running per-class sums of every module's channel weights (memory flat in the images)."""

    counts: Tensor  # (K,) images per class
    sums: dict[str, Tensor] = field(default_factory=dict)  # module -> (K, C) float64
    labels: dict[str, str] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)

    def add(self, labels: Tensor, trace: AttentionTrace) -> None:
        rows = max(self.counts.shape[0], int(labels.max()) + 1)
        self.counts = _grow_rows(self.counts, rows)
        self.counts.index_add_(0, labels, torch.ones_like(labels))
        for rec in trace.channel_records:
            weights = rec.channel_weights.float()
            self.labels[rec.name], self.stages[rec.name] = rec.label, rec.stage
            so_far = self.sums.get(rec.name, torch.zeros(0, weights.shape[1], dtype=torch.float64))
            self.sums[rec.name] = _grow_rows(so_far, rows).index_add_(
                0, labels, weights.cpu().double()
            )

    def stats(self, class_names: list[str]) -> ChannelStats:
        rows = self.counts.shape[0]
        names = class_names + [str(i) for i in range(len(class_names), rows)]
        means = {
            k: (_grow_rows(v, rows) / self.counts[:, None]).float() for k, v in self.sums.items()
        }
        return ChannelStats(names, self.counts, means, self.labels, self.stages)
