"""Where a transformer's self-attention can be read, without unfusing it.

A *reader* tells the tracer which submodule calls to tap in one self-attention module type and
how to turn what the taps kept into post-softmax attention probabilities. Fused attention stays
fused: for timm's `Attention` the taps keep q and k (the outputs of `q_norm` / `k_norm`) and
softmax(q k^T * scale) is computed when the record is built; timm's global fused-attention
setting is never touched. torchvision's `nn.MultiheadAttention` is asked for per-head weights
only while a trace is on.

Gradients with respect to the probabilities (Chefer et al.'s GAE, LeGrad) need no unfused
attention either: the output depends on A only through O = A V, so dy/dA = (dy/dO) V^T, with
dy/dO read at the head-merged tensor that enters the output projection.

Readers here: timm `Attention` (ViT, DeiT, register-token ViTs), timm Swin `WindowAttention`,
`nn.MultiheadAttention` self-attention (torchvision's ViT), torchvision Swin's
`ShiftedWindowAttention` (v1 and v2), Hugging Face transformers' ViT-style attention (ViT,
DeiT, BEiT, DINOv2, CLIP, SigLIP: `q_proj` / `k_proj` / `v_proj`, the additive mask of the
call) and Swin's (v1 and v2) window attention, and `ProbabilitiesReader` for a user's module whose
submodule outputs the probabilities (`register_attention(..., kind="self-attention",
attention="attn_drop")`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SelfAttentionReader",
    "Tap",
    "TimmAttentionReader",
    "TimmWindowReader",
    "TimmUnfusedReader",
    "TimmWindowV2Reader",
    "CaitTalkingHeadsReader",
    "CaitClassAttentionReader",
    "MultiheadReader",
    "TorchvisionWindowReader",
    "ProbabilitiesReader",
    "HuggingFaceAttentionReader",
    "HuggingFaceWindowReader",
    "HuggingFaceSwinV2Reader",
    "WindowGeometry",
    "received_on_grid",
]


@dataclass(frozen=True)
class Tap:
    """One call to watch: `module`'s output ("after") or its arguments ("before"); `keep`
    turns the tap's payload ((args, kwargs) or (args, output)) into the kept value."""

    module: nn.Module
    when: str
    part: str
    keep: Callable[[tuple, object], object]


@dataclass(frozen=True)
class WindowGeometry:
    """How one window-attention call cut its (N, H, W) grid into windows."""

    height: int
    width: int
    window: tuple[int, int]
    shift: tuple[int, int]
    roll_first: bool  # timm rolls then pads; torchvision pads then rolls


class SelfAttentionReader:
    """How to read one self-attention module type (subclass per type)."""

    windowed = False  # attention within windows (Swin): no global (T, T) matrix
    patches_only = False  # the call sees no prefix tokens: its map is the patches' mean
    vit_only = False  # records only inside a recognised ViT (a generic module elsewhere)

    def taps(self, name: str, module: nn.Module, model: nn.Module) -> list[Tap]:
        raise NotImplementedError

    def probabilities(self, module: nn.Module, parts: dict) -> Tensor | None:
        """(N, heads, T, T) post-softmax probabilities (windowed: (N * windows, heads, w, w)),
        or None when this call was not self-attention (a cross-attention call)."""
        raise NotImplementedError

    row_parts: tuple[str, ...] = ()  # the parts `probabilities` reads, kept after `class_row`

    def class_row(self, module: nn.Module, parts: dict) -> Tensor | None:
        """(N, heads, 1, T): the first token's row of `probabilities` alone, or None where
        this reader cannot compute it more cheaply (the whole matrix is then computed)."""
        return None

    def geometry(self, module: nn.Module, parts: dict) -> WindowGeometry:
        raise NotImplementedError  # windowed readers only

    def gradient_source(self, parts: dict) -> Tensor | None:
        """A tensor of the forward graph that y depends on A through (None: not readable)."""
        return None

    def probability_gradient(self, module: nn.Module, parts: dict, grad: Tensor) -> Tensor:
        """dy/dA (N, heads, T, T) from dy/d(gradient_source)."""
        raise ValueError(f"{type(module).__name__}: gradients of its attention cannot be read")


def _heads(t: Tensor, heads: int) -> Tensor:
    """(N, T, heads * d) -> (N, heads, T, d)."""
    n, tokens, width = t.shape
    return t.reshape(n, tokens, heads, width // heads).transpose(1, 2)


def _softmax(logits: Tensor) -> Tensor:
    return logits.float().softmax(-1)


def _masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(logits + mask): a boolean mask keeps where True, a float mask is added."""
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    return _softmax(logits)


class TimmAttentionReader(SelfAttentionReader):
    """timm `Attention`: q, k from `q_norm` / `k_norm`, v from `qkv`, dy/dO at `proj`'s input."""

    def taps(self, name, module, model):
        taps = [
            Tap(module.q_norm, "after", "q", lambda _a, out: out),
            Tap(module.k_norm, "after", "k", lambda _a, out: out),
            Tap(module, "before", "mask", _timm_mask),
        ]
        if isinstance(module.norm, nn.Identity) and getattr(module, "gate", None) is None:
            taps += [
                Tap(module.qkv, "after", "qkv", lambda _a, out: out),
                Tap(module.proj, "before", "merged", lambda args, _kw: args[0]),
            ]
        return taps

    def probabilities(self, module, parts):
        q, k = parts["q"].float(), parts["k"].float()
        logits = (q * module.scale) @ k.transpose(-2, -1)
        return _masked_softmax(logits, parts.get("mask"))

    row_parts = ("q", "k")

    def class_row(self, module, parts):
        if parts.get("mask") is not None:
            return None
        q, k = parts["q"][:, :, :1].float(), parts["k"].float()
        return _softmax((q * module.scale) @ k.transpose(-2, -1))

    def gradient_source(self, parts):
        return parts.get("merged")

    def probability_gradient(self, module, parts, grad):
        if "qkv" not in parts:
            return super().probability_gradient(module, parts, grad)
        n, tokens, _ = parts["qkv"].shape
        v = parts["qkv"].reshape(n, tokens, 3, module.num_heads, -1)[:, :, 2].transpose(1, 2)
        return _heads(grad.float(), module.num_heads) @ v.float().transpose(-2, -1)


def _timm_mask(args: tuple, kwargs: dict) -> Tensor | None:
    mask = kwargs.get("attn_mask") if kwargs else None
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]
    return mask


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


class HuggingFaceAttentionReader(SelfAttentionReader):
    """transformers' attention modules with `q_proj`, `k_proj`, `v_proj` and an output
    projection (`o_proj`; CLIP's and SigLIP's `out_proj`): q, k, v from the projections, the
    additive mask of the call (BEiT: its relative position bias), softmax(q k^T * scaling + mask)
    as the model's eager path computes it; dy/dO at the output projection's input. The model
    keeps whichever attention it was built with (sdpa)."""

    def taps(self, name, module, model):
        out = getattr(module, "o_proj", None)
        out = module.out_proj if out is None else out
        return [
            Tap(module, "before", "mask", _hf_mask),
            Tap(module.q_proj, "after", "q", lambda _a, o: o),
            Tap(module.k_proj, "after", "k", lambda _a, o: o),
            Tap(module.v_proj, "after", "v", lambda _a, o: o),
            Tap(out, "before", "merged", lambda args, _kw: args[0]),
        ]

    def probabilities(self, module, parts):
        return self._softmax_of(module, parts["q"], parts)

    row_parts = ("q", "k")

    def class_row(self, module, parts):
        if parts.get("mask") is not None:  # BEiT's bias: the whole matrix
            return None
        return self._softmax_of(module, parts["q"][:, :1], parts)

    @staticmethod
    def _softmax_of(module, queries: Tensor, parts: dict) -> Tensor:
        heads = queries.shape[-1] // module.head_dim
        q, k = _heads(queries.float(), heads), _heads(parts["k"].float(), heads)
        scaling = getattr(module, "scaling", None)
        scaling = module.scale if scaling is None else scaling
        logits = (q @ k.transpose(-2, -1)) * scaling
        return _masked_softmax(logits, parts.get("mask"))

    def gradient_source(self, parts):
        return parts.get("merged")

    def probability_gradient(self, module, parts, grad):
        heads = parts["v"].shape[-1] // module.head_dim
        v = _heads(parts["v"].float(), heads)
        return _heads(grad.float(), heads) @ v.transpose(-2, -1)


def _hf_mask(args: tuple, kwargs: dict) -> Tensor | None:
    mask = kwargs.get("attention_mask") if kwargs else None
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]
    return mask


class HuggingFaceWindowReader(SelfAttentionReader):
    """transformers' Swin `SwinAttention`: q, k from the projections, the relative position
    bias from the module, the shift mask from the call; the grid from the enclosing
    `SwinLayer`'s call, its window and shift as they are when the attention runs (the layer
    clamps them to small grids). transformers pads, then rolls, as torchvision does."""

    windowed = True
    depth = 1  # how far above the attention module its SwinLayer is

    def taps(self, name, module, model):
        layer = model.get_submodule(name.rsplit(".", self.depth)[0]) if "." in name else model
        if not hasattr(layer, "shift_size") or not hasattr(layer, "window_size"):
            raise ValueError(f"{name!r}: a Swin attention outside a Swin layer")

        def grid(args, kwargs):
            dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
            return int(dims[0]), int(dims[1])

        def window(_args, _kwargs):
            return int(layer.window_size), int(layer.shift_size)

        return [Tap(layer, "before", "grid", grid), Tap(module, "before", "window", window),
                *self.attention_taps(module)]  # fmt: skip

    def attention_taps(self, module: nn.Module) -> list[Tap]:
        return [
            Tap(module, "before", "mask", _hf_mask),
            Tap(module.q_proj, "after", "q", lambda _a, o: o),
            Tap(module.k_proj, "after", "k", lambda _a, o: o),
        ]

    def probabilities(self, module, parts):
        heads = module.num_attention_heads
        q, k = _heads(parts["q"].float(), heads), _heads(parts["k"].float(), heads)
        logits = (q @ k.transpose(-2, -1)) * module.scaling
        logits = logits + module.relative_position_bias().float()
        mask = parts.get("mask")
        if mask is not None:  # (windows, w*w, w*w), the same for every image
            tokens = logits.shape[-1]
            logits = (
                logits.view(-1, mask.shape[0], heads, tokens, tokens) + mask.float()[None, :, None]
            )
            logits = logits.view(-1, heads, tokens, tokens)
        return _softmax(logits)

    def geometry(self, module, parts):
        (h, w), (window, shift) = parts["grid"], parts["window"]
        return WindowGeometry(h, w, (window, window), (shift, shift), roll_first=False)


class HuggingFaceSwinV2Reader(HuggingFaceWindowReader):
    """transformers' `Swinv2SelfAttention` (cosine attention, continuous position bias): it
    has no fused path, so its probabilities are the input of its `dropout`."""

    depth = 2  # Swinv2Layer.attention.self

    def attention_taps(self, module):
        return [Tap(module.dropout, "before", "probabilities", lambda args, _kw: args[0])]

    def probabilities(self, module, parts):
        return parts["probabilities"].float()


class TimmWindowReader(SelfAttentionReader):
    """timm Swin `WindowAttention`: q, k from `qkv`, the shift mask from its call, the grid
    from the enclosing `SwinTransformerBlock`'s input (B, H, W, C)."""

    windowed = True

    def taps(self, name, module, model):
        block = _parent(model, name)
        if not hasattr(block, "shift_size") or not hasattr(block, "window_size"):
            raise ValueError(f"{name!r}: a WindowAttention outside a SwinTransformerBlock")
        self_block = block

        def grid(args, _kw):
            x = args[0]
            return (x.shape[1], x.shape[2], tuple(self_block.window_size),
                    tuple(self_block.shift_size))  # fmt: skip

        return [
            Tap(block, "before", "grid", grid),
            Tap(module, "before", "mask", _window_mask),
            Tap(module.qkv, "after", "qkv", lambda _a, out: out),
        ]

    def probabilities(self, module, parts):
        qkv = parts["qkv"]
        n, tokens, _ = qkv.shape
        q, k, _v = qkv.reshape(n, tokens, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4).float()
        logits = (q * module.scale) @ k.transpose(-2, -1) + module._get_rel_pos_bias().float()
        mask = parts.get("mask")
        if mask is not None:
            windows = mask.shape[0]
            logits = logits.view(-1, windows, module.num_heads, tokens, tokens)
            logits = (logits + mask.float()[None, :, None]).view(
                -1, module.num_heads, tokens, tokens
            )
        return _softmax(logits)

    def geometry(self, module, parts):
        h, w, window, shift = parts["grid"]
        return WindowGeometry(h, w, window, shift, roll_first=True)


class TimmUnfusedReader(SelfAttentionReader):
    """timm attention that applies rotary embeddings, a relative position bias or talking
    heads between q k^T and the softmax (EVA / EVA-02, BEiT): the probabilities are the input
    of its `attn_drop`, exactly as timm's unfused path computes them. While a trace is on, the
    module runs that path (its own `fused_attn` set off for the call, then restored; timm's
    global setting untouched), so A is in the graph: dy/dA is its gradient."""

    def taps(self, name, module, model):
        if not isinstance(getattr(module, "attn_drop", None), nn.Module):
            raise ValueError(f"{name!r}: {type(module).__name__} has no attn_drop to read")

        saved: dict[str, bool] = {}  # the module's own setting while a call runs unfused

        def unfuse(_args, _kwargs):
            if hasattr(module, "fused_attn"):  # talking heads have no fused path
                saved.setdefault("fused", module.fused_attn)
                module.fused_attn = False

        def restore(_args, _out):  # timm reads the attribute at each call
            if "fused" in saved:
                module.fused_attn = saved.pop("fused")

        return [
            Tap(module, "before", "fused", unfuse),
            Tap(module.attn_drop, "after", "probabilities", lambda _a, out: out),
            Tap(module, "after", "restored", restore),
        ]

    def probabilities(self, module, parts):
        p = parts.get("probabilities")
        return None if p is None else p.float()

    def gradient_source(self, parts):
        return parts.get("probabilities")

    def probability_gradient(self, module, parts, grad):
        return grad.float()


class CaitTalkingHeadsReader(TimmUnfusedReader):
    """CaiT's self-attention blocks (talking heads: heads mixed before and after the softmax)
    see the patches only; the class token joins later. Their (P, P) matrix is padded to the
    network's (1 + P) tokens with the class token's identity row (it is left as it is), so
    that rollout and GAE multiply them with the class-attention blocks; the block's own map is
    the mean attention its patches receive."""

    patches_only = True

    def probabilities(self, module, parts):
        p = super().probabilities(module, parts)
        return None if p is None else _with_class_token(p, identity=True)

    def probability_gradient(self, module, parts, grad):
        return _with_class_token(grad.float(), identity=False)


class CaitClassAttentionReader(TimmUnfusedReader):
    """CaiT's class-attention blocks: only the class token queries, (N, heads, 1, T). As a
    (T, T) token-mixing matrix its first row is that attention and the patches' rows the
    identity (class attention leaves the patches as they are)."""

    def probabilities(self, module, parts):
        p = super().probabilities(module, parts)
        if p is None:
            return None
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        full = eye.expand(*p.shape[:2], -1, -1).clone()
        full[:, :, :1] = p
        return full

    def probability_gradient(self, module, parts, grad):
        full = grad.new_zeros(*grad.shape[:2], grad.shape[-1], grad.shape[-1]).float()
        full[:, :, :1] = grad.float()
        return full


def _with_class_token(m: Tensor, identity: bool) -> Tensor:
    """(N, heads, P, P) -> (N, heads, 1 + P, 1 + P), the class token's entry 1 or 0."""
    out = F.pad(m, (1, 0, 1, 0))
    if identity:
        out[:, :, 0, 0] = 1.0
    return out


class TimmWindowV2Reader(TimmWindowReader):
    """timm Swin v2 `WindowAttention` (cosine attention, continuous position bias): the
    probabilities are its `attn_drop` input (it has no fused path); the grid as in v1."""

    def taps(self, name, module, model):
        grid = [t for t in super().taps(name, module, model) if t.part == "grid"]
        return [*grid, Tap(module.attn_drop, "after", "probabilities", lambda _a, out: out)]

    def probabilities(self, module, parts):
        return parts["probabilities"].float()


def _window_mask(args, kwargs) -> Tensor | None:
    mask = kwargs.get("mask") if kwargs else None
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
        mask = args[1]
    return mask


class MultiheadReader(SelfAttentionReader):
    """`nn.MultiheadAttention` called as self-attention (torchvision's ViT): asked for per-head
    weights while tracing; dy/dO from dy/d(output) through `out_proj`. Outside a recognised
    ViT (a text transformer, a hybrid) it gives no record."""

    vit_only = True

    def taps(self, name, module, model):
        def ask_weights(args, kwargs):
            if len(args) < 3 or not (args[0] is args[1] is args[2]):
                return None  # cross-attention: left alone
            if kwargs is not None and len(args) <= 4:  # need_weights is a keyword here
                kwargs["need_weights"] = True
                kwargs["average_attn_weights"] = False
            return args[0]

        return [
            Tap(module, "before", "x", ask_weights),
            Tap(module, "after", "out", lambda _a, out: out),
        ]

    def probabilities(self, module, parts):
        out = parts.get("out")
        if parts.get("x") is None or not isinstance(out, tuple) or out[1] is None:
            return None  # not a self-attention call, or weights not given
        weights = out[1]
        if weights.ndim == 3:  # (N, T, T) when the call fixed average_attn_weights itself
            return None
        return weights.float()  # (N, heads, T, T) whatever batch_first says

    def gradient_source(self, parts):
        out = parts.get("out")
        return out[0] if isinstance(out, tuple) else None

    def probability_gradient(self, module, parts, grad):
        x = parts["x"]
        if not module.batch_first:  # (T, N, E) -> (N, T, E)
            x, grad = x.transpose(0, 1), grad.transpose(0, 1)
        width = module.embed_dim
        bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * width :]
        v = F.linear(x.float(), module.in_proj_weight[2 * width :].float(),
                     None if bias is None else bias.float())  # fmt: skip
        merged_grad = grad.float() @ module.out_proj.weight.float()
        heads = module.num_heads
        return _heads(merged_grad, heads) @ _heads(v, heads).transpose(-2, -1)


class TorchvisionWindowReader(SelfAttentionReader):
    """torchvision Swin `ShiftedWindowAttention` (and V2): its attention is functional, so the
    probabilities are recomputed from its input when the record is built."""

    windowed = True

    def taps(self, name, module, model):
        return [Tap(module, "before", "x", lambda args, _kw: args[0])]

    def _shift(self, module, pad_h: int, pad_w: int) -> tuple[int, int]:
        window, shift = list(module.window_size), list(module.shift_size)
        if window[0] >= pad_h:
            shift[0] = 0
        if window[1] >= pad_w:
            shift[1] = 0
        return shift[0], shift[1]

    def geometry(self, module, parts):
        _, h, w, _ = parts["x"].shape
        window = tuple(module.window_size)
        pad_h, pad_w = -(-h // window[0]) * window[0], -(-w // window[1]) * window[1]
        return WindowGeometry(h, w, window, self._shift(module, pad_h, pad_w), roll_first=False)

    def probabilities(self, module, parts):
        x = parts["x"].float()
        geo = self.geometry(module, parts)
        windows = _partition(x, geo)  # (N * nW, w*w, C)
        heads, width = module.num_heads, x.shape[-1]
        qkv_bias = None if module.qkv.bias is None else module.qkv.bias.float()
        logit_scale = getattr(module, "logit_scale", None)
        if logit_scale is not None and qkv_bias is not None:  # v2 has no key bias
            qkv_bias = qkv_bias.clone()
            qkv_bias[width : 2 * width] = 0
        qkv = F.linear(windows, module.qkv.weight.float(), qkv_bias)
        n, tokens, _ = qkv.shape
        q, k, _v = qkv.reshape(n, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        if logit_scale is not None:
            scale = torch.clamp(logit_scale.float(), max=math.log(100.0)).exp()
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
        else:
            logits = (q * (width // heads) ** -0.5) @ k.transpose(-2, -1)
        logits = logits + module.get_relative_position_bias().float()
        if any(geo.shift):
            mask = _shift_mask(geo, x.device)
            logits = logits.view(-1, mask.shape[0], heads, tokens, tokens) + mask[None, :, None]
            logits = logits.view(-1, heads, tokens, tokens)
        return _softmax(logits)


def _padded(geo: WindowGeometry) -> tuple[int, int]:
    return -(-geo.height // geo.window[0]) * geo.window[0], -(
        -geo.width // geo.window[1]
    ) * geo.window[1]


def _partition(x: Tensor, geo: WindowGeometry) -> Tensor:
    """(N, H, W, C) -> (N * windows, w*w, C), padded and shifted as torchvision does."""
    pad_h, pad_w = _padded(geo)
    x = F.pad(x, (0, 0, 0, pad_w - geo.width, 0, pad_h - geo.height))
    if any(geo.shift):
        x = torch.roll(x, shifts=(-geo.shift[0], -geo.shift[1]), dims=(1, 2))
    n, c = x.shape[0], x.shape[-1]
    wh, ww = geo.window
    x = x.view(n, pad_h // wh, wh, pad_w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def _shift_mask(geo: WindowGeometry, device) -> Tensor:
    """torchvision's shifted-window mask (windows, w*w, w*w): -100 across regions."""
    pad_h, pad_w = _padded(geo)
    (wh, ww), (sh, sw) = geo.window, geo.shift
    labels = torch.zeros(pad_h, pad_w, device=device)
    count = 0
    for hs in ((0, -wh), (-wh, -sh), (-sh, None)):
        for ws in ((0, -ww), (-ww, -sw), (-sw, None)):
            labels[hs[0] : hs[1], ws[0] : ws[1]] = count
            count += 1
    labels = labels.view(pad_h // wh, wh, pad_w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = labels[:, None, :] - labels[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


def received_on_grid(probabilities: Tensor, geo: WindowGeometry, batch: int) -> Tensor:
    """(N, heads, H, W): the mean attention each token receives inside its window, put back
    on the stage's grid (windows merged, the cyclic shift undone, padding cut)."""
    pad_h, pad_w = _padded(geo)
    wh, ww = geo.window
    received = probabilities.mean(-2)  # (N * nW, heads, w*w): mean over the window's queries
    heads = received.shape[1]
    grid = received.view(batch, pad_h // wh, pad_w // ww, heads, wh, ww)
    grid = grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, heads, pad_h, pad_w)
    if geo.roll_first:  # timm: roll, then pad -> cut, then roll back
        grid = grid[..., : geo.height, : geo.width]
        if any(geo.shift):
            grid = torch.roll(grid, shifts=geo.shift, dims=(-2, -1))
        return grid
    if any(geo.shift):  # torchvision: pad, then roll -> roll back, then cut
        grid = torch.roll(grid, shifts=geo.shift, dims=(-2, -1))
    return grid[..., : geo.height, : geo.width]


class ProbabilitiesReader(SelfAttentionReader):
    """A user's module: the output of submodule `path` is the (N, heads, T, T) probabilities
    (e.g. its `attn_drop`, or its softmax); requires the unfused path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def taps(self, name, module, model):
        try:
            sub = module.get_submodule(self.path) if self.path else module
        except AttributeError as exc:
            raise ValueError(f"{name!r} has no submodule {self.path!r}") from exc
        return [Tap(sub, "after", "probabilities", lambda _a, out: out)]

    def probabilities(self, module, parts):
        p = parts["probabilities"]
        if not isinstance(p, Tensor) or p.ndim not in (3, 4) or p.shape[-1] != p.shape[-2]:
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(
                f"{type(module).__name__}.{self.path}: output {shape} is not (N, heads, T, T) "
                "attention probabilities (is the module's fused path on?)"
            )
        return (p[:, None] if p.ndim == 3 else p).float()
