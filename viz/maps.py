"""Pure helpers for maps: upsample to the image, normalise, overlay with a colour map."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["upsample", "normalize", "overlay", "DEFAULT_CMAP", "to_numpy"]

# perceptually uniform, monotonic in lightness (reads in grayscale), colour-blind safe
DEFAULT_CMAP = "inferno"


def to_numpy(m: Tensor | np.ndarray) -> np.ndarray:
    return (
        m.detach().float().cpu().numpy()
        if isinstance(m, Tensor)
        else np.asarray(m, dtype=np.float32)
    )


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (N, h, w) or (h, w) maps to `size` = (H, W); same rank back."""
    squeeze = maps.ndim == 2
    x = maps[None, None] if squeeze else maps[:, None]
    out = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    return out[0, 0] if squeeze else out[:, 0]


def normalize(
    maps: Tensor | Sequence[Tensor], *, shared: bool = False, eps: float = 1e-12
) -> Tensor | list[Tensor]:
    """Scale maps to [0, 1] by min-max.

    Args:
        maps: one tensor (each of its leading-dimension entries is a map) or a list of tensors.
        shared: one min and max over all the maps (comparable colours) instead of per map.

    Returns:
        The same structure as `maps`, float, in [0, 1]. A constant map becomes zeros.
    """
    as_list = not isinstance(maps, Tensor)
    items = [m.float() for m in (maps if as_list else [maps])]
    if shared:
        lo = min(m.min() for m in items)
        hi = max(m.max() for m in items)
        out = [(m - lo) / max(float(hi - lo), eps) for m in items]
    else:
        out = []
        for m in items:
            flat = m.reshape(m.shape[0], -1) if m.ndim == 3 else m.reshape(1, -1)
            lo = flat.min(1).values.view(-1, *([1] * (m.ndim - 1)) if m.ndim == 3 else [])
            hi = flat.max(1).values.view(-1, *([1] * (m.ndim - 1)) if m.ndim == 3 else [])
            out.append((m - lo) / (hi - lo).clamp_min(eps))
    return out if as_list else out[0]


def overlay(
    image: Image.Image,
    mask: Tensor | np.ndarray,
    colormap: str = DEFAULT_CMAP,
    alpha: float = 0.5,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """Blend a colour-mapped (h, w) map over an RGB image; the map is resized to the image.

    Values are scaled with `vmin`/`vmax` (default: the map's own range). Pure: inputs unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    m = torch.as_tensor(to_numpy(mask))
    m = upsample(m, (image.height, image.width)).numpy()
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    scaled = np.clip((m - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    colours = matplotlib.colormaps[colormap](scaled)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1 - alpha) * base + alpha * colours
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), "RGB")
