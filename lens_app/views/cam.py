"""Class activation map: the chosen method's CAMs, and Captum attributions on demand."""

from __future__ import annotations

import streamlit as st

import viz
from viz import figures

from .. import keys
from ..context import USER_ERRORS, Context
from ..widgets import KEEP, show_figure, state

CAPTUM_LABELS = {
    "guided-gradcam": "Guided Grad-CAM (2 passes)",
    "integrated-gradients": "Integrated Gradients (32 passes)",
    "occlusion": "Occlusion (one pass per 16-px step of a 32-px window)",
}
CAPTUM_KEPT = 8  # attributions kept per browser session


def render(ctx: Context) -> None:
    if not ctx.analysis.cams:  # a network that is not a classifier, nothing chosen yet
        st.info("Choose what to explain above: the maps then explain it.")
        return
    show_figure(ctx.draw("gradcam"), f"{ctx.stem}_{ctx.cam_name}", f"gc:{ctx.stamp}", ctx.view,
                ctx.errors)  # fmt: skip
    if ctx.classifier:  # Captum's attributions here follow a class
        captum_panel(ctx)


def captum_attribution(ckpt, item, target: int | None, method: str):
    """The attribution of this image, model, class and method: computed once per session.

    Not an `st.cache_data` function: the computation reports progress on the page, and a
    cached function must not touch Streamlit elements (its replay would fail on a revisit).
    """
    kept: dict = state(keys.CAPTUM_RESULTS, {})
    key = (item.sha, ckpt.sha256, target, method)
    if key not in kept:
        bar = st.progress(0.0, text="Starting…")
        try:
            x = ckpt.preprocess.batch([item.image])
            kept[key] = viz.attribute(ckpt.model, x, target, method=method, progress=lambda done, total: bar.progress(
                done / total, text=f"{done} of {total} images through the network"))  # fmt: skip
        finally:
            bar.empty()
        while len(kept) > CAPTUM_KEPT:
            kept.pop(next(iter(kept)))
    return kept[key]


def captum_panel(ctx: Context) -> None:
    with st.expander("Captum attributions at input resolution"):
        method = st.selectbox("Attribution method", list(viz.ATTRIBUTION_METHODS),
                              key="captum_method", persist_state=KEEP,
                              format_func=lambda m: CAPTUM_LABELS.get(m, m))  # fmt: skip
        if not st.toggle("Run", key="captum_run", persist_state=KEEP):
            return
        try:
            attr = captum_attribution(ctx.ckpt, ctx.item, ctx.target, method)
        except USER_ERRORS as exc:
            ctx.errors.error(viz.md_text(exc))
            return
        crop = ctx.ckpt.preprocess.crop_image(ctx.item.image)
        label = CAPTUM_LABELS.get(method, method).split(" (")[0]
        s = ctx.settings
        show_figure(
            lambda: figures.attribution_map(crop, attr[0], method_label=label, cmap=s.cmap,
                                            alpha=s.alpha, width=s.width),
            f"{ctx.stem}_{method}", keys.captum_figure(ctx.stamp, method), ctx.view, ctx.errors,
        )  # fmt: skip
        st.download_button(
            "Attribution (npz)", viz.npz_bytes({"attribution": attr[0].numpy()}),
            file_name=f"{ctx.view.prefix}_{ctx.stem}_{method}.npz",
            key=keys.captum_npz(ctx.stamp), on_click="ignore", icon=":material/download:",
        )  # fmt: skip
