"""What one image costs a network, estimated before it runs: FLOPs, activation memory, tokens.

A checkpoint small on disk can ask for a network huge to run: a ViT of a few hundred KB whose
options describe a 1024-px image in 4-px patches has 65,537 tokens, and its attention alone
(tokens² per head, kept for every block while tracing) needs tens of GB. `load_checkpoint`
therefore runs the network once on the meta device (shapes only: no memory, no arithmetic),
counting the FLOPs of each operation (`torch.utils.flop_counter`) and the bytes of every tensor
it makes, attention matrices included even where a fused kernel would not store them (tracing
does). Over the budget, the file is refused in one line naming the cost and the limit, unless
the user allows it (`ATTENTION_LENS_ALLOW_COSTLY=1`, `--allow-costly`); a lab server
(`ATTENTION_LENS_SERVE=shared`) never does.

Cost: about 20-60 ms per load (one meta forward with a Python hook per operation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ALLOW_COSTLY_ENV",
    "MAX_ACTIVATION_BYTES",
    "MAX_FLOPS",
    "RunCost",
    "check_cost",
    "costly_allowed",
    "estimate_cost",
]

ALLOW_COSTLY_ENV = "ATTENTION_LENS_ALLOW_COSTLY"
# one image's forward (2 FLOPs a multiply-add): ResNet-152 at 224 px is 23 GFLOPs, ViT-B/16 35,
# ViT-L/16 at 384 px 382 (about 20 s for a Grad-CAM on 2 CPU cores)
MAX_FLOPS = 400e9
# every tensor of one forward kept (what a backward and a trace keep): ViT-B/16 is 0.8 GiB,
# ViT-L/16 at 384 px 6.5 GiB
MAX_ACTIVATION_BYTES = 8 * 2**30

_SDPA = ("_scaled_dot_product", "scaled_dot_product")


@dataclass(frozen=True)
class RunCost:
    """One image through a network.

    Attributes:
        flops: floating-point operations of one forward (a multiply-add counts two).
        activation_bytes: bytes of every tensor the forward makes (float32), attention
            matrices included.
        tokens: the longest attention sequence (0 for a network without attention).
    """

    flops: float
    activation_bytes: float
    tokens: int

    def describe(self) -> str:
        tokens = f", {self.tokens:,} tokens" if self.tokens else ""
        return (
            f"{self.flops / 1e9:,.0f} GFLOPs and {self.activation_bytes / 2**30:,.1f} GiB{tokens}"
        )


class _TensorBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor an operation returns; sizes attention matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0.0
        self.tokens = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * 4
        name = getattr(func, "__name__", "")
        if name.startswith(_SDPA) and len(args) >= 2 and isinstance(args[0], torch.Tensor):
            q, k = args[0], args[1]  # (N, heads, Lq, d), (N, heads, Lk, d)
            self.bytes += q.shape[:-1].numel() * k.shape[-2] * 4
            self.tokens = max(self.tokens, int(k.shape[-2]))
        elif "softmax" in name and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
            self.tokens = max(self.tokens, int(args[0].shape[-1]))
        return out


def estimate_cost(model: nn.Module, input_shape: tuple[int, ...]) -> RunCost | None:
    """The cost of `model` on one input of `input_shape` (N, 3, H, W), from a meta-device run.

    Returns:
        The cost, or None when the network cannot run on the meta device (it then runs for
        real, unestimated; every built-in family runs there).
    """
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in (*model.named_parameters(), *model.named_buffers())
    }
    x = torch.empty(input_shape, device="meta")
    flops, sizes = FlopCounterMode(display=False), _TensorBytes()
    was_training = model.training
    kept = _plain_tensors(model)
    model.eval()
    try:
        with torch.no_grad(), flops, sizes:
            torch.func.functional_call(model, state, (x,), tie_weights=False, strict=False)
    except Exception:  # noqa: BLE001 - a network that needs real tensors: not estimated
        return None
    finally:
        model.train(was_training)
        for module, name, value in kept:  # a forward may move them to the input's device
            setattr(module, name, value)
    return RunCost(float(flops.get_total_flops()), sizes.bytes, sizes.tokens)


def _plain_tensors(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """Tensor attributes that are neither parameters nor buffers (a detector's anchors), and
    lists of them, with a copy of each list: the meta run must leave them as they were."""
    found = []
    for module in model.modules():
        for name, value in vars(module).items():
            if isinstance(value, Tensor):
                found.append((module, name, value))
            elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
                found.append((module, name, type(value)(value)))
    return found


def _shared_server() -> bool:
    return os.environ.get("ATTENTION_LENS_SERVE", "local").strip().lower() == "shared"


def costly_allowed() -> bool:
    """Whether the user allowed networks over the budget (never on a lab server)."""
    return not _shared_server() and os.environ.get(ALLOW_COSTLY_ENV, "").strip() in (
        "1",
        "true",
        "yes",
    )


def check_cost(cost: RunCost | None, allow: bool | None = None) -> str | None:
    """One line refusing `cost` when it is over the budget (None: within it, or allowed)."""
    if cost is None or (cost.flops <= MAX_FLOPS and cost.activation_bytes <= MAX_ACTIVATION_BYTES):
        return None
    allowed = costly_allowed() if allow is None else allow and not _shared_server()
    if allowed:
        return None
    return (
        f"one image would cost {cost.describe()} (limit {MAX_FLOPS / 1e9:,.0f} GFLOPs, "
        f"{MAX_ACTIVATION_BYTES / 2**30:,.0f} GiB); refused before running "
        f"(set {ALLOW_COSTLY_ENV}=1 to allow it on your own machine)"
    )
