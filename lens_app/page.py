"""The page under the sidebar: the images' predictions, the inspected image with its class
and the zip of everything, then the chosen view, the only one computed and drawn."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

import viz

from . import explain, keys
from .caching import analysis
from .context import OTHER, Context, ImageItem, View, cam_file_name
from .slow import SlowRun
from .views import agreement, bam, cam, channels, class_stats, compare, dataset, spatial
from .widgets import KEEP, Downloads

# the views in their order, keyed by an id, not by their names: "Channel attention" becoming
# "Attention heads" keeps the view open, and so does any method ("Class activation map"
# whatever the method: the figure names it)
VIEWS: dict[str, tuple[str, Callable[[Context], None]]] = {
    "spatial": ("Spatial attention", spatial.render),
    "channels": ("Channel attention", channels.render),
    "cam": ("Class activation map", cam.render),
    "agreement": ("Agreement & deletion/insertion", agreement.render),
    "bam": ("BAM hierarchy", bam.render),
    "compare": ("Compare models", compare.render),
    "stats": ("Class statistics", class_stats.render),
    "dataset": ("Data set", dataset.render),
}
ON_A_TRANSFORMER = {"channels": "Attention heads"}  # a transformer has heads, not channels
FIRST_VIEW = "spatial"


def page(ckpt, label, model_options, items: list[ImageItem], view: View, errors) -> None:
    settings = view.settings
    kind = explain.kind_of(ckpt.sha256, ckpt, items[0])
    # the network's crop at the original's resolution: the same photo as in the downloads
    crops = [ckpt.preprocess.display_crop(item.image) for item in items]
    if kind == "classes":
        # the picker needs every image's prediction; a slow method runs on the picked image only
        quick, quick_smoothing = SlowRun.quick(settings.method, settings.smoothing)
        base = predict_all(ckpt, items, quick, settings.layers, quick_smoothing)
        pick = pick_image(ckpt, label, items, base, crops)
        target, an = explained_class(ckpt, label, items[pick], crops[pick], base[pick], settings)
        explained = None
    else:  # a segmenter, a detector or an embedding network: the user says what to explain
        base = [explain.attention_analysis(i.sha, ckpt.sha256, ckpt, i.image) for i in items]
        pick = pick_image(ckpt, label, items, base, crops)
        explained, an = explain.explained_output(kind, ckpt, label, items, pick, crops[pick],
                                                 settings)  # fmt: skip
        target = None
        if explained.target is not None:
            zip_button(st, ckpt, items[pick], explained.key, an, settings)
    ctx = Context(ckpt, label, model_options, tuple(items), tuple(base), tuple(crops), pick,
                  target, an, view, errors, kind, explained)  # fmt: skip
    chosen = choose_view(ctx.transformer)
    VIEWS[chosen][1](ctx)


def choose_view(transformer: bool) -> str:
    """The view control: one view drawn at a time (`st.tabs` would run every tab's content)."""
    if st.session_state.get(keys.VIEW) not in VIEWS:
        st.session_state[keys.VIEW] = FIRST_VIEW
    return st.segmented_control(
        "View", list(VIEWS), key=keys.VIEW, required=True, label_visibility="collapsed",
        format_func=lambda v: (transformer and ON_A_TRANSFORMER.get(v)) or VIEWS[v][0],
        persist_state=KEEP,  # kept through a run that stops above it (a slow method asking)
    )  # fmt: skip


def predict_all(ckpt, items: list[ImageItem], method: str, layers: tuple,
                smoothing: tuple) -> list:  # fmt: skip
    bar = st.progress(0.0, text="Analysing images…") if len(items) > 1 else None
    out = []
    with st.spinner("Running the network…"):
        for i, item in enumerate(items):
            out.append(analysis(item.sha, ckpt.sha256, None, method, layers, smoothing, ckpt,
                                item.image))  # fmt: skip
            if bar:
                bar.progress((i + 1) / len(items), text=f"Analysed {i + 1} of {len(items)} images")
    if bar:
        bar.empty()
    return out


def pick_image(ckpt, label, items, base, crops) -> int:
    """With several images: a strip of them with their predictions, and which to inspect."""
    if len(items) == 1:
        return 0
    st.subheader(f"{len(items)} images · {viz.md_text(label)}")
    for start in range(0, len(items), 5):
        for col, i in zip(st.columns(5), range(start, min(start + 5, len(items)))):
            caption = viz.md_text(items[i].name)
            if base[i].probs is not None:  # a classifier: its top-1 under the image
                top = viz.top_predictions(base[i].probs[0], ckpt.class_names, 1)[0]
                caption += f": {viz.md_text(top.name)} (P = {top.prob:.2f})"
            col.image(crops[i], caption=caption)
    return st.selectbox(
        "Inspect image", range(len(items)), format_func=lambda i: items[i].name, key=keys.INSPECT
    )


def explained_class(ckpt, label, item, crop, base, settings: viz.FigureSettings):
    """The image, its top-5, the class to explain and the zip of everything; (target, analysis)."""
    names = ckpt.class_names
    left, right = st.columns([1, 2])
    left.image(crop, caption=f"{viz.md_text(item.name)} as the network sees it")
    top5 = viz.top_predictions(base.probs[0], names, 5)
    right.markdown(
        f"**Prediction: {viz.md_text(top5[0].name)}** (P = {top5[0].prob:.3f}) · "
        f"{viz.md_text(label)}"
    )
    right.dataframe(
        pd.DataFrame({"class": [p.name for p in top5], "P": [round(p.prob, 4) for p in top5]}),
        hide_index=True,
    )
    choice = right.radio(
        "Explain class", [p.index for p in top5] + [OTHER], horizontal=True,
        key=keys.target(item, ckpt),
        format_func=lambda i: "another class…" if i == OTHER else viz.md_text(names[i]),
    )  # fmt: skip
    if choice == OTHER:
        choice = right.selectbox(
            "Search all classes", range(len(names)), index=top5[0].index,
            format_func=names.__getitem__, key=keys.target_search(item, ckpt),
        )  # fmt: skip
    target = None if choice == top5[0].index else int(choice)
    SlowRun.reserve()
    if not SlowRun.slow(settings.method, settings.smoothing):
        SlowRun.cancel()  # a slow method left for a quick one: its job would run on for nothing
    an = analysis(item.sha, ckpt.sha256, target, settings.method, settings.layers,
                  settings.smoothing, ckpt, item.image,
                  tuple(settings.method_options().items()))  # fmt: skip
    SlowRun.done()
    if target is not None:
        right.markdown(
            f"Explaining **{viz.md_text(names[target])}** (P = {float(an.target_probs[0]):.3f})"
        )
    zip_button(right, ckpt, item, target, an, settings)
    return target, an


def zip_button(where, ckpt, item, target, an, settings) -> None:
    stem = f"{viz.safe_stem(ckpt.label)}_{viz.safe_stem(item.name)}_{cam_file_name(settings)}"
    file_name = f"{stem}_attention_lens.zip"
    where.download_button(
        "Everything for this image (zip)", icon=":material/folder_zip:",
        file_name=file_name, mime="application/zip", key=keys.zip_download(keys.image_model(item, ckpt)),
        help="All figures as PNG, PDF and SVG, the raw maps (maps.npz) and a manifest: the files "
        "`python -m viz export` writes.",
        **Downloads.of_session().on_click(lambda: viz.zip_bundle(viz.image_bundle(
            item.data, ckpt, name=item.name, figures=viz.IMAGE_FIGURES, formats=viz.FORMATS,
            target=target, analysis=an, settings=settings,
        )), file_name),
    )  # fmt: skip
