"""Strong augmentation for training vision transformers from scratch (`--augment strong`).

DeiT's recipe (Touvron et al., ICML 2021, https://arxiv.org/abs/2012.12877, table 9) in
`torchvision.transforms.v2`, after the trainer's random-resized crop and flip: per image an
automatic policy on the uint8 pixels (TrivialAugmentWide, or RandAugment with 2 ops at
magnitude 9), normalisation, random erasing with random pixel values; per batch MixUp
(alpha 0.8) or CutMix (alpha 1.0), one of the two at random, which turns the labels into soft
targets (N, C).

Every random draw comes from seeds the trainer takes from its own generator (saved with the
training state), inside `torch.random.fork_rng`, so the global RNG is untouched, a resumed run
draws exactly what the uninterrupted one did, and ranks that draw for the whole global batch
stay in step. Cost: about 1 ms per 224-px image for the policy and erasing, on one core.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["POLICIES", "StrongAugment"]

POLICIES = ("trivial", "rand")


class StrongAugment:
    """uint8 crops and labels -> normalised, augmented, mixed images and soft targets."""

    def __init__(
        self,
        num_classes: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        policy: str = "trivial",
        mixup: float = 0.8,
        cutmix: float = 1.0,
        erase: float = 0.25,
    ) -> None:
        """
        Args:
            num_classes: for the soft targets.
            mean, std: the student's normalisation (pixels in [0, 1]).
            policy: "trivial" (TrivialAugmentWide) or "rand" (RandAugment, 2 ops, magnitude 9).
            mixup, cutmix: Beta alphas; 0 turns one off (both 0: labels stay hard).
            erase: probability of random erasing per image (0: none).
        """
        from torchvision.transforms import v2

        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        self.policy = (
            v2.TrivialAugmentWide() if policy == "trivial" else v2.RandAugment(2, magnitude=9)
        )
        self.erase = v2.RandomErasing(p=erase, value="random") if erase > 0 else None
        mixers = [v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []
        if cutmix > 0:
            mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.mix = (
            None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        )
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255

    def __call__(
        self, images: Tensor, labels: Tensor, image_seeds: Tensor, batch_seed: int
    ) -> tuple[Tensor, Tensor]:
        """Augment a batch.

        Args:
            images: uint8 (N, 3, H, W), already cropped and flipped.
            labels: (N,) class indices.
            image_seeds: (N,) int64, one seed per image (the policy and erasing).
            batch_seed: the seed of the batch's MixUp/CutMix.

        Returns:
            float32 images (N, 3, H, W), normalised; targets (N, C) soft (or (N,) labels
            when mixing is off).
        """
        out = torch.empty(images.shape, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            for i in range(len(images)):
                torch.manual_seed(int(image_seeds[i]))
                x = (self.policy(images[i]).float() - self.mean) / self.std
                out[i] = self.erase(x) if self.erase is not None else x
            if self.mix is None:
                return out, labels
            torch.manual_seed(int(batch_seed))
            return self.mix(out, labels)

    def describe(self) -> str:
        """For the checkpoint's recipe, e.g. "TrivialAugmentWide + random erasing 0.25 + ..."."""
        parts = [type(self.policy).__name__]
        if hasattr(self.policy, "num_ops"):
            parts[0] += f" ({self.policy.num_ops} ops, magnitude {self.policy.magnitude})"
        if self.erase is not None:
            parts.append(f"random erasing {self.erase.p}")
        mixers = getattr(self.mix, "transforms", [self.mix] if self.mix is not None else [])
        mixed = " or ".join(f"{type(m).__name__} alpha {m.alpha}" for m in mixers)
        return " + ".join(parts + ([f"{mixed} per batch"] if mixed else []))
