"""What both comparisons (of classifiers, and of other networks) share: the models picked, the
stage, DINO's masks, each row's analyses at the stage, the figure."""

from __future__ import annotations

import streamlit as st

import viz
from viz import figures

from .. import keys
from ..explain import kind_of
from ..widgets import KEEP, show_figure

DINO_INTRO = (
    "DINO's masks (Caron et al. 2021): each row's last block's class-token attention (the mean "
    "of its heads), the patches outside the fewest holding {mass:.0%} of it dimmed; a network "
    "without a class token (a CNN) is n/a. P is the softmax score of each column's class."
)


def dino_mass_choice(loaded: dict) -> float | None:
    """The mass of DINO's masks when the user asks the grid for them (offered only where a
    picked network has a class token's self-attention), else None: the CAMs."""
    with_class_token = [
        m for m in loaded.values() if (layout := viz.token_layout(m.model)) and layout.class_token
    ]
    if not with_class_token:
        return None
    shown = st.radio("Grid shows", ["CAM", "DINO masks"], horizontal=True, key=keys.GRID_MAP,
                     persist_state=KEEP,
                     help="DINO masks: each transformer's class-token attention in its last "
                          "block, and the patches holding the share of it set beside.")  # fmt: skip
    if shown != "DINO masks":
        return None
    return st.slider("Attention mass kept", 0.1, 0.95, 0.6, 0.05, key="grid_mass",
                     persist_state=KEEP)  # fmt: skip


def stage_choice(disabled: bool = False) -> int:
    return st.radio("Stage of the CAM", [4, 3, 2, 1], horizontal=True, key=keys.GRID_STAGE,
                    persist_state=KEEP, disabled=disabled,
                    format_func=lambda s: f"stage {s}" + (" (last, as in the paper)" if s == 4 else ""),
                    help="The same stage in every row, whatever each network calls the layer; "
                         "a network without it (a ViT: one resolution throughout) shows the "
                         "layer at the same depth, named above the grid.")  # fmt: skip


def at_stage(other, analyse, columns: int, stage: int) -> tuple[list, str]:
    """Each column's analysis, `analyse(column, layers)`, at `stage` (each model's own stage
    layers: networks name them differently), and a note when the network has no such stage
    (a ViT: the block at the same depth stands in, `grid_stand_in`)."""
    found, stand_in = [], None
    for c in range(columns):
        an = analyse(c, None)
        if c == 0:
            stand_in = viz.grid_stand_in(other.model, an, stage)
        if stand_in is not None:
            if stand_in.layer not in an.cams:
                an = analyse(c, (stand_in.layer,))
            an = viz.shown_at_stage(an, stand_in.layer, stage)
        found.append(an)
    note = f"{viz.md_text(other.label)}: {viz.md_text(stand_in.note)}" if stand_in else ""
    return found, note


def of_the_kind(kind: str, loaded: dict, first_item) -> tuple[dict, list[str]]:
    """The picked networks that return what the model in use returns (`kind`), and a note for
    each left out (a segmenter among classifiers, say): a row must explain the same thing."""
    kept, notes = {}, []
    for name, other in loaded.items():
        theirs = kind_of(other.sha256, other, first_item)
        if theirs == kind:
            kept[name] = other
        else:
            notes.append(
                f"{viz.md_text(name)} returns {viz.targets.OUTPUT_KINDS[theirs]}: left out."
            )
    return kept, notes


def pick_models(ctx) -> list[str]:
    """The models side by side: the model in use at first; then the user's picks, which stay
    as they are when another model is put in use (their work)."""
    default = None if keys.COMPARE in st.session_state else [ctx.label]
    return st.multiselect("Models side by side", list(ctx.models), default=default,
                          key=keys.COMPARE, persist_state=KEEP)  # fmt: skip


def draw_grid(ctx, grid: list, column_titles: list[str], stage: int, mass: float | None,
              title: str | None = None) -> None:  # fmt: skip
    """The comparison's figure, its rows as in the papers (plain, SE, BAM, CBAM, then others),
    not in click order; DINO's masks instead of the CAMs when `mass` is set."""
    s, crops = ctx.settings, ctx.crops
    rows, missing = viz.model_grid_rows(grid)
    show_figure(
        lambda: figures.model_grid(crops, rows, column_titles=column_titles, title=title,
                                   stage=stage, cmap=s.cmap, alpha=s.alpha, width=s.width,
                                   missing=missing, render=s.render, class_token_mass=mass),
        # file names by stage: each stage's grid downloads beside the others'
        "dino_grid" if mass else f"model_grid_stage{stage}", "dino_grid" if mass else "grid",
        ctx.view,
        ctx.errors,
    )  # fmt: skip
