"""Image preprocessing recorded with a checkpoint: resize, centre crop, normalise."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["Preprocess", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `resize`, centre-crop `crop` x `crop`, normalise.

    The default is the official ImageNet validation: 256 -> 224, ImageNet mean/std.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: Image.Image) -> Tensor:
        """PIL image -> float tensor (1, 3, crop, crop)."""
        return self.batch([image])

    def batch(self, images: list[Image.Image]) -> Tensor:
        """PIL images -> float tensor (N, 3, crop, crop)."""
        return torch.stack([self.normalize(_pil_to_tensor(self.crop_image(im))) for im in images])

    def crop_image(self, image: Image.Image) -> Image.Image:
        """The RGB image the network sees, before normalisation (for overlays)."""
        image = image.convert("RGB")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        if long > 4 * short:
            # a sliver: the centre crop keeps only its middle, so cut that out before resizing
            # (same pixels in the end, without a huge intermediate image)
            keep = 4 * short
            box = (
                ((w - keep) // 2, 0, (w - keep) // 2 + keep, h)
                if w > h
                else (0, (h - keep) // 2, w, (h - keep) // 2 + keep)
            )
            image = image.crop(box)
        return _center_crop(_resize_short_side(image, self.resize), self.crop)

    def map_box(
        self, box: tuple[float, float, float, float], size: tuple[int, int]
    ) -> tuple[float, float, float, float] | None:
        """A box (x0, y0, x1, y1) in the original image's pixels -> the same box in the crop.

        Follows `crop_image` exactly: the sliver cut, the short-side resize (torchvision's
        rounding of the long side) and the centre crop; the result is clipped to the crop.

        Args:
            box: corners in pixel coordinates of the original, x1 > x0, y1 > y0 (continuous:
                a box covering pixel columns 0..9 is x0=0, x1=10).
            size: the original image's (width, height).

        Returns:
            The box in crop coordinates, or None when none of it is inside the crop.
        """
        w, h = size
        x0, y0, x1, y1 = (float(v) for v in box)
        short, long = min(w, h), max(w, h)
        if long > 4 * short:  # the sliver cut of crop_image
            keep = 4 * short
            if w > h:
                x0, x1, w = x0 - (w - keep) // 2, x1 - (w - keep) // 2, keep
            else:
                y0, y1, h = y0 - (h - keep) // 2, y1 - (h - keep) // 2, keep
            short, long = min(w, h), max(w, h)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        left = int(round((new_w - self.crop) / 2.0))
        top = int(round((new_h - self.crop) / 2.0))
        sx, sy = new_w / w, new_h / h
        mapped = [x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top]
        cx0, cx1 = (min(max(v, 0.0), float(self.crop)) for v in (mapped[0], mapped[2]))
        cy0, cy1 = (min(max(v, 0.0), float(self.crop)) for v in (mapped[1], mapped[3]))
        if cx1 <= cx0 or cy1 <= cy0:
            return None
        return (cx0, cy0, cx1, cy1)

    def display_crop(self, image: Image.Image, size: int = 512) -> Image.Image:
        """The region the network sees, cut from the original at up to `size` px (for figures).

        `crop_image` is the network input (e.g. 224 px), which a 300-dpi figure would have to
        enlarge; this is the same square of the scene at the original image's own resolution,
        so photos stay sharp under the maps. Falls back to `crop_image` when the original has
        no more pixels than that.
        """
        image = image.convert("RGB")
        w, h = image.size
        short = min(w, h)
        side = self.crop * short / self.resize  # the crop's extent in original pixels
        if side <= self.crop or side > short or max(w, h) > 4 * short:
            return self.crop_image(image)
        left, top = (w - side) / 2, (h - side) / 2
        out = min(size, int(round(side)))
        return image.resize(
            (out, out), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
        )

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (…, 3, H, W) -> normalised float."""
        x = images.float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """From `to_dict`'s output, read from a file: raises ValueError or TypeError when invalid."""
        try:  # JSON allows Infinity, NaN and 400-digit ints: int() and float() overflow on them
            resize, crop = _finite_int(d.get("resize", 256)), _finite_int(d.get("crop", 224))
            mean = tuple(float(v) for v in d.get("mean", IMAGENET_MEAN))
            std = tuple(float(v) for v in d.get("std", IMAGENET_STD))
        except OverflowError:
            raise ValueError("preprocess numbers must be finite and in range") from None
        if not (8 <= crop <= 4096 and 8 <= resize <= 4096):
            raise ValueError(f"preprocess sizes out of range: resize={resize}, crop={crop}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("preprocess mean/std must be three numbers each")
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise ValueError("preprocess mean/std must be finite, std > 0")
        return cls(resize, crop, mean, std)  # type: ignore[arg-type]


def _finite_int(value: object) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"preprocess sizes must be finite numbers, not {value}")
    return int(value)  # type: ignore[call-overload]


# torchvision's `resize`, `center_crop` and `pil_to_tensor` on PIL images, pixel for pixel
# (tests compare them), without importing torchvision: a second off every start-up.


def _resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so the short side is `size`; the long side rounds down, as torchvision."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre `size` x `size` (torchvision's rounding); zero padding where it is smaller."""
    w, h = image.size
    left = -((size - w) // 2) if size > w else int(round((w - size) / 2.0))
    top = -((size - h) // 2) if size > h else int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _pil_to_tensor(image: Image.Image) -> Tensor:
    """(H, W, 3) uint8 pixels -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
