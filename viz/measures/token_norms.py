"""High-norm output tokens of a vision transformer (Darcet et al., ICLR 2024, "Vision
Transformers Need Registers", https://arxiv.org/abs/2309.16588).

Large, well-trained ViTs (DINOv2, CLIP, DeiT-III) repurpose a few low-information patches as
global scratch space: those patches' output tokens have norms several times the rest, and
their attention maps show them as bright artefacts. Registers (extra prefix tokens) take that
role over. Here an outlier is a patch token whose norm exceeds `ratio` times the median patch
norm of its image (the paper's artefacts sit at several times the others). Read from the trace
(`AttentionRecord.token_norms`): no extra forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from viz.engine.trace import AttentionRecord, AttentionTrace

__all__ = ["TokenNorms", "token_norms", "norm_blocks"]


@dataclass(frozen=True)
class TokenNorms:
    """One block's output-token norms, for every image of the batch.

    Attributes:
        block: the attention record's label ("block 11").
        patches: (N, h, w) each patch token's L2 norm on the patch grid.
        median: (N,) each image's median patch norm.
        outliers: (N, h, w) bool, patches above `ratio` x the median.
        ratio: the outlier threshold, as a multiple of the median.
        prefix_share: (N,) the share of the class token's attention (mean over heads) that
            goes to the other prefix tokens (registers, a distillation token), or None
            without a class token or other prefix tokens.
        others: how many prefix tokens besides the class token.
    """

    block: str
    patches: Tensor
    median: Tensor
    outliers: Tensor
    ratio: float
    prefix_share: Tensor | None
    others: int

    @property
    def outlier_fraction(self) -> Tensor:
        """(N,) the share of patches that are outliers."""
        return self.outliers.flatten(1).float().mean(1)


def norm_blocks(trace: AttentionTrace) -> list[AttentionRecord]:
    """The self-attention records with their block's output-token norms."""
    return [r for r in trace if r.token_norms is not None and r.heads is not None]


def token_norms(trace: AttentionTrace, *, block: int = -1, ratio: float = 2.0) -> TokenNorms:
    """The output-token norms of one block (Python index into `norm_blocks`; -1: the last).

    Raises:
        ValueError: no block with token norms (a CNN, Swin's windows), `block` out of range,
            `ratio` not above 1.
    """
    if not ratio > 1.0:
        raise ValueError(f"ratio must be above 1 (a multiple of the median norm), got {ratio}")
    blocks = norm_blocks(trace)
    if not blocks:
        raise ValueError("token norms need a vision transformer with global self-attention")
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"block must be one of 0..{len(blocks) - 1} (or -1), got {block}")
    rec = blocks[block]
    n, _, h, w = rec.heads.shape
    prefix = rec.token_norms.shape[1] - h * w
    patches = rec.token_norms[:, prefix:].reshape(n, h, w)
    median = patches.flatten(1).median(1).values
    outliers = patches > ratio * median[:, None, None]
    others = prefix - 1 if rec.class_token else 0
    share = None
    if others > 0:  # the class token's row: how much of it the other prefix tokens take
        share = rec.attention[:, :, 0, 1:prefix].sum(-1).mean(1)
    return TokenNorms(rec.label, patches, median, outliers, ratio, share, max(others, 0))
