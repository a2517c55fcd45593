"""Image preprocessing recorded with a checkpoint: resize, centre crop, normalise."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as TF

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
        return torch.stack([self.normalize(TF.pil_to_tensor(self.crop_image(im))) for im in images])

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
        image = TF.resize(image, self.resize, interpolation=TF.InterpolationMode.BILINEAR)
        return TF.center_crop(image, self.crop)

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
        resize, crop = int(d.get("resize", 256)), int(d.get("crop", 224))
        if not (8 <= crop <= 4096 and 8 <= resize <= 4096):
            raise ValueError(f"preprocess sizes out of range: resize={resize}, crop={crop}")
        mean = tuple(float(v) for v in d.get("mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in d.get("std", IMAGENET_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("preprocess mean/std must be three numbers each")
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise ValueError("preprocess mean/std must be finite, std > 0")
        return cls(resize, crop, mean, std)  # type: ignore[arg-type]
