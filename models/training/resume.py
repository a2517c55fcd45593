"""Continue a run: the per-epoch state (--resume) and a checkpoint's weights as the start (--init)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from models.checkpoints.checkpoint import Checkpoint, CheckpointError, atomic_write_bytes
from models.distributed import Ranks, say
from models.networks.resnet import ResNet

__all__ = ["start_from", "init_record", "resume_state", "save_state"]


def start_from(model: ResNet, init: Checkpoint) -> bool:
    """Copy `init`'s weights into `model` (same architecture); the classifier only if it fits.

    Returns:
        Whether the classifier was copied (False: it keeps its fresh initialisation).
    """
    state = init.model.state_dict()
    keep_classifier = init.arch.num_classes == model.arch.num_classes
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise CheckpointError(f"--init does not fit: missing {missing[:3]}, extra {unexpected[:3]}")
    return keep_classifier


def init_record(path: Path, init: Checkpoint, keep_classifier: bool) -> dict:
    """What the new checkpoint says about its starting point (its training record included)."""
    record = {
        "file": path.name,
        "sha256": init.sha256,
        "name": init.label,
        "format": init.format,
        "classifier": "kept" if keep_classifier else "new",
    }
    for key in ("dataset", "accuracy", "training"):
        if key in init.metadata:
            record[key] = init.metadata[key]
    return record


# --- data -------------------------------------------------------------------------------------


def resume_state(
    args, model, opt, gen, state_path: Path, ranks: Ranks
) -> tuple[int, list, dict | None]:
    """(epochs done, history, best evaluated epoch) from the training state; rank 0 reads it
    and sends it (no shared disk needed between nodes)."""
    state = None
    if ranks.main and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    state = ranks.broadcast(state)
    if state is None:
        return 0, [], None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    if "rng" in state:  # the global RNG: dropout and stochastic depth
        torch.set_rng_state(state["rng"])
    say(ranks, f"resumed from {state_path} after epoch {state['epoch']}")
    return state["epoch"], json.loads(state["history"]), state.get("best")


def save_state(
    path: Path, model, opt, gen, epochs_done: int, history: list, best: dict | None = None
) -> None:
    """What --resume needs, written atomically after every epoch."""
    buf = io.BytesIO()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "rng": torch.get_rng_state(),
        "epoch": epochs_done,
        "history": json.dumps(history),
    }
    if best is not None:
        state["best"] = best
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
