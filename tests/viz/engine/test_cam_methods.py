"""Every CAM method against the peer that computes it (same network, layer, input and target).

pytorch-grad-cam scales each map to [0, 1] at the layer, resizes it to the image and scales it
again; `_as_pytorch_grad_cam` does the same to ours, so maps compare at the image's size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from tests.conftest import PYTORCH_GRAD_CAM, ROOT, leftovers, randomize_bn
from viz.engine.cam import AUGMENTATIONS, CAM_METHODS, NEEDS, analyze
from viz.engine.maps import normalize

SIZE = 64


@pytest.fixture(scope="module")
def cbam_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build_model(18, "cbam", num_classes=7)).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))


def _scaled(m: torch.Tensor) -> torch.Tensor:
    m = m - m.amin((-2, -1), keepdim=True)
    return m / (1e-7 + m.amax((-2, -1), keepdim=True))


def _as_pytorch_grad_cam(m: torch.Tensor, relu: bool = True) -> np.ndarray:
    """Our (N, h, w) map as pytorch-grad-cam returns it: scaled, resized, ReLU, scaled."""
    m = F.interpolate(_scaled(m.float())[:, None], (SIZE, SIZE), mode="bilinear")[:, 0]
    return _scaled(torch.relu(m) if relu else m).numpy()


def _pytorch_grad_cam(name: str, model, x, target: int, layer=None, **call) -> np.ndarray:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layers = [layer if layer is not None else model.layer4]
    with getattr(pytorch_grad_cam, name)(model=model, target_layers=layers) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)], **call)


GRADIENT_PEERS = PYTORCH_GRAD_CAM


PEERS = {**GRADIENT_PEERS, "scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}


@pytest.mark.parametrize("method", [m for m in PEERS if m != "gradcam++"])
def test_layer_methods_equal_pytorch_grad_cam_end_to_end(method, cbam_model, image):
    ours = analyze(cbam_model, image, 3, ["layer4"], method=method).cams["layer4"]
    theirs = _pytorch_grad_cam(PEERS[method], cbam_model, image, 3)
    np.testing.assert_allclose(_as_pytorch_grad_cam(ours), theirs, atol=2e-4)
    assert leftovers(cbam_model) == 0


def _gradcam_pp_with_eps(acts, grads):
    g2 = grads.pow(2)
    alpha = g2 / (2 * g2 + acts.sum((2, 3), keepdim=True) * g2 * grads + 1e-6)
    return (alpha * torch.relu(grads)).sum((2, 3), keepdim=True) * acts


def test_gradcampp_differs_from_pytorch_grad_cam_by_its_epsilon_only(cbam_model, image):
    """pytorch-grad-cam adds 1e-6 to the denominator of the Grad-CAM++ coefficients; with
    gradients of 1e-3 (a last stage that is average-pooled) that is as large as the squared
    gradient itself. We keep the paper's formula; with the epsilon added the maps are equal."""
    from viz.engine.cam import register_cam_method

    theirs = _pytorch_grad_cam("GradCAMPlusPlus", cbam_model, image, 3)
    ours = analyze(cbam_model, image, 3, ["layer4"], method="gradcam++").cams["layer4"]
    assert np.abs(_as_pytorch_grad_cam(ours) - theirs).max() > 1e-4  # the epsilon shows
    register_cam_method("gradcam++eps", contributions=_gradcam_pp_with_eps, label="eps")
    try:
        with_eps = analyze(cbam_model, image, 3, ["layer4"], method="gradcam++eps").cams["layer4"]
    finally:
        del CAM_METHODS["gradcam++eps"]
    np.testing.assert_allclose(_as_pytorch_grad_cam(with_eps), theirs, atol=2e-4)


def _chain() -> nn.Module:
    torch.manual_seed(2)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
              nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]  # fmt: skip
    return randomize_bn(nn.Sequential(*layers)).eval()


def test_fullgrad_equals_pytorch_grad_cam():
    model, x = _chain(), torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    ours = analyze(model, x, 2, method="fullgrad", cam_layers=["3"])
    assert list(ours.cams) == ["fullgrad"] and ours.cam_stages == {"fullgrad": 0}
    theirs = _pytorch_grad_cam("FullGrad", model, x, 2, layer=model[3])  # a layer it ignores
    np.testing.assert_allclose(_scaled(ours.cams["fullgrad"]).numpy(), theirs, atol=2e-4)


def test_fullgrad_on_a_resnet_differs_from_pytorch_grad_cam_where_it_mispairs_biases(
    cbam_model, image
):
    """pytorch-grad-cam pairs the bias layers in definition order with their gradients in
    execution order; the official ResNet computes `downsample` before `bn1`, so in each first
    block of a stage it multiplies one layer's bias with another's gradient. Small, not zero."""
    ours = _scaled(analyze(cbam_model, image, 2, method="fullgrad").cams["fullgrad"]).numpy()
    theirs = _pytorch_grad_cam("FullGrad", cbam_model, image, 2)
    assert 2e-4 < np.abs(ours - theirs).max() < 1e-2


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_eigen_smooth_equals_pytorch_grad_cam_up_to_the_sign(method, cbam_model, image):
    ours = analyze(cbam_model, image, 1, ["layer4"], method=method, eigen_smooth=True)
    assert ours.smoothing == ("eigen",) and "eigen smooth" in ours.method_label
    theirs = _pytorch_grad_cam(GRADIENT_PEERS[method], cbam_model, image, 1, eigen_smooth=True)
    flipped = _as_pytorch_grad_cam(torch.relu(-_unrelu(cbam_model, image, method)))
    straight = _as_pytorch_grad_cam(ours.cams["layer4"])
    best = min(np.abs(straight - theirs).max(), np.abs(flipped - theirs).max())
    assert best < 2e-4


def _unrelu(model, x, method) -> torch.Tensor:
    """The signed principal-component map (before the ReLU), to compare with either sign."""
    spec = CAM_METHODS[method]
    object.__setattr__(spec, "relu", False)
    try:
        return analyze(model, x, 1, ["layer4"], method=method, eigen_smooth=True).cams["layer4"]
    finally:
        object.__setattr__(spec, "relu", True)


def test_aug_smooth_is_pytorch_grad_cams_test_time_augmentation(cbam_model, image):
    ours = analyze(cbam_model, image, 5, ["layer4"], method="gradcam", aug_smooth=True)
    theirs = _pytorch_grad_cam("GradCAM", cbam_model, image, 5, aug_smooth=True)
    # pytorch-grad-cam scales each version after resizing it to the image, we at the layer
    # (resizing moves the extremes a little), so the means agree to a few hundredths
    mine = F.interpolate(ours.cams["layer4"][:, None], (SIZE, SIZE), mode="bilinear")[:, 0]
    assert np.abs(mine.numpy() - theirs).max() < 0.02
    plain = analyze(cbam_model, image, 5, ["layer4"], method="gradcam")
    torch.testing.assert_close(ours.logits, plain.logits)  # the image as given, not a version
    assert ours.smoothing == ("aug",) and len(AUGMENTATIONS) == 6


def test_aug_smooth_mirrors_each_version_back():
    # a network whose CAM is its input's first channel: smoothing a lopsided image keeps it lopsided
    model = nn.Sequential(nn.Identity(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    x = torch.zeros(1, 3, 8, 8)
    x[..., :, :2] = 1.0
    maps = analyze(model, x, 0, ["0"], method="eigencam", aug_smooth=True).cams["0"]
    assert maps[0, :, :2].min() > maps[0, :, 2:].max()


# --- TorchCAM's methods ------------------------------------------------------------------------


def _torchcam(name: str, model, x, target: int, layer="layer4", **options) -> torch.Tensor:
    from torchcam import methods

    if name == "CAM":
        options["fc_layer"] = "fc"  # the attention gates have linear layers too
    with getattr(methods, name)(model, layer, input_shape=(3, SIZE, SIZE), **options) as extractor:
        scores = model(x)
        return extractor(target, scores)[0]


def test_cam_equals_torchcam(cbam_model, image):
    ours = analyze(cbam_model, image, 4, method="cam")
    assert list(ours.cams) == ["layer4"]  # CAM's default: the last feature layer
    theirs = _torchcam("CAM", cbam_model, image, 4)
    torch.testing.assert_close(normalize(ours.cams["layer4"]), theirs, atol=1e-5, rtol=1e-5)


def test_cam_needs_pooling_and_a_linear_layer_after_the_layer(cbam_model, image):
    with pytest.raises(ValueError, match="CAM needs global average pooling") as caught:
        analyze(cbam_model, image, method="cam", cam_layers=["layer3"])
    assert "\n" not in str(caught.value)


# the score family on a small network (eight channels at the layer): the passes are per channel


def test_iscam_equals_torchcam(image):
    model = _chain()
    ours = analyze(model, image, 3, ["5"], method="iscam", options={"num_samples": 3})
    theirs = _torchcam("ISCAM", model, image, 3, layer="5", num_samples=3)
    torch.testing.assert_close(normalize(ours.cams["5"]), theirs, atol=1e-4, rtol=1e-4)


def test_sscam_without_noise_is_torchcams_scorecam_and_is_seeded(image):
    model = _chain()
    quiet = analyze(model, image, 0, ["5"], method="sscam",
                    options={"num_samples": 1, "std": 0.0})  # fmt: skip
    theirs = _torchcam("ScoreCAM", model, image, 0, layer="5")
    torch.testing.assert_close(normalize(quiet.cams["5"]), theirs, atol=1e-4, rtol=1e-4)

    def noisy(seed: int) -> torch.Tensor:
        opts = {"num_samples": 2}
        return analyze(model, image, 0, ["5"], method="sscam", options=opts,
                       seed=seed).cams["5"]  # fmt: skip

    torch.testing.assert_close(noisy(1), noisy(1))
    assert not torch.equal(noisy(1), noisy(2))


def test_smoothgradcampp_without_noise_is_gradcampp_and_is_seeded(cbam_model, image):
    # layer3: after layer4 the network is linear, so noise would not change its gradients
    plain = analyze(cbam_model, image, 2, ["layer3"], method="gradcam++").cams["layer3"]
    quiet = analyze(cbam_model, image, 2, ["layer3"], method="smoothgradcam++",
                    options={"num_samples": 2, "std": 0.0}).cams["layer3"]  # fmt: skip
    torch.testing.assert_close(quiet, plain, atol=1e-5, rtol=1e-4)
    runs = [
        analyze(cbam_model, image, 2, ["layer3"], method="smoothgradcam++", seed=s).cams["layer3"]
        for s in (7, 7, 8)
    ]
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# --- what makes the pass methods fast, and honest ----------------------------------------------


def test_ablation_runs_the_layers_before_the_layer_at_batch_one(cbam_model, image):
    seen = []
    handle = cbam_model.conv1.register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[0]))
    try:
        analyze(cbam_model, image, 0, ["layer4"], method="ablationcam", options={"batch_size": 64})
    finally:
        handle.remove()
    assert seen and set(seen) == {1}  # the traced pass and one per batch of 64 ablations
    assert len(seen) == 1 + -(-512 // 64)  # the first batch carries the unablated check too


class _Concat(nn.Module):
    """The layer's output is concatenated with an earlier tensor: no broadcasting there."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        stem = self.stem(x)
        both = torch.cat((stem, self.layer(stem)), 1)
        return self.head(both.mean((2, 3)))


def test_ablation_falls_back_to_whole_passes_where_the_network_cannot_broadcast():
    torch.manual_seed(1)
    model = _Concat().eval()
    x = torch.randn(1, 3, 6, 6)
    ours = analyze(model, x, 1, ["layer"], method="ablationcam").cams["layer"]
    # by hand: each channel of the layer's output zeroed (ReLU output: its minimum is 0)
    with torch.no_grad():
        stem = model.stem(x)
        out = model.layer(stem)
        base = model(x)[0, 1]
        weights = []
        for c in range(4):
            ablated = out.clone()
            ablated[:, c] = 0
            score = model.head(torch.cat((stem, ablated), 1).mean((2, 3)))[0, 1]
            weights.append((base - score) / base)
        expected = torch.relu((torch.stack(weights)[:, None, None] * out[0]).sum(0))
    torch.testing.assert_close(ours[0], expected, atol=1e-5, rtol=1e-4)


def test_scorecam_evaluates_identical_masks_once(cbam_model, image):
    # eight channels, four of them dead: five distinct masks (four live, one all-zero)
    acts = torch.zeros(1, 8, 2, 2)
    acts[0, :4] = torch.rand(4, 2, 2, generator=torch.Generator().manual_seed(0))
    calls = []
    from viz.engine.cam import extra_passes as passes
    from viz.engine.cam.targets import explained_by

    x = torch.rand(1, 3, 4, 4)
    context = passes.PassContext(
        model=_Counting(calls), x=x, module=nn.Identity(), acts=acts,
        explained=explained_by(0, x.mean((2, 3)), 1), scores=torch.tensor([1.0]),
        options={"batch_size": 100},
    )  # fmt: skip
    weights = passes.PASS_WEIGHTS["scorecam"](context)
    assert sum(calls) == 5
    assert torch.allclose(weights[0, 4:], weights[0, 4].expand(4))


class _Counting(nn.Module):
    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def forward(self, x):
        self.calls.append(len(x))
        return x.mean((2, 3))


def test_progress_counts_every_pass_up_to_the_total(cbam_model, image):
    seen: list[tuple[int, int]] = []
    analyze(cbam_model, image, 0, ["layer4"], method="ablationcam",
            progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert seen[0] == (1, 1 + 513) and seen[-1] == (514, 514)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_every_method_declares_what_it_needs_and_what_it_costs():
    for method in CAM_METHODS.values():
        assert method.needs in NEEDS
        assert method.cost and method.label and method.paper
        if method.needs == "passes":
            assert method.channel_weights is not None


def test_the_readme_method_table_lists_every_method():

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### CAM methods") :].split("\n## ")[0]
    missing = [m.label for m in CAM_METHODS.values() if m.label not in section]
    assert not missing


def test_a_network_wide_map_is_drawn_in_the_gradcam_figure(cbam_model, image):
    from viz.figures.attention_vs_gradcam import attention_vs_gradcam

    analysis = analyze(cbam_model, image, 1, method="fullgrad")
    fig = attention_vs_gradcam(torch.rand(3, SIZE, SIZE), analysis)
    texts = " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
    assert "whole network" in texts and "FullGrad" in texts


def test_the_passes_leave_the_denormal_setting_as_they_found_it(image):
    def flushing() -> bool:
        return float(torch.tensor(1e-39) * 1.0) == 0.0

    model = _chain()
    for setting in (False, True):
        torch.set_flush_denormal(setting)
        try:
            analyze(model, image, 0, ["5"], method="iscam", options={"num_samples": 1})
            assert flushing() is setting
        finally:
            torch.set_flush_denormal(False)


def test_the_folded_copy_follows_weights_changed_in_place(cbam_model, image):
    from viz.engine.cam.extra_passes import _folded_copy

    model = _chain()
    first = _folded_copy(model)
    assert _folded_copy(model) is first  # cached
    with torch.no_grad():
        model[0].weight.mul_(2)
    again = _folded_copy(model)
    assert again is not first
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_sample": 2}, "unknown method option"),  # a typo must not run the default 35
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"num_samples": -3}, "num_samples"),
        ({"std": -1.0}, "std must be a number >= 0"),
        ({"std": float("nan")}, "std"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_method_options_are_checked_before_any_pass(options, message):
    model, x = _chain(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=message):
        analyze(model, x, 0, ["3"], method="sscam", options=options)


def test_smoothing_given_as_one_name():
    model, x = _chain(), torch.randn(1, 3, 8, 8)
    assert analyze(model, x, 0, ["3"], smoothing="aug").smoothing == ("aug",)


def test_eigen_smoothing_is_refused_where_it_would_change_nothing():
    from viz import FigureSettings
    from viz.commands.export import ExportError
    from viz.engine.cam import smoothings_for

    assert smoothings_for("gradcam") == ("aug", "eigen") == smoothings_for("scorecam")
    assert smoothings_for("eigencam") == ("aug",) == smoothings_for("eigengradcam")
    assert smoothings_for("rollout") == ("aug",)  # a transformer's whole-network map
    model, x = _chain(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="Eigen-CAM takes no eigen smoothing"):
        analyze(model, x, 0, ["3"], method="eigencam", eigen_smooth=True)
    with pytest.raises(ValueError, match="EigenGrad-CAM takes no eigen smoothing"):
        analyze(model, x, 0, ["3"], method="eigengradcam", smoothing=("aug", "eigen"))
    with pytest.raises(ExportError, match="Eigen-CAM takes no eigen smoothing"):
        FigureSettings(method="eigencam", smoothing=("eigen",))
    assert analyze(model, x, 0, ["3"], method="eigencam", smoothing="aug").smoothing == ("aug",)


@pytest.mark.parametrize("method", ["eigencam", "gradcam", "rollout", "gae", "legrad"])
def test_same_for_every_class_says_whether_the_class_changes_the_map(method):
    """The app tells the user when the class explained changes nothing (Eigen-CAM, rollout):
    the flag must match what the maps do."""
    import timm

    torch.manual_seed(0)
    if CAM_METHODS[method].reads_attention:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                  num_classes=3).eval()  # fmt: skip
        x, layers = torch.randn(1, 3, 32, 32), None
    else:
        model = randomize_bn(build_model(18, "cbam", 3)).eval()
        x, layers = torch.randn(1, 3, 64, 64), ["layer4"]
    maps = [next(iter(analyze(model, x, t, layers, method=method).cams.values())) for t in (0, 1)]
    assert torch.allclose(maps[0], maps[1]) == CAM_METHODS[method].same_for_every_class
