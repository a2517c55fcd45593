"""What a network that is not a classifier explains (issue 40): one of its segments, one of
its detections, or its likeness to another image. A classifier's class is chosen in
`page.explained_class`; this is the same place on the page for the other outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import streamlit as st
import torch

import viz
from viz.targets import (
    OUTPUT_KINDS,
    BoxScore,
    SegmentationScore,
    SimilarityScore,
    main_tensor,
    matching_detection,
    output_kind,
)

from . import keys
from .caching import analysis

DETECTIONS_SHOWN = 10


@dataclass(frozen=True)
class Explained:
    """The chosen target (None: nothing chosen yet, the attention alone is shown), the key the
    analyses are cached under, and what it is in words. `for_network(ckpt, item)`: the same
    target for another network of the kind on any image, as (key, target), or the reason it
    has none (Compare models: one row per network)."""

    target: object
    key: str
    text: str
    for_network: Callable[..., tuple[str, object] | str] | None = None


@st.cache_data(show_spinner=False, max_entries=64)
def network_output(image_sha: str, ckpt_sha: str, _ckpt, _image):
    """The network's output on one image (no gradients), kept for all sessions."""
    with torch.no_grad():
        return _ckpt.model(_ckpt.preprocess.batch([_image]))


@st.cache_data(show_spinner=False, max_entries=32)
def kind_of(ckpt_sha: str, _ckpt, _item) -> str:
    """ "classes", "segments", "boxes" or "embedding": what the network returns, seen once per
    model (on the first image it is shown)."""
    out = network_output(_item.sha, ckpt_sha, _ckpt, _item.image)
    return output_kind(out, headless=viz.is_headless(_ckpt.model))


@st.cache_data(show_spinner=False, max_entries=256)
def attention_analysis(image_sha: str, ckpt_sha: str, _ckpt, _image):
    """The attention maps alone (no CAM): what every network shows without a target."""
    return viz.attention_only(_ckpt.model, _ckpt.preprocess.batch([_image]))


def explained_output(kind, ckpt, label, items, pick, crop, settings):
    """The image, the choice of what to explain, the zip; (Explained, analysis)."""
    item = items[pick]
    left, right = st.columns([1, 2])
    left.image(crop, caption=f"{viz.md_text(item.name)} as the network sees it")
    right.markdown(
        f"**{viz.md_text(label)}** returns {OUTPUT_KINDS[kind]}: its maps explain "
        "what you choose here."
    )
    choose = {"segments": _segment, "boxes": _detection, "embedding": _likeness}[kind]
    chosen = choose(right, ckpt, items, pick)
    if chosen.target is None:
        return chosen, attention_analysis(item.sha, ckpt.sha256, ckpt, item.image)
    an = analysis(item.sha, ckpt.sha256, None, settings.method, settings.layers,
                  settings.smoothing, ckpt, item.image, tuple(settings.method_options().items()),
                  explain=(chosen.key, chosen.target))  # fmt: skip
    score = float(an.scores[0])
    right.markdown(f"Explaining **{viz.md_text(chosen.text)}** (score {score:.4g})")
    return chosen, an


def _segment(where, ckpt, items, pick) -> Explained:
    item = items[pick]
    maps = main_tensor(network_output(item.sha, ckpt.sha256, ckpt, item.image))[0]
    counts = torch.bincount(maps.argmax(0).flatten(), minlength=maps.shape[0])
    present = [int(k) for k in counts.argsort(descending=True) if counts[k] > 0]
    names, total = ckpt.class_names, int(counts.sum())
    k = where.selectbox(
        "Explain segment", present, key=keys.explain(item, ckpt, "segment"),
        format_func=lambda c: f"{names[c]} ({100 * int(counts[c]) / total:.1f}% of the pixels)",
    )  # fmt: skip
    target = SegmentationScore(k, name=names[k])
    return Explained(target, f"segment:{k}", f"{names[k]} (its predicted pixels)",
                     lambda other, each: same_segment(other, each, names[k]))  # fmt: skip


def same_segment(other, item, name: str) -> tuple[str, object] | str:
    """The segment of class `name` in another segmenter: its own predicted pixels on `item`."""
    if name not in other.class_names:
        return f"no class {name!r}"
    k = other.class_names.index(name)
    maps = main_tensor(network_output(item.sha, other.sha256, other, item.image))[0]
    if not bool((maps.argmax(0) == k).any()):
        return f"no pixel predicted as {name}"
    return f"segment:{k}", SegmentationScore(k, name=name)


def _detection(where, ckpt, items, pick) -> Explained:
    item = items[pick]
    found = network_output(item.sha, ckpt.sha256, ckpt, item.image)[0]
    boxes, labels, scores = (found[k][:DETECTIONS_SHOWN] for k in ("boxes", "labels", "scores"))
    if not len(boxes):
        where.info("The detector finds nothing in this image: its attention maps are shown alone.")
        return Explained(None, "", "")
    names = ckpt.class_names

    def name(i: int) -> str:
        k = int(labels[int(i)])
        return names[k] if k < len(names) else f"class {k}"

    where.dataframe(
        pd.DataFrame({
            "detection": range(len(boxes)),
            "label": [name(i) for i in range(len(boxes))],
            "score": [round(float(s), 3) for s in scores],
            "box (x0, y0, x1, y1)": [", ".join(f"{v:.0f}" for v in b.tolist()) for b in boxes],
        }),
        hide_index=True,
    )  # fmt: skip
    i = where.selectbox(
        "Explain detection", range(len(boxes)), key=keys.explain(item, ckpt, "box"),
        format_func=lambda i: f"{i}: {name(i)} ({float(scores[int(i)]):.2f})",
    )  # fmt: skip
    i = int(i)
    key, target = own_detection(found, i, names)
    text = f"{name(i)} at ({', '.join(f'{v:.0f}' for v in target.boxes[0].tolist())})"
    return Explained(target, key, text,
                     lambda other, each: same_detection(ckpt, other, each))  # fmt: skip


def own_detection(found: dict, i: int, names) -> tuple[str, BoxScore]:
    """Detection `i` of a detector's output `found` as a target, and the key its analyses are
    cached under (the same in the explain panel and in Compare models' row of that model)."""
    box = found["boxes"][i : i + 1].clone()
    return f"box:{box[0].tolist()}", BoxScore(box, found["labels"][i : i + 1].clone(),
                                              names=list(names))  # fmt: skip


def same_detection(ckpt, other, item) -> tuple[str, object] | str:
    """In another detector, the detection matching the one chosen with `ckpt` on `item` (its
    choice on that image, else its top detection): the same label, overlapping by IoU > 0.5."""
    found = network_output(item.sha, ckpt.sha256, ckpt, item.image)[0]
    if not len(found["boxes"]):
        return f"{ckpt.label} finds nothing in {item.name}"
    i = min(int(st.session_state.get(keys.explain(item, ckpt, "box"), 0)), len(found["boxes"]) - 1)
    if other.sha256 == ckpt.sha256:  # the model in use: its own choice, analysed once
        return own_detection(found, i, ckpt.class_names)
    k = int(found["labels"][i])
    name = ckpt.class_names[k] if k < len(ckpt.class_names) else None
    if name not in other.class_names:
        return f"no class {name!r}" if name else f"no name for class {k}"
    seen_as, own = ckpt.preprocess(item.image).shape[-2:], other.preprocess(item.image).shape[-2:]
    scale = [own[1] / seen_as[1], own[0] / seen_as[0]] * 2  # its own input's pixels
    box = [float(v) * f for v, f in zip(found["boxes"][i].tolist(), scale)]
    theirs = network_output(item.sha, other.sha256, other, item.image)
    try:
        target = matching_detection(theirs[0], box, other.class_names.index(name),
                                    other.class_names)  # fmt: skip
    except ValueError as exc:
        return str(exc)
    return f"box:{[round(v, 2) for v in box]}:{name}", target


def _likeness(where, ckpt, items, pick) -> Explained:
    """The likeness to another uploaded image, or to a region of this one (its embedding)."""
    item = items[pick]
    others = [i for i in range(len(items)) if i != pick]
    sources = (["another image"] if others else []) + ["a region of this image"]
    source = where.radio("Concept", sources, horizontal=True,
                         key=keys.explain(item, ckpt, "concept_source"),
                         help="The maps show what makes this image like the concept: the "
                              "network's embedding of another image or of a part of this "
                              "one.")  # fmt: skip
    if source == "another image":
        j = where.selectbox(
            "Explain the likeness to", others, key=keys.explain(item, ckpt, "concept"),
            format_func=lambda i: items[i].name,
        )  # fmt: skip
        concept = items[j]

        def like(network, _item):
            out = network_output(concept.sha, network.sha256, network, concept.image)
            return f"similar:{concept.sha}", SimilarityScore(main_tensor(out).flatten(1)[0].clone())

        return Explained(like(ckpt, None)[1], f"similar:{concept.sha}",
                         f"likeness to {concept.name}", like)  # fmt: skip
    across, down = where.columns(2)
    x0, x1 = across.slider("Region across (% of the width)", 0, 100, (25, 75), 5,
                           key=keys.explain(item, ckpt, "region_x"))  # fmt: skip
    y0, y1 = down.slider("Region down (% of the height)", 0, 100, (25, 75), 5,
                         key=keys.explain(item, ckpt, "region_y"))  # fmt: skip
    if x1 - x0 < 5 or y1 - y0 < 5:
        where.info("Make the region at least 5% wide and high.")
        return Explained(None, "", "")
    region = region_of(item.image, (x0, y0, x1, y1))
    where.image(region, width=120, caption="the concept")
    key = f"region:{item.sha}:{x0},{y0},{x1},{y1}"  # other images are compared with it too

    def like(network, _item):
        embedded = region_embedding(item.sha, (x0, y0, x1, y1), network.sha256, network, region)
        return key, SimilarityScore(embedded)

    text = f"likeness to the region x {x0}-{x1}%, y {y0}-{y1}% of {item.name}"
    return Explained(like(ckpt, None)[1], key, text, like)


def region_of(image, percent: tuple[int, int, int, int]):
    """The part of a PIL image between the percentages (x0, y0, x1, y1) of its size."""
    w, h = image.size
    x0, y0, x1, y1 = percent
    box = (w * x0 // 100, h * y0 // 100, max(w * x1 // 100, w * x0 // 100 + 1),
           max(h * y1 // 100, h * y0 // 100 + 1))  # fmt: skip
    return image.crop(box)


@st.cache_data(show_spinner=False, max_entries=64)
def region_embedding(image_sha: str, percent: tuple, ckpt_sha: str, _ckpt, _region):
    """The network's embedding of a region, as it embeds any image (its own resize and crop)."""
    with torch.no_grad():
        out = _ckpt.model(_ckpt.preprocess.batch([_region]))
    return main_tensor(out).flatten(1)[0].clone()
