"""The data-set report's measures on tiny cases whose answers are known by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models import Preprocess, build_model
from tests.conftest import randomize_bn
from viz.engine.cam import analyze
from viz.measures.localization import (
    BoxError,
    box_iou,
    energy_pointing_game,
    pointing_game,
    read_boxes,
)
from viz.measures.metrics import deletion_insertion
from viz.measures.sanity import cascading_randomisation, randomisation_steps, spearman, ssim
from viz.measures.stats import bootstrap_mean, paired_difference

# --- localisation -----------------------------------------------------------------------------


def _blob(size: int, cx: float, cy: float, sigma: float = 3.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def test_pointing_game_hits_the_box_and_misses_outside_the_tolerance():
    m = _blob(64, 20, 20)
    assert pointing_game(m, [(10, 10, 30, 30)], 64) == 1.0
    assert pointing_game(m, [(40, 40, 60, 60)], 64, tolerance=0) == 0.0
    # 15 px tolerance as in the paper: a box ending 10 px before the peak still counts
    assert pointing_game(m, [(30, 30, 40, 40)], 64) == 1.0
    assert math.isnan(pointing_game(m, [], 64))
    # maps at another resolution are resized to the crop first
    assert pointing_game(_blob(8, 2.5, 2.5, 0.8), [(10, 10, 30, 30)], 64) == 1.0


def test_energy_pointing_game_is_the_share_inside():
    inside = torch.zeros(10, 10)
    inside[2:5, 2:5] = 1.0
    assert energy_pointing_game(inside, [(2, 2, 5, 5)], 10) == pytest.approx(1.0)
    uniform = torch.ones(10, 10)
    assert energy_pointing_game(uniform, [(0, 0, 5, 4)], 10) == pytest.approx(20 / 100)
    # negative values carry no energy; an all-negative map has none at all
    assert energy_pointing_game(inside - 0.5, [(2, 2, 5, 5)], 10) == pytest.approx(1.0)
    assert math.isnan(energy_pointing_game(-uniform, [(0, 0, 5, 5)], 10))


def test_box_iou_of_the_largest_region():
    m = torch.zeros(20, 20)
    m[2:8, 3:9] = 1.0  # the larger region: 6 x 6
    m[15:17, 15:17] = 0.9  # a smaller one, above the threshold too
    assert box_iou(m, [(3, 2, 9, 8)], 20) == pytest.approx(1.0)
    # half-overlapping box: intersection 3 x 6 = 18, union 36 + 36 - 18 = 54
    assert box_iou(m, [(6, 2, 12, 8)], 20) == pytest.approx(18 / 54)
    assert box_iou(m, [(15, 15, 17, 17), (3, 2, 9, 8)], 20) == pytest.approx(1.0)
    assert math.isnan(box_iou(m, [], 20))


@pytest.mark.parametrize("size", [(300, 200), (160, 400), (1000, 120)])
def test_boxes_follow_the_models_resize_and_crop(size):
    """A white rectangle drawn on the original lands where map_box says, in the crop."""
    w, h = size
    box = (0.3 * w, 0.25 * h, 0.7 * w, 0.8 * h)
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = 255
    prep = Preprocess(resize=73, crop=64)
    crop = np.asarray(prep.crop_image(Image.fromarray(pixels)))[..., 0] > 127
    mapped = prep.map_box(box, (w, h))
    assert mapped is not None
    rows, cols = np.nonzero(crop.any(1))[0], np.nonzero(crop.any(0))[0]
    seen = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert np.allclose(mapped, seen, atol=1.5), (mapped, seen)
    assert prep.map_box((0, 0, 1, 1), (w, h)) is None or min(w, h) * 4 >= max(w, h)


def test_box_outside_the_crop_is_dropped():
    prep = Preprocess(resize=64, crop=64)
    assert prep.map_box((0, 0, 20, 100), (200, 100)) is None  # the left edge is cut away


def test_read_boxes_in_three_formats(tmp_path):
    (tmp_path / "b.csv").write_text("file,x0,y0,x1,y1,label\na.jpg,1,2,3,4,cat\na.jpg,5,6,7,8,\n")
    assert read_boxes(tmp_path / "b.csv") == {"a.jpg": [(1, 2, 3, 4), (5, 6, 7, 8)]}
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 7, "bbox": [1, 2, 10, 20], "category_id": 1}],
    }
    (tmp_path / "b.json").write_text(json.dumps(coco))
    assert read_boxes(tmp_path / "b.json") == {"a.jpg": [(1, 2, 11, 22)], "b.jpg": []}
    voc = tmp_path / "voc" / "Annotations"
    voc.mkdir(parents=True)
    (voc / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><name>dog</name>"
        "<bndbox><xmin>11</xmin><ymin>21</ymin><xmax>40</xmax><ymax>60</ymax></bndbox>"
        "</object></annotation>"
    )
    assert read_boxes(tmp_path / "voc") == {"a.jpg": [(10, 20, 40, 60)]}  # 1-based, inclusive


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("x.xml", '<!DOCTYPE a [<!ENTITY x "y">]><annotation/>', "DOCTYPE"),
        (
            "x.xml",
            "<annotation><object><bndbox><xmin>a</xmin></bndbox></object></annotation>",
            "four numbers",
        ),  # fmt: skip
        ("x.csv", "file,x0,y0,x1,y1\na.jpg,5,5,1,1\n", "not a box"),
        ("x.csv", "name,a\n", "needs the columns"),
        ("x.json", "{", "not JSON"),
        ("x.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("x.txt", "", "give a .csv"),
    ],
)
def test_bad_box_files_are_one_line(tmp_path, name, text, words):
    path = tmp_path / name
    if name.endswith(".xml"):
        path = tmp_path / "voc"
        path.mkdir()
        (path / name).write_text(text)
    else:
        path.write_text(text)
    with pytest.raises(BoxError, match=words) as info:
        read_boxes(path)
    assert "\n" not in str(info.value)


# --- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_of_constants_and_known_means():
    est = bootstrap_mean([0.25] * 10)
    assert (est.mean, est.low, est.high, est.n) == (0.25, 0.25, 0.25, 10)
    values = np.random.default_rng(0).normal(3.0, 1.0, 400)
    est = bootstrap_mean(np.append(values, np.nan))
    assert est.n == 400 and est.mean == pytest.approx(values.mean())
    se = values.std(ddof=1) / math.sqrt(400)  # the normal interval is about +- 1.96 se
    assert est.low == pytest.approx(values.mean() - 1.96 * se, abs=0.5 * se)
    assert est.high == pytest.approx(values.mean() + 1.96 * se, abs=0.5 * se)
    assert math.isnan(bootstrap_mean([math.nan]).mean)


def test_paired_difference_sees_a_shift_the_unpaired_spread_hides():
    a = np.random.default_rng(1).uniform(0, 1, 50)
    est = paired_difference(a, a - 0.1)
    assert est.mean == pytest.approx(0.1) and est.low == pytest.approx(0.1)
    assert est.high == pytest.approx(0.1)
    b = a.copy()
    b[3] = math.nan  # pairs where one side is missing are dropped
    assert paired_difference(a, b).n == 49
    with pytest.raises(ValueError, match="same images"):
        paired_difference([1, 2], [1])


# --- deletion / insertion with random ties ----------------------------------------------------


def test_constant_map_with_random_ties_scores_as_a_random_map():
    """In expectation over seeds, a constant map's AUCs equal those of uniform noise."""
    torch.manual_seed(0)
    model = randomize_bn(build_model(18, None, num_classes=4)).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    constant, noise = [], []
    for seed in range(40):
        c = deletion_insertion(model, x, torch.ones(1, 32, 32), 0, steps=8, tie_seeds=[seed])
        r = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(1000 + seed))
        n = deletion_insertion(model, x, r, 0, steps=8, tie_seeds=[seed])
        constant.append(float(c.deletion_auc[0] - c.insertion_auc[0]))
        noise.append(float(n.deletion_auc[0] - n.insertion_auc[0]))
    spread = np.std(constant + noise) / math.sqrt(40)
    assert abs(np.mean(constant) - np.mean(noise)) < 4 * spread + 1e-6
    # with row-major ties a constant map always deletes the same pixels first
    a = deletion_insertion(model, x, torch.ones(1, 32, 32), 0, steps=8)
    b = deletion_insertion(model, x, torch.ones(1, 32, 32), 0, steps=8)
    assert torch.equal(a.deletion_curve, b.deletion_curve)
    with pytest.raises(ValueError, match="one seed per image"):
        deletion_insertion(model, x, torch.ones(1, 32, 32), 0, tie_seeds=[1, 2])


# --- sanity check -----------------------------------------------------------------------------


def test_ssim_and_spearman_of_identical_and_unrelated_maps():
    m = _blob(16, 5, 9)
    assert ssim(m, m) == pytest.approx(1.0) and spearman(m, m) == pytest.approx(1.0)
    assert ssim(m, 2 * m + 1) == pytest.approx(1.0)  # both are min-max scaled first
    gen = torch.Generator().manual_seed(0)
    unrelated = [ssim(torch.rand(16, 16, generator=gen), torch.rand(16, 16, generator=gen))
                 for _ in range(20)]  # fmt: skip
    assert abs(float(np.mean(unrelated))) < 0.1
    assert ssim(torch.rand(3, 3, generator=gen), torch.rand(3, 3, generator=gen)) < 1.0
    # a constant map (an all-zero CAM) has no structure to compare: n/a, as Spearman
    flat = torch.zeros(16, 16)
    assert np.isnan(ssim(flat, flat)) and np.isnan(ssim(flat, m)) and np.isnan(spearman(flat, m))


def test_cascading_randomisation_runs_from_the_logits_down_and_decorrelates():
    torch.manual_seed(0)
    model = randomize_bn(build_model(18, "cbam", num_classes=5)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = randomisation_steps(model, torch.zeros(1, 3, 64, 64))
    assert steps[0] == "fc" and steps[1] == "layer4.1" and steps[-1] == "conv1"
    # BAMs are registered after layer4 but act after their stage: forward order puts them there
    bam = build_model(18, "bam", num_classes=5).eval()
    order = randomisation_steps(bam, torch.zeros(1, 3, 64, 64))
    assert order.index("layer4.0") < order.index("bam3.channel_att") < order.index("layer3.1")
    assert randomisation_steps(bam) != order  # registration order would put them elsewhere
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3, 4, 0])

    def maps_of(net, images, tgt):
        a = analyze(net, images, tgt)
        gate = next(r for r in a.trace.spatial_records if r.name == "layer3.1.cbam")
        return {"cam": a.cams["layer3"], "gate": gate.spatial}

    rows = cascading_randomisation(model, x, target, maps_of)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # a copy
    assert len(rows) == len(steps) * 2 * 6
    own = steps.index("layer3.1")
    # the forward gate of layer3.1 does not depend on the blocks after it: until its own block
    # is randomised it stays exactly what it was
    early = [r for r in rows if r.step < own and r.map == "gate"]
    assert all(r.spearman == pytest.approx(1.0) and r.ssim == pytest.approx(1.0) for r in early)
    for name in ("cam", "gate"):
        last = [r.spearman for r in rows if r.step == len(steps) - 1 and r.map == name]
        finite = [v for v in last if math.isfinite(v)]
        assert finite and abs(float(np.mean(finite))) < 0.3  # a random network's maps: unrelated


def test_batched_agreement_equals_the_per_map_one():
    from viz.measures.metrics import agreement, agreement_batch

    gen = torch.Generator().manual_seed(0)
    att = torch.rand(7, 7, 7, generator=gen)
    cam = torch.relu(torch.randn(7, 14, 14, generator=gen))  # many tied zeros
    att[1] = 0.5  # constant
    cam[2] = 0.0  # constant zero CAM
    att[3, 2:5, 2:5] = 0.9  # a plateau of ties
    att[4, 0, 0] = math.nan
    cam[5] = torch.round(cam[5] * 2) / 2  # coarse values: ties at the top-k cut
    pearson, spearman, iou = agreement_batch(att, cam, top_k=0.2)
    for i in range(7):
        one = agreement(att[i], cam[i], top_k=0.2)
        for got, want in (
            (pearson[i], one.pearson),
            (spearman[i], one.spearman),
            (iou[i], one.iou),
        ):
            if math.isnan(want):
                assert math.isnan(float(got)), i
            else:
                assert float(got) == pytest.approx(want, abs=1e-9), i


def test_sanity_summary_counts_the_maps_it_averages():
    from viz.commands.report_page import sanity_summary

    rows = [
        {"checkpoint": "m", "image": image, "step": 0, "randomised": "fc", "map": "cam/stage1",
         "spearman": value, "ssim": value}
        for image, value in (("a", 0.5), ("b", None), ("c", 0.3))  # b: a constant (zero) CAM
    ]  # fmt: skip
    (summary,) = sanity_summary(rows)
    assert summary["n"] == 2 and summary["spearman"] == pytest.approx(0.4)


def test_report_tables_sort_blocks_by_number():
    """Issue 36, item 9: blocks 9, 10, 11 in that order (was 10, 11, 9), in the summary, the
    sanity summary and the report's choice of its last CAM."""
    from viz.commands.report_page import _last_cam, natural_key, sanity_summary, summarise

    blocks = [f"attention/blocks.{b}.attn" for b in (10, 11, 9, 2)]
    per_map = [
        {"checkpoint": "m", "image": image, "map": name, "kind": "attention",
         "deletion_auc": 0.5, "insertion_auc": 0.5}
        for image in ("a", "b") for name in blocks
    ]  # fmt: skip
    rows = {"per_image": [], "per_map": per_map}
    shown = list(dict.fromkeys(r["map"] for r in summarise(rows, ["m"])))
    assert shown == ["attention/all", *(f"attention/blocks.{b}.attn" for b in (2, 9, 10, 11))]
    sanity = [
        {"checkpoint": "m", "image": "a", "step": 0, "randomised": "fc", "map": name,
         "spearman": 0.5, "ssim": 0.5}
        for name in blocks
    ]  # fmt: skip
    order = [r["map"] for r in sanity_summary(sanity)]
    assert order == ["attention/all", *(f"attention/blocks.{b}.attn" for b in (2, 9, 10, 11))]
    assert sorted(["cam/stage10", "cam/stage9"], key=natural_key) == ["cam/stage9", "cam/stage10"]
    cams = [{"map": m, "kind": "cam"} for m in ("cam/stage10", "cam/stage9")]
    assert _last_cam(cams) == "cam/stage10"


def test_a_whole_network_map_is_named_by_its_method():
    """Issue 36, item 9: rollout's map is `rollout` in the report (was `cam/stage0`)."""
    from viz.commands.report import cam_map_name, is_cam_map

    assert cam_map_name(0, "rollout") == "rollout" and cam_map_name(0, "fullgrad") == "fullgrad"
    assert cam_map_name(4, "layer4") == "cam/stage4"
    assert is_cam_map("rollout") and is_cam_map("cam/stage3")
    assert not is_cam_map("random") and not is_cam_map("attention/blocks.0.attn")
