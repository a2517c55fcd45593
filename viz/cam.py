"""Grad-CAM family, computed together with the attention trace.

`analyze` runs one forward and one backward for everything: the attention maps of every module
(read by `record_attention` during the forward) and Grad-CAM (Selvaraju et al., ICCV 2017,
https://arxiv.org/abs/1610.02391) or Grad-CAM++ (Chattopadhyay et al., WACV 2018,
https://arxiv.org/abs/1710.11063) at every requested layer. Gradients are taken with
`torch.autograd.grad` on the layers' output tensors (no module backward hooks), and the
parameters need no gradients, so the backward stops at the earliest requested layer.

Input-resolution attributions that cost more passes come from Captum in `attribute`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .trace import AttentionTrace, model_lock, record_attention

__all__ = [
    "Analysis",
    "analyze",
    "attribute",
    "resolve_layers",
    "DEFAULT_CAM_LAYERS",
    "CAM_METHODS",
    "ATTRIBUTION_METHODS",
]

DEFAULT_CAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")
CAM_METHODS = ("gradcam", "gradcam++")
ATTRIBUTION_METHODS = ("guided-gradcam", "integrated-gradients", "occlusion")


@dataclass(frozen=True)
class Analysis:
    """Everything one forward + backward tells about a batch.

    Attributes:
        logits: (N, K).
        probs: (N, K) softmax of the logits.
        target: (N,) class explained by the CAMs.
        trace: attention maps of every SE/BAM/CBAM module, forward order.
        cams: layer name -> (N, h, w) map at the layer's native resolution, ReLU applied,
            not normalised.
        method: "gradcam" or "gradcam++".
    """

    logits: Tensor
    probs: Tensor
    target: Tensor
    trace: AttentionTrace
    cams: dict[str, Tensor]
    method: str = "gradcam"

    @property
    def target_probs(self) -> Tensor:
        """(N,) softmax score of each image's target class (the 'P' of the CBAM paper's figure)."""
        return self.probs.gather(1, self.target[:, None])[:, 0]

    def select(self, index: int) -> Analysis:
        """The analysis of image `index` (batch dimension kept, size 1)."""
        pick = slice(index, index + 1)
        return Analysis(
            self.logits[pick], self.probs[pick], self.target[pick], self.trace.select(index),
            {k: v[pick] for k, v in self.cams.items()}, self.method,
        )  # fmt: skip


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map dotted names to modules; a wrong name gets a ValueError listing the valid ones."""
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules or name == "":
            # list the names a user would pick: stages and blocks, not every conv
            shown = [n for n in modules if n and n.count(".") <= 1 and not n.startswith("fc")]
            raise ValueError(
                f"unknown layer {name!r}; valid layers include: {', '.join(shown)} "
                "(or any dotted submodule name)"
            )
        found[name] = modules[name]
    return found


def _targets(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
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


def _gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    weights = grads.mean((2, 3), keepdim=True)
    return torch.relu((weights * acts).sum(1))


def _gradcam_pp(acts: Tensor, grads: Tensor) -> Tensor:
    g2 = grads.pow(2)
    g3 = g2 * grads
    denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alpha * torch.relu(grads)).sum((2, 3), keepdim=True)
    return torch.relu((weights * acts).sum(1))


def analyze(
    model: nn.Module,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    cam_layers: Sequence[str] | None = None,
    *,
    method: str = "gradcam",
) -> Analysis:
    """Attention maps of every module and Grad-CAM at each layer, from one forward and one backward.

    Args:
        model: the network (left with its `training` flags and `requires_grad` as they were).
        x: images (N, 3, H, W), preprocessed.
        target: class to explain: an int for all images, one per image, or None for the argmax.
        cam_layers: dotted module names; default the four stages `layer1`…`layer4`.
        method: "gradcam" or "gradcam++" (both from the same gradients: no extra pass).

    Returns:
        An `Analysis`; `cams[name]` is (N, h, w) at the layer's own resolution.

    Cost: 1 forward + 1 backward that runs from the logits down to the earliest requested layer,
    without parameter gradients.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {list(CAM_METHODS)}, got {method!r}")
    names = list(DEFAULT_CAM_LAYERS if cam_layers is None else cam_layers)
    layers = resolve_layers(model, names)
    acts: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_m, _i, out: Tensor) -> Tensor | None:
            if not out.requires_grad:
                # nothing upstream needs gradients: start the graph here
                out = out.detach().requires_grad_()
                acts[name] = out
                return out
            acts[name] = out
            return None

        return hook

    with model_lock(model):
        grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        handles = []
        try:
            for p, _ in grad_flags:
                p.requires_grad_(False)
            with torch.enable_grad():  # also when the caller is inside torch.no_grad()
                with record_attention(model, feature_means=True) as trace:
                    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
                    logits = model(x)
                for h in handles:
                    h.remove()
                targets = _targets(target, logits)
                score = logits.gather(1, targets[:, None]).sum()
                grads = torch.autograd.grad(score, list(acts.values()), allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for p, flag in grad_flags:
                p.requires_grad_(flag)
    combine = _gradcam if method == "gradcam" else _gradcam_pp
    cams = {}
    for (name, act), grad in zip(acts.items(), grads):
        if grad is None:  # the layer does not influence the logits
            grad = torch.zeros_like(act)
        cams[name] = combine(act.detach(), grad)
    logits = logits.detach()
    return Analysis(logits, logits.softmax(1), targets, trace, cams, method)


def attribute(
    model: nn.Module,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    method: str = "guided-gradcam",
    layer: str = "layer4",
    steps: int = 32,
    window: int = 32,
) -> Tensor:
    """Input-resolution attributions through Captum, summed over colour channels: (N, H, W).

    Costs (passes through the network):
        - "guided-gradcam": Grad-CAM at `layer` times guided backprop: 2 forwards + 2 backwards.
        - "integrated-gradients": `steps` forwards and backwards (batched by Captum).
        - "occlusion": one forward per occluded window position: about (H/stride)*(W/stride)
          forwards, stride = window/2.
    """
    from captum.attr import GuidedGradCam, IntegratedGradients, Occlusion

    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"method must be one of {list(ATTRIBUTION_METHODS)}, got {method!r}")
    with model_lock(model):
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                targets = _targets(target, model(x)).tolist()
            if method == "guided-gradcam":
                module = resolve_layers(model, [layer])[layer]
                attr = GuidedGradCam(model, module).attribute(x, target=targets)
            elif method == "integrated-gradients":
                attr = IntegratedGradients(model).attribute(
                    x, target=targets, n_steps=steps, internal_batch_size=max(1, steps)
                )
            else:
                stride = max(1, window // 2)
                attr = Occlusion(model).attribute(
                    x, target=targets, sliding_window_shapes=(3, window, window),
                    strides=(3, stride, stride),
                )  # fmt: skip
        finally:
            for m, flag in flags:
                m.training = flag
    return attr.detach().sum(1)
