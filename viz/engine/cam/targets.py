"""The class each image's map explains: given, one per image, or the argmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["resolve_targets"]


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
