"""`analyze`: the CAMs and the attention trace of a batch from one forward and one backward.

`analyze` runs one forward and one backward for everything: the attention maps of every module
(read by `record_attention` during the forward) and a class activation map at every requested
layer (default: the stage layers that `viz.engine.levels` finds in any network). Gradients are taken
with `torch.autograd.grad` on the layers' output tensors (no module backward hooks), and the
parameters need no gradients, so the backward stops at the earliest requested layer.

The methods and what each needs are in `viz.engine.cam.registry`, their weights in
`viz.engine.cam.weights` and `viz.engine.cam.extra_passes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from viz.engine.cam.extra_passes import PassContext, planned_passes
from viz.engine.cam.layers import cam_stage, resolve_layers
from viz.engine.cam.network import bias_layers, fullgrad_map, transformer_analysis
from viz.engine.cam.registry import CAM_METHODS, checked_options, settings_error
from viz.engine.cam.result import Analysis, ForwardBackward, Settings, analysis_of
from viz.engine.cam.targets import ATTENTION_WORDS, explained_by, nothing_explained
from viz.engine.levels import network_levels
from viz.engine.maps import normalize
from viz.engine.model_state import model_lock, preserve_model_state
from viz.engine.tokens import as_feature_map, token_layout
from viz.engine.trace import model_modules, record_attention
from viz.engine.unread import warn_unread_attention
from viz.targets import ClassScore, SegmentationScore, SimilarityScore, main_tensor

__all__ = ["analyze", "attention_only", "AUGMENTATIONS", "ATTENTION_ONLY"]


def analyze(
    model: nn.Module,
    x: Tensor,
    target: int | Sequence[int] | Tensor | Callable[[object], Tensor] | None = None,
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
        target: what to explain. For a classifier, a class: an int for all images, one per
            image, or None for the argmax. For any network, a callable `target(output) -> (N,)`,
            one differentiable score per image from whatever the network returns
            (`viz.targets`: ClassScore, SegmentationScore, BoxScore, SimilarityScore,
            RawScore); every method scores with it, the pass methods their masked images too.
            A network whose output is not class logits needs one (refused without).
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
    settings = Settings(spec, eigen_smooth, options, seed, progress)
    warn_unread_attention(model)  # attention no probe reads: said once per call, in one line
    if aug_smooth:
        return _augmentation_smoothed(model, x, target, cam_layers, settings)
    return _analyze(model, x, target, cam_layers, settings)


def _analyze(model, x, target, cam_layers, settings: Settings) -> Analysis:
    spec = settings.spec
    with model_lock(model):
        modules = model_modules(model)  # one walk for the caches, the flags and the freeze
        if spec.needs == "attention":
            return transformer_analysis(model, x, target, settings, modules)
        try:
            levels = network_levels(model, len(modules))
        except ValueError:
            if cam_layers is None and spec.needs != "network":
                raise
            levels = None  # stages of the given layers from their stride alone
        if spec.needs == "network":
            layers = bias_layers(model)
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
                cams = {"fullgrad": fullgrad_map(x, run, layers, settings.eigen_smooth)}
                stages = {"fullgrad": 0}
            else:
                cams = _layer_maps(model, x, layers, run, settings, counter)
                stages = {
                    n: cam_stage(levels, x.shape[-2], a.shape[-2], n) for n, a in run.acts.items()
                }
    return run.analysis(cams, spec.name, stages, settings.smoothing)


ATTENTION_ONLY = ATTENTION_WORDS
"""`Analysis.explained` of `attention_only`."""


def attention_only(model: nn.Module, x: Tensor) -> Analysis:
    """The attention maps of every module from one forward, with no CAM: for the figures that
    need none (overview, heads, dino-heads, token-norms, channels) on a network whose output
    no target explains (an embedding network given no concept). Scores are NaN."""
    with model_lock(model), preserve_model_state(model), torch.no_grad():
        with record_attention(model, feature_means=True) as trace:
            model(x)
    return analysis_of(trace, None, nothing_explained(len(x)), {}, "none", {}, ())


class _Counter:
    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def _forward_backward(
    model, x, target, layers: dict[str, nn.Module], modules, needs: str
) -> ForwardBackward:
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
                output = model(x_in)
        finally:
            for h in handles:
                h.remove()
        explained = explained_by(target, output, len(x), model)
        score = explained.scores.sum()
        run = ForwardBackward(
            trace, output, explained, {n: a.detach() for n, a in acts.items()}, grads
        )
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


def _layer_maps(
    model, x, layers, run: ForwardBackward, settings: Settings, counter: _Counter
) -> dict:
    spec, cams = settings.spec, {}
    generator = torch.Generator().manual_seed(settings.seed)
    for name, act in run.acts.items():
        weights = None
        if spec.needs == "classifier":
            weights = _classifier_weights(model, name, act, run)
        elif spec.needs == "passes":
            context = PassContext(
                model, x.detach(), layers[name], act, run.explained,
                run.explained.scores.detach().float(), settings.options, generator, counter.add,
            )  # fmt: skip
            weights = spec.channel_weights(context)
        cams[name] = spec.weigh(
            act, run.grads.get(name), weights=weights, eigen_smooth=settings.eigen_smooth
        )
    return cams


def _classifier_weights(model, name: str, acts: Tensor, run: ForwardBackward) -> Tensor:
    """CAM's class weights: the linear layer that maps the layer's pooled output to the logits."""
    targets = run.explained.classes
    if targets is None:
        raise ValueError(
            f"CAM weighs with the classifier's weights of a class; it cannot explain "
            f"{run.explained.text}: use Grad-CAM (gradcam) or another method"
        )
    logits = main_tensor(run.output).detach()
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


# --- test-time augmentation -----------------------------------------------------------------

AUGMENTATIONS = ((False, 1.0), (False, 0.9), (False, 1.1), (True, 1.0), (True, 0.9), (True, 1.1))
"""`aug_smooth`'s versions of an image: (mirrored, intensity factor); the first is the image."""


def _augmentation_smoothed(model, x, target, cam_layers, settings: Settings) -> Analysis:
    n = len(x)
    if callable(target) and not isinstance(target, (Tensor, ClassScore)):
        targets = _for_every_version(target)
    else:
        with preserve_model_state(model, eval_mode=False), torch.inference_mode():
            # the class of the image as given
            targets = explained_by(target, model(x), n, model).classes
        targets = targets.repeat(len(AUGMENTATIONS))
    batch = torch.cat([(x.flip(-1) if mirror else x) * factor for mirror, factor in AUGMENTATIONS])
    inner = _analyze(model, batch, targets, cam_layers, settings)
    cams = {}
    for name, maps in inner.cams.items():
        versions = [maps[k * n : (k + 1) * n] for k in range(len(AUGMENTATIONS))]
        versions = [v.flip(-1) if mirror else v for v, (mirror, _) in zip(versions, AUGMENTATIONS)]
        cams[name] = torch.stack([normalize(v) for v in versions]).mean(0)
    first = inner.select(slice(0, n))
    return dataclasses.replace(first, cams=cams, smoothing=("aug", *first.smoothing))


def _for_every_version(target):
    """A callable target for the batch of every version of the images: a segment of each
    version's own predicted pixels, or a concept, holds as it is (a concept per image is
    repeated); a fixed mask or a box would have to be mirrored with the image."""
    if isinstance(target, SimilarityScore):
        concept = torch.as_tensor(target.embedding)
        if concept.ndim == 2 and len(concept) > 1:  # one per image
            return SimilarityScore(concept.repeat(len(AUGMENTATIONS), 1))
        return target
    if isinstance(target, SegmentationScore) and target.mask is None:
        return target
    raise ValueError(
        "aug smoothing mirrors and rescales the images, which a fixed mask, a box or another "
        "callable target does not follow: only a class, a segment of the predicted pixels "
        "(SegmentationScore without a mask) or a concept (SimilarityScore)"
    )
