"""imgclsmob / pytorchcv ResNet layouts (`features.init_block...`, `output`).

Recognised so that such a file gets a clear message; the key mapping is not written yet.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["is_pytorchcv_layout", "rename_pytorchcv"]


def is_pytorchcv_layout(state: dict[str, Tensor]) -> bool:
    """True for pytorchcv key names (`features.init_block.*`, `output.*`)."""
    return any(k.startswith("features.init_block.") for k in state)


def rename_pytorchcv(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map pytorchcv keys to ours (not supported yet: raises CheckpointError)."""
    from .checkpoint import CheckpointError

    raise CheckpointError(
        "pytorchcv (imgclsmob) checkpoints are recognised but not supported yet; "
        "convert them to the official key names first"
    )
