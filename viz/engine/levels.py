"""Resolution levels of any CNN, found from the network itself, not from its module names.

A network's *levels* are the strides (input size / feature-map size) at which its modules
produce 4-D feature maps. The deepest four are stages 1..4: for an ImageNet ResNet these are
strides 4, 8, 16 and 32 (`layer1`..`layer4`), for a CIFAR-stem ResNet 1, 2, 4, 8, for
EfficientNet and MobileNet 4..32 (their stride-2 stem level is stage 0).

The *stage layer* of a level, where Grad-CAM is taken by default, is the last module, among
the shallowest ones, whose output lives at that level: `layer3` rather than `layer4.0.conv1`
(which also outputs at stride 16 in a ResNet-50), `features.5` in torchvision's EfficientNet.
Attention modules and their insides are never stage layers: a CAM after BAM is not the stage's,
and an attention module's (N, heads, tokens, dim) tensors are no feature maps (registered
modules and those named as attention, `viz.engine.unread`). A transformer that the token
layouts (`viz.engine.tokens`) do not know is read on its patch grid: (N, T, C) outputs after
the last feature map, T a square (and a class token), are its deepest level, numbered 4 as a
ViT's.

Levels are found once per model with a shape probe (one forward of a 224 x 224 zero image,
under `torch.no_grad`) and cached.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.probes import find_probe, registry_generation
from viz.engine.model_state import preserve_model_state, submodules
from viz.engine.tokens import TokenLayout, guessed_grid, token_layout
from viz.engine.unread import attention_names

__all__ = ["NetworkLevels", "network_levels", "stride_of", "PROBE_SIZE", "STAGES"]

PROBE_SIZE = 224
STAGES = 4  # the deepest levels numbered 1..STAGES


def stride_of(input_size: int, map_size: int) -> int:
    """The power-of-two stride that turns `input_size` into `map_size` (rounded)."""
    if map_size <= 0 or input_size <= 0:
        return 1
    return 2 ** max(0, round(math.log2(input_size / map_size)))


@dataclass(frozen=True)
class NetworkLevels:
    """The resolution levels of one network.

    Attributes:
        strides: distinct strides of its 4-D feature maps, ascending, e.g. (2, 4, 8, 16, 32).
        layers: stage -> dotted name of the stage layer, for stages 1..4 (fewer in a network
            with fewer levels), e.g. {1: "layer1", ..., 4: "layer4"}.
        attention_inputs: attention-module name -> (stride, channels) of the feature map it
            attends, for modules the probe saw at one resolution (the tracer then needs no
            tap on the module itself, only on its gates).
    """

    strides: tuple[int, ...]
    layers: dict[int, str]
    attention_inputs: dict[str, tuple[int, int]] = field(default_factory=dict)
    deepest_last: bool = False  # fewer than four levels numbered up to 4 (a plain ViT: 4)
    trunk: str | None = None  # a hybrid's CNN trunk: the modules outside it are the last stage

    def stage_of_layer(self, name: str, stride: int) -> int:
        """The stage of a CAM layer: its own where it is a stage layer; in a hybrid, any
        transformer module's (outside the trunk: the last stage, as its attention is drawn,
        though at the trunk's stride); else the stage of its stride."""
        for stage, layer in self.layers.items():
            if layer == name:
                return stage
        if self.trunk is not None and not name.startswith(self.trunk + "."):
            return STAGES
        return self.stage_of(stride)

    def stage_layer_names(self) -> list[str]:
        """The stage layers in stage order: the default CAM layers."""
        return [self.layers[s] for s in sorted(self.layers)]

    def stage_of(self, stride: int) -> int:
        """The stage of a map at `stride` (0 or below: shallower than stage 1)."""
        offset = (
            len(self.strides) - STAGES if self.deepest_last else max(0, len(self.strides) - STAGES)
        )
        if stride in self.strides:
            return self.strides.index(stride) + 1 - offset
        if not self.strides:
            return fallback_stage(stride)
        # between or beyond the known levels: count octaves from the nearest one
        near = min(self.strides, key=lambda s: abs(math.log2(s / stride)))
        return self.stage_of(near) + round(math.log2(stride / near))


def fallback_stage(stride: int) -> int:
    """Stage from the stride alone, for networks the probe cannot run: 4 -> 1 ... 32 -> 4."""
    return max(0, round(math.log2(max(stride, 1))) - 1)


_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, NetworkLevels | ValueError]] = (
    weakref.WeakKeyDictionary()
)
_cache_guard = threading.Lock()


def network_levels(model: nn.Module, count: int | None = None) -> NetworkLevels:
    """The levels and stage layers of `model` (cached per model).

    Args:
        model: any network.
        count: `len(submodules(model))`, when the caller has it (the cache key).

    Raises:
        ValueError: the shape probe could not run the network (one line, with the reason).
    """
    if count is None:
        count = len(submodules(model))
    key = (count, registry_generation())
    with _cache_guard:
        hit = _cache.get(model)
    if hit is not None:
        if hit[0] == key:
            if isinstance(hit[1], ValueError):
                raise ValueError(str(hit[1]))
            return hit[1]
    modules = list(model.named_modules())
    layout = token_layout(model)
    try:
        if layout is None:
            levels = _probe(model, modules)
        elif layout.trunk:
            levels = _hybrid_levels(model, layout)
        else:
            levels = _token_levels(layout)
    except ValueError as exc:  # remembered too: a network the probe cannot run stays so
        with _cache_guard:
            _cache[model] = (key, exc)
        raise
    with _cache_guard:
        _cache[model] = (key, levels)
    return levels


def _token_levels(layout: TokenLayout) -> NetworkLevels:
    """A transformer's levels from its layout: a ViT has one (the patch grid, stage 4; its
    blocks' attention is grouped by depth instead), Swin one per stage."""
    if layout.family == "vit":
        return NetworkLevels((layout.patch,), {STAGES: layout.last_norm}, deepest_last=True)
    strides = tuple(layout.patch * 2**i for i in range(len(layout.stage_layers)))
    offset = max(0, len(strides) - STAGES)
    layers = {i + 1: name for i, name in enumerate(layout.stage_layers[offset:])}
    return NetworkLevels(strides, layers)


def _hybrid_levels(model: nn.Module, layout: TokenLayout) -> NetworkLevels:
    """A hybrid CNN + ViT: its trunk's deepest levels are stages 1-3 (as in the ResNet it was
    cut from: layer1..layer3), the transformer on the trunk's grid stage 4."""
    trunk = model.get_submodule(layout.trunk)
    found = _probe(trunk, list(trunk.named_modules()))
    kept = found.strides[-(STAGES - 1) :]
    names = [found.layers[s] for s in sorted(found.layers)][-len(kept) :]
    layers = {i + 1: f"{layout.trunk}.{name}" for i, name in enumerate(names)}
    layers[STAGES] = layout.last_norm
    inputs = {f"{layout.trunk}.{k}": v for k, v in found.attention_inputs.items()}
    # the transformer's level counts as one octave below the trunk's deepest
    return NetworkLevels((*kept, 2 * kept[-1]), layers, inputs, trunk=layout.trunk)


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _attention_names(modules: list[tuple[str, nn.Module]]) -> list[str]:
    return [name for name, m in modules if name and find_probe(m) is not None]


def _spatial(out: Tensor) -> bool:
    """A (1, C, h, w) feature map of the probe image: h and w at one stride, not larger than
    the image (an attention module's (1, heads, tokens, dim) is neither)."""
    h, w = out.shape[-2], out.shape[-1]
    if out.shape[0] != 1 or h * w <= 1 or h > PROBE_SIZE or w > PROBE_SIZE:
        return False
    return stride_of(PROBE_SIZE, h) == stride_of(PROBE_SIZE, w)


def _token_side(out: Tensor) -> int | None:
    """The side of the patch grid of (1, T, C) tokens (T a square, or a square and a class
    token, as `viz.engine.tokens.as_feature_map` reads them), else None."""
    if out.shape[0] != 1:
        return None
    grid = guessed_grid(out.shape[1]) or guessed_grid(out.shape[1] - 1)
    return grid[0] if grid is not None and grid[0] > 1 else None


def _probe(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> NetworkLevels:
    gated = _attention_names(modules)
    internals = attention_names(modules)  # registered or named attention: never a stage layer

    def inside_attention(name: str) -> bool:
        return any(name == g or name.startswith(g + ".") for g in internals)

    # a segmenter's or detector's stages are its backbone's: its head (LR-ASPP's classifier,
    # FCN's) works at the last stride but is the output, not a stage of features
    in_backbone = isinstance(getattr(model, "backbone", None), nn.Module)

    # (name, depth, stride, tokens) in the order modules finish: 4-D feature maps, and (N, T, C)
    # tokens on a square patch grid (a transformer the token layouts do not know)
    seen: list[tuple[str, int, int, bool]] = []
    calls: dict[str, int] = {}

    def hook_for(name: str):
        depth = name.count(".") + 1

        def hook(_m, _i, out) -> None:
            calls[name] = calls.get(name, 0) + 1
            if not isinstance(out, Tensor):
                return
            if out.ndim == 4 and _spatial(out):
                seen.append((name, depth, stride_of(PROBE_SIZE, out.shape[-2]), False))
            elif out.ndim == 3 and (side := _token_side(out)) is not None:
                seen.append((name, depth, stride_of(PROBE_SIZE, side), True))

        return hook

    inputs: dict[str, set[tuple[int, int]]] = {}

    def input_hook(name: str):
        def hook(_m, args, _out) -> None:
            f = args[0] if args and isinstance(args[0], Tensor) else None
            if f is not None and f.ndim == 4:
                inputs.setdefault(name, set()).add((stride_of(PROBE_SIZE, f.shape[-2]), f.shape[1]))

        return hook

    x = torch.zeros(1, _in_channels(model), PROBE_SIZE, PROBE_SIZE)
    try:
        param = next(model.parameters())
        x = x.to(param.device)
    except StopIteration:
        pass
    # under the model's lock: another thread's forward must not run through these hooks
    with preserve_model_state(model), torch.no_grad():
        handles = [
            m.register_forward_hook(hook_for(name))
            for name, m in modules
            if name
            and not inside_attention(name)
            and (not in_backbone or name.startswith("backbone."))
        ]
        named = dict(modules)
        handles += [named[name].register_forward_hook(input_hook(name)) for name in gated]
        try:
            model(x)
        except Exception as exc:
            text = " ".join(str(exc).split())[:200]
            raise ValueError(
                f"cannot find this network's stages: a {PROBE_SIZE}x{PROBE_SIZE} probe failed "
                f"({type(exc).__name__}: {text}); give the CAM layers by name"
            ) from exc
        finally:
            for h in handles:
                h.remove()
    # a module run more than once per forward (a detection head shared by the pyramid's
    # levels) has no one output to explain: never a stage layer
    seen = [entry for entry in seen if calls[entry[0]] == 1]
    return _levels(seen, inputs)


def _levels(seen: list[tuple[str, int, int, bool]], inputs: dict) -> NetworkLevels:
    """The stages from the probe's feature maps (name, depth, stride, tokens), in finish order."""
    # attention modules are never stage layers (their inputs are kept above), and tokens count
    # only after the last feature map: a transformer at the end of the network, read on its grid
    last_map = max((i for i, (*_, tokens) in enumerate(seen) if not tokens), default=-1)
    tokens_last = last_map < len(seen) - 1
    seen = [(n, d, s) for i, (n, d, s, tokens) in enumerate(seen) if not tokens or i > last_map]
    strides = tuple(sorted({s for _, _, s in seen}))
    # a transformer's patch grid is its deepest level: numbered up to 4, as a ViT's
    deepest_last = tokens_last and len(strides) < STAGES
    offset = len(strides) - STAGES if deepest_last else max(0, len(strides) - STAGES)
    layers: dict[int, str] = {}
    for i, stride in enumerate(strides):
        if i < offset:
            continue
        at_level = [(name, depth) for name, depth, s in seen if s == stride]
        shallowest = min(depth for _, depth in at_level)
        layers[i + 1 - offset] = [name for name, depth in at_level if depth == shallowest][-1]
    # a module run at two resolutions (shared weights) is left to the tracer's module tap
    attention_inputs = {name: found.pop() for name, found in inputs.items() if len(found) == 1}
    return NetworkLevels(strides, layers, attention_inputs, deepest_last)
