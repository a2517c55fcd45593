"""The region a target explains, drawn over an image: a mask's contour or boxes.

White lines with a dark edge stay visible over any colour map and photograph.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["outlined"]

_LIGHT, _DARK = (255, 255, 255), (0, 0, 0)


def outlined(image: Image.Image, outline: Tensor | None) -> Image.Image:
    """`image` with `outline` drawn: a mask (H, W) of any size (its contour, the mask resized to
    the image) or boxes (K, 4) x0, y0, x1, y1 in the image's pixels; None: the image as is."""
    if outline is None:
        return image
    outline = torch.as_tensor(outline)
    if outline.ndim == 2 and outline.shape[-1] == 4 and outline.dtype != torch.bool:
        return _boxes(image, outline.float())
    if outline.ndim == 2:
        return _contour(image, outline.bool())
    raise ValueError(f"an outline is a mask (H, W) or boxes (K, 4); got {tuple(outline.shape)}")


def _boxes(image: Image.Image, boxes: Tensor) -> Image.Image:
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 150))
    for x0, y0, x1, y1 in boxes.tolist():
        draw.rectangle((x0, y0, x1, y1), outline=_DARK, width=width + 2)
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=_LIGHT, width=width)
    return out


def _contour(image: Image.Image, mask: Tensor) -> Image.Image:
    size = (image.height, image.width)
    big = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].bool()
    inside = big.numpy()
    edge = np.zeros_like(inside)
    edge[:-1] |= inside[:-1] != inside[1:]
    edge[:, :-1] |= inside[:, :-1] != inside[:, 1:]
    thick = max(1, round(min(size) / 200))
    line = _grown(edge, thick)
    border = _grown(edge, thick + 1) & ~line
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[border] = _DARK
    pixels[line] = _LIGHT
    return Image.fromarray(pixels, "RGB")


def _grown(edge: np.ndarray, steps: int) -> np.ndarray:
    """`edge` dilated by `steps` pixels (a square neighbourhood)."""
    grown = torch.from_numpy(edge)[None, None].float()
    grown = F.max_pool2d(grown, 2 * steps - 1, stride=1, padding=steps - 1) if steps > 1 else grown
    return grown[0, 0].bool().numpy()
