"""CAM methods that weigh a layer's channels with extra passes through the network, batched.

- "scorecam": Wang et al., CVPR-W 2020 (https://arxiv.org/abs/2003.06871), as pytorch-grad-cam
  computes it: each channel, upsampled to the image (bilinear, corners aligned) and min-max
  scaled to [0, 1], masks the image; the channel's weight is the softmax over channels of the
  target logits of the masked images.
- "sscam": Wang et al. 2020 (https://arxiv.org/abs/2006.14255), as TorchCAM: channels min-max
  scaled, upsampled (bilinear), plus Gaussian noise (`std`, default 2) drawn at image resolution,
  `num_samples` (35) times; softmax of the mean change of the target logit.
- "iscam": Naidu et al. 2020 (https://arxiv.org/abs/2010.03023), as TorchCAM: the masked image
  times the cumulative coefficients sum(j / N, j = 1..i), i = 1..N (`num_samples`, 10); softmax
  of the mean change of the target logit.
- "ablationcam": Desai & Ramaswamy, WACV 2020, as pytorch-grad-cam: each channel set to zero
  (far below the layer's minimum when activations can be negative); weight (y - y_ablated) / y.
- "smoothgradcam++": Omeiza et al. 2019 (https://arxiv.org/abs/1908.01224): Grad-CAM++ with the
  gradient powers averaged over `num_samples` (4) noisy copies of the image (`std` 0.3), over
  the clean image's activations, in the paper's formula (TorchCAM's variant uses the last noisy
  sample's gradients and activations).

What makes them faster than the peers at equal maps: passes run under `torch.inference_mode`
with channels-last inputs (oneDNN's fast convolutions on CPUs), through a copy of the network
with its batch norms folded into the convolutions and its weights in the same layout (the model
itself is not touched), with denormal numbers flushed to zero (masked images make many), in
batches sized by a memory budget from the measured activation size of one image, identical
masks are evaluated once, and Ablation-CAM runs only the part of the network after the layer:
the image goes through the layers before it once per batch, and the layer's output is replaced
by the batch of ablated activations (checked against the unablated logit; where a network
cannot take that, the whole network runs per ablation, as the peer does).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from viz.engine.cam.targets import Explained
from viz.engine.tokens import as_feature_map, token_layout

__all__ = ["PassContext", "PASS_WEIGHTS", "planned_passes", "MEMORY_BUDGET_MIB", "NUM_SAMPLES"]

MEMORY_BUDGET_MIB = 256
"""Activation memory a batch of extra passes may take; beyond ~32 images CPUs gain nothing."""
_MAX_BATCH = 64
_EPS = 1e-8


@dataclass
class PassContext:
    """What a pass method needs for one layer: the network, the images and what they gave.

    Attributes:
        model: the network (parameters frozen, in the mode the caller left it).
        x: (N, C, H, W) images.
        module: the CAM layer; acts: its (N, C, h, w) output on `x`.
        explained: the target (`Explained`): its score of copies of one image;
        scores: (N,) the target's scores of `x`.
        options: method options (`num_samples`, `std`, `batch_size`), else the defaults.
        generator: seeded noise source (the randomised methods are reproducible).
        progress: called with the number of images each pass ran.
    """

    model: nn.Module
    x: Tensor
    module: nn.Module
    acts: Tensor
    explained: Explained
    scores: Tensor
    options: dict = field(default_factory=dict)
    generator: torch.Generator | None = None
    progress: Callable[[int], None] = lambda n: None

    def option(self, name: str, default):
        return self.options.get(name, default)

    def batch_size(self) -> int:
        given = self.options.get("batch_size")
        return int(given) if given else _budget_batch(self.model, self.x[:1])


NUM_SAMPLES = {"sscam": 35, "iscam": 10, "smoothgradcam++": 4}
"""The methods that take a `num_samples` option, and its default (their papers')."""

# --- batching ---------------------------------------------------------------------------------

_image_bytes: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _budget_batch(model: nn.Module, one: Tensor) -> int:
    """Images per batch within `MEMORY_BUDGET_MIB`, from the largest activation of one image
    (measured once per model and input size; a few such tensors are alive at a time)."""
    sizes = _image_bytes.setdefault(model, {})
    key = tuple(one.shape[1:])
    if key not in sizes:
        largest = [0]

        def note(_m, _i, out) -> None:
            if isinstance(out, Tensor):
                largest[0] = max(largest[0], out.numel() * out.element_size())

        handles = [m.register_forward_hook(note) for m in model.modules()]
        try:
            with torch.inference_mode():
                model(one)
        finally:
            for h in handles:
                h.remove()
        sizes[key] = 3 * max(largest[0], one.numel() * one.element_size())
    return max(1, min(_MAX_BATCH, MEMORY_BUDGET_MIB * 2**20 // sizes[key]))


def _logits(model: nn.Module, inputs: Tensor) -> Tensor:
    return model(inputs.contiguous(memory_format=torch.channels_last))


_folded: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def _folded_copy(model: nn.Module) -> nn.Module:
    """A copy of the model in eval mode with every batch norm folded into the convolution
    before it (torch.fx), for the masked-image passes: the same function in fewer operations.

    Cached per model and checked against its tensors' versions, so weights changed in place
    make a new copy; a network that torch.fx cannot trace, or one in training mode, runs as is.
    """
    tensors = [*model.parameters(), *model.buffers()]
    key = (model.training, *((id(t), t._version) for t in tensors))
    hit = _folded.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    folded = model
    if not model.training:
        try:
            from torch.fx.experimental.optimization import fuse

            # weights in the inputs' channels-last layout: no reordering at every call
            folded = fuse(model).to(memory_format=torch.channels_last)
        except Exception:  # noqa: BLE001 - any tracing failure: run the model itself
            folded = model
    _folded[model] = (key, folded)
    return folded


def _scores_of_masks(ctx: PassContext, image: int, masked: Callable[[slice], Tensor], count: int):
    """Target scores of `count` masked images, `masked(chunk)` building each batch on demand."""
    score, batch = ctx.explained.per_image(image), ctx.batch_size()
    out = torch.empty(count)
    model = _folded_copy(ctx.model)
    with torch.inference_mode(), _denormals_flushed():
        for start in range(0, count, batch):
            chunk = slice(start, min(count, start + batch))
            out[chunk] = score(_logits(model, masked(chunk))).float()
            ctx.progress(chunk.stop - chunk.start)
    return out


@contextmanager
def _denormals_flushed():
    """Values below 1e-38 count as zero inside: masked images drive many activations into that
    range, where CPU arithmetic is several times slower (the logits do not change)."""
    before = float(torch.tensor(1e-39) * 1.0) == 0.0  # already flushing?
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


# --- masks --------------------------------------------------------------------------------------


def _min_max(maps: Tensor) -> Tensor:
    """(K, h, w) maps each scaled to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    return ((flat - lo[:, None]) / (hi - lo + _EPS)[:, None]).view_as(maps)


def _upsample(maps: Tensor, size, aligned: bool) -> Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=aligned)[:, 0]


def _distinct(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of one channel per distinct mask, and each channel's distinct mask.

    Masks depend on a channel only up to a positive affine change (min-max scaling), so
    channels equal after scaling (all the dead ones, for instance) share one pass."""
    keys = _min_max(maps).flatten(1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((len(unique),), len(keys), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys)), reduce="amin")
    return first, inverse


# --- the methods --------------------------------------------------------------------------------


def _scorecam(ctx: PassContext) -> Tensor:
    n, _, h, w = ctx.x.shape
    weights = []
    for i in range(n):
        first, inverse = _distinct(ctx.acts[i])
        channels = ctx.acts[i, first]
        image = ctx.x[i : i + 1]

        def masked(chunk: slice, channels=channels, image=image) -> Tensor:
            masks = _min_max(_upsample(channels[chunk], (h, w), aligned=True))
            return image * masks[:, None]

        scores = _scores_of_masks(ctx, i, masked, len(first))[inverse]
        ctx.progress(len(inverse) - len(first))  # the passes saved count as done
        weights.append(torch.softmax(scores, 0))
    return torch.stack(weights)


def _noisy_scores(ctx: PassContext, samples: int, scale: Callable[[int], float], std: float):
    """Mean change of the target logit over `samples` passes of every channel's mask
    (TorchCAM's masks: min-max at the layer, then upsampled), noise and scale per sample."""
    n, _, h, w = ctx.x.shape
    weights = []
    for i in range(n):
        masks = _upsample(_min_max(ctx.acts[i]), (h, w), aligned=False)
        total = torch.zeros(len(masks))
        for s in range(samples):
            noisy = masks
            if std > 0:
                noisy = masks + std * torch.randn(masks.shape, generator=ctx.generator)
            factor, image = scale(s), ctx.x[i : i + 1]

            def masked(chunk: slice, noisy=noisy, factor=factor, image=image) -> Tensor:
                return factor * (image * noisy[chunk, None])

            total += _scores_of_masks(ctx, i, masked, len(masks)) - float(ctx.scores[i])
        weights.append(torch.softmax(total / samples, 0))
    return torch.stack(weights)


def _sscam(ctx: PassContext) -> Tensor:
    samples = int(ctx.option("num_samples", NUM_SAMPLES["sscam"]))
    std = float(ctx.option("std", 2.0))
    return _noisy_scores(ctx, samples, lambda s: 1.0, std)


def _iscam(ctx: PassContext) -> Tensor:
    samples = int(ctx.option("num_samples", NUM_SAMPLES["iscam"]))
    # sample s scales the masked image by sum(j / N, j = 1..s+1)
    return _noisy_scores(ctx, samples, lambda s: (s + 1) * (s + 2) / (2 * samples), 0.0)


def _ablationcam(ctx: PassContext) -> Tensor:
    n, c = ctx.acts.shape[:2]
    weights = []
    for i in range(n):
        acts = ctx.acts[i]
        low = float(acts.min())
        value = 0.0 if low == 0 else low - 1e7  # the peer's choice for signed activations
        suffix = _Suffix(ctx, i)
        scores = torch.empty(c)
        # the batch runs from the layer on: sized by the layer's activations, not the image's
        batch = ctx.options.get("batch_size") or MEMORY_BUDGET_MIB * 2**20 // (
            3 * acts.numel() * acts.element_size()
        )
        batch = max(1, int(batch))
        for start in range(0, c, batch):
            chunk = torch.arange(start, min(c, start + batch))
            ablated = acts.expand(len(chunk), *acts.shape).clone()
            ablated[torch.arange(len(chunk)), chunk] = value
            scores[chunk] = suffix(ablated)
        base = float(ctx.scores[i])
        weights.append((base - scores) / base)
    return torch.stack(weights)


class _Suffix:
    """Target logits with the layer's output replaced by a batch of activations.

    The image runs through the layers before the layer at batch size 1 and the rest of the
    network broadcasts to the batch; the first call checks that this gives the unablated
    logit back, else every call runs the whole network on a batch of copies of the image.
    """

    def __init__(self, ctx: PassContext, image: int) -> None:
        self.ctx, self.image, self.whole = ctx, image, None
        self.score = ctx.explained.per_image(image)

    def _run(self, replaced: Tensor, whole: bool) -> Tensor:
        image = self.ctx.x[self.image : self.image + 1]
        if whole:
            image = image.expand(len(replaced), *image.shape[1:])
        handle = self.ctx.module.register_forward_hook(lambda _m, _i, _o: replaced)
        try:
            with torch.inference_mode():
                scores = self.score(_logits(self.ctx.model, image))
        finally:
            handle.remove()
        if scores.shape != (len(replaced),):
            raise ValueError("batch changed")
        self.ctx.progress(len(replaced))
        return scores.float()

    def __call__(self, replaced: Tensor) -> Tensor:
        if self.whole is None:  # first call: the unablated activations go first, as a check
            check = torch.cat((self.ctx.acts[self.image : self.image + 1], replaced))
            expected = float(self.ctx.scores[self.image])
            for whole in (False, True):
                try:
                    scores = self._run(check, whole)
                except (RuntimeError, ValueError):
                    continue
                if math.isclose(float(scores[0]), expected, rel_tol=1e-3, abs_tol=1e-3):
                    self.whole = whole
                    return scores[1:]
            raise ValueError(
                "Ablation-CAM could not replace the layer's output (is the layer called more "
                "than once per forward?); pick another layer"
            )
        return self._run(replaced, self.whole)


def _smoothgradcampp(ctx: PassContext) -> Tensor:
    """Channel-and-location weights folded into (N, C) per-channel weights."""
    samples = int(ctx.option("num_samples", NUM_SAMPLES["smoothgradcam++"]))
    std = float(ctx.option("std", 0.3))
    n = len(ctx.x)
    g1 = torch.zeros_like(ctx.acts)
    g2, g3 = torch.zeros_like(ctx.acts), torch.zeros_like(ctx.acts)
    batch = max(1, ctx.batch_size() // 2)  # a backward keeps the activations alive
    for i in range(n):
        noise = std * torch.randn((samples, *ctx.x.shape[1:]), generator=ctx.generator)
        for start in range(0, samples, batch):
            noisy = ctx.x[i : i + 1] + noise[start : start + batch]
            grads = _layer_gradients(ctx.model, ctx.module, noisy, ctx.explained.per_image(i))
            g1[i] += grads.sum(0)
            g2[i] += grads.pow(2).sum(0)
            g3[i] += grads.pow(3).sum(0)
            ctx.progress(len(noisy))
    g1, g2, g3 = g1 / samples, g2 / samples, g3 / samples
    denom = 2 * g2 + ctx.acts.sum((2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    return (alpha * torch.relu(g1)).sum((2, 3))


def _layer_gradients(model: nn.Module, module: nn.Module, inputs: Tensor, score) -> Tensor:
    kept: list[Tensor] = []

    def keep(_m, _i, out: Tensor):
        if not out.requires_grad:
            out = out.detach().requires_grad_()
            kept.append(out)
            return out
        kept.append(out)
        return None

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            output = model(inputs)
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(score(output).sum(), kept[:1])
    # a transformer's tokens onto their grid, as the layer's activations are
    return as_feature_map(grads.detach(), token_layout(model), tuple(inputs.shape[-2:]))


PASS_WEIGHTS: dict[str, Callable[[PassContext], Tensor]] = {
    "scorecam": _scorecam,
    "sscam": _sscam,
    "iscam": _iscam,
    "ablationcam": _ablationcam,
    "smoothgradcam++": _smoothgradcampp,
}
"""Method name -> (context -> (N, C) channel weights)."""


def planned_passes(method: str, acts: Tensor, options: dict) -> int:
    """Images the method will run through the network for one layer (before de-duplication)."""
    n, c = acts.shape[:2]
    per_image = {
        "scorecam": c,
        "ablationcam": c + 1,
        "smoothgradcam++": int(options.get("num_samples", NUM_SAMPLES["smoothgradcam++"])),
    }.get(method)
    if per_image is None:
        per_image = c * int(options.get("num_samples", NUM_SAMPLES[method]))
    return n * per_image
