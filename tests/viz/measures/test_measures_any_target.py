"""Deletion/insertion and localisation with a target that is not a class (issue 40)."""

from __future__ import annotations

import math

import torch

from models import build_model
from tests.conftest import randomize_bn
from tests.viz.engine.test_explain_any_output import TinyCbamUNet
from viz.measures.localization import energy_in_mask, pointing_in_mask
from viz.measures.metrics import deletion_insertion
from viz.targets import ClassScore, SegmentationScore


def test_a_callable_follows_the_same_curves_as_the_class_it_scores():
    torch.manual_seed(0)
    model = randomize_bn(build_model(18, "cbam", num_classes=5)).eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    saliency = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(2))
    by_class = deletion_insertion(model, x, saliency, 2, steps=4, batch_size=3)
    by_callable = deletion_insertion(
        model, x, saliency, lambda out: out.float().softmax(1)[:, 2], steps=4, batch_size=3
    )
    torch.testing.assert_close(by_callable.deletion_curve, by_class.deletion_curve)
    torch.testing.assert_close(by_callable.insertion_auc, by_class.insertion_auc)
    assert by_callable.target is None and by_callable.explained == "<lambda>"
    assert torch.equal(by_class.target, torch.tensor([2, 2]))
    by_helper = deletion_insertion(model, x, saliency, ClassScore(2), steps=4, batch_size=3)
    torch.testing.assert_close(by_helper.deletion_curve, by_class.deletion_curve)  # probabilities
    assert torch.equal(by_helper.target, by_class.target)


def test_deletion_of_a_segmentation_score_starts_at_the_images_score():
    torch.manual_seed(0)
    model = TinyCbamUNet().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    target = SegmentationScore(1, mask)
    result = deletion_insertion(model, x, torch.rand(1, 4, 4), target, steps=4, baseline="zero")
    with torch.no_grad():
        first = target(model(x))
        last = target(model(torch.zeros_like(x)))
    torch.testing.assert_close(result.deletion_curve[:, 0], first)
    torch.testing.assert_close(result.deletion_curve[:, -1], last)
    assert result.explained == "segment 1 (given mask)"


def test_energy_and_pointing_against_a_mask():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, :4] = True  # the left half
    left = torch.zeros(4, 4)
    left[1, 0] = 1.0
    assert energy_in_mask(left.repeat_interleave(2, 0).repeat_interleave(2, 1), mask) == 1.0
    assert pointing_in_mask(left, mask) == 1.0
    even = torch.ones(8, 8)
    assert abs(energy_in_mask(even, mask) - 0.5) < 1e-6
    right = torch.zeros(8, 8)
    right[3, 6] = 1.0
    assert pointing_in_mask(right, mask) == 0.0 and energy_in_mask(right, mask) == 0.0
    assert math.isnan(energy_in_mask(even, torch.zeros(8, 8)))


def test_the_sanity_check_randomises_a_segmenter_explained_for_a_fixed_mask():
    from viz.engine.cam import analyze
    from viz.measures.sanity import cascading_randomisation

    torch.manual_seed(1)
    model = TinyCbamUNet().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        category = int(model(x).argmax(1).flatten().mode().values)
        target = SegmentationScore(category).fixed_on(model(x))  # the trained model's pixels
    assert analyze(model, x, target, ["enc2"]).cams["enc2"].sum() > 0  # a map to compare

    def maps_of(net, images, what):
        return analyze(net, images, what, ["enc2"]).cams

    rows = cascading_randomisation(model, x, target, maps_of, seed=1)
    assert {r.map for r in rows} == {"enc2"} and len(rows) >= 3
    assert all(math.isnan(r.spearman) or -1.0 <= r.spearman <= 1.0 for r in rows)  # nan: a flat map
    assert any(not math.isnan(r.spearman) for r in rows)
