"""Agreement, deletion/insertion and channel statistics on tiny models and hand-built cases."""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models import Preprocess, build_model
from models.images import load_image
from tests.conftest import leftovers, randomize_bn
from viz.engine.cam import analyze
from viz.engine.maps import upsample
from viz.engine.trace import record_attention
from viz.measures.metrics import (
    _gaussian_blur,
    agreement,
    agreement_table,
    channel_statistics,
    deletion_insertion,
)


def _tiny(attention: str | None, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build_model(18, attention, num_classes=num_classes)).eval()


@pytest.fixture
def smooth_map() -> torch.Tensor:
    """A (12, 10) map without ties."""
    return torch.randn(12, 10, generator=torch.Generator().manual_seed(3))


# --- agreement --------------------------------------------------------------------------------


def test_agreement_with_itself_and_its_negation(smooth_map):
    same = agreement(smooth_map, smooth_map)
    assert (same.pearson, same.spearman, same.iou, same.top_k) == pytest.approx((1, 1, 1, 0.2))
    neg = agreement(smooth_map, -smooth_map)
    assert (neg.pearson, neg.spearman) == pytest.approx((-1, -1))
    assert neg.iou == 0.0


def test_agreement_across_resolutions_and_numpy(smooth_map):
    big = upsample(smooth_map, (24, 20))
    result = agreement(smooth_map.numpy(), big)  # the small map is resized to (24, 20)
    assert (result.pearson, result.spearman, result.iou) == pytest.approx((1, 1, 1))
    other = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    mixed = agreement(other, big, size=(6, 6), top_k=0.5)
    assert -1 <= mixed.pearson <= 1 and -1 <= mixed.spearman <= 1 and 0 <= mixed.iou <= 1
    assert mixed.top_k == 0.5


def test_constant_map_gives_nan_without_raising(smooth_map):
    result = agreement(torch.full((6, 5), 0.3), smooth_map)
    # a constant map has no correlation and no top region: every score n/a, and why
    assert all(math.isnan(v) for v in (result.pearson, result.spearman, result.iou))
    assert result.constant == ("attention",) and result.reason == "constant attention map"
    both = agreement(np.zeros((3, 3)), np.zeros((4, 4)))
    assert math.isnan(both.iou) and both.reason == "constant attention map and CAM"
    broken = agreement(torch.tensor([[1.0, float("nan")], [0.0, 2.0]]), smooth_map)
    assert all(math.isnan(v) for v in (broken.pearson, broken.spearman, broken.iou))
    assert broken.reason == "nan or infinite values"
    assert agreement(smooth_map, smooth_map).reason is None


def test_spearman_invariant_to_monotone_transform_pearson_not(smooth_map):
    other = smooth_map + torch.randn(12, 10, generator=torch.Generator().manual_seed(5))
    plain, warped = agreement(smooth_map, other), agreement(smooth_map.mul(2).exp(), other)
    assert warped.spearman == pytest.approx(plain.spearman, abs=1e-12)
    assert warped.iou == pytest.approx(plain.iou)
    assert abs(warped.pearson - plain.pearson) > 0.05
    self_warped = agreement(smooth_map, smooth_map.mul(2).exp())
    assert self_warped.spearman == pytest.approx(1.0) and self_warped.pearson < 0.9


def test_spearman_with_ties_equals_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(6)
    a = torch.randint(0, 4, (9, 9), generator=gen).float()
    b = torch.randint(0, 6, (9, 9), generator=gen).float() + 0.1 * a
    result = agreement(a, b)
    assert result.spearman == pytest.approx(stats.spearmanr(a.flatten(), b.flatten())[0], abs=1e-12)
    assert result.pearson == pytest.approx(stats.pearsonr(a.flatten(), b.flatten())[0], abs=1e-6)


def test_top_k_ties_are_shared_not_ordered():
    # five pixels tied at the cut of a top-2 region: each gets 2/5, whatever the pixel order
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.0, 0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0]])
    assert agreement(a, b, top_k=0.2).iou == pytest.approx(0.4 / (4 * 0.4 + 1 + 1))
    assert agreement(a.flip(1), b.flip(1), top_k=0.2).iou == agreement(a, b, top_k=0.2).iou


def test_agreement_rejects_bad_arguments(smooth_map):
    with pytest.raises(ValueError, match="top_k"):
        agreement(smooth_map, smooth_map, top_k=0)
    with pytest.raises(ValueError, match="2-D"):
        agreement(smooth_map[None], smooth_map)
    with pytest.raises(ValueError, match="size"):
        agreement(smooth_map, smooth_map, size=(0, 4))


@pytest.mark.parametrize(
    "attention, expected",
    [
        ("cbam", [("layer1.1.cbam", "layer1"), ("layer2.1.cbam", "layer2"), ("layer3.1.cbam", "layer3"), ("layer4.1.cbam", "layer4")]),
        ("bam", [("bam1", "layer1"), ("bam2", "layer2"), ("bam3", "layer3")]),
    ],
)  # fmt: skip
def test_agreement_table_pairs_last_module_with_stage_cam(attention, expected, image_batch):
    model = _tiny(attention)
    result = analyze(model, image_batch)
    rows = agreement_table(result, 1, top_k=0.3)
    assert [(name, layer) for name, layer, _ in rows] == expected
    for name, layer, agree in rows:
        spatial = result.trace[name].spatial[1]
        assert spatial.shape == result.cams[layer].shape[1:]
        assert agree == agreement(spatial, result.cams[layer][1], top_k=0.3)
    only = agreement_table(replace(result, cams={"layer2": result.cams["layer2"]}), 0)
    assert [(name, layer) for name, layer, _ in only] == [expected[1]]
    with pytest.raises(IndexError, match="batch of 2"):
        agreement_table(result, 2)


def test_agreement_table_empty_without_spatial_attention(image_batch):
    assert agreement_table(analyze(_tiny("se"), image_batch)) == []


# --- deletion and insertion -------------------------------------------------------------------


class RegionScore(nn.Module):
    """Two classes; class 0's logit depends only on the mean of the central 8x8 region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, 28:36, 28:36].mean((1, 2, 3))
        return torch.stack([8 * (region - 1.0), torch.zeros_like(region)], 1)


@pytest.mark.parametrize("baseline", ["blur", "zero"])
def test_saliency_on_the_deciding_region_scores_better(baseline):
    gen = torch.Generator().manual_seed(7)
    x = 0.3 * torch.randn(1, 3, 64, 64, generator=gen)
    x[:, :, 28:36, 28:36] += 2.0
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    distance = (rows - 31.5).abs() + (cols - 31.5).abs()
    model = RegionScore()
    good = deletion_insertion(model, x, -distance[None], steps=16, baseline=baseline)
    bad = deletion_insertion(model, x, distance[None], steps=16, baseline=baseline)
    assert good.target.tolist() == [0]
    assert good.deletion_auc.item() < bad.deletion_auc.item() - 0.2
    assert good.insertion_auc.item() > bad.insertion_auc.item() + 0.2


def _small_net() -> nn.Module:
    """A few-layer CNN with BatchNorm: in train mode its outputs would depend on the batch."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    )  # fmt: skip


@pytest.mark.parametrize("baseline", ["blur", "zero"])
def test_batching_does_not_change_the_curves(baseline, image_batch):
    model = randomize_bn(_small_net()).train()
    saliency = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(8))
    kwargs = {"target": [1, 3], "steps": 5, "baseline": baseline}
    one = deletion_insertion(model, image_batch, saliency, batch_size=1, **kwargs)
    many = deletion_insertion(model, image_batch, saliency, batch_size=7, **kwargs)
    for field in (
        "deletion_auc",
        "insertion_auc",
        "fractions",
        "deletion_curve",
        "insertion_curve",
    ):
        torch.testing.assert_close(getattr(one, field), getattr(many, field), atol=1e-6, rtol=1e-5)
    assert one.target.tolist() == [1, 3]
    assert all(m.training for m in model.modules())


def test_curves_start_and_end_where_they_should(image_batch):
    model = _tiny("bam")
    model.train()
    modes = {n: m.training for n, m in model.named_modules()}
    x = image_batch[:, :, :32, :32]
    result = deletion_insertion(model, x, torch.rand(2, 32, 32), steps=4)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert leftovers(model) == 0
    torch.testing.assert_close(result.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1]))
    assert result.deletion_curve.shape == result.insertion_curve.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        clean = model(x).softmax(1).gather(1, result.target[:, None])[:, 0]
        blurred = model(_gaussian_blur(x)).softmax(1).gather(1, result.target[:, None])[:, 0]
    torch.testing.assert_close(result.deletion_curve[:, 0], clean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.insertion_curve[:, -1], clean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.deletion_curve[:, -1], blurred, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.insertion_curve[:, 0], blurred, atol=1e-6, rtol=1e-5)
    trapezoid = ((result.deletion_curve[:, 1:] + result.deletion_curve[:, :-1]) / 2).sum(1) / 4
    torch.testing.assert_close(result.deletion_auc, trapezoid)


def test_blur_keeps_constants_and_removes_detail():
    flat = torch.full((1, 3, 20, 20), 0.7)
    torch.testing.assert_close(_gaussian_blur(flat), flat)
    checker = (
        (torch.arange(20)[:, None] + torch.arange(20)).remainder(2).float().expand(1, 3, 20, 20)
    )
    assert _gaussian_blur(checker).std() < 0.1 * checker.std()


def test_deletion_insertion_rejects_bad_arguments(image_batch):
    model = RegionScore()
    with pytest.raises(ValueError, match="saliency"):
        deletion_insertion(model, image_batch, torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="baseline"):
        deletion_insertion(model, image_batch, torch.rand(2, 4, 4), baseline="noise")
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion(model, image_batch, torch.rand(2, 4, 4), steps=0)
    with pytest.raises(ValueError, match="out of range"):
        deletion_insertion(model, image_batch, torch.rand(2, 4, 4), target=5)


# --- channel statistics -----------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    """ImageFolder layout: 'cat' with 3 pictures, 'dog' with 2, 40x40 random PNGs."""
    rng = np.random.default_rng(9)
    for name, count in (("cat", 3), ("dog", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("attention", ["se", "bam", "cbam"])
def test_channel_statistics_equal_per_class_means(attention, image_folder):
    model = _tiny(attention, num_classes=2)
    preprocess = Preprocess(resize=36, crop=32)
    calls = []
    stats = channel_statistics(
        model, image_folder, preprocess, batch_size=2, progress=lambda *a: calls.append(a)
    )
    assert stats.class_names == ["cat", "dog"]
    assert stats.counts.tolist() == [3, 2]
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert leftovers(model) == 0
    expected: dict[str, list[torch.Tensor]] = {}
    for name in ("cat", "dog"):
        images = [load_image(p) for p in sorted((image_folder / name).iterdir())]
        with torch.no_grad(), record_attention(model) as trace:
            model(preprocess.batch(images))
        for rec in trace:
            weights = rec.channel.sigmoid() if attention == "bam" else rec.channel
            expected.setdefault(rec.name, []).append(weights.mean(0))
    assert list(stats.means) == list(expected)
    for name, rows in expected.items():
        assert stats.means[name].shape == (2, rows[0].shape[0])
        torch.testing.assert_close(stats.means[name], torch.stack(rows), atol=1e-6, rtol=1e-5)


def test_channel_statistics_of_a_dataset_with_an_empty_class():
    model = _tiny("cbam", num_classes=3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    dataset = torch.utils.data.TensorDataset(x, torch.tensor([0, 2, 2]))
    stats = channel_statistics(model, dataset, None, batch_size=2)
    assert stats.class_names == ["0", "1", "2"]
    assert stats.counts.tolist() == [1, 0, 2]
    means = stats.means["layer1.0.cbam"]
    assert means.shape == (3, 64) and means[1].isnan().all() and not means[[0, 2]].isnan().any()


def test_channel_statistics_refuses_missing_folder_and_no_preprocess(tmp_path, image_folder):
    model = _tiny("cbam", num_classes=2)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        channel_statistics(model, tmp_path / "missing", Preprocess(36, 32))
    with pytest.raises(ValueError, match="preprocess"):
        channel_statistics(model, image_folder, None)


def test_channel_statistics_memory_does_not_grow_with_images():
    model = _tiny("cbam", num_classes=2)
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    dataset = torch.utils.data.TensorDataset(x, torch.tensor([0, 1] * 5))
    live = []

    def count_tensors(done: int, total: int) -> None:
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance on some torch module proxies warns
            live.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))

    channel_statistics(model, dataset, None, batch_size=2, progress=count_tensors)
    assert len(live) == 5
    assert max(live[1:]) <= live[1]  # no trace, image or map of an earlier batch is kept
