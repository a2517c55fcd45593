"""The files of a data-set report: CSV tables, summary with intervals, figures, Markdown, HTML.

Every name in these files (images, checkpoints, modules, classes) comes from the user's files:
the HTML escapes it, the Markdown escapes the characters a table or a link would read, and the
app shows the tables as data, never as Markdown.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from viz.figures.canvas import styled
from viz.measures.stats import bootstrap_mean, paired_difference
from viz.text import md_text

__all__ = [
    "FinishedReport",
    "open_report",
    "temporary_report_folder",
    "write_report",
    "summarise",
    "sanity_summary",
    "csv_bytes",
    "read_csv",
    "SUMMARY_COLUMNS",
    "MAP_METRICS",
    "natural_key",
]

MAP_METRICS = (
    "deletion_auc", "insertion_auc", "pearson", "spearman", "iou", "pointing", "energy", "box_iou",
    "mask_pointing", "mask_energy",
)  # fmt: skip
IMAGE_METRICS = ("correct", "prob", "score")
SUMMARY_COLUMNS = (
    "section", "checkpoint", "compared_to", "map", "metric", "n", "mean", "ci_low", "ci_high",
)  # fmt: skip
SANITY_SUMMARY_COLUMNS = ("checkpoint", "step", "randomised", "map", "n", "spearman", "ssim")
ALL_ATTENTION = "attention/all"  # per image, the mean over its attention modules
_DIGITS = re.compile(r"(\d+)")
_METRIC_WORDS = {
    "correct": "top-1 accuracy",
    "prob": "P(target)",
    "deletion_auc": "deletion AUC (lower is better)",
    "insertion_auc": "insertion AUC (higher is better)",
    "pearson": "Pearson r with the stage's CAM",
    "spearman": "Spearman rho with the stage's CAM",
    "iou": "top-20% IoU with the stage's CAM",
    "pointing": "pointing game",
    "energy": "energy pointing game",
    "box_iou": "box IoU",
    "score": "score of what is explained",
    "mask_pointing": "pointing game in the segment",
    "mask_energy": "energy in the segment",
}


# --- tables -----------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(round(value, 6))
    return str(value)


def csv_bytes(rows: Iterable[dict], columns: Sequence[str]) -> bytes:
    """Rows as UTF-8 CSV with a header; missing and non-finite values are empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buffer.getvalue().encode("utf-8")


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """A report CSV back as a list of {column: text} (for the app)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _value(v: object) -> float:
    return math.nan if v is None or v == "" else float(v)  # type: ignore[arg-type]


def _with_all_attention(per_map: list[dict]) -> list[dict]:
    """per_map rows plus, per checkpoint and image, the mean over its attention modules."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in per_map:
        if row["kind"] == "attention":
            groups[(row["checkpoint"], row["image"])].append(row)
    extra = []
    for (ckpt, image), rows in groups.items():
        mean = {"checkpoint": ckpt, "image": image, "map": ALL_ATTENTION, "kind": "attention"}
        for metric in MAP_METRICS:
            values = [_value(r.get(metric)) for r in rows]
            finite = [v for v in values if math.isfinite(v)]
            mean[metric] = float(np.mean(finite)) if finite else None
        extra.append(mean)
    return per_map + extra


def summarise(rows: dict[str, list[dict]], checkpoints: Sequence[str], seed: int = 0) -> list[dict]:
    """Means with bootstrap intervals per checkpoint, then paired differences between them."""
    per_image = [r for r in rows["per_image"] if not r.get("error") and not r.get("left_out")]
    per_map = _with_all_attention(rows["per_map"])
    values: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for r in per_image:
        for metric in IMAGE_METRICS:
            values[(r["checkpoint"], "", metric)][r["image"]] = _value(r.get(metric))
    for r in per_map:
        for metric in MAP_METRICS:
            v = _value(r.get(metric))
            if math.isfinite(v):
                values[(r["checkpoint"], r["map"], metric)][r["image"]] = v
    out = []
    order = {name: i for i, name in enumerate(checkpoints)}
    keys = sorted(values, key=lambda k: (order.get(k[0], 99), natural_key(k[1]),
                                         MAP_METRICS.index(k[2]) if k[2] in MAP_METRICS else -1))  # fmt: skip
    for ckpt, map_name, metric in keys:
        by_image = values[(ckpt, map_name, metric)]
        est = bootstrap_mean(list(by_image.values()), seed=seed)
        if est.n:
            out.append(_summary_row("model", ckpt, "", map_name, metric, est))
    for i, a in enumerate(checkpoints):
        for b in checkpoints[i + 1 :]:
            for ckpt, map_name, metric in keys:
                if ckpt != a or (b, map_name, metric) not in values:
                    continue
                va, vb = values[(a, map_name, metric)], values[(b, map_name, metric)]
                common = sorted(set(va) & set(vb))
                est = paired_difference([va[k] for k in common], [vb[k] for k in common], seed=seed)
                if est.n:
                    out.append(_summary_row("paired", a, b, map_name, metric, est))
    return out


def _summary_row(section, ckpt, other, map_name, metric, est) -> dict:
    return {
        "section": section, "checkpoint": ckpt, "compared_to": other, "map": map_name,
        "metric": metric, "n": est.n, "mean": est.mean, "ci_low": est.low, "ci_high": est.high,
    }  # fmt: skip


def sanity_summary(sanity: list[dict]) -> list[dict]:
    """Mean Spearman and SSIM per checkpoint, step and map (attention maps also together);
    `n` counts the maps scored (a constant map has neither number), for `attention/all` those
    of every module."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in sanity:
        groups[(r["checkpoint"], r["step"], r["randomised"], r["map"])].append(r)
        if r["map"].startswith("attention/"):
            groups[(r["checkpoint"], r["step"], r["randomised"], ALL_ATTENTION)].append(r)
    out = []
    for (ckpt, step, group, map_name), rs in groups.items():
        sp = [_value(r["spearman"]) for r in rs]
        ss = [_value(r["ssim"]) for r in rs]
        out.append({
            "checkpoint": ckpt, "step": step, "randomised": group, "map": map_name,
            "n": sum(math.isfinite(v) for v in sp),
            "spearman": _nanmean(sp), "ssim": _nanmean(ss),
        })  # fmt: skip
    return sorted(out, key=lambda r: (r["checkpoint"], natural_key(r["map"]), r["step"]))


def natural_key(text: str) -> tuple:
    """A sort key reading the numbers in `text` as numbers: `blocks.9` before `blocks.10`."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(text))


def is_cam_map(name: str) -> bool:
    """Whether the map `name` is a CAM (`viz.commands.report.is_cam_map`)."""
    from viz.commands.report import is_cam_map as cam

    return cam(name)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# --- figures ----------------------------------------------------------------------------------


def _last_cam(per_map: list[dict]) -> str | None:
    stages = sorted({r["map"] for r in per_map if r["kind"] == "cam"}, key=natural_key)
    return stages[-1] if stages else None


@styled
def _distribution_figure(per_map: list[dict], checkpoints: Sequence[str]):
    """Box plots of deletion and insertion AUC: last CAM, attention (mean), random; per model."""
    from matplotlib.patches import Patch

    from viz.figures.canvas import DOUBLE_COLUMN, fit_text, new_figure

    cam = _last_cam(per_map)
    maps = [m for m in (cam, ALL_ATTENTION, "random") if m]
    rows = _with_all_attention(per_map)
    metrics = [m for m in ("deletion_auc", "insertion_auc")
               if any(r.get(m) not in (None, "") for r in rows)]  # fmt: skip
    if not metrics:
        return None
    fig = new_figure(DOUBLE_COLUMN, 2.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = {cam: "#0072B2", ALL_ATTENTION: "#D55E00", "random": "#999999"}
    for ax, metric in zip(axes, metrics):
        positions, data, tint = [], [], []
        for i, ckpt in enumerate(checkpoints):
            for j, m in enumerate(maps):
                v = [_value(r.get(metric)) for r in rows if r["checkpoint"] == ckpt
                     and r["map"] == m]  # fmt: skip
                v = [x for x in v if math.isfinite(x)]
                if v:
                    positions.append(i * (len(maps) + 1) + j)
                    data.append(v)
                    tint.append(colours[m])
        if not data:
            continue
        parts = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True,
                           showfliers=True, flierprops={"markersize": 2})  # fmt: skip
        for patch, colour in zip(parts["boxes"], tint):
            patch.set_facecolor(colour)
            patch.set_alpha(0.7)
        centres = [i * (len(maps) + 1) + (len(maps) - 1) / 2 for i in range(len(checkpoints))]
        ax.set_xticks(centres)
        width_each = (fig.get_figwidth() / len(metrics)) / max(1, len(checkpoints))
        ax.set_xticklabels(
            [fit_text(c, width_each, fontsize=6, max_lines=2)[0] for c in checkpoints], fontsize=6
        )
        ax.set_title(_METRIC_WORDS[metric], fontsize=7)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    drawn = [m for m in maps if any(r["map"] == m and r.get(metrics[0]) not in (None, "")
                                    for r in rows)]  # fmt: skip
    handles = [Patch(color=colours[m], label=m) for m in drawn]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(drawn), fontsize=6,
               frameon=False)  # fmt: skip
    return fig


@styled
def _legend_label(checkpoint: str, map_name: str, inches: float = 3.1) -> str:
    """`checkpoint · map` in one legend column (half the double width): a long checkpoint name
    is cut, never the map's."""
    from viz.figures.canvas import fit_text, literal, text_width

    tail = f" · {map_name}"
    room = max(0.6, inches - text_width(tail, 6.0))
    return literal(fit_text(checkpoint, room, fontsize=6.0, min_size=6.0)[0]) + literal(tail)


def _sanity_figure(summary: list[dict], checkpoints: Sequence[str], method: str):
    """Spearman and SSIM against the randomisation step: the last CAM and the attention mean."""
    from viz.figures.canvas import DOUBLE_COLUMN, fit_text, new_figure

    if not summary:
        return None
    cams = sorted({r["map"] for r in summary if is_cam_map(r["map"])}, key=natural_key)
    maps = [m for m in (cams[-1] if cams else None, ALL_ATTENTION) if m]
    # one axis of block names when every model has the same blocks; else the fraction of the
    # network randomised, so networks of different depth share the axis
    sequences = {
        ckpt: [g for _, g in sorted({(r["step"], r["randomised"]) for r in summary
                                     if r["checkpoint"] == ckpt})]
        for ckpt in checkpoints
    }  # fmt: skip
    known = [seq for seq in sequences.values() if seq]
    named = all(seq == known[0] for seq in known)
    fig = new_figure(DOUBLE_COLUMN, 3.0 if named else 2.6)
    axes = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    for ax, metric in zip(axes, ("spearman", "ssim")):
        for i, ckpt in enumerate(checkpoints):
            count = max(1, len(sequences[ckpt]))
            for m, colour in zip(maps, ("#0072B2", "#D55E00")):
                pts = [r for r in summary if r["checkpoint"] == ckpt and r["map"] == m]
                if not pts:
                    continue
                pts.sort(key=lambda r: r["step"])
                # step k has randomised k + 1 of the groups (step 0: the classifier)
                xs = [r["step"] if named else (r["step"] + 1) / count for r in pts]
                ax.plot(xs, [r[metric] for r in pts], styles[i % 4],
                        color=colour, marker="o", markersize=2, linewidth=1,
                        label=_legend_label(ckpt, f"{m} ({method})" if m in cams and m != method else m))  # fmt: skip
        ax.axhline(0, color="#bbbbbb", linewidth=0.5)
        if named:
            ax.set_xticks(range(len(known[0])))
            ax.set_xticklabels([fit_text(g, 0.5, fontsize=6)[0] for g in known[0]], rotation=90)
            ax.set_xlabel("randomised up to (from the logits down)", fontsize=6)
        else:
            ax.set_xlim(0, 1.02)
            ax.set_xlabel("share of the blocks randomised, from the logits down (1: all of them)",
                          fontsize=6)  # fmt: skip
        ax.set_ylabel(f"{'Spearman ρ' if metric == 'spearman' else 'SSIM'} to trained map",
                      fontsize=6)  # fmt: skip
        ax.tick_params(labelsize=6)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=6, frameon=False)
    return fig


@styled
def _sample_figure(inputs, samples: list[dict], method: str, count: int = 4):
    """The first images under each model's last-stage CAM and its last attention map, as the
    run kept them (`samples` rows: checkpoint, image, map, values)."""
    import torch
    from matplotlib.figure import Figure

    from models.images import load_image
    from viz.engine.maps import overlay
    from viz.figures.canvas import DOUBLE_COLUMN, SINGLE_COLUMN, fit_text, literal

    kept: dict[tuple[str, str], dict[str, list]] = {}
    for row in samples:
        kept.setdefault((row["checkpoint"], row["image"]), {})[row["map"]] = row["values"]
    names = [name for name, _, _ in inputs.checkpoints]
    shown = []
    for path, name, label in inputs.images:
        if not all((ckpt, name) in kept for ckpt in names):
            continue  # not analysed (broken) or past the kept ones
        try:
            shown.append((load_image(path), name, label))
        except Exception:  # a broken image is in per_image.csv already
            continue
        if len(shown) == count:
            break
    if not shown:
        return None
    panels = []  # (checkpoint name, checkpoint, map name, (N, h, w)) per column
    for ckpt_name, _, ckpt in inputs.checkpoints:
        first = kept[(ckpt_name, shown[0][1])]
        for key in first:
            m = torch.tensor([kept[(ckpt_name, name)][key] for _, name, _ in shown])
            title = f"{key} ({method})" if is_cam_map(key) and key != method else key
            panels.append((ckpt_name, ckpt, title, m))
    columns = max(1, len(panels))
    # panels placed by hand: no layout engine; room for the row labels and the scale's note.
    # Few columns keep small panels (one model's two maps filled a 15-inch-tall page)
    side = min(DOUBLE_COLUMN / columns, SAMPLE_PANEL_INCHES)
    fig_width = min(DOUBLE_COLUMN, max(SINGLE_COLUMN, side * columns / 0.94))
    height = 0.8 + side * len(shown)
    fig = Figure(figsize=(fig_width, height))
    axes = fig.subplots(len(shown), columns, squeeze=False)
    width = side - 0.15  # titles and row labels fitted to a panel, less room for the estimate
    titles = [fit_text(f"{ckpt_name} · {key}", width, fontsize=6, max_lines=3)[0]
              for ckpt_name, _, key, _ in panels]  # fmt: skip
    lines = max(t.count("\n") + 1 for t in titles)
    for c, (_, ckpt, _, m) in enumerate(panels):
        for r, (image, _, _) in enumerate(shown):
            ax = axes[r, c]
            ax.set_axis_off()
            ax.imshow(overlay(ckpt.preprocess.crop_image(image), m[r], alpha=0.5))
        # every title as many lines as the longest, so the titles share one baseline
        axes[0, c].set_title(literal(titles[c]) + "\n" * (lines - titles[c].count("\n") - 1),
                             fontsize=6)  # fmt: skip
    for r, (_, name, label) in enumerate(shown):
        text = fit_text(name + (f" ({label})" if label else ""), width, fontsize=6, max_lines=2)[0]
        axes[r, 0].text(-0.04, 0.5, literal(text), transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=6)  # fmt: skip
    fig.text(0.5, 0.15 / height, "each map scaled to its own min–max (inferno: dark low, light "
             "high)", ha="center", va="bottom", fontsize=6)  # fmt: skip
    fig.subplots_adjust(
        left=0.3 / fig_width, right=0.99, bottom=0.4 / height,
        top=1 - (0.1 + 0.1 * lines) / height, wspace=0.04, hspace=0.04,
    )  # fmt: skip
    return fig


SAMPLE_PANEL_INCHES = 1.6  # the samples figure's largest panel


def _png(fig) -> bytes:
    from viz.commands.export import figure_bytes

    return figure_bytes(fig, "png", dpi=150)


# --- documents --------------------------------------------------------------------------------


def _fmt(v: object, digits: int = 3) -> str:
    x = _value(v) if not isinstance(v, float) else v
    return "" if not math.isfinite(x) else f"{x:.{digits}f}"


def _table_rows(summary: list[dict], section: str) -> list[list[str]]:
    rows = []
    for r in summary:
        if r["section"] != section:
            continue
        who = r["checkpoint"] if section == "model" else f"{r['checkpoint']} − {r['compared_to']}"
        rows.append([
            who, r["map"] or "(image)", _METRIC_WORDS.get(r["metric"], r["metric"]), str(r["n"]),
            f"{_fmt(r['mean'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
        ])  # fmt: skip
    return rows


SUMMARY_HEADER = ["model", "map", "metric", "n", "mean [95% CI]"]


def readable_summary(summary: list[dict]) -> dict[str, list[dict]]:
    """summary.csv as the report page shows it: {"per model": rows, "paired": rows}, each row
    {model, map, metric (in words), n, "mean [95% CI]"} (3 digits)."""
    return {
        title: [dict(zip(SUMMARY_HEADER, row)) for row in _table_rows(summary, section)]
        for title, section in (("per model", "model"), ("paired", "paired"))
    }


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_text(c, limit=None) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%}code{background:#f3f3f3}"
)


def _figures(rows: dict[str, list[dict]], sanity: list[dict], inputs, options) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by file name (a figure with nothing to show: none)."""
    names = [name for name, _, _ in inputs.checkpoints]
    figures = {}
    for fname, make in (
        ("figures/distributions.png", lambda: _distribution_figure(rows["per_map"], names)),
        ("figures/sanity.png", lambda: _sanity_figure(sanity, names, options.method)),
        # the maps the run kept: no second analysis after the progress bar has ended
        ("figures/samples.png", lambda: _sample_figure(inputs, rows["samples"], options.method)),
    ):
        fig = make()
        if fig is not None:
            figures[fname] = _png(fig)
    return figures


def _method_text(inputs, options) -> str:
    """ "gae (aug smooth)", and which CNNs beside a transformer showed Grad-CAM instead."""
    text = options.method + "".join(f" ({s} smooth)" for s in options.smoothing)
    fallen = [n for n, _, c in inputs.checkpoints if options.for_model(c.model) is not options]
    if fallen:  # CNNs beside a transformer under rollout, GAE or LeGrad
        text += f" (Grad-CAM for {', '.join(fallen)}: {options.method} needs self-attention)"
    return text


def _images_text(rows, inputs, failed: list[str]) -> tuple[str, int]:
    """How many images the numbers cover, and why the others are not there; and that count."""
    left = sorted({r["image"] for r in rows["per_image"] if r.get("left_out")} - set(failed))
    read = len(inputs.images) - len(failed) - len(left)
    text = f"{read} images" + (f" ({len(failed)} more could not be read)" if failed else "")
    if left:  # a segment some images do not have: nothing there to explain
        text += f" ({len(left)} left out: nothing to explain, see per_image.csv)"
    return text, read


def write_report(out: Path, rows: dict[str, list[dict]], inputs, options, *, world: int = 1) -> int:
    """Write every report file into `out`; returns how many images could not be read."""
    from dataclasses import asdict

    from viz.commands.export import build_manifest, checkpoint_info, manifest_bytes, write_files
    from viz.commands.report import PER_IMAGE_COLUMNS, PER_MAP_COLUMNS, SANITY_COLUMNS

    names = [name for name, _, _ in inputs.checkpoints]
    summary = summarise(rows, names, options.seed)
    sanity = sanity_summary(rows["sanity"])
    files: dict[str, bytes] = {
        "per_image.csv": csv_bytes(rows["per_image"], PER_IMAGE_COLUMNS),
        "per_map.csv": csv_bytes(rows["per_map"], PER_MAP_COLUMNS),
        "sanity.csv": csv_bytes(rows["sanity"], SANITY_COLUMNS),
        "summary.csv": csv_bytes(summary, SUMMARY_COLUMNS),
        "sanity_summary.csv": csv_bytes(sanity, SANITY_SUMMARY_COLUMNS),
    }
    figures = _figures(rows, sanity, inputs, options)
    files.update(figures)
    failed = sorted({r["image"] for r in rows["per_image"] if r.get("error")})
    header = SUMMARY_HEADER
    model_rows, paired_rows = _table_rows(summary, "model"), _table_rows(summary, "paired")
    deletion = {"all": "every map", "default": "the last stage's CAM and the random map",
                "off": "no map"}[options.deletion]  # fmt: skip
    images, read = _images_text(rows, inputs, failed)
    checked = len({r["image"] for r in rows["sanity"]})  # the first --sanity images that read
    sanity = (
        "no sanity check" if checked == 0
        else f"sanity check on all {checked} images" if checked == read
        else f"sanity check on the first {checked} images"
    )  # fmt: skip
    scored = (
        "no deletion/insertion" if options.deletion == "off"
        else f"deletion/insertion on {deletion} with {options.steps} steps "
             f"({options.baseline} baseline)"
    )  # fmt: skip
    intro = (
        f"{images}, {len(names)} checkpoint(s), CAM method {_method_text(inputs, options)}, "
        f"{scored}, {sanity}, {world} process(es). "
        "Intervals: 95% percentile bootstrap over images."
    )
    md = [
        "# Attention Lens data-set report", "", md_text(intro, limit=None), "",
        "## Per model", "", _markdown(header, model_rows), "",
    ]  # fmt: skip
    if paired_rows:
        md += ["## Paired differences (same images)", "", _markdown(header, paired_rows), ""]
    for fname in figures:
        md += [f"**{FIGURE_CAPTIONS.get(fname, fname)}**", "", f"![{fname}]({fname})", ""]
    if failed:
        md += [f"Unreadable images: {len(failed)} (see per_image.csv).", ""]
    files["report.md"] = "\n".join(md).encode("utf-8")
    body = [f"<h1>Attention Lens data-set report</h1><p>{html.escape(intro)}</p>",
            "<h2>Per model</h2>", _html_table(header, model_rows)]  # fmt: skip
    if paired_rows:
        body += ["<h2>Paired differences (same images)</h2>", _html_table(header, paired_rows)]
    for fname, data in figures.items():
        encoded = base64.b64encode(data).decode("ascii")
        caption = html.escape(FIGURE_CAPTIONS.get(fname, fname))
        body.append(f'<h2>{caption}</h2><img alt="{html.escape(fname)}" '
                    f'src="data:image/png;base64,{encoded}">')  # fmt: skip
    if failed:
        body.append(f"<p>Unreadable images: {len(failed)} (see per_image.csv).</p>")
    files["report.html"] = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Attention Lens report</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    ).encode()
    manifest = build_manifest(
        checkpoints=[checkpoint_info(c, p) | {"name": n} for n, p, c in inputs.checkpoints],
        images=[{"file": str(p), "name": n, "label": lab} for p, n, lab in inputs.images],
        options=asdict(options) | {"world_size": world},
        failures=[{"input": name, "step": "decode"} for name in failed],
        files=files, tool="attention-lens report",
    )  # fmt: skip
    files["manifest.json"] = manifest_bytes(manifest)
    write_files(out, files)
    return len(failed)


# --- reading a finished report (the app) ------------------------------------------------------

_MAX_TABLE_BYTES = 200 * 2**20
FIGURE_CAPTIONS = {
    "figures/distributions.png": "Per-image scores of each map (box plots, outliers drawn)",
    "figures/sanity.png": "Sanity check: each map against the trained network's as the "
    "blocks are randomised from the logits down",
    "figures/samples.png": "The first images under each model's last CAM and last attention map",
}
REPORT_FIGURES = tuple(FIGURE_CAPTIONS)


@dataclass
class FinishedReport:
    """A report folder read back: its tables (as text) and figures (decoded as PNG only)."""

    folder: Path
    summary: list[dict[str, str]]
    per_image: list[dict[str, str]]
    figures: dict[str, object]  # name -> PIL image
    files: dict[str, Path]  # downloadable files that exist


def open_report(folder: str | Path) -> FinishedReport:
    """Read a report folder written by `python -m viz report`.

    Only regular files of bounded size are read; figures go through the allow-listed decoder.

    Raises:
        ValueError: not a report folder, or a table that cannot be read (one line).
    """
    import os
    import stat

    from models.images import load_image

    root = Path(folder)

    def regular(name: str) -> Path | None:
        path = root / name
        try:
            info = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_TABLE_BYTES:
            return None
        return path

    summary_path = regular("summary.csv")
    if summary_path is None:
        raise ValueError(f"{root} holds no summary.csv: not a finished report folder")
    try:
        summary = read_csv(summary_path)
        per_image_path = regular("per_image.csv")
        per_image = read_csv(per_image_path) if per_image_path else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{root}: cannot read the report's tables ({exc})") from None
    figures = {}
    for name in REPORT_FIGURES:
        path = regular(name)
        if path is not None:
            try:
                figures[name] = load_image(path)
            except ValueError:
                continue  # a figure that is not a PNG is not shown
    files = {
        name: path
        for name in ("report.html", "report.md", "summary.csv", "per_image.csv", "per_map.csv",
                     "sanity.csv", "manifest.json")
        if (path := regular(name)) is not None
    }  # fmt: skip
    return FinishedReport(root, summary, per_image, figures, files)


TEMPORARY_PREFIX = "attention_lens_report_"
_STALE_SECONDS = 24 * 3600


def temporary_report_folder(previous: str | Path | None = None) -> Path:
    """A new folder under the system's temporary directory for a report run from the app.

    The run's files stay there to be downloaded while the report is shown; `previous` (the
    folder this session showed before, which the new report replaces) is removed, and so are
    folders of this kind left for more than a day by sessions that ended.
    """
    import shutil
    import tempfile
    import time

    base = Path(tempfile.gettempdir())
    stale_before = time.time() - _STALE_SECONDS
    for folder in base.glob(TEMPORARY_PREFIX + "*"):
        try:
            old = folder.is_dir() and folder.stat().st_mtime < stale_before
        except OSError:
            continue
        if old or (previous is not None and folder == Path(previous)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX))
