"""Channel attention (a CNN's channel weights) or, for a transformer, its attention heads."""

from __future__ import annotations

import streamlit as st

import viz

from ..context import Context, Drawing
from ..widgets import KEEP, show_figure


def render(ctx: Context) -> None:
    if ctx.transformer:
        show_figure(ctx.draw("heads"), f"{ctx.stem}_heads", f"hd:{ctx.stamp}", ctx.view,
                    ctx.errors)  # fmt: skip
        return
    trace = ctx.base[ctx.pick].trace
    if not len(trace):
        st.info(f"{viz.md_text(ctx.ckpt.label)} has no attention modules, so no channel weights.")
        return
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
