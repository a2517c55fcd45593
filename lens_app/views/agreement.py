"""Agreement & deletion/insertion: attention against the CAM, and how causal each map is."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import viz
from viz import figures

from .. import keys
from ..caching import causal_scores
from ..context import Context
from ..widgets import KEEP, show_figure


def render(ctx: Context) -> None:
    an = ctx.analysis
    prefix = f"{ctx.view.prefix}_{ctx.stem}"  # the model and image: keys and file names
    agreement_table(an, prefix, f"{prefix}_{ctx.cam_name}")
    st.markdown(
        "**Deletion / insertion** (RISE): remove or reveal the most salient pixels first; "
        "a random map gives the chance level."
    )
    whole = viz.CAM_METHODS[ctx.settings.method].needs in ("network", "attention")  # one map
    maps, shown = saliency_maps(an, whole)
    chosen = choose_saliency_maps(maps, shown, whole)
    steps = st.slider("Steps", 8, 64, 16, 8, key="di_steps", persist_state=KEEP)
    if not chosen:
        st.info("Pick at least one saliency map to score.")
        return
    if not ctx.classifier and ctx.explain[1] is None:
        st.info("Choose what to explain above: deletion and insertion follow its score.")
        return
    if st.toggle(f"Run ({len(chosen) + 1} maps x {2 * steps + 3} forward passes)", key="di_run",
                 persist_state=KEEP):  # fmt: skip
        deletion_insertion(ctx, [(shown[m], maps[m]) for m in chosen], steps, prefix)


def agreement_table(an, prefix: str, file_stem: str) -> None:
    rows = viz.agreement_table(an, 0)
    if not rows:
        if an.trace.spatial_records and set(an.cam_stages.values()) == {0}:
            st.info(
                f"{an.method_label} gives one map for the whole network, not one per stage, so "
                "no stage's attention map pairs with it here (a layer method such as Grad-CAM "
                "does); score it against the attention maps by deletion/insertion below."
            )
        else:
            st.info(f"No spatial attention map to compare with {an.method_label} in this model.")
        return
    table = pd.DataFrame(
        [(m, "(whole network)" if layer in viz.CAM_METHODS else layer, a.pearson, a.spearman,
          a.iou, int(an.trace[m].spatial[0].numel()), "" if a.reason is None else f"n/a: {a.reason}")
         for m, layer, a in rows],
        columns=["attention module", f"{an.method_label} layer", "Pearson", "Spearman",
                 "IoU (top 20%)", "cells", "note"],
    )  # fmt: skip
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            k: st.column_config.NumberColumn(format="%.3f")
            for k in ("Pearson", "Spearman", "IoU (top 20%)")
        },
    )
    st.download_button(
        "Agreement table (CSV)", table.to_csv(index=False).encode(), mime="text/csv",
        file_name=f"{file_stem}_agreement.csv", key=keys.agreement_csv(prefix), on_click="ignore",
        icon=":material/download:",
    )  # fmt: skip


def deletion_insertion(ctx: Context, named: list, steps: int, prefix: str) -> None:
    """Score each chosen map and a random one; their table, curves and CSV."""
    ckpt, item, s = ctx.ckpt, ctx.item, ctx.settings
    results = {}
    bar = st.progress(0.0, text="Deleting and inserting pixels…")
    size = (ckpt.preprocess.crop, ckpt.preprocess.crop)  # the network input's side
    noise = viz.random_saliency([viz.seed_of(item.sha)], size)
    named = [*named, (figures.RANDOM_LABEL, noise)]
    for done, (name, saliency) in enumerate(named):
        key = f"{s.method}:{','.join(s.layers or ())}:{name}"
        results[name] = causal_scores(
            item.sha, ckpt.sha256, ctx.target, key, steps, ckpt, item.image, saliency, *ctx.explain
        )
        bar.progress((done + 1) / len(named), text=f"{done + 1} of {len(named)} maps")
    bar.empty()
    table = pd.DataFrame(
        [(m, float(r.deletion_auc[0]), float(r.insertion_auc[0])) for m, r in results.items()],
        columns=["map", "deletion AUC (lower is better)", "insertion AUC (higher is better)"],
    )  # fmt: skip
    st.dataframe(table, hide_index=True)
    show_figure(
        lambda: figures.deletion_insertion_curves(results, width=s.width),
        f"{ctx.stem}_{ctx.cam_name}_deletion_insertion", keys.curves_figure(prefix), ctx.view,
        ctx.errors,
    )  # fmt: skip
    st.download_button(
        "Curves (CSV)", viz.deletion_insertion_csv(results), mime="text/csv",
        file_name=f"{prefix}_{ctx.cam_name}_deletion_insertion.csv", key=keys.curves_csv(prefix),
        on_click="ignore", icon=":material/download:",
    )  # fmt: skip


def saliency_maps(an, whole: bool) -> tuple[dict, dict[str, str]]:
    """The maps deletion/insertion can score, the method's first, and their names on screen.

    Keyed without the CAM method (`cam:<layer>`, `attention:<module>`), so that a choice
    survives changing the method; a whole-network method's one map by its method
    (`network_map`: a box must not show one method's name for another's map)."""
    mine = viz.network_map(an.method)
    maps = {mine if whole else f"cam:{k}": v for k, v in an.cams.items()}
    maps.update({f"attention:{r.name}": r.spatial for r in an.trace.spatial_records})
    shown = {m: an.method_label if m == mine else f"{an.method_label} {m[4:]}"
             if m.startswith("cam:") else m.replace(":", " ", 1) for m in maps}  # fmt: skip
    return maps, shown


def choose_saliency_maps(maps: dict, shown: dict[str, str], whole: bool) -> list[str]:
    """The "Saliency maps" box: the user's choice carried over a change of method, layers or
    model (`carry_saliency_choice`), the method's map offered first."""
    before = st.session_state.get(keys.DI_MAPS)
    carried = viz.carry_saliency_choice(before, list(maps), whole=whole,
                                        was_whole=st.session_state.get(keys.DI_WHOLE),
                                        layer_picks=st.session_state.get(keys.DI_LAYER_PICKS, ()))  # fmt: skip
    if before is not None and carried != before:
        st.session_state[keys.DI_MAPS] = carried
    default = None if keys.DI_MAPS in st.session_state else carried
    chosen = st.multiselect("Saliency maps", list(maps), default=default, key=keys.DI_MAPS,
                            format_func=shown.__getitem__, persist_state=KEEP)  # fmt: skip
    st.session_state[keys.DI_WHOLE] = whole
    if not whole:  # what comes back after a whole-network method
        st.session_state[keys.DI_LAYER_PICKS] = [m for m in chosen if m.startswith("cam:")]
    return chosen
