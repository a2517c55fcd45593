"""Compare models that are not classifiers: one row per segmenter, detector or embedding
network, one column per image, every row explaining with its own network what was chosen for
the model in use — the same segment class, the detection matching the chosen one, the
likeness to the same concept."""

from __future__ import annotations

import streamlit as st

import viz

from ..caching import analysis
from ..context import Context
from ..slow import SlowRun
from .grid import at_stage, dino_mass_choice, draw_grid, of_the_kind, pick_models, stage_choice


def render(ctx: Context) -> None:
    explained = ctx.explained
    if explained is None or explained.target is None:
        st.info("Choose what to explain above: each model of the comparison explains it.")
        return
    s = ctx.settings
    method, smoothing = SlowRun.quick(s.method, s.smoothing)
    intro = st.empty()
    picked = pick_models(ctx)
    if not picked:
        st.info("Pick at least one model.")
        return
    loaded, notes = of_the_kind(ctx.kind, {n: ctx.models[n].load() for n in picked}, ctx.items[0])
    mass = dino_mass_choice(loaded)
    stage = stage_choice(disabled=mass is not None)  # DINO's masks have no stage
    grid = []
    for name, other in loaded.items():
        row, said = output_row(ctx, name, other, method, smoothing, stage)
        notes += said
        if row is not None:
            grid.append(row)
    intro.markdown("  \n".join([outputs_intro(ctx, method, stage, mass), *notes]))
    if not grid:
        return
    titles = [item.name for item in ctx.items]
    # a detection is each image's own; a segment's class and a concept are the same for all
    title = "each image's chosen detection" if ctx.kind == "boxes" else explained.text
    draw_grid(ctx, grid, titles, stage, mass, title)


def output_row(ctx: Context, name: str, other, method: str, smoothing: tuple, stage: int):
    """(the row of `other`, picked as `name`, or None when it has nothing to explain, and the
    notes about it): each column's target made for its network (`Explained.for_network`); a
    column without one (no such pixels, no matching detection) is n/a."""
    made = [ctx.explained.for_network(other, item) for item in ctx.items]
    label = viz.md_text(name)
    absent = [c for c, m in enumerate(made) if isinstance(m, str)]
    if len(absent) == len(made):
        return None, [f"{label}: {viz.md_text(made[0])}: left out."]
    notes = [f"{label}, {viz.md_text(ctx.items[c].name)}: {viz.md_text(made[c])} (n/a)."
             for c in absent]  # fmt: skip
    own = method if method in viz.methods_for(other.model) else "gradcam"
    first = next(c for c in range(len(made)) if c not in absent)

    def analyse(c: int, layers: tuple | None):
        # an n/a column, drawn as such, holds the first column's analysis in its place
        item = ctx.items[first if c in absent else c]
        return analysis(item.sha, other.sha256, None, own, layers, smoothing, other,
                        item.image, explain=made[first if c in absent else c])  # fmt: skip

    analyses, note = at_stage(other, analyse, len(ctx.items), stage)
    notes += [note] if note else []
    source = ctx.models[name].source
    return viz.GridModel(other.label, source, other, analyses, absent), notes


def outputs_intro(ctx: Context, method: str, stage: int, mass: float | None) -> str:
    """What the comparison shows and what every row explains."""
    if mass:
        shown = (f"DINO's masks (Caron et al. 2021): each row's last block's class-token "
                 f"attention, the patches outside the fewest holding {mass:.0%} of it dimmed")  # fmt: skip
    else:
        label = viz.CAM_METHODS[method].label
        shown = f"{label} " + ("of the last stage" if stage == 4 else f"at stage {stage}")
    each = {
        "segments": "the same class's segment (each network's own predicted pixels)",
        "boxes": "the detection of the same label overlapping the one chosen for each image "
        "(its choice on that image, else its top detection) by IoU > 0.5",
        "embedding": "the likeness to the same concept (each network embeds it)",
    }[ctx.kind]
    text = f"{shown}, one row per model; every row explains {each}, with its own network."
    if SlowRun.slow(ctx.settings.method, ctx.settings.smoothing):
        text += (f" {SlowRun.label(ctx.settings.method, ctx.settings.smoothing)} would take its "
                 "extra passes for every model and image, so the comparison shows Grad-CAM.")  # fmt: skip
    return text
