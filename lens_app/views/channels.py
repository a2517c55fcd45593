"""Channel attention (a CNN's channel weights) or, for a transformer, its attention heads (and,
for a hybrid CNN + ViT, its CNN gates' channel weights too)."""

from __future__ import annotations

import streamlit as st

import viz

from ..context import Context, Drawing
from ..widgets import KEEP, show_figure

HEAD_FIGURES = {  # a transformer's figures of its heads, by their export names
    "heads": "Every head",
    "dino-heads": "DINO: class-token attention and its mass masks",
    "token-norms": "Output-token norms (registers)",
}


CHANNELS = "channels"  # a hybrid CNN + ViT's CBAM channel weights, beside its heads' figures


def render(ctx: Context) -> None:
    if ctx.transformer:
        heads(ctx)
        return
    trace = ctx.base[ctx.pick].trace
    if not len(trace):
        st.info(f"{viz.md_text(ctx.ckpt.label)} has no attention modules, so no channel weights.")
        return
    channel_weights(ctx)


def channel_weights(ctx: Context) -> None:
    """The channel weights of every module with them (SE, BAM, CBAM), top channels of the
    last, optionally beside another image's."""
    c1, c2 = st.columns(2)
    top_k = c1.slider("Top channels of the last module", 4, 32, 10, key="top_k",
                      persist_state=KEEP)  # fmt: skip
    items, pick = ctx.items, ctx.pick
    others = [i for i in range(len(items)) if i != pick]
    other = c2.selectbox(
        "Compare with image", [None, *others], key="channel_compare", persist_state=KEEP,
        format_func=lambda i: "(none)" if i is None else items[i].name,
    )  # fmt: skip
    compare = None if other is None else ctx.base[other].trace
    labels = None if other is None else [items[pick].name, items[other].name]
    base, crop, names, settings = ctx.base[pick], ctx.crop, ctx.ckpt.class_names, ctx.settings
    # the images' quick analyses (shared, `st.cache_data`): kept under their images and options
    key = ("channels", items[pick].sha, None if other is None else items[other].sha, top_k,
           tuple(labels or ()), *ctx.drawing_key())  # fmt: skip
    show_figure(
        Drawing(lambda: viz.draw_image_figure("channels", crop, base, names, settings,
                                              top_k=top_k, compare=compare, labels=labels), key),
        f"{ctx.stem}_channels", f"ch:{ctx.stamp}", ctx.view, ctx.errors,
    )  # fmt: skip


def heads(ctx: Context) -> None:
    """Every head, DINO's figure (one block's heads and the patches holding a share of their
    mass) or the registers paper's token norms, as the network allows."""
    trace = ctx.analysis.trace
    offered = [f for f in HEAD_FIGURES if viz.FIGURES[f].unavailable(ctx.analysis) is None]
    if trace.channel_records:  # a hybrid: its CNN gates have channels
        offered.append(CHANNELS)
    kind = st.radio(
        "Figure",
        offered,
        horizontal=True,
        key="head_figure",
        persist_state=KEEP,
        format_func=lambda f: HEAD_FIGURES.get(f, "Channel weights (CNN gates)"),
    )
    if kind == CHANNELS:
        channel_weights(ctx)
        return
    extra = {}
    if kind in ("dino-heads", "token-norms"):
        blocks = len(
            viz.class_token_blocks(trace) if kind == "dino-heads" else viz.norm_blocks(trace)
        )
        c1, c2 = st.columns(2)
        # keyed by the block count: another model's count must not meet this one's value
        extra["block"] = c1.slider("Block", 0, blocks - 1, blocks - 1, key=f"{kind}_block_{blocks}",
                                   persist_state=KEEP) if blocks > 1 else 0  # fmt: skip
        if kind == "dino-heads":
            extra["mass"] = c2.slider("Attention mass kept", 0.1, 0.95, 0.6, 0.05,
                                      key="dino_mass", persist_state=KEEP)  # fmt: skip
        else:
            extra["ratio"] = c2.slider("Outlier: norm over the median above", 1.2, 5.0, 2.0, 0.1,
                                       key="norm_ratio", persist_state=KEEP)  # fmt: skip
    name = f"{ctx.stem}_{kind.replace('-', '_')}"
    show_figure(ctx.draw(kind, **extra), name, f"hd:{kind}:{ctx.stamp}", ctx.view, ctx.errors)
