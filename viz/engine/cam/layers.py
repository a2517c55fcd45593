"""Which layers a CAM explains: the stage layers, names resolved to modules, their stages."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from viz.engine.levels import NetworkLevels, fallback_stage, network_levels, stride_of

__all__ = ["DEFAULT_CAM_LAYERS", "stage_layers", "resolve_layers", "cam_stage"]

DEFAULT_CAM_LAYERS = ("layer1", "layer2", "layer3", "layer4")
"""The stage layers `analyze` finds in Attention Lens's own ResNets (kept for reference)."""


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


def cam_stage(levels: NetworkLevels | None, input_size: int, map_size: int, layer: str) -> int:
    stride = stride_of(input_size, map_size)
    return fallback_stage(stride) if levels is None else levels.stage_of_layer(layer, stride)
