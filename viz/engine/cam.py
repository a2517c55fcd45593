"""CAM methods, computed together with the attention trace from one forward and one backward.

`analyze` runs one forward and one backward for everything: the attention maps of every module
(read by `record_attention` during the forward) and a class activation map at every requested
layer (default: the stage layers that `viz.engine.levels` finds in any network). Gradients are taken
with `torch.autograd.grad` on the layers' output tensors (no module backward hooks), and the
parameters need no gradients, so the backward stops at the earliest requested layer.

Every CAM method is a weight function `(activations, gradients) -> map`, both (N, C, h, w), in
the `CAM_METHODS` registry; a new method is one function and one `register_cam_method` call:

- "gradcam": Selvaraju et al., ICCV 2017 (https://arxiv.org/abs/1610.02391)
- "gradcam++": Chattopadhyay et al., WACV 2018 (https://arxiv.org/abs/1710.11063)
- "hirescam": Draelos & Carin, 2020 (https://arxiv.org/abs/2011.08891)
- "xgradcam": Fu et al., BMVC 2020 (https://arxiv.org/abs/2008.02312)
- "layercam": Jiang et al., IEEE TIP 2021 (https://doi.org/10.1109/TIP.2021.3089943)
- "gradcamelementwise": pytorch-grad-cam's variant, sum over channels of relu(dY/dA * A)
- "eigencam": Muhammad & Yeasin, IJCNN 2020 (https://arxiv.org/abs/2008.00299): the first
  principal component of the centred activations, no gradient; its sign is chosen so that it
  correlates positively with the activations' channel mean (pytorch-grad-cam leaves the sign
  to the SVD routine, so its maps can come out inverted)
- "eigengradcam": pytorch-grad-cam's variant, the same on dY/dA * A

Input-resolution attributions that cost more passes come from Captum in `attribute`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from viz.engine.levels import NetworkLevels, fallback_stage, network_levels, stride_of
from viz.engine.state import model_lock, preserve_model_state
from viz.engine.trace import AttentionTrace, model_modules, record_attention

__all__ = [
    "Analysis",
    "CamMethod",
    "analyze",
    "attribute",
    "register_cam_method",
    "resolve_layers",
    "resolve_targets",
    "stage_layers",
    "DEFAULT_CAM_LAYERS",
    "CAM_METHODS",
    "ATTRIBUTION_METHODS",
]

DEFAULT_CAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")
"""The stage layers `analyze` finds in Attention Lens's own ResNets (kept for reference)."""
ATTRIBUTION_METHODS = ("guided-gradcam", "integrated-gradients", "occlusion")


@dataclass(frozen=True)
class CamMethod:
    """One CAM method: `weigh(acts, grads)` -> (N, h, w) map, ReLU applied, not normalised."""

    name: str
    label: str
    weigh: Callable[[Tensor, Tensor], Tensor]
    paper: str = ""


CAM_METHODS: dict[str, CamMethod] = {}


def register_cam_method(
    name: str, weigh: Callable[[Tensor, Tensor], Tensor], *, label: str = "", paper: str = ""
) -> CamMethod:
    """Add a CAM method computed from one layer's activations and gradients (N, C, h, w)."""
    method = CamMethod(name, label or name, weigh, paper)
    CAM_METHODS[name] = method
    return method


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


def _hirescam(acts: Tensor, grads: Tensor) -> Tensor:
    # element-wise gradient x activation: no spatial averaging of the gradients
    return torch.relu((grads * acts).sum(1))


def _xgradcam(acts: Tensor, grads: Tensor) -> Tensor:
    # axiom-derived weights: sum(A * dY/dA) / sum(A), per channel
    weights = (grads * acts).sum((2, 3), keepdim=True) / (acts.sum((2, 3), keepdim=True) + 1e-7)
    return torch.relu((weights * acts).sum(1))


def _layercam(acts: Tensor, grads: Tensor) -> Tensor:
    # positive gradients weigh each location separately
    return torch.relu((torch.relu(grads) * acts).sum(1))


def _gradcam_elementwise(acts: Tensor, grads: Tensor) -> Tensor:
    # HiResCAM with the ReLU inside the channel sum: only positive contributions add up
    return torch.relu(grads * acts).sum(1)


def _first_component(values: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h, w): the locations projected on the first principal component of
    their centred channel vectors, signed to correlate positively with the channel mean."""
    n, c, h, w = values.shape
    rows = values.detach().double().flatten(2).transpose(1, 2)  # (N, hw, C)
    centred = rows - rows.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None])[..., 0]  # (N, hw)
    # the SVD leaves the sign free; pytorch-grad-cam keeps whatever the routine returns
    mean = rows.mean(2)
    agree = (
        (projection - projection.mean(1, keepdim=True)) * (mean - mean.mean(1, keepdim=True))
    ).sum(1)
    sign = torch.where(agree < 0, -1.0, 1.0).to(projection)
    return (projection * sign[:, None]).view(n, h, w).to(values.dtype)


def _eigencam(acts: Tensor, grads: Tensor) -> Tensor:
    return torch.relu(_first_component(acts))  # activations only: no class, no gradient


def _eigengradcam(acts: Tensor, grads: Tensor) -> Tensor:
    return torch.relu(_first_component(grads * acts))


register_cam_method("gradcam", _gradcam, label="Grad-CAM", paper="arXiv:1610.02391")
register_cam_method("gradcam++", _gradcam_pp, label="Grad-CAM++", paper="arXiv:1710.11063")
register_cam_method("hirescam", _hirescam, label="HiResCAM", paper="arXiv:2011.08891")
register_cam_method("xgradcam", _xgradcam, label="XGrad-CAM", paper="arXiv:2008.02312")
register_cam_method("layercam", _layercam, label="LayerCAM", paper="doi:10.1109/TIP.2021.3089943")
register_cam_method("gradcamelementwise", _gradcam_elementwise, label="Grad-CAM element-wise",
                    paper="pytorch-grad-cam (Gildenblat et al.)")  # fmt: skip
register_cam_method("eigencam", _eigencam, label="Eigen-CAM", paper="arXiv:2008.00299")
register_cam_method("eigengradcam", _eigengradcam, label="EigenGrad-CAM",
                    paper="pytorch-grad-cam (Gildenblat et al.)")  # fmt: skip


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
        cam_stages: layer name -> resolution level (stage) of its map, as the trace's stages.
    """

    logits: Tensor
    probs: Tensor
    target: Tensor
    trace: AttentionTrace
    cams: dict[str, Tensor]
    method: str = "gradcam"
    cam_stages: dict[str, int] = field(default_factory=dict)

    @property
    def target_probs(self) -> Tensor:
        """(N,) softmax score of each image's target class (the 'P' of the CBAM paper's figure)."""
        return self.probs.gather(1, self.target[:, None])[:, 0]

    @property
    def method_label(self) -> str:
        """The method's display name, e.g. "Grad-CAM++"."""
        method = CAM_METHODS.get(self.method)
        return method.label if method else self.method

    def stage_cams(self) -> dict[int, str]:
        """Stage -> the name of the (last requested) CAM layer at that stage."""
        by_stage: dict[int, str] = {}
        for name in self.cams:
            if name in self.cam_stages:
                by_stage[self.cam_stages[name]] = name
        return dict(sorted(by_stage.items()))

    def select(self, index: int) -> Analysis:
        """The analysis of image `index` (batch dimension kept, size 1)."""
        pick = slice(index, index + 1)
        return Analysis(
            self.logits[pick], self.probs[pick], self.target[pick], self.trace.select(index),
            {k: v[pick] for k, v in self.cams.items()}, self.method, dict(self.cam_stages),
        )  # fmt: skip


def stage_layers(model: nn.Module) -> list[str]:
    """The default CAM layers of `model`: the last module at each of its four deepest levels.

    `layer1`..`layer4` for ResNets; found by a shape probe for any network (`viz.engine.levels`).

    Raises:
        ValueError: the network could not be probed (give the layers by name).
    """
    return network_levels(model).stage_layer_names()


def resolve_layers(model: nn.Module, layers: Sequence[str | nn.Module]) -> dict[str, nn.Module]:
    """Map dotted names (or modules of `model`) to (name, module); a wrong one gets a ValueError."""
    found = {}
    named: dict[str, nn.Module] = {}
    for layer in layers:
        if isinstance(layer, str) and layer:
            try:  # no walk of the whole model for the common case
                found[layer] = model.get_submodule(layer)
                continue
            except AttributeError:
                pass
        modules = named = named or dict(model.named_modules())
        if isinstance(layer, nn.Module):
            name = next((n for n, m in modules.items() if m is layer and n), None)
            if name is None:
                raise ValueError(f"the {type(layer).__name__} given as a layer is not in the model")
            found[name] = layer
            continue
        if layer not in modules or layer == "":
            # list the names a user would pick: stages and blocks, not every conv
            shown = [n for n in modules if n and n.count(".") <= 1 and not n.startswith("fc")]
            raise ValueError(
                f"unknown layer {layer!r}; valid layers include: {', '.join(shown[:40])} "
                "(or any dotted submodule name)"
            )
        found[layer] = modules[layer]
    return found


def resolve_targets(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
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


def _cam_stage(levels: NetworkLevels | None, input_size: int, map_size: int) -> int:
    stride = stride_of(input_size, map_size)
    return fallback_stage(stride) if levels is None else levels.stage_of(stride)


def analyze(
    model: nn.Module,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    cam_layers: Sequence[str | nn.Module] | None = None,
    *,
    method: str = "gradcam",
) -> Analysis:
    """Attention maps of every module and a CAM at each layer, from one forward and one backward.

    Args:
        model: any network (left with its `training` flags and `requires_grad` as they were).
        x: images (N, C, H, W), preprocessed.
        target: class to explain: an int for all images, one per image, or None for the argmax.
        cam_layers: dotted module names or modules; default the network's stage layers
            (`stage_layers`: `layer1`…`layer4` for a ResNet).
        method: a name in `CAM_METHODS` (all from the same gradients: no extra pass).

    Returns:
        An `Analysis`; `cams[name]` is (N, h, w) at the layer's own resolution.

    Cost: 1 forward + 1 backward that runs from the logits down to the earliest requested layer,
    without parameter gradients.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {list(CAM_METHODS)}, got {method!r}")
    acts: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_m, _i, out: Tensor) -> Tensor | None:
            if not isinstance(out, Tensor) or out.ndim != 4:
                raise ValueError(f"CAM layer {name!r} does not output an (N, C, h, w) tensor")
            if not out.requires_grad:
                # nothing upstream needs gradients: start the graph here
                out = out.detach().requires_grad_()
                acts[name] = out
                return out
            acts[name] = out
            return None

        return hook

    with model_lock(model):
        modules = model_modules(model)  # one walk for the caches, the flags and the freeze
        try:
            levels = network_levels(model, len(modules))
        except ValueError:
            if cam_layers is None:
                raise
            levels = None  # stages of the given layers from their stride alone
        if cam_layers is None:
            cam_layers = levels.stage_layer_names()
        layers = resolve_layers(model, cam_layers)
        handles = []
        with preserve_model_state(model, eval_mode=False, freeze=True, modules=modules):
            try:
                with torch.enable_grad():  # also when the caller is inside torch.no_grad()
                    with record_attention(model, feature_means=True, modules=modules) as trace:
                        handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
                        logits = model(x)
                    for h in handles:
                        h.remove()
                    targets = resolve_targets(target, logits)
                    score = logits.gather(1, targets[:, None]).sum()
                    grads = torch.autograd.grad(score, list(acts.values()), allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
    weigh = CAM_METHODS[method].weigh
    cams, cam_stages = {}, {}
    for (name, act), grad in zip(acts.items(), grads):
        if grad is None:  # the layer does not influence the logits
            grad = torch.zeros_like(act)
        cams[name] = weigh(act.detach(), grad)
        cam_stages[name] = _cam_stage(levels, x.shape[-2], act.shape[-2])
    logits = logits.detach()
    return Analysis(logits, logits.softmax(1), targets, trace, cams, method, cam_stages)


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
