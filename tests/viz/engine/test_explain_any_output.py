"""`analyze` with a target callable (issue 40): segmentation masks, detected boxes, embeddings.

Each helper's Grad-CAM equals pytorch-grad-cam's on the same network, layer and input (seeded
random weights): torchvision FCN-ResNet50 with a mask, a ResNet-18 without its classifier
against a concept vector, torchvision Faster R-CNN (MobileNetV3-FPN) for one detected box. A
network whose output is not class logits is refused without a target, in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.networks.attention import CBAM
from tests.conftest import leftovers, randomize_bn
from viz.engine.cam import analyze
from viz.targets import BoxScore, ClassScore, SegmentationScore, SimilarityScore


def _scaled(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (m - lo) / (hi - lo + 1e-7)


def _as_peer(ours: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Our (N, h, w) map as pytorch-grad-cam returns it: scaled, resized, ReLU, scaled."""
    m = F.interpolate(_scaled(ours.float())[:, None], size, mode="bilinear")[:, 0]
    return _scaled(torch.relu(m)).numpy()


def _peer(name: str, model, layer, x, targets) -> np.ndarray:
    import pytorch_grad_cam

    with getattr(pytorch_grad_cam, name)(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=targets)


class _OutOnly(nn.Module):
    """pytorch-grad-cam scores tensors: torchvision segmentation's dict output, unwrapped."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


@pytest.fixture(scope="module")
def fcn():
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    return randomize_bn(fcn_resnet50(weights=None, weights_backbone=None, num_classes=5)).eval()


def test_segmentation_gradcam_equals_pytorch_grad_cam_with_a_mask(fcn):
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(64, 64)
    mask[16:48, 8:40] = 1
    result = analyze(fcn, x, SegmentationScore(2, mask), ["backbone.layer4"])
    assert result.target is None and result.logits is None
    assert result.explained == "segment 2 (given mask)"
    theirs = _peer("GradCAM", _OutOnly(fcn), fcn.backbone.layer4, x,
                   [SemanticSegmentationTarget(2, mask.numpy())])  # fmt: skip
    np.testing.assert_allclose(
        _as_peer(result.cams["backbone.layer4"], (64, 64)), theirs, atol=2e-4
    )
    with torch.no_grad():
        want = (fcn(x)["out"][:, 2] * mask).sum((1, 2))
    torch.testing.assert_close(result.scores, want)
    assert leftovers(fcn) == 0


def test_output_that_is_not_class_logits_is_refused_without_a_target(fcn):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"returned \(1, 5, 32, 32\), not class logits.*Segment"):
        analyze(fcn, x, None, ["backbone.layer4"])
    with pytest.raises(ValueError, match="category 7 is not one of the 5 outputs"):
        analyze(fcn, x, SegmentationScore(7), ["backbone.layer4"])
    with pytest.raises(ValueError, match=r"the mask is \(8, 8\), the output \(32, 32\)"):
        analyze(fcn, x, SegmentationScore(1, torch.ones(8, 8)), ["backbone.layer4"])
    with pytest.raises(ValueError, match=r"must return one score per image \(1,\)"):
        analyze(fcn, x, lambda out: out["out"].sum(), ["backbone.layer4"])
    with pytest.raises(ValueError, match="do not depend on the network's output differentiably"):
        analyze(fcn, x, lambda out: out["out"].argmax(1).flatten(1).float().sum(1),
                ["backbone.layer4"])  # fmt: skip
    with pytest.raises(ValueError, match="not class logits"):
        analyze(fcn, x, ClassScore(1), ["backbone.layer4"])
    assert leftovers(fcn) == 0


@pytest.fixture(scope="module")
def headless_resnet18():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = randomize_bn(resnet18(weights=None))
    model.fc = nn.Identity()
    return model.eval()


class _TutorialConcept:
    """pytorch-grad-cam's embeddings tutorial's target (not in the package): the cosine
    similarity of one image's output to a concept vector."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


def test_embedding_gradcam_equals_pytorch_grad_cam_against_a_concept(headless_resnet18):
    gen = torch.Generator().manual_seed(2)
    x, other = torch.randn(2, 1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        concept = headless_resnet18(other)[0]
    result = analyze(headless_resnet18, x, SimilarityScore(concept), ["layer4"])
    theirs = _peer("GradCAM", headless_resnet18, headless_resnet18.layer4, x,
                   [_TutorialConcept(concept)])  # fmt: skip
    np.testing.assert_allclose(_as_peer(result.cams["layer4"], (64, 64)), theirs, atol=2e-4)
    assert result.explained == "cosine similarity to a 512-d embedding"
    with pytest.raises(ValueError, match=r"no classifier: its \(1, 512\) output is an embedding"):
        analyze(headless_resnet18, x, None, ["layer4"])
    with pytest.raises(ValueError, match="the embedding has 3 values, the network's output 512"):
        analyze(headless_resnet18, x, SimilarityScore(torch.ones(3)), ["layer4"])


@pytest.fixture(scope="module")
def detector():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.0
    )
    return randomize_bn(model).eval()


def test_box_gradcam_equals_pytorch_grad_cam_for_one_detected_box(detector):
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        found = detector(x)[0]
    assert len(found["boxes"]), "random weights with no score threshold still detect boxes"
    box, label = found["boxes"][:1], found["labels"][:1]
    layer = "backbone.body.16"  # the last stage of MobileNetV3's features
    result = analyze(detector, x, BoxScore(box, label), [layer])
    theirs = _peer("GradCAM", detector, detector.get_submodule(layer), x,
                   [FasterRCNNBoxScoreTarget(label, box)])  # fmt: skip
    np.testing.assert_allclose(_as_peer(result.cams[layer], (96, 96)), theirs, atol=2e-4)
    assert result.explained.startswith("box (") and f"label {int(label)}" in result.explained
    assert float(result.scores[0]) > 1.0  # IoU 1 with itself, plus its score
    with pytest.raises(ValueError, match="a list of dict .a detector.s.., not class logits"):
        analyze(detector, x, None, [layer])
    with pytest.raises(ValueError, match="x0 < x1"):
        BoxScore(torch.tensor([[10.0, 10, 5, 20]]), torch.tensor([1]))
    assert leftovers(detector) == 0


class TinyCbamUNet(nn.Module):
    """A U-Net of two levels with a CBAM after each encoder block: a segmenter with gates."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), CBAM(8, reduction=4))
        self.enc2 = nn.Sequential(
            nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), CBAM(16, reduction=4)
        )
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec = nn.Conv2d(24, classes, 3, padding=1)

    def forward(self, x):
        e1 = self.enc1(x)
        return self.dec(torch.cat((e1, self.up(self.enc2(e1))), 1))


def test_cbam_unet_traces_its_gates_and_score_cam_scores_masked_images_with_the_mask():
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    torch.manual_seed(0)
    model = TinyCbamUNet().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    target = SegmentationScore(1)  # the predicted pixels, fixed on the image as given
    result = analyze(model, x, target, ["enc2"], method="scorecam")
    assert len(result.trace) == 2  # both CBAMs' maps, traced as on a classifier
    with torch.no_grad():
        mask = (model(x).argmax(1)[0] == 1).float()
    theirs = _peer("ScoreCAM", model, model.enc2, x, [SemanticSegmentationTarget(1, mask.numpy())])
    np.testing.assert_allclose(_as_peer(result.cams["enc2"], (32, 32)), theirs, atol=2e-4)
    assert leftovers(model) == 0


def test_aug_smoothing_follows_a_segment_and_a_concept_and_refuses_a_fixed_mask():
    """Each version (mirrored or not, times an intensity) is explained for its own predicted
    pixels of the segment, or for the concept; the maps, mirrored back, are averaged."""
    from viz.engine.cam.analyze import AUGMENTATIONS
    from viz.engine.maps import normalize

    torch.manual_seed(0)
    model = TinyCbamUNet().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        concept = model(x).flatten(1).flip(0)  # each image against the other's output
    for target in (SegmentationScore(1), SimilarityScore(concept)):
        smoothed = analyze(model, x, target, ["enc2"], smoothing=("aug",))
        versions = []
        for mirror, factor in AUGMENTATIONS:
            v = analyze(model, (x.flip(-1) if mirror else x) * factor, target, ["enc2"])
            versions.append(normalize(v.cams["enc2"].flip(-1) if mirror else v.cams["enc2"]))
        torch.testing.assert_close(smoothed.cams["enc2"], torch.stack(versions).mean(0))
        plain = analyze(model, x, target, ["enc2"])
        torch.testing.assert_close(smoothed.scores, plain.scores)  # of the images as given
        assert smoothed.smoothing == ("aug",) and smoothed.explained == plain.explained
    with pytest.raises(ValueError, match="a fixed mask, a box or another callable"):
        analyze(model, x, SegmentationScore(1, mask=torch.ones(32, 32)), ["enc2"],
                smoothing=("aug",))  # fmt: skip


@pytest.mark.parametrize("method", ["gradcam++", "ablationcam", "smoothgradcam++", "layercam"])
def test_every_score_method_takes_a_callable(method):
    torch.manual_seed(0)
    model = TinyCbamUNet().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    options = {"num_samples": 2} if method == "smoothgradcam++" else None
    result = analyze(model, x, SegmentationScore(0), ["enc2"], method=method, options=options)
    assert result.cams["enc2"].shape == (2, 8, 8) and torch.isfinite(result.cams["enc2"]).all()
    assert result.scores.shape == (2,)


def test_class_score_gives_the_maps_of_the_int_target():
    from models import build_model

    torch.manual_seed(0)
    model = randomize_bn(build_model(18, "cbam", num_classes=7)).eval()
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    for method in ("gradcam", "cam"):
        by_int = analyze(model, image, 3, ["layer4"], method=method)
        by_helper = analyze(model, image, ClassScore(3), ["layer4"], method=method)
        torch.testing.assert_close(by_helper.cams["layer4"], by_int.cams["layer4"])
        assert by_int.explained == by_helper.explained == "class 3"
        assert torch.equal(by_helper.target, torch.tensor([3]))
    logit_3 = lambda out: out[:, 3]  # noqa: E731 - any callable, not a helper
    with pytest.raises(ValueError, match="another callable target does not follow"):
        analyze(model, image, logit_3, ["layer4"], smoothing=("aug",))
    with pytest.raises(ValueError, match="cannot explain <lambda>"):
        analyze(model, image, logit_3, ["layer4"], method="cam")


def test_rollout_reads_attention_alone_so_an_embedding_vit_needs_no_target():
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    result = analyze(net, x, method="rollout")
    assert result.cams["rollout"].shape == (1, 14, 14) and result.target is None
    assert result.explained.startswith("attention only") and torch.isnan(result.scores).all()
    with pytest.raises(ValueError, match="no classifier"):
        analyze(net, x, method="gae")  # GAE weighs by a score's gradients: it needs one
