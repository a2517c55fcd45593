"""Compare models: the CBAM paper's grid, one row per model, one column per image."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import viz

from .. import keys
from ..caching import analysis
from ..context import Context
from ..sidebar import with_class_names
from ..slow import SlowRun
from ..targets import chosen_target
from ..widgets import KEEP
from . import compare_outputs
from .grid import (
    DINO_INTRO,
    at_stage,
    dino_mass_choice,
    draw_grid,
    of_the_kind,
    pick_models,
    stage_choice,
)  # fmt: skip

FROM_MODEL = "(the model in use: its chosen class or top-1)"


def render(ctx: Context) -> None:
    if not ctx.classifier:
        compare_outputs.render(ctx)
        return
    s = ctx.settings
    # extra passes for every model and image: under a slow method the comparison shows Grad-CAM
    method, smoothing = SlowRun.quick(s.method, s.smoothing)
    intro = st.empty()  # what the grid shows: written once the stage and the rows are known
    picked = pick_models(ctx)
    if not picked:
        intro.markdown(compare_intro(s, method, st.session_state.get(keys.GRID_STAGE, 4)))
        st.info("Pick at least one model.")
        return
    loaded = {name: with_class_names(ctx.models[name].load()) for name in picked}
    loaded, left_out = of_the_kind(ctx.kind, loaded, ctx.items[0])
    classes = column_classes(ctx, loaded, method, smoothing)
    mass = dino_mass_choice(loaded)
    stage = stage_choice(disabled=mass is not None)  # DINO's masks have no stage
    grid, notes = [], list(left_out)
    bar = st.progress(0.0, text="Analysing…") if len(loaded) > 1 else None
    for n, name in enumerate(loaded):
        row, note = grid_row(loaded[name], ctx.models[name].source, ctx.items, classes, method,
                             smoothing, stage)  # fmt: skip
        grid.append(row)
        notes += [note] if note else []
        if bar:
            bar.progress((n + 1) / len(loaded), text=f"Analysed {name}")
    if bar:
        bar.empty()
    intro.markdown(
        "  \n".join([DINO_INTRO.format(mass=mass), *left_out])
        if mass
        else compare_intro(s, method, stage, notes)
    )
    if not grid:
        return
    draw_grid(ctx, grid, classes, stage, mass)


def grid_row(other, source, items, classes, method, smoothing, stage) -> tuple:
    """One model's row of the comparison at `stage`, and a note when its network has no such
    stage (a ViT: the block at the same depth stands in, `grid_stand_in`)."""
    # a transformer method on a CNN row: that row shows Grad-CAM (its label says so)
    own = method if method in viz.methods_for(other.model) else "gradcam"
    targets = [other.class_names.index(c) if c in other.class_names else None for c in classes]
    # a class the model does not have is drawn as n/a, not as another class under this title
    absent = [c for c, t in enumerate(targets) if t is None]

    def analyse(c: int, layers: tuple | None):
        item = items[c]
        return analysis(item.sha, other.sha256, targets[c], own, layers, smoothing, other,
                        item.image)  # fmt: skip

    found, note = at_stage(other, analyse, len(items), stage)
    return viz.GridModel(other.label, source, other, found, absent), note


def compare_intro(settings: viz.FigureSettings, method: str, stage: int, notes=()) -> str:
    """What the comparison shows: the method, the stage (the last only when it is), the rows
    that stand in for a stage their network does not have."""
    label = viz.CAM_METHODS[method].label
    at = "of the last stage" if stage == 4 else f"at stage {stage}"
    if viz.CAM_METHODS[method].needs in ("network", "attention"):  # no stages: one map each
        shown = (f"{label} (one map for the whole network; a row whose network has no "
                 f"{label} shows its Grad-CAM {at})")  # fmt: skip
    else:
        shown = f"{label} {at}"
    text = (
        f"The CBAM paper's comparison: {shown}, one row per model, and the softmax score P of "
        "each column's class (the class chosen for that image, else the prediction of the model "
        'in use). A map without contrast is drawn as the photo, marked "constant CAM" (often '
        "Grad-CAM at an early stage: its weighted sum is negative everywhere, so zero after "
        "its ReLU)."
    )
    if SlowRun.slow(settings.method, settings.smoothing):
        text += (f" {SlowRun.label(settings.method, settings.smoothing)} would take its extra "
                 "passes for every model and image, so the comparison shows Grad-CAM.")  # fmt: skip
    return "  \n".join([text, *notes])


def column_classes(ctx: Context, loaded: dict, method: str, smoothing: tuple) -> list[str]:
    """The class of each column, per image and independent of the model in use: from an
    uploaded labels CSV, a choice made here, or else what the model in use explains."""
    upload = st.file_uploader(
        "Labels CSV (columns file,label: the image's file name and its class name)",
        type=["csv"], key="grid_labels", max_upload_size=5,
    )  # fmt: skip
    labels: dict[str, str] = {}
    if upload is not None:
        try:
            labels = viz.parse_labels(upload.getvalue().decode("utf-8-sig"), upload.name)
        except (UnicodeDecodeError, viz.UsageError) as exc:
            ctx.errors.error(viz.md_text(f"{upload.name}: {exc}"))
    names = sorted(
        {n for other in loaded.values() for n in other.class_names} | set(ctx.ckpt.class_names)
    )
    with st.expander("Class of each column", expanded=bool(labels)):
        return [column_class(ctx, item, labels, names, method, smoothing) for item in ctx.items]


def column_class(ctx: Context, item, labels: dict, names: list, method, smoothing) -> str:
    key = keys.column_class(item)
    label = viz.label_of(Path(item.name), labels) if labels else None
    if label is not None:
        found = viz.class_index(label.strip(), names)
        label = label if found is None else names[found]
        if label not in names:
            ctx.errors.warning(
                viz.md_text(f"{item.name}: label {label!r} is no class of these models")
            )
            label = None
    stamp = keys.column_class_from(item)  # a new CSV sets the choice again; one made here stays
    if label is not None and st.session_state.get(stamp) != label:
        st.session_state[key], st.session_state[stamp] = label, label
    choice = st.selectbox(
        viz.md_text(item.name), [FROM_MODEL, *names], key=key, persist_state=KEEP,
        help="The class every row explains in this column, whichever model is in use.",
    )  # fmt: skip
    if choice != FROM_MODEL:
        return choice
    ckpt, layers = ctx.ckpt, ctx.settings.layers
    t = chosen_target(item, ckpt)
    if t is None:  # the top-1 only: a quick method
        t = int(analysis(item.sha, ckpt.sha256, None, method, layers, smoothing, ckpt,
                         item.image).target[0])  # fmt: skip
    return ckpt.class_names[t]
