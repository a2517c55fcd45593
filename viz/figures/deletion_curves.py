"""Deletion and insertion curves of several saliency maps of one image, with a random baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from viz.figures.canvas import figure_width, fit_text, literal, styled

if TYPE_CHECKING:
    from viz.measures.metrics import DeletionInsertion

__all__ = ["deletion_insertion_curves", "RANDOM_LABEL"]

RANDOM_LABEL = "random map"  # drawn grey and dashed: the chance level
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


@styled
def deletion_insertion_curves(
    results: Mapping[str, DeletionInsertion],
    *,
    index: int = 0,
    width: str | float = "single",
    title: str | None = None,
) -> Figure:
    """P(target) as the most salient pixels are deleted, and as they are inserted, per map.

    Args:
        results: map label -> `viz.measures.metrics.deletion_insertion` result (all of the same image
            and target); a label equal to `RANDOM_LABEL` is drawn as the grey dashed baseline.
        index: which image of the batch.
        width: "single" (3.3 in), "double" (6.9 in) or inches.
        title: optional figure title.

    Each legend entry gives the map's two AUCs (deletion: lower is better, ↓; insertion:
    higher is better, ↑).
    """
    if not results:
        raise ValueError("give at least one deletion/insertion result")
    inches = figure_width(width)
    rows = len(results)
    legend_height = 0.16 * rows + 0.1
    fig = Figure(figsize=(inches, 1.75 + legend_height + (0.25 if title else 0)),
                 layout="constrained")  # fmt: skip
    axes = fig.subplots(1, 2, sharey=True)
    handles = []
    for i, (label, res) in enumerate(results.items()):
        baseline = label == RANDOM_LABEL
        style = {"color": "#888888", "linestyle": "--"} if baseline else {
            "color": _COLOURS[i % len(_COLOURS)], "linestyle": "-"}  # fmt: skip
        x = res.fractions.numpy()
        for ax, curve in zip(axes, (res.deletion_curve, res.insertion_curve)):
            (line,) = ax.plot(x, curve[index].numpy(), linewidth=1.0, **style)
        text = (f"{literal(label)} · del {float(res.deletion_auc[index]):.3f} · "
                f"ins {float(res.insertion_auc[index]):.3f}")  # fmt: skip
        line.set_label(fit_text(text, inches - 0.3, fontsize=6.5, min_size=6.5)[0])
        handles.append(line)
    for ax, name in zip(axes, ("deletion", "insertion")):
        # arrows: which way the AUC is better (deletion: lower, insertion: higher)
        ax.set_title(f"{name} · AUC {'↓' if name == 'deletion' else '↑'}", fontsize=7)
        ax.set_xlabel("fraction of pixels", fontsize=6.5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("P(target)", fontsize=6.5)
    fig.legend(handles=handles, loc="outside lower center", ncol=1, fontsize=6.5, frameon=False)
    if title:
        fig.suptitle(fit_text(literal(title), inches - 0.2, fontsize=8, min_size=6.5)[0],
                     fontsize=8)  # fmt: skip
    return fig
