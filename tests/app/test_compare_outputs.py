"""Compare models for networks that are not classifiers: what each row explains is made for
its own network (`lens_app.explain`'s `same_segment`, `same_detection`), or the row or column
says why it has nothing (n/a)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lens_app.context import ImageItem
from lens_app.explain import same_detection, same_segment
from models import Preprocess


class _Fixed(torch.nn.Module):
    """A network whose output is `make(batch)`: a segmenter's map or a detector's dicts."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


def _network(name: str, make, classes) -> SimpleNamespace:
    return SimpleNamespace(model=_Fixed(make), preprocess=Preprocess(32, 32), label=name,
                           class_names=list(classes),
                           sha256=hashlib.sha256(name.encode()).hexdigest())  # fmt: skip


@pytest.fixture
def item() -> ImageItem:
    image = Image.new("RGB", (32, 32), "gray")
    return ImageItem("gray.png", b"", hashlib.sha256(b"gray-compare").hexdigest(), image)


def _segmenter(name: str, classes, predicted: int):
    def make(x):
        maps = torch.zeros(len(x), len(classes), 8, 8)
        maps[:, predicted] = 1.0
        return {"out": maps}

    return _network(name, make, classes)


def test_a_segment_is_the_same_class_in_each_network_or_says_why_not(item):
    sky_first = _segmenter("sky-first", ["sky", "road"], predicted=0)
    road_first = _segmenter("road-first", ["road", "sky", "car"], predicted=1)  # sky is 1 here
    key, target = same_segment(road_first, item, "sky")
    assert key == "segment:1" and target.category == 1 and target.name == "sky"
    assert same_segment(sky_first, item, "car") == "no class 'car'"
    assert same_segment(road_first, item, "road") == "no pixel predicted as road"


def _detector(name: str, classes, boxes, labels):
    def make(x):
        return [{"boxes": torch.tensor(boxes, dtype=torch.float32),
                 "labels": torch.tensor(labels), "scores": torch.ones(len(labels))}
                for _ in range(len(x))]  # fmt: skip

    return _network(name, make, classes)


def test_a_detection_is_matched_by_label_and_overlap_in_each_network(item):
    in_use = _detector("in use", ["bg", "dog", "cat"], [[2, 2, 20, 20], [0, 0, 5, 5]], [1, 2])
    # the other network numbers its classes differently: dog is its class 2
    other = _detector("other", ["bg", "cat", "dog"], [[0, 0, 4, 4], [3, 3, 21, 20]], [1, 2])
    key, target = same_detection(in_use, other, item)  # no choice made: the top detection
    assert key.endswith(":dog") and target.labels.tolist() == [2]
    assert torch.equal(target.boxes, torch.tensor([[2.0, 2.0, 20.0, 20.0]]))
    apart = _detector("apart", ["bg", "dog"], [[25, 25, 31, 31]], [1])
    assert "no detection of label dog overlaps the box by IoU > 0.5" in same_detection(
        in_use, apart, item
    )
    assert same_detection(in_use, _detector("birds", ["bg", "bird"], [], []), item) == (
        "no class 'dog'"
    )
    # the model in use explains its own choice under the explain panel's key (analysed once)
    key, target = same_detection(in_use, in_use, item)
    assert key == "box:[2.0, 2.0, 20.0, 20.0]" and target.labels.tolist() == [1]
    empty = _detector("empty", ["bg", "dog"], [], [])

    assert same_detection(empty, in_use, item) == "empty finds nothing in gray.png"


def test_a_column_without_the_target_is_na_and_a_row_without_any_is_left_out(monkeypatch):
    """`output_row`: each column analysed for its own target; an n/a column holds the first
    column's analysis in its place (drawn as n/a, never explained for what it lacks)."""
    from lens_app.context import ModelOption
    from lens_app.views import compare_outputs

    asked = []

    def fake_analysis(image_sha, ckpt_sha, target, method, layers, *rest, explain):
        asked.append((image_sha, explain[0]))
        return f"analysis of {image_sha} for {explain[0]}"

    monkeypatch.setattr(compare_outputs, "analysis", fake_analysis)
    monkeypatch.setattr(compare_outputs, "at_stage",
                        lambda other, analyse, n, stage: ([analyse(c, None) for c in range(n)], ""))  # fmt: skip
    items = [ImageItem(name, b"", name, None) for name in ("a.png", "b.png", "c.png")]
    found = {"a.png": "no pixel predicted as sky", "b.png": ("segment:1", "sky target"),
             "c.png": ("segment:1", "sky target")}  # fmt: skip
    explained = SimpleNamespace(for_network=lambda other, item: found[item.name])
    network = SimpleNamespace(label="net", sha256="n", model=torch.nn.Identity())
    ctx = SimpleNamespace(items=items, explained=explained,
                          models={"net (n.pth)": ModelOption("n.pth", lambda: network)})  # fmt: skip
    row, notes = compare_outputs.output_row(ctx, "net (n.pth)", network, "gradcam", (), 4)
    assert row.absent == [0] and asked == [("b.png", "segment:1")] * 2 + [("c.png", "segment:1")]
    plain = [n.replace("\\", "") for n in notes]  # the notes are Markdown, names escaped
    assert plain == ["net (n.pth), a.png: no pixel predicted as sky (n/a)."]
    found.update({"b.png": "no pixel predicted as sky", "c.png": "no pixel predicted as sky"})
    row, notes = compare_outputs.output_row(ctx, "net (n.pth)", network, "gradcam", (), 4)
    assert (
        row is None
        and notes[0].replace("\\", "") == "net (n.pth): no pixel predicted as sky: left out."
    )
