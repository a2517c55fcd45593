"""Whole-network maps: the transformer methods (rollout, GAE, LeGrad) and FullGrad."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.probes import find_probe
from viz.engine.cam.result import Analysis, ForwardBackward, Settings, analysis_of
from viz.engine.cam.targets import Explained, NoTargetError, explained_by, nothing_explained
from viz.engine.cam.weights import first_component
from viz.engine.model_state import preserve_model_state
from viz.engine.tokens import token_layout
from viz.engine.trace import attention_modules, record_attention
from viz.engine.transformer import gae, legrad, rollout
from viz.engine.unread import unread_attention
from viz.targets import BoxScore, SegmentationScore

__all__ = ["transformer_analysis", "bias_layers", "fullgrad_map"]


# --- transformer methods -----------------------------------------------------------------------


def transformer_analysis(model, x, target, settings: Settings, modules) -> Analysis:
    """Rollout, GAE or LeGrad: one traced forward (and the backward GAE and LeGrad need)."""
    spec, options = settings.spec, settings.options
    layout = token_layout(model)
    gradients = spec.gradients
    outputs: list[Tensor] = []
    handles = []
    with preserve_model_state(model, eval_mode=False, freeze=True, modules=modules):
        with torch.set_grad_enabled(gradients):
            x_in = x.detach().requires_grad_() if gradients else x
            try:
                with record_attention(model, modules=modules, keep_graph=gradients) as trace:
                    if spec.name == "legrad":
                        handles = _block_output_hooks(model, outputs)
                    output = model(x_in)
            finally:
                for h in handles:
                    h.remove()
            explained = _explained(spec.name, target, output, len(x), model)
            calls = trace.attention_calls()
            unread = unread_attention(model)
            if unread and not calls:
                raise ValueError(
                    f"{spec.name} needs a vision transformer's self-attention that a probe reads; "
                    f"no probe reads this network's {', '.join(unread)} (register_attention)"
                )
            if spec.name == "rollout":
                cam = rollout(
                    [rec for *_, rec in calls], head_fusion=options.get("head_fusion", "mean"),
                    discard=float(options.get("discard", 0.0)),
                    start=int(options.get("start_block", 0)),
                )  # fmt: skip
            elif spec.name == "gae":
                cam = gae(calls, explained.scores.sum())
            else:
                if layout is None or layout.score is None:
                    raise ValueError(
                        "legrad needs a timm or torchvision ViT (its final norm and head)"
                    )
                cam = legrad(calls, outputs, _block_score(layout.score, explained, target))
    if settings.progress is not None:
        settings.progress(len(x), len(x))
    return analysis_of(trace, output, explained, {spec.name: cam}, spec.name, {spec.name: 0}, ())


def _block_score(head: Callable[[Tensor], Tensor], explained: Explained, target):
    """LeGrad's score of a block's tokens, through the final norm and head: the class's logit,
    or the callable target on that (N, D) output (a concept's likeness: an embedding network's
    head is the identity). A segment or a box is of an output no block gives."""
    classes = explained.classes
    if classes is not None:
        return lambda tokens: head(tokens).gather(1, classes[:, None])[:, 0]
    if callable(target) and not isinstance(target, (SegmentationScore, BoxScore)):
        return lambda tokens: target(head(tokens))
    raise ValueError(
        f"legrad scores every block through the network's final norm and head; it cannot "
        f"explain {explained.text}: use gae or gradcam"
    )


def _explained(method: str, target, output, n: int, model: nn.Module) -> Explained:
    """What the map explains; rollout explains nothing (it reads attention alone), so a
    network whose output is not class logits needs no target for it."""
    try:
        return explained_by(target, output, n, model)
    except NoTargetError:
        if method != "rollout":
            raise
        return nothing_explained(n)


def _block_output_hooks(model: nn.Module, outputs: list[Tensor]) -> list:
    """Forward hooks that keep the output of each self-attention module's enclosing block."""
    names = [n for n, m in attention_modules(model) if find_probe(m).reader is not None]
    blocks = [model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model for n in names]
    return [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in blocks]


# --- FullGrad ---------------------------------------------------------------------------------


def bias_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every 2-D convolution with a bias and every 2-D batch norm: FullGrad's bias terms."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) or (isinstance(m, nn.Conv2d) and m.bias is not None)
    }  # fmt: skip


def _effective_bias(m: nn.Module) -> Tensor:
    """The bias a layer adds: a batch norm's, with its running statistics folded in."""
    if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
        weight = m.weight if m.weight is not None else torch.ones_like(m.running_mean)
        bias = m.bias if m.bias is not None else torch.zeros_like(m.running_mean)
        return (bias - m.running_mean * weight / torch.sqrt(m.running_var + m.eps)).detach()
    bias = getattr(m, "bias", None)
    return bias.detach() if bias is not None else torch.zeros(m.num_features)


def _scaled_per_channel(t: Tensor) -> Tensor:
    """(N, C, h, w), each map minus its minimum over its maximum (pytorch-grad-cam's scaling)."""
    flat = t.flatten(2)
    flat = flat - flat.min(2, keepdim=True).values
    return (flat / (1e-7 + flat.max(2, keepdim=True).values)).view_as(t)


def fullgrad_map(
    x: Tensor, run: ForwardBackward, layers: dict[str, nn.Module], eigen_smooth: bool
) -> Tensor:
    """Srinivas & Fleuret, NeurIPS 2019: |input x its gradient| plus, at every bias layer,
    |bias x gradient| scaled per channel, summed, upsampled to the input (as pytorch-grad-cam)."""
    size = tuple(x.shape[-2:])
    parts = [_scaled_per_channel((run.input_grad * x.detach()).abs())]
    for name, grad in run.grads.items():
        bias = _effective_bias(layers[name]).to(grad.dtype)
        layer_sum = _scaled_per_channel((bias[None, :, None, None] * grad).abs()).sum(1)
        if tuple(layer_sum.shape[-2:]) != size:  # upsampling is linear: sum first, then resize
            layer_sum = F.interpolate(layer_sum[:, None], size=size, mode="bilinear",
                                      align_corners=False)[:, 0]  # fmt: skip
        parts.append(layer_sum[:, None])
    stacked = torch.cat(parts, 1)
    return first_component(stacked) if eigen_smooth else stacked.sum(1)
