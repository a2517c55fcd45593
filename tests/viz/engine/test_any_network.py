"""Attention probes, stage discovery and CAM methods on networks Attention Lens did not build.

Every network here has random weights (timm and torchvision with `pretrained=False`, nothing is
downloaded). Gate outputs are read independently by the test's own hooks and compared with
the trace; CAMs are compared with Captum and pytorch-grad-cam.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torchvision
from captum.attr import LayerGradCam
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.layers.eca import EcaModule
from timm.layers.squeeze_excite import SEModule
from torch import nn

from models.probes import find_probe
from tests.conftest import PYTORCH_GRAD_CAM, leftovers, randomize_bn
from viz import (
    CAM_METHODS,
    analyze,
    attention_hooks,
    record_attention,
    register_attention,
    registered_attention,
    stage_layers,
    unregister_attention,
)

# --- a user's own CBAM, written unlike ours: 1x1 convs, hard sigmoid, pooled in another order


class MyChannelAttention(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.ReLU(), nn.Conv2d(c // 4, c, 1))
        self.act = nn.Hardsigmoid()

    def forward(self, x):
        pooled = self.mlp(x.amax((2, 3), keepdim=True)) + self.mlp(x.mean((2, 3), keepdim=True))
        return x * self.act(pooled)


class MySpatialAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 5, padding=2)
        self.act = nn.Sigmoid()

    def forward(self, x):
        pooled = torch.stack((x.mean(1), x.amax(1)), 1)
        return x * self.act(self.conv(pooled))


class MyCBAM(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.ca = MyChannelAttention(c)
        self.sa = MySpatialAttention()

    def forward(self, x):
        return self.sa(self.ca(x))


class MyNet(nn.Module):
    """Four stride-2 stages after a stride-2 stem, attention at the end of each stage."""

    def __init__(self, attention=MyCBAM, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        widths = [8, 16, 32, 64, 64]
        self.stages = nn.ModuleList()
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1),
                    nn.ReLU(),
                    attention(widths[i + 1]),
                )
            )
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture
def my_cbam_registered():
    register_attention(MyCBAM, kind="cbam", channel="ca.act", spatial="sa.act")
    yield
    unregister_attention(MyCBAM)


def _seeded(model: nn.Module) -> nn.Module:
    return randomize_bn(model).eval()


NETWORKS = {
    "timm-resnet18-cbam": lambda: timm.create_model(
        "resnet18", pretrained=False, num_classes=5, block_args={"attn_layer": "cbam"}
    ),
    "timm-seresnet18": lambda: timm.create_model("seresnet18", pretrained=False, num_classes=5),
    "timm-ecaresnet26t": lambda: timm.create_model("ecaresnet26t", pretrained=False, num_classes=5),
    "tv-efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=5),
    "tv-mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
}
# where each network's gates are (the submodule a reader would name), found without the registry
GATES = {
    "timm-resnet18-cbam": (CbamModule, ["channel.gate", "spatial.gate"], "cbam"),
    "timm-seresnet18": (SEModule, ["gate"], "se"),
    "timm-ecaresnet26t": (EcaModule, ["gate"], "eca"),
    "tv-efficientnet_b0": (torchvision.ops.SqueezeExcitation, ["scale_activation"], "se"),
    "tv-mobilenet_v3_small": (torchvision.ops.SqueezeExcitation, ["scale_activation"], "se"),
}
STAGE_LAYERS = {
    "timm-resnet18-cbam": ["layer1", "layer2", "layer3", "layer4"],
    "timm-seresnet18": ["layer1", "layer2", "layer3", "layer4"],
    "timm-ecaresnet26t": ["layer1", "layer2", "layer3", "layer4"],
    "tv-efficientnet_b0": ["features.2", "features.3", "features.5", "features"],
    "tv-mobilenet_v3_small": ["features.1", "features.3", "features.8", "features"],
}


def _independent_gates(model: nn.Module, cls: type, paths: list[str], x: torch.Tensor):
    """(module name, [gate outputs], input height) of every `cls` instance, in forward order."""
    found: list[tuple[str, list[torch.Tensor], int]] = []
    handles = []
    for name, module in model.named_modules():
        if type(module) is not cls:
            continue
        outputs: dict[str, torch.Tensor] = {}

        def keep(path, store=outputs):
            return lambda _m, _i, out: store.__setitem__(path, out.detach().clone())

        def done(_m, inputs, _out, name=name, store=outputs):
            found.append((name, [store[p] for p in paths], inputs[0].shape[-2]))

        for path in paths:
            handles.append(module.get_submodule(path).register_forward_hook(keep(path)))
        handles.append(module.register_forward_hook(done))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


@pytest.mark.parametrize("net", list(NETWORKS))
def test_every_gate_is_recorded_in_order_with_its_stage(net):
    torch.manual_seed(0)
    model = _seeded(NETWORKS[net]())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    cls, paths, kind = GATES[net]
    expected = _independent_gates(model, cls, paths, x)
    assert expected, "the network has gates"
    with record_attention(model) as trace:
        with torch.no_grad():
            model(x)
    assert [r.name for r in trace] == [name for name, _, _ in expected]
    for rec, (_, outputs, height) in zip(trace, expected):
        assert rec.kind == kind
        torch.testing.assert_close(rec.channel, outputs[0].reshape(2, -1))
        if len(outputs) > 1:
            torch.testing.assert_close(rec.spatial, outputs[1][:, 0])
        # these networks have a stride-2 stem: stride 4 is stage 1 ... stride 32 is stage 4
        assert rec.stage == round(math.log2(64 / height)) - 1
    blocks: dict[int, list[int]] = {}
    for rec in trace:
        blocks.setdefault(rec.stage, []).append(rec.block)
    assert all(b == list(range(len(b))) for b in blocks.values())
    assert leftovers(model) == 0


@pytest.mark.parametrize("net", list(NETWORKS))
def test_hooks_kept_for_many_traces_record_the_same(net):
    model = _seeded(NETWORKS[net]())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with record_attention(model) as fresh:
            model(x)
        with attention_hooks(model):
            for _ in range(2):
                with record_attention(model) as kept:
                    model(x)
    assert leftovers(model) == 0
    assert [(r.name, r.stage, r.block) for r in kept] == [(r.name, r.stage, r.block) for r in fresh]
    for a, b in zip(fresh, kept):
        torch.testing.assert_close(a.channel, b.channel)
        torch.testing.assert_close(a.gate, b.gate)


@pytest.mark.parametrize("net", list(NETWORKS))
def test_analyze_finds_stage_layers_and_equals_captum(net):
    torch.manual_seed(0)
    model = _seeded(NETWORKS[net]())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert stage_layers(model) == STAGE_LAYERS[net]
    result = analyze(model, x)
    assert list(result.cams) == STAGE_LAYERS[net]
    assert list(result.stage_cams()) == [1, 2, 3, 4]
    for name in STAGE_LAYERS[net]:
        ref = LayerGradCam(model, model.get_submodule(name)).attribute(
            x, target=result.target.tolist(), relu_attributions=True
        )[:, 0]
        torch.testing.assert_close(result.cams[name], ref, atol=1e-5, rtol=1e-4)
    assert leftovers(model) == 0


def test_our_resnets_keep_layer1_to_layer4(tiny_model):
    assert stage_layers(tiny_model) == ["layer1", "layer2", "layer3", "layer4"]


def test_cifar_stem_resnet_has_four_stages():
    from models import build_model

    model = build_model(18, "cbam", 10, stem="cifar").eval()
    assert stage_layers(model) == ["layer1", "layer2", "layer3", "layer4"]
    with record_attention(model) as trace:
        model(torch.randn(1, 3, 32, 32))
    assert {r.name.split(".")[0]: r.stage for r in trace} == {
        "layer1": 1, "layer2": 2, "layer3": 3, "layer4": 4,
    }  # fmt: skip


def test_a_users_own_cbam_registered_in_one_line(my_cbam_registered):
    torch.manual_seed(0)
    model = MyNet().eval()
    x = torch.randn(2, 3, 64, 64)
    found = _independent_gates(model, MyCBAM, ["ca.act", "sa.act"], x)
    with record_attention(model) as trace:
        model(x)
    assert [r.name for r in trace] == [f"stages.{i}.2" for i in range(4)]
    assert [r.kind for r in trace] == ["cbam"] * 4
    assert [r.stage for r in trace] == [1, 2, 3, 4]
    for rec, (_, (channel, spatial), _) in zip(trace, found):
        torch.testing.assert_close(rec.channel, channel.reshape(2, -1))
        torch.testing.assert_close(rec.spatial, spatial[:, 0])
        # gate = channel mean x spatial, as for our CBAM
        torch.testing.assert_close(rec.gate, rec.channel.mean(1)[:, None, None] * rec.spatial)
    # the network's own stage layers: the last (shallowest) module at each resolution
    assert stage_layers(model) == [f"stages.{i}" for i in range(4)]


def test_channel_and_spatial_halves_registered_apart():
    register_attention(MyChannelAttention, kind="cbam-channel", channel="act")
    register_attention(MySpatialAttention, kind="cbam-spatial", spatial="act")
    try:
        model = MyNet().eval()
        with record_attention(model, feature_means=True) as trace:
            model(torch.randn(1, 3, 64, 64))
        kinds = [r.kind for r in trace]
        assert kinds == ["cbam-channel", "cbam-spatial"] * 4
        channel, spatial = trace[0], trace[1]
        assert channel.spatial is None and channel.channel.shape == (1, 16)
        assert spatial.channel is None and spatial.spatial.shape == (1, 16, 16)
        # feature means of a user module come from its own input and output
        assert channel.feature_in is not None and channel.feature_out is not None
    finally:
        unregister_attention(MyChannelAttention)
        unregister_attention(MySpatialAttention)


def test_subclasses_match_and_the_most_specific_probe_wins(my_cbam_registered):
    class Tweaked(MyCBAM):
        pass

    assert find_probe(Tweaked(8)).kind == "cbam"
    register_attention(Tweaked, kind="tweaked", spatial="sa.act")
    try:
        assert find_probe(Tweaked(8)).kind == "tweaked"
        assert find_probe(MyCBAM(8)).kind == "cbam"
    finally:
        unregister_attention(Tweaked)


def test_modules_inside_an_attention_module_are_part_of_it(my_cbam_registered):
    register_attention(MyChannelAttention, kind="cbam-channel", channel="act")
    try:
        model = MyNet().eval()
        with record_attention(model) as trace:
            model(torch.randn(1, 3, 64, 64))
        assert [r.kind for r in trace] == ["cbam"] * 4
    finally:
        unregister_attention(MyChannelAttention)


def test_a_wrong_submodule_name_is_one_clear_error():
    register_attention(MyCBAM, kind="cbam", channel="ca.actt", spatial="sa.act")
    try:
        model = MyNet()
        with pytest.raises(ValueError, match=r"no submodule 'ca.actt'") as info:
            with record_attention(model):
                pass
        assert "\n" not in str(info.value)
        assert leftovers(model) == 0
    finally:
        unregister_attention(MyCBAM)


def test_a_gate_of_the_wrong_shape_is_one_clear_error():
    # the conv inside the channel MLP is not a gate: C/4 channels, not C
    register_attention(MyCBAM, kind="cbam", channel="ca.mlp.0")
    try:
        model = MyNet().train()
        with record_attention(model) as trace:
            model(torch.randn(1, 3, 64, 64))
        assert leftovers(model) == 0 and model.training
        with pytest.raises(ValueError, match="channel output .* has no N x C") as info:
            list(trace)  # shapes are checked when the records are built, on first read
        assert "\n" not in str(info.value) and "ca.mlp.0" in str(info.value)
    finally:
        unregister_attention(MyCBAM)


def test_registration_is_checked():
    with pytest.raises(TypeError):
        register_attention(int, kind="x", channel="a")
    with pytest.raises(ValueError, match="channel=..., spatial="):
        register_attention(MyCBAM, kind="cbam")
    with pytest.raises(ValueError, match="non-empty kind"):
        register_attention(MyCBAM, kind=" ", channel="ca.act")
    assert MyCBAM not in registered_attention()


def test_built_in_probes_cover_timm_and_torchvision():
    registry = registered_attention()
    names = {f"{cls.__module__}.{cls.__name__}" for cls in registry}
    for expected in (
        "models.networks.attention.SqueezeExcite", "models.networks.attention.BAM", "models.networks.attention.CBAM",
        "timm.layers.squeeze_excite.SEModule", "timm.layers.squeeze_excite.EffectiveSEModule",
        "timm.layers.eca.EcaModule", "timm.layers.eca.CecaModule", "timm.layers.cbam.CbamModule",
        "timm.layers.cbam.LightCbamModule", "torchvision.ops.misc.SqueezeExcitation",
    ):  # fmt: skip
        assert expected in names


def test_light_cbam_channel_gate_is_the_sigmoid_of_its_logits():
    model = _seeded(
        timm.create_model(
            "resnet18", pretrained=False, num_classes=3, block_args={"attn_layer": "lcbam"}
        )
    )
    x = torch.randn(1, 3, 64, 64)
    logits = _independent_gates(model, LightCbamModule, ["channel.fc2"], x)
    with record_attention(model) as trace:
        model(x)
    torch.testing.assert_close(trace[0].channel, torch.sigmoid(logits[0][1][0]).reshape(1, -1))


def test_no_hook_or_flag_left_after_an_exception_in_any_network():
    model = NETWORKS["tv-efficientnet_b0"]().train()
    model.features[4].add_module("boom", _Boom())
    with pytest.raises(RuntimeError, match="boom"):
        analyze(model, torch.randn(1, 3, 64, 64), cam_layers=["features.2"])
    assert leftovers(model) == 0
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


class _Boom(nn.Module):
    def forward(self, x):
        if x.shape[-1] < 100:  # the 224-px shape probe passes, the analysed image fails
            raise RuntimeError("boom")
        return x


def test_layers_may_be_given_as_modules(tiny_model, image_batch):
    by_name = analyze(tiny_model, image_batch, cam_layers=["layer3"])
    by_module = analyze(tiny_model, image_batch, cam_layers=[tiny_model.layer3])
    torch.testing.assert_close(by_name.cams["layer3"], by_module.cams["layer3"])
    assert by_module.cam_stages == {"layer3": 3}
    with pytest.raises(ValueError, match="not in the model"):
        analyze(tiny_model, image_batch, cam_layers=[nn.Conv2d(1, 1, 1)])


# --- CAM methods ------------------------------------------------------------------------------


EIGEN = {"eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM"}


@pytest.mark.parametrize("method", list(PYTORCH_GRAD_CAM))
def test_cam_methods_equal_pytorch_grad_cam(method, tiny_model):
    import pytorch_grad_cam

    gen = torch.Generator().manual_seed(3)
    acts = torch.randn(2, 6, 5, 4, generator=gen).abs()
    grads = torch.randn(2, 6, 5, 4, generator=gen)
    ours = CAM_METHODS[method].weigh(acts, grads)
    cam_class = getattr(pytorch_grad_cam, PYTORCH_GRAD_CAM[method])
    with cam_class(model=tiny_model, target_layers=[tiny_model.layer4]) as cam:
        theirs = cam.get_cam_image(
            None, tiny_model.layer4, None, acts.numpy(), grads.numpy(), eigen_smooth=False
        )
    np.testing.assert_allclose(ours.numpy(), np.maximum(theirs, 0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", list(EIGEN))
def test_eigen_methods_equal_pytorch_grad_cam_up_to_the_svd_sign(method, tiny_model):
    import pytorch_grad_cam

    gen = torch.Generator().manual_seed(5)
    acts = torch.randn(3, 6, 5, 4, generator=gen).abs()
    grads = torch.randn(3, 6, 5, 4, generator=gen)
    ours = CAM_METHODS[method].weigh(acts, grads).numpy()
    with getattr(pytorch_grad_cam, EIGEN[method])(model=tiny_model,
                                                 target_layers=[tiny_model.layer4]) as cam:  # fmt: skip
        theirs = cam.get_cam_image(
            None, tiny_model.layer4, None, acts.numpy(), grads.numpy(), eigen_smooth=False
        )
    values = (acts if method == "eigencam" else acts * grads).numpy()
    for i in range(3):
        # our sign: the component correlates positively with the channel mean
        mean = values[i].mean(0).ravel()
        sign = 1.0 if np.corrcoef(theirs[i].ravel(), mean)[0, 1] >= 0 else -1.0
        np.testing.assert_allclose(ours[i], np.maximum(sign * theirs[i], 0), rtol=1e-4, atol=1e-5)


def test_eigencam_is_the_first_principal_component_with_a_fixed_sign():
    # two locations bright on every channel, the rest dark: the map must be high there
    acts = torch.zeros(1, 4, 3, 3)
    acts[0, :, 0, 0], acts[0, :, 2, 1] = 5.0, 4.0
    acts += 0.01 * torch.arange(9.0).view(1, 1, 3, 3)
    for flipped in (acts, acts.flip(1)):  # the sign does not depend on channel order
        m = CAM_METHODS["eigencam"].weigh(flipped, torch.zeros_like(flipped))[0]
        assert m[0, 0] > 0 and m[2, 1] > 0 and m[1, 1] == 0


def test_cam_formulas_on_a_hand_computed_example():
    # one channel, two locations: A = [1, 3], dY/dA = [2, -1]
    acts = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    grads = torch.tensor([2.0, -1.0]).view(1, 1, 1, 2)

    def run(name):
        return CAM_METHODS[name].weigh(acts, grads).flatten().tolist()

    assert run("gradcam") == pytest.approx([0.5, 1.5])  # w = mean(g) = 0.5
    assert run("hirescam") == pytest.approx([2.0, 0.0])  # relu(g * A) = [2, -3 -> 0]
    assert run("layercam") == pytest.approx([2.0, 0.0])  # relu(g) * A
    assert run("gradcamelementwise") == pytest.approx([2.0, 0.0])  # sum_c relu(g * A)
    w = (2 * 1 - 1 * 3) / 4  # sum(g A) / sum(A) = -0.25: the map is negative, ReLU gives 0
    assert run("xgradcam") == pytest.approx([max(0.0, w * 1), max(0.0, w * 3)])


def test_analysis_records_its_method_and_layers(tiny_model, image_batch):
    result = analyze(tiny_model, image_batch, cam_layers=["layer2", "layer4"], method="layercam")
    assert result.method == "layercam" and result.method_label == "LayerCAM"
    assert result.cam_stages == {"layer2": 2, "layer4": 4}
    with pytest.raises(ValueError, match="method must be one of"):
        analyze(tiny_model, image_batch, method="score-cam")


def test_a_fresh_trace_pickles_with_its_records(tiny_model, image_batch):
    import pickle

    with record_attention(tiny_model) as trace:
        tiny_model(image_batch)
    again = pickle.loads(pickle.dumps(trace))  # records are built lazily; pickling builds them
    assert again.names == trace.names
    for a, b in zip(again, trace):
        torch.testing.assert_close(a.gate, b.gate)


class _FixedSize(nn.Module):
    """A CNN whose head needs a 32x32 input (flattened features): the 224 px probe fails."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), MyCBAM(8))
        self.head = nn.Linear(8 * 16 * 16, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_a_network_the_probe_cannot_run_still_traces_and_says_why(my_cbam_registered):
    model = _FixedSize().eval()
    x = torch.randn(1, 3, 32, 32)
    with record_attention(model) as trace:
        model(x)
    assert [r.stage for r in trace] == [0]  # stride 2, from the stride alone
    with pytest.raises(ValueError, match="probe failed .*give the CAM layers by name") as info:
        analyze(model, x)
    assert "\n" not in str(info.value)
    result = analyze(model, x, cam_layers=["features"])
    assert result.cams["features"].shape == (1, 16, 16)
    assert leftovers(model) == 0
