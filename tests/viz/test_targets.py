"""Targets (issue 40): one score per image from any output, equal to pytorch-grad-cam's."""

from __future__ import annotations

import pytest
import torch
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputTarget,
    FasterRCNNBoxScoreTarget,
    SemanticSegmentationTarget,
)

from viz.targets import BoxScore, ClassScore, RawScore, SegmentationScore, SimilarityScore

GEN = torch.Generator().manual_seed(0)


def test_class_and_raw_scores():
    logits = torch.randn(3, 5, generator=GEN)
    want = torch.stack([ClassifierOutputTarget(2)(row) for row in logits])
    assert torch.equal(ClassScore(2)(logits), want)
    assert torch.equal(RawScore(4)({"out": logits}), logits[:, 4])
    with pytest.raises(ValueError, match="class 5 is not one of the 5 outputs"):
        ClassScore(5)(logits)
    with pytest.raises(ValueError, match=r"ClassScore needs class logits \(N, C\)"):
        ClassScore(0)(torch.randn(1, 3, 4, 4))


def test_segmentation_score_equals_pytorch_grad_cam_and_defaults_to_the_predicted_pixels():
    out = torch.randn(2, 4, 6, 6, generator=GEN, requires_grad=True)
    mask = (torch.rand(6, 6, generator=GEN) > 0.5).float()
    got = SegmentationScore(1, mask)({"out": out})
    want = torch.stack([SemanticSegmentationTarget(1, mask.numpy())(o) for o in out])
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert torch.equal(out.grad[:, 1], mask.expand(2, 6, 6))  # differentiable, only category 1
    predicted = SegmentationScore(3)(out)
    torch.testing.assert_close(predicted, (out[:, 3] * (out.argmax(1) == 3)).sum((1, 2)))
    with pytest.raises(ValueError, match="needs a segmentation output"):
        SegmentationScore(0)(torch.randn(2, 4))


def _detections(gen: torch.Generator) -> list[dict]:
    out = []
    for _ in range(2):
        xy = torch.rand(6, 2, generator=gen) * 40
        wh = torch.rand(6, 2, generator=gen) * 30 + 5
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.tensor([1, 2, 1, 3, 2, 1]),
                    "scores": torch.rand(6, generator=gen).requires_grad_()})  # fmt: skip
    return out


def test_box_score_equals_pytorch_grad_cams_faster_rcnn_target():
    found = _detections(torch.Generator().manual_seed(1))
    wanted = found[0]["boxes"][[0, 3]].detach() + 1.0  # near two detections of image 0
    labels = torch.tensor([1, 3])
    got = BoxScore(wanted, labels)(found)
    want = torch.cat([FasterRCNNBoxScoreTarget(labels, wanted)(o) for o in found])
    torch.testing.assert_close(got, want)
    assert float(got[0].detach()) > 1.0  # both boxes found in image 0
    got[0].backward()
    assert found[0]["scores"].grad[[0, 3]].tolist() == [1.0, 1.0]
    per_image = BoxScore([wanted, wanted[:1]], [labels, labels[:1]], iou=0.9)(found)
    assert per_image.shape == (2,)
    with pytest.raises(ValueError, match="needs a detector's output"):
        BoxScore(wanted, labels)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="boxes for 1 images, the batch 2"):
        BoxScore([wanted], [labels])(found)


def test_similarity_score_is_the_cosine_to_the_concept():
    emb = torch.randn(3, 8, generator=GEN)
    concept = torch.randn(8, generator=GEN)
    want = torch.stack([torch.nn.functional.cosine_similarity(e, concept, dim=0) for e in emb])
    torch.testing.assert_close(SimilarityScore(concept)(emb), want)
    with pytest.raises(ValueError, match="the embedding has 8 values, the network's output 4"):
        SimilarityScore(concept)(torch.randn(3, 4))
