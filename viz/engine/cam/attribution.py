"""Input-resolution attributions through Captum: guided Grad-CAM, integrated gradients, occlusion."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from viz.engine.cam.layers import resolve_layers, stage_layers
from viz.engine.cam.targets import resolve_targets
from viz.engine.model_state import model_lock, preserve_model_state

__all__ = ["ATTRIBUTION_METHODS", "attribute"]

ATTRIBUTION_METHODS = ("guided-gradcam", "integrated-gradients", "occlusion")


def attribute(
    model: nn.Module,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    method: str = "guided-gradcam",
    layer: str | None = None,
    steps: int = 32,
    window: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Input-resolution attributions through Captum, summed over colour channels: (N, H, W).

    `progress(done, total)` is called after every forward pass with the images run so far and
    the number the method needs (counted by a forward hook on the model, removed afterwards).

    Costs (passes through the network):
        - "guided-gradcam": Grad-CAM at `layer` (default the last stage layer) times guided
          backprop: 2 forwards + 2 backwards.
        - "integrated-gradients": `steps` forwards and backwards (batched by Captum).
        - "occlusion": one forward per occluded window position: about (H/stride)*(W/stride)
          forwards, stride = window/2.
    """

    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"method must be one of {list(ATTRIBUTION_METHODS)}, got {method!r}")
    n, _, h, w = x.shape
    stride = max(1, window // 2)
    windows = (max(0, h - window) // stride + 1) * (max(0, w - window) // stride + 1)
    total = n * {"guided-gradcam": 3, "integrated-gradients": 1 + steps,
                 "occlusion": 2 + windows}[method]  # fmt: skip
    seen = [0]

    def count(_module, _inputs, output) -> None:
        seen[0] += output.shape[0] if isinstance(output, Tensor) else 0
        progress(min(seen[0], total), total)

    # Captum hooks the model's ReLUs (guided backprop): one user of a shared model at a time
    with model_lock(model):
        handle = model.register_forward_hook(count) if progress else None
        try:
            return _attribute(model, x, target, method, layer, steps, window, stride)
        finally:
            if handle is not None:
                handle.remove()


def _attribute(model, x, target, method, layer, steps, window, stride) -> Tensor:
    from captum.attr import GuidedGradCam, IntegratedGradients, Occlusion

    with preserve_model_state(model):
        with torch.no_grad():
            targets = resolve_targets(target, model(x)).tolist()
        if method == "guided-gradcam":
            layer = layer or stage_layers(model)[-1]
            module = resolve_layers(model, [layer])[layer]
            attr = GuidedGradCam(model, module).attribute(x, target=targets)
        elif method == "integrated-gradients":
            attr = IntegratedGradients(model).attribute(
                x, target=targets, n_steps=steps, internal_batch_size=max(1, steps)
            )
        else:
            attr = Occlusion(model).attribute(
                x, target=targets, sliding_window_shapes=(x.shape[1], window, window),
                strides=(x.shape[1], stride, stride),
            )  # fmt: skip
    return attr.detach().sum(1)
