"""Attention tracing and the Grad-CAM engine: official values, hygiene, Captum agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerActivation, LayerGradCam, LayerGradientXActivation

from models import build_model
from models.networks.attention import CBAM
from tests.conftest import leftovers, randomize_bn
from viz.engine.cam import analyze, attribute, resolve_layers
from viz.engine.trace import attention_modules, record_attention


@pytest.mark.parametrize("name", ["cbam", "cbam_rect"])
def test_cbam_trace_equals_official_maps(module_vectors, name):
    channels = module_vectors[f"{name}/input"].shape[1]
    module = CBAM(channels).eval()
    prefix = f"{name}/state_dict/"
    module.load_state_dict(
        {
            k[len(prefix) :]: torch.from_numpy(v)
            for k, v in module_vectors.items()
            if k.startswith(prefix)
        }
    )
    holder = torch.nn.Sequential()
    holder.add_module("cbam", module)
    with record_attention(holder) as trace:
        out = holder(torch.from_numpy(module_vectors[f"{name}/input"]))
    (rec,) = list(trace)
    torch.testing.assert_close(
        out, torch.from_numpy(module_vectors[f"{name}/output"]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        rec.channel, torch.from_numpy(module_vectors[f"{name}/channel_scale"]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        rec.spatial, torch.from_numpy(module_vectors[f"{name}/spatial_scale"]), atol=1e-5, rtol=0
    )


def test_bam_trace_equals_official_branches(module_vectors):
    from models.networks.attention import BAM

    module = BAM(64).eval()
    prefix = "bam/state_dict/"
    module.load_state_dict(
        {
            k[len(prefix) :]: torch.from_numpy(v)
            for k, v in module_vectors.items()
            if k.startswith(prefix)
        }
    )
    holder = torch.nn.Sequential()
    holder.add_module("bam1", module)
    x = torch.from_numpy(module_vectors["bam/input"])
    with record_attention(holder, feature_means=True) as trace:
        out = holder(x)
    rec = trace["bam1"]
    torch.testing.assert_close(
        rec.channel, torch.from_numpy(module_vectors["bam/channel_logits"]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        rec.spatial, torch.from_numpy(module_vectors["bam/spatial_logits"]), atol=1e-5, rtol=0
    )
    # the gate is what multiplies F: out = F * gate, so its channel mean matches
    gate = 1 + torch.sigmoid(rec.channel[:, :, None, None] * rec.spatial[:, None])
    torch.testing.assert_close(rec.gate, gate.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.feature_out, out.abs().mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.feature_in, x.abs().mean(1), atol=1e-5, rtol=0)


def test_every_module_traced_in_forward_order(tiny_model, image_batch):
    expected = [
        n
        for n, _ in tiny_model.named_modules()
        if n.endswith((".se", ".cbam")) or n in ("bam1", "bam2", "bam3")
    ]
    with record_attention(tiny_model) as trace:
        tiny_model(image_batch)
    assert trace.names == expected
    kind = tiny_model.arch.attention
    for rec in trace:
        assert rec.kind == kind
        assert rec.channel.shape[0] == 2
        assert (rec.spatial is None) == (kind == "se")
        assert 1 <= rec.stage <= 3 if kind == "bam" else 1 <= rec.stage <= 4
        assert rec.gate.ndim == 3 and rec.gate.shape[0] == 2
        assert rec.spatial is None or rec.gate.shape == rec.spatial.shape
        assert rec.feature_in is None and rec.feature_out is None  # only when asked for
    if kind == "cbam":
        assert trace["layer2.0.cbam"].stage == 2 and trace["layer2.0.cbam"].block == 0


def test_feature_means_equal_the_module_input_and_output(tiny_model, image_batch):
    if tiny_model.arch.attention is None:
        pytest.skip("no attention modules")
    seen = {}
    handles = [
        m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
        for n, m in attention_modules(tiny_model)
    ]
    try:
        with torch.no_grad(), record_attention(tiny_model, feature_means=True) as trace:
            tiny_model(image_batch)
    finally:
        for h in handles:
            h.remove()
    assert len(trace) == len(seen) > 0
    for rec in trace:
        f_in, f_out = seen[rec.name]
        torch.testing.assert_close(rec.feature_in, f_in.abs().mean(1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rec.feature_out, f_out.abs().mean(1), atol=1e-6, rtol=1e-5)


def test_hooks_removed_and_training_restored_after_exception(tiny_model):
    tiny_model.train()
    tiny_model.layer2.train(False)
    before = {n: m.training for n, m in tiny_model.named_modules()}
    with pytest.raises(RuntimeError):
        with record_attention(tiny_model):
            tiny_model(torch.randn(1, 5, 32, 32))  # wrong channel count raises inside forward
    assert leftovers(tiny_model) == 0
    assert {n: m.training for n, m in tiny_model.named_modules()} == before


def test_analyze_one_forward_and_equals_captum(tiny_model, image_batch):
    calls = []
    tiny_model.register_forward_pre_hook(lambda *_: calls.append(1))
    analyze(tiny_model, image_batch)  # the first call also probes the network's levels, once
    calls.clear()
    result = analyze(tiny_model, image_batch)
    assert len(calls) == 1
    layers = dict(tiny_model.named_modules())
    for name in ("layer1", "layer2", "layer3", "layer4"):
        ref = LayerGradCam(tiny_model, layers[name]).attribute(
            image_batch, target=result.target.tolist(), relu_attributions=True
        )[:, 0]
        torch.testing.assert_close(result.cams[name], ref, atol=1e-6, rtol=1e-4)
        assert result.cams[name].shape == ref.shape


def test_analyze_leaves_model_as_it_was(tiny_model, image_batch):
    tiny_model.train()
    tiny_model.fc.weight.requires_grad_(False)
    grads = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    modes = {n: m.training for n, m in tiny_model.named_modules()}
    analyze(tiny_model, image_batch, cam_layers=["layer3"])
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == grads
    assert {n: m.training for n, m in tiny_model.named_modules()} == modes
    assert leftovers(tiny_model) == 0
    assert all(p.grad is None for p in tiny_model.parameters())


def test_batch_equals_single_images(tiny_model, image_batch):
    both = analyze(tiny_model, image_batch, target=[1, 3])
    for i, t in enumerate([1, 3]):
        one = analyze(tiny_model, image_batch[i : i + 1], target=t)
        for name, cam in one.cams.items():
            torch.testing.assert_close(both.cams[name][i : i + 1], cam, atol=1e-6, rtol=1e-4)
        for a, b in zip(both.trace.select(i), one.trace):
            torch.testing.assert_close(a.channel, b.channel, atol=1e-6, rtol=1e-5)
    assert both.target.tolist() == [1, 3]


def test_gradcam_plus_plus_matches_formula_on_captum_gradients(tiny_model, image_batch):
    result = analyze(tiny_model, image_batch, method="gradcam++", cam_layers=["layer4"])
    layer = tiny_model.layer4
    targets = result.target.tolist()
    grads = (
        LayerGradientXActivation(tiny_model, layer, multiply_by_inputs=False)
        .attribute(image_batch, target=targets)
        .double()
        .numpy()
    )
    acts = LayerActivation(tiny_model, layer).attribute(image_batch).double().numpy()
    g2, g3 = grads**2, grads**3
    denom = 2 * g2 + acts.sum((2, 3), keepdims=True) * g3
    alpha = np.where(denom != 0, g2 / np.where(denom != 0, denom, 1), 0)
    weights = (alpha * np.maximum(grads, 0)).sum((2, 3), keepdims=True)
    expected = np.maximum((weights * acts).sum(1), 0)
    np.testing.assert_allclose(result.cams["layer4"].numpy(), expected, atol=1e-5, rtol=1e-3)


def test_target_validation_and_layer_names(tiny_model, image_batch):
    with pytest.raises(ValueError, match="valid layers include: .*layer1"):
        analyze(tiny_model, image_batch, cam_layers=["layer9"])
    with pytest.raises(ValueError, match="out of range"):
        analyze(tiny_model, image_batch, target=99)
    with pytest.raises(ValueError, match="2 images"):
        analyze(tiny_model, image_batch, target=[1, 2, 3])
    assert list(resolve_layers(tiny_model, ["layer1.0.conv1"])) == ["layer1.0.conv1"]
    assert leftovers(tiny_model) == 0


def test_any_module_name_and_resnet50(image_batch):
    model = randomize_bn(build_model(50, "cbam", num_classes=5)).eval()
    result = analyze(model, image_batch, cam_layers=["layer3.5", "layer4"])
    assert result.cams["layer3.5"].shape == (2, 4, 4)
    assert len(result.trace) == 16
    assert result.probs.sum(1).allclose(torch.ones(2))


@pytest.mark.parametrize("method", ["guided-gradcam", "integrated-gradients", "occlusion"])
def test_captum_attributions_have_image_shape(method):
    model = randomize_bn(build_model(18, "cbam", num_classes=3)).eval()
    x = torch.randn(1, 3, 32, 32)
    calls = []
    attr = attribute(model, x, method=method, steps=4, window=16,
                     progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    assert attr.shape == (1, 32, 32) and torch.isfinite(attr).all()
    assert leftovers(model) == 0
    # progress counts every forward pass and ends at the total the method needs
    assert calls and calls[-1][0] == calls[-1][1]
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_analyze_inside_no_grad(tiny_model, image_batch):
    expected = analyze(tiny_model, image_batch, cam_layers=["layer4"])
    with torch.no_grad():
        result = analyze(tiny_model, image_batch, cam_layers=["layer4"])
    torch.testing.assert_close(result.cams["layer4"], expected.cams["layer4"])
