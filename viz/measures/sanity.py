"""Do the maps depend on what the network learned? Cascading parameter randomisation.

Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018 (https://arxiv.org/abs/1810.03292):
randomise the network's weights block by block from the logits down, recompute every map after
each step for the same images and class, and compare it with the trained network's map (Spearman
rank correlation and SSIM). A map that stays the same while the weights it should explain are
noise is not explaining them.

Steps are the network's blocks in reverse forward order (found with one forward pass): for a
ResNet `fc`, `layer4.1`, `layer4.0`, …, `conv1`, a BAM after the stage it follows — names cut to
two components, so any network is grouped the same way (`features.7`, `classifier.1` in torchvision's EfficientNet). Each parameter is redrawn
from a normal distribution with the trained tensor's own mean and standard deviation (seeded per
step), which keeps activations at their scale; buffers (BatchNorm running statistics) are kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from viz.engine.maps import upsample
from viz.engine.model_state import preserve_model_state

__all__ = [
    "randomisation_steps",
    "randomise_",
    "cascading_randomisation",
    "ssim",
    "spearman",
    "SanityStep",
]


def randomisation_steps(model: nn.Module, x: Tensor | None = None) -> list[str]:
    """Parameter groups of `model`, from the logits down: two-component name prefixes.

    With an input `x` the order is the order in which a forward pass first runs each group
    (modules registered out of order, such as a ResNet's BAMs, land where they act), reversed;
    without, the order of registration, reversed.
    """
    owners = {
        name: ".".join(name.split(".")[:2])
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }
    order: list[str] = []
    if x is not None:
        modules = dict(model.named_modules())

        def seen(prefix: str):
            def hook(*_args) -> None:
                if prefix not in order:
                    order.append(prefix)

            return hook

        handles = [modules[n].register_forward_pre_hook(seen(p)) for n, p in owners.items()]
        try:
            with preserve_model_state(model), torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
    for prefix in owners.values():  # groups the pass did not run, and the no-input case
        if prefix not in order:
            order.append(prefix)
    return order[::-1]


def _in_group(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def randomise_(model: nn.Module, prefix: str, seed: int) -> None:
    """Redraw every parameter under `prefix` in place (normal, the tensor's mean and std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not _in_group(name.rsplit(".", 1)[0], prefix):
                continue
            values = p.detach().float().cpu()
            std = float(values.std()) if values.numel() > 1 else 0.0
            std = std if math.isfinite(std) and std > 0 else 0.02
            noise = torch.randn(values.shape, generator=generator) * std + float(values.mean())
            p.copy_(noise.to(p.dtype))


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two maps (ties averaged); nan if either is constant."""
    from viz.measures.metrics import agreement

    return agreement(a, b).spearman


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(a: Tensor, b: Tensor, *, size: int | None = None) -> float:
    """Structural similarity (Wang et al., IEEE TIP 2004) of two maps, each scaled to [0, 1].

    Maps are resized to `size` x `size` (default the larger of the two) and min-max scaled;
    11 x 11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, reflect padding so small maps
    work too. nan if either map is constant, as `spearman`: an all-zero map explains nothing,
    and two of them would otherwise score as identical.
    """
    if any(float(m.max() - m.min()) == 0 for m in (torch.nan_to_num(a), torch.nan_to_num(b))):
        return math.nan
    side = size or max(*a.shape[-2:], *b.shape[-2:])

    def prep(m: Tensor) -> Tensor:
        m = torch.nan_to_num(m.detach().double().cpu(), nan=0.0)
        m = m if tuple(m.shape) == (side, side) else upsample(m.float(), (side, side)).double()
        lo, hi = m.min(), m.max()
        return ((m - lo) / (hi - lo)).view(1, 1, side, side)

    x, y = prep(a), prep(b)
    window = _gaussian_window()
    pad = window.shape[-1] // 2
    if side <= pad:  # reflect padding needs a larger map: compare at a resize
        return ssim(a, b, size=2 * pad + 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), window)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


@dataclass(frozen=True)
class SanityStep:
    """One row of the check: after randomising `randomised` (and every group before it)."""

    step: int
    randomised: str
    image: int
    map: str
    spearman: float
    ssim: float


def cascading_randomisation(
    model: nn.Module,
    x: Tensor,
    target: Tensor | Callable[[object], Tensor],
    maps_of: Callable[[nn.Module, Tensor, object], dict[str, Tensor]],
    *,
    seed: int = 0,
    steps: list[str] | None = None,
    original: dict[str, Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[SanityStep]:
    """Compare every map of the trained `model` with the same map after each randomisation step.

    Args:
        model: the trained network; it is copied, never changed.
        x: images (N, 3, H, W).
        target: (N,) class to explain, fixed for every step (the trained model's), or a
            target callable (`viz.targets`) fixed on the trained model's output (e.g.
            `SegmentationScore(k).fixed_on(output)`: the same pixels at every step).
        maps_of: (model, x, target) -> {map name: (N, h, w)}; called once per step (and on
            the trained copy unless `original` is given).
        seed: step k is randomised with seed `seed + k`.
        steps: parameter groups in the order to randomise; default `randomisation_steps`.
        original: the trained model's maps of `x`, when the caller has them already (saves
            a forward and a backward); default `maps_of` on the trained copy.
        progress: called with (steps done, steps) after every step.

    Returns:
        A `SanityStep` per step, image and map (maps missing after a step are skipped).
    """
    work = copy.deepcopy(model)
    groups = randomisation_steps(work, x[:1]) if steps is None else steps
    if original is None:
        original = maps_of(work, x, target)
    rows: list[SanityStep] = []
    for k, group in enumerate(groups):
        randomise_(work, group, seed + k)
        now = maps_of(work, x, target)
        for name, before in original.items():
            after = now.get(name)
            if after is None:
                continue
            for i in range(before.shape[0]):
                rows.append(
                    SanityStep(k, group, i, name, spearman(before[i], after[i]),
                               ssim(before[i], after[i]))
                )  # fmt: skip
        if progress:
            progress(k + 1, len(groups))
    return rows
