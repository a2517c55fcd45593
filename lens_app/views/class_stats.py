"""Class statistics: the mean channel weight per class over a folder on the server."""

from __future__ import annotations

import streamlit as st

import viz
from viz import figures

from .. import keys
from ..caching import policy
from ..context import USER_ERRORS, Context
from ..widgets import KEEP, show_figure, state


def render(ctx: Context) -> None:
    if not ctx.classifier:
        st.info(
            f"Class statistics compares classifiers on classes; {viz.md_text(ctx.ckpt.label)} returns "
            f"{viz.targets.OUTPUT_KINDS[ctx.kind]} (the command line explains it: --target)."
        )
        return
    if not ctx.analysis.trace.channel_records:  # the statistics are channel weights
        st.info(
            f"Class statistics average channel weights (SE, ECA, CBAM, BAM); "
            f"{viz.md_text(ctx.ckpt.label)} has none"
            + (" (self-attention weighs tokens, not channels)." if ctx.transformer else ".")
        )
        return
    st.markdown(
        "Mean channel weight per class over a folder on the server, one subfolder per class "
        "(ImageFolder layout)."
    )
    limits = policy()
    if not limits.server_paths:
        st.info("Server paths are turned off on this server (shared mode without allowed folders).")
        return
    ckpt = ctx.ckpt
    folder = st.text_input("Image folder on the server", key="stats_folder",
                           persist_state=KEEP).strip()  # fmt: skip
    results: dict = state(keys.CLASS_STATS, {})
    key = (ckpt.sha256, folder)
    if st.button("Compute class statistics", disabled=not folder, key="stats_run"):
        bar = st.progress(0.0, text="Reading images…")
        try:
            root = limits.check_path(folder, "folder")
            results[key] = viz.channel_statistics(
                ckpt.model, root, ckpt.preprocess,
                progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} images"),
                max_images=limits.max_stats_images, max_seconds=limits.max_stats_seconds,
            )  # fmt: skip
        except USER_ERRORS as exc:
            ctx.errors.error(viz.md_text(f"{folder}: {exc}"))
        bar.empty()
    if key in results:
        show_statistics(ctx, results[key])


def show_statistics(ctx: Context, stats) -> None:
    s = ctx.settings
    chosen = st.multiselect(
        "Modules", list(stats.means), default=viz.default_modules(stats),
        format_func=lambda n: stats.labels.get(n, n), key=keys.stats_modules(ctx.ckpt),
        persist_state=KEEP,
        help="Default: the last module of each stage, as in the SENet paper; add any other.",
    )  # fmt: skip
    if not chosen:
        st.info("Pick at least one module.")
        return
    show_figure(
        lambda: figures.class_channel_stats(stats, modules=chosen, cmap=s.cmap,
                                            shared_scale=s.shared_scale, width=s.width),
        "class_channel_stats", keys.stats_figure(ctx.ckpt), ctx.view, ctx.errors,
    )  # fmt: skip
