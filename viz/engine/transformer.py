"""Network-wide maps of a vision transformer, from its self-attention records.

- `rollout`: Abnar & Zuidema, ACL 2020 (https://arxiv.org/abs/2005.00928). Per block the heads
  are fused (mean, max or min), the identity added and halved for the residual path, rows
  renormalised, and the blocks multiplied from the first (or `start`) on; the map is the class
  token's row over the patches. `discard` sets that fraction of each fused matrix's smallest
  entries to zero first (the class token's own entry is kept), as in the vit-explain scripts.
- `gae`: Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model Explainability"
  (https://arxiv.org/abs/2103.15679): R = I; per block R <- R + mean_h(relu(dy/dA * A)) R;
  the class token's row over the patches.
- `legrad`: Bousselham et al. 2024 (https://arxiv.org/abs/2404.03214): per block l the class
  score of that block's tokens (the final norm and head on their mean), its gradient with respect
  to the block's attention, positive part averaged over heads and queries, prefix keys dropped,
  averaged over blocks (as TorchCAM 0.5's `LeGrad`).

Without a class token (global-pool ViTs) a map is the mean over the patch rows instead.
Only global attention is read: Swin's window attention has no token-to-token matrix across the
image, so these methods refuse it (its per-stage Grad-CAM works).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from viz.engine.trace import AttentionRecord

__all__ = ["rollout", "gae", "legrad", "HEAD_FUSIONS", "AttentionCall"]

HEAD_FUSIONS = ("mean", "max", "min")

AttentionCall = tuple  # (watch, parts, record) from the trace state, forward order


def _global(records: Sequence[AttentionRecord], method: str) -> list[AttentionRecord]:
    found = [r for r in records if r.kind == "self-attention"]
    if not found:
        raise ValueError(f"{method} needs a vision transformer: this network has no self-attention")
    if any(r.attention is None for r in found):
        raise ValueError(
            f"{method} needs global self-attention (ViT, DeiT); window attention (Swin) has no "
            "token-to-token matrix across the image: use gradcam on its stages"
        )
    tokens = {r.attention.shape[-1] for r in found}
    if len(tokens) > 1:
        raise ValueError(f"{method}: blocks attend over different token counts {sorted(tokens)}")
    return found


def _row_over_patches(matrix: Tensor, rec: AttentionRecord, class_token: bool) -> Tensor:
    """(N, T, T) -> (N, h, w): the class token's row (or the patch rows' mean) over patches."""
    n, h, w = rec.spatial.shape
    prefix = matrix.shape[-1] - h * w
    row = matrix[:, 0, prefix:] if class_token else matrix[:, prefix:, prefix:].mean(1)
    return row.reshape(n, h, w)


def rollout(
    records: Sequence[AttentionRecord],
    *,
    head_fusion: str = "mean",
    discard: float = 0.0,
    start: int = 0,
    class_token: bool | None = None,
) -> Tensor:
    """Attention rollout (N, h, w) over the blocks from `start` on."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(
            f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}"
        )
    if not 0.0 <= discard < 1.0:
        raise ValueError(f"discard must be in [0, 1), got {discard}")
    blocks = _global(records, "rollout")
    if not 0 <= start < len(blocks):
        raise ValueError(f"start must be a block in 0..{len(blocks) - 1}, got {start}")
    cls = blocks[0].class_token if class_token is None else class_token
    joint = None
    for rec in blocks[start:]:
        a = rec.attention.double()
        fused = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[head_fusion]
        if discard > 0:
            fused = _discard_lowest(fused, discard)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        fused = (fused + eye) / 2
        fused = fused / fused.sum(-1, keepdim=True)
        joint = fused if joint is None else fused @ joint
    return _row_over_patches(joint, blocks[0], cls).float()


def _discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    n, t, _ = fused.shape
    flat = fused.reshape(n, -1).clone()
    k = int(flat.shape[1] * ratio)
    if k:
        lowest = flat.topk(k, dim=1, largest=False).indices
        keep_first = lowest != 0  # never the class token's own entry
        flat.scatter_(
            1, lowest, torch.where(keep_first, 0.0, flat.gather(1, lowest)).to(flat.dtype)
        )
    return flat.view(n, t, t)


def _probability_gradients(calls: Sequence[AttentionCall], grads: Sequence[Tensor]) -> list[Tensor]:
    return [
        watch.reader.probability_gradient(watch.module, parts, g).detach()
        for (watch, parts, _rec), g in zip(calls, grads)
    ]


def gradient_sources(calls: Sequence[AttentionCall], method: str) -> list[Tensor]:
    """The tensors the attention gradients are read at, one per block (forward order)."""
    sources = []
    for watch, parts, _rec in calls:
        source = watch.reader.gradient_source(parts)
        if source is None or not source.requires_grad:
            raise ValueError(
                f"{method}: the attention gradient of {watch.name!r} cannot be read "
                f"({type(watch.module).__name__} with a normalisation or gate after attention)"
            )
        sources.append(source)
    return sources


def gae(
    calls: Sequence[AttentionCall], score: Tensor, *, class_token: bool | None = None
) -> Tensor:
    """Chefer et al.'s generic attention explainability (N, h, w) for `score` (summed target
    logits of the traced forward, still in its graph)."""
    blocks = _global([rec for *_, rec in calls], "gae")
    sources = gradient_sources(calls, "gae")
    grads = torch.autograd.grad(score, sources, allow_unused=True)
    grads = [torch.zeros_like(s) if g is None else g for g, s in zip(grads, sources)]
    cls = blocks[0].class_token if class_token is None else class_token
    relevance = None
    for rec, d_attention in zip(blocks, _probability_gradients(calls, grads)):
        a = rec.attention.double()
        contribution = torch.relu(d_attention.double() * a).mean(1)  # (N, T, T)
        if relevance is None:
            relevance = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(contribution).clone()
        relevance = relevance + contribution @ relevance
    return _row_over_patches(relevance, blocks[0], cls).float()


def legrad(
    calls: Sequence[AttentionCall],
    block_outputs: Sequence[Tensor],
    block_score: Callable[[Tensor], Tensor],
) -> Tensor:
    """LeGrad (N, h, w): the mean over blocks of relu(d s_l / d A_l) averaged over heads and
    queries, s_l = `block_score(tokens)` (N,): the target's score from block l's tokens (its
    logit through the final norm and head, or their likeness to a concept)."""
    _global([rec for *_, rec in calls], "legrad")
    sources = gradient_sources(calls, "legrad")
    maps = []
    for (watch, parts, rec), source, tokens in zip(calls, sources, block_outputs):
        s = block_score(tokens).sum()
        (g,) = torch.autograd.grad(s, [source], retain_graph=True)
        d_attention = watch.reader.probability_gradient(watch.module, parts, g)
        n, h, w = rec.spatial.shape
        relevance = torch.relu(d_attention).mean((1, 2))  # (N, T)
        maps.append(relevance[:, relevance.shape[-1] - h * w :].reshape(n, h, w))
    return torch.stack(maps).mean(0).detach().float()
