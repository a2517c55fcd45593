"""Attention Lens, the Streamlit app: `streamlit run app.py`.

The entry point: page setup, the sidebar's settings and the routing to the page (the views
live in `lens_app`, one module each; only the chosen view is computed and drawn). A shell over
the library: every computation is a call into `models` or `viz`, cached by `lens_app.caching`,
so changing how maps are drawn never runs the network again.

The environment variable ATTENTION_LENS_CHECKPOINTS points the app at another checkpoint folder;
ATTENTION_LENS_PLUGINS lists the operator's plugins (`models.plugins`), loaded once per server;
ATTENTION_LENS_TORCH_THREADS sets the CPU threads of a network pass (default 1, 0: torch's own).
"""

from __future__ import annotations

import logging

import streamlit as st

import viz
from lens_app.caching import Heap, network_threads, plugin_errors, policy
from lens_app.context import USER_ERRORS, View
from lens_app.images import choose_images
from lens_app.page import page
from lens_app.sidebar import choose_method, choose_model, drawing
from lens_app.widgets import Downloads

log = logging.getLogger("attention_lens.app")


def main() -> None:
    st.set_page_config(page_title="Attention Lens", page_icon=":mag:", layout="wide")
    network_threads()
    st.title("Attention Lens")
    st.caption(
        "What attention does inside a network: every BAM/CBAM/SE module's spatial map and "
        "channel weights, a vision transformer's self-attention per block and head, CAMs from "
        "the same pass, and how much they agree."
    )
    errors = st.container()  # the one place where problems are reported
    Downloads.of_session().report(errors)
    for line in plugin_errors():
        errors.warning(viz.md_text(line, limit=400))
    if policy().warning:
        errors.warning(viz.md_text(policy().warning))
    try:
        label, ckpt, models = choose_model(errors)
        if ckpt is not None:
            unread = viz.unread_attention_line(ckpt.model)
            if unread:  # its maps are missing from every view: said once, above them
                errors.warning(viz.md_text(f"{ckpt.label}: {unread}", limit=400))
        items = choose_images(errors)
        method, layers, samples, whole = choose_method(ckpt, errors)
        settings = drawing(method, layers, samples, errors)
        if ckpt is None:
            return
        if not items:
            st.info("Upload images or pick sample images in the sidebar.")
            return
        if not layers and not whole:
            raise ValueError("choose at least one CAM layer in the sidebar")
        page(ckpt, label, models, items, View(settings, viz.safe_stem(ckpt.label)), errors)
    except USER_ERRORS as exc:
        errors.error(viz.md_text(exc))
    except Exception as exc:  # a bug of ours: one line on the page, the traceback in the log
        log.exception("unexpected error")
        errors.error(
            viz.md_text(
                f"Unexpected error ({type(exc).__name__}: {exc}); the server log has details."
            )
        )


main()
Heap.settle()  # after the page: the collector's pass that follows each run stays short
