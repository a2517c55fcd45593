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

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.probes import find_probe
from viz.engine.levels import NetworkLevels, fallback_stage, network_levels, stride_of
from viz.engine.maps import normalize
from viz.engine.passes import NUM_SAMPLES, PASS_WEIGHTS, PassContext, planned_passes
from viz.engine.state import model_lock, preserve_model_state
from viz.engine.tokens import as_feature_map, token_layout
from viz.engine.trace import AttentionTrace, attention_modules, model_modules, record_attention
from viz.engine.transformer import gae, legrad, rollout
from viz.engine.unread import unread_attention, warn_unread_attention

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
    "SMOOTHINGS",
    "smoothings_for",
    "settings_error",
]

DEFAULT_CAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")
"""The stage layers `analyze` finds in Attention Lens's own ResNets (kept for reference)."""
ATTRIBUTION_METHODS = ("guided-gradcam", "integrated-gradients", "occlusion")


SMOOTHINGS = ("aug", "eigen")
"""`analyze`'s smoothing options: test-time augmentation, first principal component."""
NEEDS = ("gradients", "activations", "classifier", "passes", "network", "attention")
"""What a CAM method needs, cheapest first: the shared backward's gradients at the layer; the
layer's activations only; those and the classifier's weights; extra passes of its own
(`viz.engine.passes`); every bias layer's gradient and the input's (one map for the network);
a transformer's self-attention (`viz.engine.transformer`: one map for the network)."""


@dataclass(frozen=True)
class CamMethod:
    """One CAM method.

    Attributes:
        name, label: registry key and display name ("scorecam", "Score-CAM").
        needs: one of `NEEDS`.
        contributions: (acts, grads) -> (N, C, h, w) weighted activations, summed over channels
            for the map; None for the methods that weigh channels with extra passes or the
            classifier (their contributions are weights x activations).
        project: the map is the first principal component of the contributions (Eigen-CAM).
        relu: ReLU on the map (all but CAM, which keeps negative evidence as Zhou et al.).
        cost: passes through the network, for the docs ("1 forward + 1 backward").
        peer: the implementation its maps equal, if any.
        default_layers: "stages" (one layer per stage) or "last" (the last stage's only) when
            `analyze` is given no layers.
    """

    name: str
    label: str
    needs: str = "gradients"
    contributions: Callable[[Tensor, Tensor], Tensor] | None = None
    paper: str = ""
    project: bool = False
    relu: bool = True
    cost: str = "1 forward + 1 backward"
    peer: str = ""
    default_layers: str = "stages"
    channel_weights: Callable[[PassContext], Tensor] | None = None

    def weigh(
        self, acts: Tensor, grads: Tensor | None, *, weights: Tensor | None = None,
        eigen_smooth: bool = False,
    ) -> Tensor:  # fmt: skip
        """(N, h, w) map from a layer's activations and gradients, or per-channel `weights`
        (N, C) for the pass and classifier methods; `eigen_smooth`: the first principal
        component of the contributions instead of their sum (pytorch-grad-cam's option)."""
        if weights is not None:
            parts = weights[:, :, None, None].to(acts.dtype) * acts
        elif self.contributions is not None:
            parts = self.contributions(acts, grads)
        else:
            raise ValueError(f"{self.label} weighs channels with extra passes: use analyze")
        if parts.ndim == 3:  # a user's method that returns the map itself
            m = parts
        else:
            m = _first_component(parts) if self.project or eigen_smooth else parts.sum(1)
        return torch.relu(m) if self.relu else m


CAM_METHODS: dict[str, CamMethod] = {}


def register_cam_method(
    name: str,
    weigh: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    contributions: Callable[[Tensor, Tensor], Tensor] | None = None,
    label: str = "",
    paper: str = "",
    needs: str = "gradients",
    **details,
) -> CamMethod:
    """Add a CAM method computed from one layer's activations and gradients (N, C, h, w).

    Give either `weigh(acts, grads) -> (N, h, w)` map (ReLU is applied to it), or
    `contributions(acts, grads) -> (N, C, h, w)`, summed over channels (then `eigen_smooth`
    works too). `needs` is "gradients" or "activations" (then `grads` is None and the backward
    is skipped when no other method needs it). `details`: other `CamMethod` fields.
    """
    own_computation = ("passes", "classifier", "network", "attention")
    if (weigh is None) == (contributions is None) and needs not in own_computation:
        raise ValueError("give one of weigh or contributions")
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {', '.join(NEEDS)}, got {needs!r}")
    method = CamMethod(name, label or name, needs, contributions or weigh, paper, **details)
    CAM_METHODS[name] = method
    return method


def _gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    return grads.mean((2, 3), keepdim=True) * acts


def _gradcam_pp(acts: Tensor, grads: Tensor) -> Tensor:
    g2 = grads.pow(2)
    g3 = g2 * grads
    denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alpha * torch.relu(grads)).sum((2, 3), keepdim=True)
    return weights * acts


def _hirescam(acts: Tensor, grads: Tensor) -> Tensor:
    # element-wise gradient x activation: no spatial averaging of the gradients
    return grads * acts


def _xgradcam(acts: Tensor, grads: Tensor) -> Tensor:
    # axiom-derived weights: sum(A * dY/dA) / sum(A), per channel
    weights = (grads * acts).sum((2, 3), keepdim=True) / (acts.sum((2, 3), keepdim=True) + 1e-7)
    return weights * acts


def _layercam(acts: Tensor, grads: Tensor) -> Tensor:
    # positive gradients weigh each location separately
    return torch.relu(grads) * acts


def _gradcam_elementwise(acts: Tensor, grads: Tensor) -> Tensor:
    # HiResCAM with the ReLU inside the channel sum: only positive contributions add up
    return torch.relu(grads * acts)


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


def _activations(acts: Tensor, grads: Tensor | None) -> Tensor:
    return acts  # Eigen-CAM: no class, no gradient


def _grads_times_acts(acts: Tensor, grads: Tensor) -> Tensor:
    return grads * acts


_PGC = "pytorch-grad-cam 1.5"


def _register_builtins() -> None:
    def add(name, contributions, label, paper, **more):
        register_cam_method(name, contributions=contributions, label=label, paper=paper, **more)

    add("gradcam", _gradcam, "Grad-CAM", "arXiv:1610.02391", peer=_PGC)
    add("gradcam++", _gradcam_pp, "Grad-CAM++", "arXiv:1710.11063", peer=_PGC)
    add("hirescam", _hirescam, "HiResCAM", "arXiv:2011.08891", peer=_PGC)
    add("xgradcam", _xgradcam, "XGrad-CAM", "arXiv:2008.02312", peer=_PGC)
    add("layercam", _layercam, "LayerCAM", "doi:10.1109/TIP.2021.3089943", peer=_PGC)
    add("gradcamelementwise", _gradcam_elementwise, "Grad-CAM element-wise",
        "pytorch-grad-cam (Gildenblat et al.)", peer=_PGC)  # fmt: skip
    add("eigencam", _activations, "Eigen-CAM", "arXiv:2008.00299", needs="activations",
        project=True, cost="1 forward", peer=_PGC + " (up to the SVD's sign)")  # fmt: skip
    add("eigengradcam", _grads_times_acts, "EigenGrad-CAM", "pytorch-grad-cam (Gildenblat et al.)",
        project=True, peer=_PGC + " (up to the SVD's sign)")  # fmt: skip
    register_cam_method("cam", label="CAM", paper="arXiv:1512.04150", needs="classifier",
                        relu=False, cost="1 forward", peer="TorchCAM 0.5",
                        default_layers="last")  # fmt: skip
    # C full forwards per layer: by default at the last stage only (all four: ~2x the passes)
    for name, label, paper, cost, peer, layers in (
        ("scorecam", "Score-CAM", "arXiv:2003.06871", "1 forward + C forwards", _PGC, "last"),
        ("sscam", "SS-CAM", "arXiv:2006.14255", "1 forward + 35 C forwards (num_samples)", "",
         "last"),
        ("iscam", "IS-CAM", "arXiv:2010.03023", "1 forward + 10 C forwards (num_samples)",
         "TorchCAM 0.5", "last"),
        ("ablationcam", "Ablation-CAM", "doi:10.1109/WACV45572.2020.9093360",
         "1 forward + C forwards of the layers after the layer", _PGC, "stages"),
        ("smoothgradcam++", "SmoothGrad-CAM++", "arXiv:1908.01224",
         "1 forward + 4 forwards + 4 backwards (num_samples)", "", "stages"),
    ):  # fmt: skip
        register_cam_method(name, label=label, paper=paper, needs="passes", cost=cost, peer=peer,
                            channel_weights=PASS_WEIGHTS[name], default_layers=layers)  # fmt: skip
    register_cam_method("fullgrad", label="FullGrad", paper="arXiv:1905.00780", needs="network",
                        cost="1 forward + 1 backward to the input", peer=_PGC)  # fmt: skip
    register_cam_method("rollout", label="attention rollout", paper="arXiv:2005.00928",
                        needs="attention", cost="1 forward", relu=False)  # fmt: skip
    register_cam_method("gae", label="GAE (Chefer et al.)", paper="arXiv:2103.15679",
                        needs="attention", cost="1 forward + 1 backward to the input")  # fmt: skip
    register_cam_method("legrad", label="LeGrad", paper="arXiv:2404.03214", needs="attention",
                        cost="1 forward + 1 short backward per block",
                        peer="TorchCAM 0.5 LeGrad")  # fmt: skip


_register_builtins()


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
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    smoothing: Sequence[str] = (),
    options: dict | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Attention maps of every module and a CAM at each layer, from one forward and one backward.

    Args:
        model: any network (left with its `training` flags and `requires_grad` as they were).
        x: images (N, C, H, W), preprocessed.
        target: class to explain: an int for all images, one per image, or None for the argmax.
        cam_layers: dotted module names or modules; default the network's stage layers
            (`stage_layers`: `layer1`…`layer4` for a ResNet), the last one for "cam" and for
            the methods with C full forwards per layer ("scorecam", "sscam", "iscam").
        method: a name in `CAM_METHODS`; `CAM_METHODS[method].needs` says what it costs.
        aug_smooth: the mean of the maps of six versions of the images (mirrored or not, times
            0.9, 1 and 1.1), each mirrored back and min-max scaled, as pytorch-grad-cam's
            test-time augmentation; run as one batch of 6 N images (the trace and logits are
            those of the images as given).
        eigen_smooth: each map is the first principal component of the method's weighted
            activations instead of their channel sum (pytorch-grad-cam's option).
        smoothing: the same two as names, e.g. ("aug", "eigen") (`SMOOTHINGS`).
        options: method options: `num_samples`, `std` (SS-CAM, IS-CAM, SmoothGrad-CAM++),
            `batch_size` of the extra passes (default: from a memory budget); rollout's
            `head_fusion` ("mean", "max", "min"), `discard` (fraction of the smallest fused
            entries set to zero) and `start_block`.
        seed: seed of the noise of SS-CAM and SmoothGrad-CAM++ (same seed, same maps).
        progress: `progress(done, total)` in images through the network, after the main pass
            and after every batch of extra passes.

    Returns:
        An `Analysis`; `cams[name]` is (N, h, w) at the layer's own resolution; FullGrad gives
        one map, `cams["fullgrad"]`, at the input's resolution (stage 0); the transformer
        methods (rollout, gae, legrad) one map on the patch grid, `cams[method]` (stage 0).
        Token layers (a ViT's (N, T, C), Swin's (N, H, W, C)) are put on their grid first,
        prefix tokens dropped (`viz.engine.tokens`).

    Warns:
        UnreadAttentionWarning: the network has attention modules that no probe reads
            (`viz.engine.unread`): one line naming their classes.

    Cost: 1 forward + 1 backward that runs from the logits down to the earliest requested layer,
    without parameter gradients, shared by every gradient method; no backward for the methods
    that need activations only; the pass methods add their own passes (`CamMethod.cost`).
    """
    spec = CAM_METHODS.get(method)
    if spec is None:
        raise ValueError(f"method must be one of {list(CAM_METHODS)}, got {method!r}")
    if isinstance(smoothing, str):  # one name, not its letters
        smoothing = (smoothing,)
    aug_smooth, eigen_smooth = (
        aug_smooth or "aug" in smoothing,
        eigen_smooth or "eigen" in smoothing,
    )
    options = checked_options(options)
    eigen = ["eigen"] if eigen_smooth else []
    problem = settings_error(method, [*smoothing, *eigen], options)
    if problem:
        raise ValueError(problem)
    settings = _Settings(spec, eigen_smooth, options, seed, progress)
    warn_unread_attention(model)  # attention no probe reads: said once per call, in one line
    if aug_smooth:
        return _augmentation_smoothed(model, x, target, cam_layers, settings)
    return _analyze(model, x, target, cam_layers, settings)


def smoothings_for(method: str) -> tuple[str, ...]:
    """The smoothings that change `method`'s maps: "aug" for all; "eigen" not for Eigen-CAM
    and EigenGrad-CAM (a principal component already) nor rollout, GAE, LeGrad (no channels)."""
    spec = CAM_METHODS[method]
    eigen = not spec.project and spec.needs != "attention"
    return tuple(s for s in SMOOTHINGS if s != "eigen" or eigen)


def settings_error(
    method: str, smoothing: Sequence[str] = (), options: dict | None = None
) -> str | None:
    """Why `smoothing` (names) or `options` do not apply to `method`, in one line; None if they
    do. A setting that would change nothing (eigen smoothing of a principal component, a
    noisy-sample count for a method without noise) is an error, not a silent record."""
    unknown = sorted(set(smoothing) - set(SMOOTHINGS))
    if unknown:
        return f"smoothing must be among {', '.join(SMOOTHINGS)}, got {unknown}"
    label = CAM_METHODS[method].label
    if set(smoothing) - set(smoothings_for(method)):
        return (
            f"{label} takes no eigen smoothing: its map is a principal component already, or "
            "it has no channels to take one of"
        )
    if "num_samples" in (options or {}) and method not in NUM_SAMPLES:
        return f"num_samples applies to {', '.join(NUM_SAMPLES)} only, not to {label}"
    return None


def _checked_by_rollout(_value: object) -> bool:
    return True  # `rollout` checks its own arguments (head_fusion, discard, start_block)


_OPTION_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "num_samples": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1"),
    "std": (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, "a number >= 0"),
    "head_fusion": (_checked_by_rollout, ""),
    "discard": (_checked_by_rollout, ""),
    "start_block": (_checked_by_rollout, ""),
}


def checked_options(options: dict | None) -> dict:
    """The method options, each known and valid (a typo must not silently run the defaults)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTION_CHECKS))
    if unknown:
        raise ValueError(f"unknown method option(s) {unknown}; known: {', '.join(_OPTION_CHECKS)}")
    for name, value in options.items():
        valid, wanted = _OPTION_CHECKS[name]
        if isinstance(value, bool) or not valid(value):
            raise ValueError(f"option {name} must be {wanted}, got {value!r}")
    return options


@dataclass(frozen=True)
class _Settings:
    spec: CamMethod
    eigen_smooth: bool
    options: dict
    seed: int
    progress: Callable[[int, int], None] | None

    @property
    def smoothing(self) -> tuple[str, ...]:
        return ("eigen",) if self.eigen_smooth else ()


@dataclass
class _Pass:
    """What the forward and backward gave."""

    trace: AttentionTrace
    logits: Tensor
    targets: Tensor
    acts: dict[str, Tensor]
    grads: dict[str, Tensor]
    input_grad: Tensor | None = None


def _analyze(model, x, target, cam_layers, settings: _Settings) -> Analysis:
    spec = settings.spec
    with model_lock(model):
        modules = model_modules(model)  # one walk for the caches, the flags and the freeze
        if spec.needs == "attention":
            return _transformer_analysis(model, x, target, settings, modules)
        try:
            levels = network_levels(model, len(modules))
        except ValueError:
            if cam_layers is None and spec.needs != "network":
                raise
            levels = None  # stages of the given layers from their stride alone
        if spec.needs == "network":
            layers = _bias_layers(model)
        else:
            if cam_layers is None:
                stages = levels.stage_layer_names()
                cam_layers = stages[-1:] if spec.default_layers == "last" else stages
            layers = resolve_layers(model, cam_layers)
            if spec.name == "ablationcam" and token_layout(model) is not None:
                raise ValueError(
                    f"{spec.label} replaces a CNN layer's feature maps; on a transformer use "
                    "scorecam or gradcam"
                )
        with preserve_model_state(model, eval_mode=False, freeze=True, modules=modules):
            run = _forward_backward(model, x, target, layers, modules, spec.needs)
            counter = _Counter(settings.progress, len(x))
            if spec.needs == "passes":
                counter.total += sum(
                    planned_passes(spec.name, a, settings.options) for a in run.acts.values()
                )
            counter.add(len(x))
            if spec.needs == "network":
                cams = {"fullgrad": _fullgrad(x, run, layers, settings.eigen_smooth)}
                stages = {"fullgrad": 0}
            else:
                cams = _layer_maps(model, x, layers, run, settings, counter)
                stages = {
                    n: _cam_stage(levels, x.shape[-2], a.shape[-2]) for n, a in run.acts.items()
                }
    logits = run.logits.detach()
    return Analysis(logits, logits.softmax(1), run.targets, run.trace, cams, spec.name, stages,
                    settings.smoothing)  # fmt: skip


class _Counter:
    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def _forward_backward(model, x, target, layers: dict[str, nn.Module], modules, needs: str) -> _Pass:
    """The traced forward with the layers' outputs kept, and the backward the method needs."""
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    network = needs == "network"

    def keep(name: str):
        def hook(_m, _i, out: Tensor) -> Tensor | None:
            if not isinstance(out, Tensor) or out.ndim not in (3, 4) or (network and out.ndim != 4):
                raise ValueError(
                    f"CAM layer {name!r} outputs neither an (N, C, h, w) map nor (N, T, C) tokens"
                )
            if network:  # the gradient of this value, even if later changed in place
                if out.requires_grad:
                    out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
                return None
            if not out.requires_grad:
                # nothing upstream needs gradients: start the graph here
                out = out.detach().requires_grad_()
                acts[name] = out
                return out
            acts[name] = out
            return None

        return hook

    x_in = x.detach().requires_grad_() if network else x
    handles = []
    with torch.enable_grad():  # also when the caller is inside torch.no_grad()
        try:
            with record_attention(model, feature_means=True, modules=modules) as trace:
                handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
                logits = model(x_in)
        finally:
            for h in handles:
                h.remove()
        targets = resolve_targets(target, logits)
        score = logits.gather(1, targets[:, None]).sum()
        run = _Pass(trace, logits, targets, {n: a.detach() for n, a in acts.items()}, grads)
        if network:
            (run.input_grad,) = torch.autograd.grad(score, [x_in])
        elif needs == "gradients" and acts:
            found = torch.autograd.grad(score, list(acts.values()), allow_unused=True)
            for (name, act), grad in zip(acts.items(), found):
                # None: the layer does not influence the logits
                grads[name] = torch.zeros_like(act) if grad is None else grad
    if not network:  # token layers onto their patch grid (ViT tokens, Swin's channels-last)
        layout, hw = token_layout(model), (x.shape[-2], x.shape[-1])
        run.acts = {n: as_feature_map(a, layout, hw, n) for n, a in run.acts.items()}
        run.grads = {n: as_feature_map(g, layout, hw, n) for n, g in grads.items()}
    return run


def _layer_maps(model, x, layers, run: _Pass, settings: _Settings, counter: _Counter) -> dict:
    spec, cams = settings.spec, {}
    generator = torch.Generator().manual_seed(settings.seed)
    for name, act in run.acts.items():
        weights = None
        if spec.needs == "classifier":
            weights = _classifier_weights(model, name, act, run.logits.detach(), run.targets)
        elif spec.needs == "passes":
            context = PassContext(
                model, x.detach(), layers[name], act, run.targets,
                run.logits.detach().gather(1, run.targets[:, None])[:, 0], settings.options,
                generator, counter.add,
            )  # fmt: skip
            weights = spec.channel_weights(context)
        cams[name] = spec.weigh(
            act, run.grads.get(name), weights=weights, eigen_smooth=settings.eigen_smooth
        )
    return cams


def _classifier_weights(model, name: str, acts: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    """CAM's class weights: the linear layer that maps the layer's pooled output to the logits."""
    pooled = acts.float().mean((2, 3))
    for fc in reversed([m for m in model.modules() if isinstance(m, nn.Linear)]):
        if fc.in_features != acts.shape[1] or fc.out_features != logits.shape[1]:
            continue
        with torch.no_grad():
            again = fc(pooled.to(fc.weight.dtype)).float()
        if torch.allclose(again, logits.float(), rtol=1e-3, atol=1e-3):
            return fc.weight.detach().float()[targets]
    raise ValueError(
        f"CAM needs global average pooling and one linear layer right after {name!r} "
        "(Zhou et al.), which this network does not have there: give the last feature layer, "
        "or use Grad-CAM (gradcam), which works at every layer"
    )


CNN_ONLY = ("cam", "fullgrad", "ablationcam")
"""Methods not offered for transformers: no linear classifier right after a token layer (CAM),
hardly any conv or norm biases (FullGrad), no feature maps to ablate (Ablation-CAM, refused)."""

# --- transformer methods -----------------------------------------------------------------------


def _transformer_analysis(model, x, target, settings: _Settings, modules) -> Analysis:
    """Rollout, GAE or LeGrad: one traced forward (and the backward GAE and LeGrad need)."""
    spec, options = settings.spec, settings.options
    layout = token_layout(model)
    gradients = spec.name != "rollout"
    outputs: list[Tensor] = []
    handles = []
    with preserve_model_state(model, eval_mode=False, freeze=True, modules=modules):
        with torch.set_grad_enabled(gradients):
            x_in = x.detach().requires_grad_() if gradients else x
            try:
                with record_attention(model, modules=modules, keep_graph=gradients) as trace:
                    if spec.name == "legrad":
                        handles = _block_output_hooks(model, outputs)
                    logits = model(x_in)
            finally:
                for h in handles:
                    h.remove()
            targets = resolve_targets(target, logits)
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
                score = logits.gather(1, targets[:, None]).sum()
                cam = gae(calls, score)
            else:
                if layout is None or layout.score is None:
                    raise ValueError(
                        "legrad needs a timm or torchvision ViT (its final norm and head)"
                    )
                cam = legrad(calls, outputs, layout.score, targets)
    if settings.progress is not None:
        settings.progress(len(x), len(x))
    logits = logits.detach()
    return Analysis(logits, logits.softmax(1), targets, trace, {spec.name: cam}, spec.name,
                    {spec.name: 0}, ())  # fmt: skip


def _block_output_hooks(model: nn.Module, outputs: list[Tensor]) -> list:
    """Forward hooks that keep the output of each self-attention module's enclosing block."""
    names = [n for n, m in attention_modules(model) if find_probe(m).reader is not None]
    blocks = [model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model for n in names]
    return [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in blocks]


# --- FullGrad ---------------------------------------------------------------------------------


def _bias_layers(model: nn.Module) -> dict[str, nn.Module]:
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


def _fullgrad(x: Tensor, run: _Pass, layers: dict[str, nn.Module], eigen_smooth: bool) -> Tensor:
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
    return _first_component(stacked) if eigen_smooth else stacked.sum(1)


# --- test-time augmentation -----------------------------------------------------------------

AUGMENTATIONS = ((False, 1.0), (False, 0.9), (False, 1.1), (True, 1.0), (True, 0.9), (True, 1.1))
"""`aug_smooth`'s versions of an image: (mirrored, intensity factor); the first is the image."""


def _augmentation_smoothed(model, x, target, cam_layers, settings: _Settings) -> Analysis:
    n = len(x)
    with preserve_model_state(model, eval_mode=False), torch.inference_mode():
        targets = resolve_targets(target, model(x))  # the class of the image as given
    batch = torch.cat([(x.flip(-1) if mirror else x) * factor for mirror, factor in AUGMENTATIONS])
    inner = _analyze(model, batch, targets.repeat(len(AUGMENTATIONS)), cam_layers, settings)
    cams = {}
    for name, maps in inner.cams.items():
        versions = [maps[k * n : (k + 1) * n] for k in range(len(AUGMENTATIONS))]
        versions = [v.flip(-1) if mirror else v for v, (mirror, _) in zip(versions, AUGMENTATIONS)]
        cams[name] = torch.stack([normalize(v) for v in versions]).mean(0)
    first = inner.select(slice(0, n))
    return dataclasses.replace(first, cams=cams, smoothing=("aug", *first.smoothing))


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
