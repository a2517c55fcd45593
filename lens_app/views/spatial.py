"""Spatial attention: every module's spatial map over the image."""

from __future__ import annotations

import streamlit as st

import viz

from ..context import Context
from ..widgets import show_figure


def render(ctx: Context) -> None:
    if ctx.analysis.trace.spatial_records:
        show_figure(ctx.draw("overview"), f"{ctx.stem}_spatial", f"sp:{ctx.stamp}", ctx.view,
                    ctx.errors)  # fmt: skip
    else:  # a note, not a figure to download
        st.info(viz.no_spatial_maps(viz.md_text(ctx.ckpt.label), ctx.analysis.trace))
