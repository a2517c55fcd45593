"""BAM hierarchy: a BAM model's modules, stage by stage."""

from __future__ import annotations

import streamlit as st

import viz

from ..context import Context
from ..widgets import show_figure


def render(ctx: Context) -> None:
    if viz.FIGURES["bam-hierarchy"].unavailable(ctx.analysis) is None:
        show_figure(ctx.draw("bam-hierarchy"), f"{ctx.stem}_bam_hierarchy", f"bam:{ctx.stamp}",
                    ctx.view, ctx.errors)  # fmt: skip
    else:
        st.info("The BAM hierarchy exists only for BAM models; choose one in the sidebar.")
