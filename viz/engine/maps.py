"""Pure helpers for maps: upsample to the image, normalise, overlay with a colour map."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "upsample",
    "resize_map",
    "cell_grid",
    "with_cell_grid",
    "normalize",
    "overlay",
    "DEFAULT_CMAP",
    "RENDERS",
    "to_numpy",
]

# how a map is enlarged to the image: smooth (bilinear, as the papers draw them) or cells
# (nearest, with the grid drawn: what the network actually computed)
RENDERS = ("smooth", "cells")
_GRID_GREY, _GRID_OPACITY = 0.5, 0.6

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


def _check_render(render: str) -> None:
    if render not in RENDERS:
        raise ValueError(f"render must be one of {', '.join(RENDERS)}, got {render!r}")


def resize_map(m: Tensor, size: tuple[int, int], render: str = "smooth") -> Tensor:
    """A (h, w) map at `size` (H, W): bilinear ("smooth") or one flat block per cell ("cells")."""
    _check_render(render)
    if render == "smooth":
        return upsample(m, size)
    return F.interpolate(m.float()[None, None], size=size, mode="nearest-exact")[0, 0]


def cell_grid(shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the lines between the cells of an (h, w) map drawn at `size` (H, W).

    Lines are about 1/128 of the image thick, so they stay visible in a 300-dpi figure, but
    never more than an eighth of a cell (at least one pixel), so a fine grid does not hide the
    map; a 1 x 1 map has none.
    """
    (h, w), (H, W) = shape, size
    width = max(1, min(max(H, W) // 128, min(H // max(h, 1), W // max(w, 1)) // 8))

    def lines(cells: int, pixels: int) -> np.ndarray:
        cell = np.floor((np.arange(pixels) + 0.5) * cells / pixels).astype(int)  # nearest-exact
        starts = np.flatnonzero(cell[1:] != cell[:-1]) + 1
        mark = np.zeros(pixels, dtype=bool)
        for s in starts:
            mark[max(0, s - width // 2) : s - width // 2 + width] = True
        return mark

    return lines(h, H)[:, None] | lines(w, W)[None, :]


def with_cell_grid(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Float RGB (H, W, 3) in [0, 1] with the cell lines of an (h, w) map blended in grey."""
    grid = cell_grid(shape, rgb.shape[:2])
    out = rgb.copy()
    out[grid] = (1 - _GRID_OPACITY) * out[grid] + _GRID_OPACITY * _GRID_GREY
    return out


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
    render: str = "smooth",
) -> Image.Image:
    """Blend a colour-mapped (h, w) map over an RGB image; the map is resized to the image.

    Values are scaled with `vmin`/`vmax` (default: the map's own range). `render` "cells"
    draws each cell as a flat block with the grid visible. Pure: inputs unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    small = torch.as_tensor(to_numpy(mask))
    m = resize_map(small, (image.height, image.width), render).numpy()
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    scaled = np.clip((m - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    colours = matplotlib.colormaps[colormap](scaled)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1 - alpha) * base + alpha * colours
    if render == "cells":
        blended = with_cell_grid(blended, tuple(small.shape[-2:]))
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), "RGB")
