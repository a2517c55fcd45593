"""Library helpers behind the app: the checkpoint folder (models.checkpoints.zoo) and viz.interactive."""

from __future__ import annotations

import struct

import pytest
import torch
from PIL import Image

from models import build_model, load_checkpoint, save_checkpoint
from models.checkpoints.zoo import (
    CHECKPOINT_DIR_ENV,
    checkpoint_dir,
    default_checkpoint,
    embedded_checkpoints,
)
from tests.conftest import ROOT, autolinks, plain, randomize_bn
from viz.engine.cam import analyze
from viz.interactive import (
    KeptUploads,
    analyze_images,
    cam_layer_choices,
    carry_saliency_choice,
    check_upload_size,
    describe_checkpoint,
    digest,
    grid_stand_in,
    network_map,
    no_spatial_maps,
    sample_images,
    shown_at_stage,
    stack_analyses,
    top_predictions,
)
from viz.text import md_text, safe_stem


def _save(path, kind, classes=4, **meta):
    torch.manual_seed(0)
    model = randomize_bn(build_model(18, kind, num_classes=classes)).eval()
    save_checkpoint(path, model, class_names=[f"c{i}" for i in range(classes)], metadata=meta)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    _save(root / "b_plain.safetensors", None)
    _save(root / "c_cbam.safetensors", "cbam", name="My CBAM")
    (root / ".c_cbam.safetensors.x1.tmp").write_bytes(b"half written")
    (root / "a_broken.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    (root / "notes.txt").write_text("not a checkpoint")
    return root


def test_embedded_checkpoints_reads_headers_only(folder):
    entries = embedded_checkpoints(folder)
    assert [e.path.name for e in entries] == [
        "a_broken.safetensors", "b_plain.safetensors", "c_cbam.safetensors"
    ]  # fmt: skip
    broken, plain, cbam = entries
    assert broken.error and "a_broken.safetensors" in broken.error and broken.metadata == {}
    assert plain.error is None and plain.attention is None
    assert plain.label == "ResNet-18 (b_plain.safetensors)"
    assert cbam.attention == "cbam" and cbam.label == "My CBAM (c_cbam.safetensors)"
    assert cbam.metadata["class_names"] == ["c0", "c1", "c2", "c3"]
    assert cbam.size == (folder / "c_cbam.safetensors").stat().st_size
    assert default_checkpoint(entries) is cbam
    assert default_checkpoint([broken, plain]) is plain
    assert default_checkpoint([broken]) is None
    assert embedded_checkpoints(folder / "missing") == []


def test_checkpoint_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(CHECKPOINT_DIR_ENV, raising=False)
    assert checkpoint_dir() == ROOT / "checkpoints"
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path))
    assert checkpoint_dir() == tmp_path
    assert embedded_checkpoints() == []


def test_analyze_images_is_the_one_path(folder):
    ckpt = load_checkpoint(folder / "c_cbam.safetensors")
    images = [
        Image.new("RGB", (300, 260), (120, 40, 200)),
        Image.new("RGB", (240, 240), (0, 90, 20)),
    ]
    result = analyze_images(ckpt, images, method="gradcam++", layers=["layer4"])
    expected = analyze(
        ckpt.model, ckpt.preprocess.batch(images), None, ["layer4"], method="gradcam++"
    )
    torch.testing.assert_close(result.logits, expected.logits)
    torch.testing.assert_close(result.cams["layer4"], expected.cams["layer4"])
    with pytest.raises(ValueError, match="at least one CAM layer"):
        analyze_images(ckpt, images, layers=[])
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
        analyze_images(ckpt, images, layers=["layer9"])
    with pytest.raises(ValueError, match="method must be one of"):
        analyze_images(ckpt, images, method="score-cam")
    with pytest.raises(ValueError, match="out of range"):
        analyze_images(ckpt, images, target=7)
    with pytest.raises(ValueError, match="no images"):
        analyze_images(ckpt, [])


def test_stack_analyses_equals_one_batch(folder):
    ckpt = load_checkpoint(folder / "c_cbam.safetensors")
    images = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (10, 10, 250))]
    x = ckpt.preprocess.batch(images)
    whole = analyze(ckpt.model, x, 2)
    parts = [analyze(ckpt.model, x[i : i + 1], 2) for i in range(3)]
    stacked = stack_analyses(parts)
    torch.testing.assert_close(stacked.probs, whole.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stacked.target, whole.target)
    for name in whole.cams:
        torch.testing.assert_close(stacked.cams[name], whole.cams[name], atol=1e-4, rtol=1e-3)
    assert stacked.trace.names == whole.trace.names
    rec_s, rec_w = stacked.trace["layer2.1.cbam"], whole.trace["layer2.1.cbam"]
    torch.testing.assert_close(rec_s.spatial, rec_w.spatial, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rec_s.channel, rec_w.channel, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no analyses"):
        stack_analyses([])
    other = analyze(ckpt.model, x[:1], 2, ["layer4"])
    with pytest.raises(ValueError, match="share the Grad-CAM method and layers"):
        stack_analyses([parts[0], other])


def test_small_helpers(folder):
    ckpt = load_checkpoint(folder / "c_cbam.safetensors")
    rows = describe_checkpoint(ckpt, source="upload x.pth")
    assert rows["Depth"] == "18" and rows["Attention"] == "CBAM" and rows["Classes"] == "4"
    assert rows["Format"] == "attention-lens" and rows["SHA-256"] == ckpt.sha256[:12]
    assert rows["Model"] == "My CBAM" and rows["Source"] == "upload x.pth"
    assert (
        describe_checkpoint(load_checkpoint(folder / "b_plain.safetensors"))["Attention"] == "none"
    )

    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    top = top_predictions(probs, ["a", "b", "c", "d"], 3)
    assert [(p.index, p.name) for p in top] == [(1, "b"), (3, "d"), (2, "c")]
    assert top[0].prob == pytest.approx(0.5)
    assert len(top_predictions(probs, list("abcd"), 10)) == 4
    with pytest.raises(ValueError, match="4 scores for 3 class names"):
        top_predictions(probs, list("abc"))

    layers = cam_layer_choices(ckpt.model)
    assert layers[:4] == ["layer1", "layer2", "layer3", "layer4"]
    assert "layer4.1" in layers and "layer4.1.cbam" not in layers

    assert digest(b"abc").startswith("ba7816bf")
    check_upload_size(10, 10)
    with pytest.raises(ValueError, match="big.pth is 2.0 MiB, over the 1 MiB limit"):
        check_upload_size(2 * 2**20, 2**20, "big.pth")
    assert safe_stem("My photo (1).JPG") == "My_photo_1"
    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("") == "image" and safe_stem("***.png") == "image"


def test_sample_images_with_labels():
    samples = sample_images(ROOT / "samples")
    assert len(samples) == 20
    by_name = {s.path.name: s.label for s in samples}
    assert by_name["tench_12881.jpg"] == "tench"
    assert by_name["english_springer_4972.jpg"] == "English springer"
    assert sample_images(ROOT / "no such folder") == []


def test_md_text_leaves_no_bare_address_to_autolink():
    hostile = ["see https://evil.example/x", "WWW.evil.example", "mail me: bob@evil.example",
               "http://a.b https://c.d", "mailto:x@y.z"]  # fmt: skip
    for text in hostile:
        assert autolinks(text), text  # the pattern finds them in the raw text...
        shown = md_text(text)
        assert autolinks(shown) == [], shown  # ...and none once made literal
        assert plain(shown).replace("\u200b", "") == text  # the same characters on screen


def test_a_network_without_a_stage_shows_the_layer_at_the_same_depth(folder):
    """A ViT has one resolution throughout: stage s of four is its block s/4 of the way down;
    a CNN without the stage asked shows its nearest; a whole-network map stands for any."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=64)
    x = torch.rand(2, 3, 64, 64)
    own = analyze(vit.eval(), x)
    assert own.stage_cams() == {4: "blocks.11.norm1"}
    assert grid_stand_in(vit, own, 4) is None
    for stage, k in ((3, 9), (2, 6), (1, 3)):
        found = grid_stand_in(vit, own, stage)
        assert found.layer == f"blocks.{k - 1}.norm1"
        assert found.note == (f"no stage {stage} (one resolution throughout): block {k} of 12 "
                              f"(blocks.{k - 1}.norm1), at the same depth")  # fmt: skip
    at3 = analyze(vit, x, cam_layers=["blocks.8.norm1"])
    shown = shown_at_stage(at3, "blocks.8.norm1", 3)
    assert shown.stage_cams() == {3: "blocks.8.norm1"} and list(shown.cams) == ["blocks.8.norm1"]
    assert torch.equal(shown.cams["blocks.8.norm1"], at3.cams["blocks.8.norm1"])
    with pytest.raises(ValueError, match="no CAM for 'blocks.2.norm1'"):
        shown_at_stage(at3, "blocks.2.norm1", 1)
    assert grid_stand_in(vit, analyze(vit, x, method="rollout"), 2) is None  # its own map

    cnn = load_checkpoint(folder / "c_cbam.safetensors").model
    deep = analyze(cnn, torch.rand(1, 3, 64, 64), cam_layers=["layer3", "layer4"])
    assert grid_stand_in(cnn, deep, 3) is None
    nearest = grid_stand_in(cnn, deep, 1)
    assert nearest.layer == "layer3" and nearest.note == "no stage 1: its nearest, stage 3 (layer3)"


def test_the_saliency_choice_follows_the_method():
    cams, gates = ["cam:layer3", "cam:layer4"], ["attention:a", "attention:b"]
    rollout, gae = network_map("rollout"), network_map("gae")
    whole = [rollout, *gates]

    def carry(before, offered, whole, was, picks=()):
        return carry_saliency_choice(before, offered, whole=whole, was_whole=was, layer_picks=picks)

    assert carry(None, cams + gates, False, None) == ["cam:layer4", "attention:b"]
    # layer method -> whole-network method: its map first, the modules kept
    assert carry(["cam:layer3", "attention:a"], whole, True, False) == [rollout, "attention:a"]
    assert carry([], whole, True, False) == [rollout]  # offered even after an empty choice
    # whole -> whole: the user's choice as it is, the new method's map for the old one's
    assert carry(["attention:a"], whole, True, True) == ["attention:a"]
    assert carry([], whole, True, True) == []
    assert carry([rollout, "attention:b"], [gae, *gates], True, True) == [gae, "attention:b"]
    # whole -> layer method: the layer CAMs chosen before come back, else the deepest
    back = carry([gae, "attention:a"], cams + gates, False, True, ["cam:layer3"])
    assert back == ["cam:layer3", "attention:a"]
    assert carry(["attention:a"], cams + gates, False, True, ["cam:gone"]) == [
        "cam:layer4", "attention:a"
    ]  # fmt: skip
    # layer -> layer: what still exists; never emptied by the switch itself
    assert carry(["cam:layer4", "attention:b"], ["cam:layer3", *gates], False, False) == [
        "attention:b"
    ]  # fmt: skip
    assert carry(["cam:layer4"], ["cam:layer3", *gates], False, False) == [
        "cam:layer3", "attention:b"
    ]  # fmt: skip


def test_why_a_model_has_no_spatial_map(folder):
    plain_model = load_checkpoint(folder / "b_plain.safetensors").model
    trace = analyze(plain_model, torch.rand(1, 3, 64, 64)).trace
    assert no_spatial_maps("R18", trace) == (
        "R18 has no attention modules: no spatial attention maps to show."
    )
    torch.manual_seed(0)
    se = build_model(18, "se", num_classes=4).eval()
    assert no_spatial_maps("SE", analyze(se, torch.rand(1, 3, 64, 64)).trace).startswith(
        "SE's SE modules have no spatial map"
    )
    cbam = load_checkpoint(folder / "c_cbam.safetensors").model
    with pytest.raises(ValueError, match="has spatial attention maps"):
        no_spatial_maps("CBAM", analyze(cbam, torch.rand(1, 3, 64, 64)).trace)


def test_kept_uploads_are_bounded_and_expire():
    now = [0.0]
    store = KeptUploads(max_bytes=10, ttl=60, clock=lambda: now[0])
    key = KeptUploads.new_key()
    assert len(key) >= 20 and key != KeptUploads.new_key()
    assert store.put(key, [("a.png", b"12345")])
    assert store.get(key) == [("a.png", b"12345")] and store.get("other") == []
    assert store.put("k2", [("b.png", b"123456")])  # 11 bytes in all: the older one goes
    assert store.get(key) == [] and store.get("k2") == [("b.png", b"123456")]
    assert not store.put("k3", [("big.png", b"x" * 11)])  # over the bound: not kept
    assert store.get("k3") == []
    now[0] = 59.0
    assert store.get("k2")  # a read keeps it longer
    now[0] = 118.0
    assert store.get("k2")
    now[0] = 180.0
    assert store.get("k2") == []  # expired
    store.put(key, [("a.png", b"1")])
    store.drop(key)
    assert store.get(key) == []


def test_a_hybrids_attention_is_described_as_its_parts(tmp_path):
    from models.checkpoints.architectures import ForeignArch
    from models.networks.hybrid import HYBRID_NAME, build_hybrid

    torch.manual_seed(0)
    arch = ForeignArch(HYBRID_NAME, "attention-lens", 3, "cbam+self-attention")
    save_checkpoint(tmp_path / "h.safetensors", build_hybrid(3).eval(), arch=arch)
    ckpt = load_checkpoint(tmp_path / "h.safetensors")
    assert describe_checkpoint(ckpt)["Attention"] == "CBAM + self-attention"  # was all capitals


def test_every_default_cam_layer_is_a_choice_of_the_layers_box():
    """The app's Layers box starts at the default layers, kept only if offered: a hybrid CNN +
    ViT's CBAM stages were not offered, so its box showed the last block alone."""
    import timm

    from models.networks.hybrid import build_hybrid
    from viz.interactive import default_cam_layers

    torch.manual_seed(0)
    hybrid = build_hybrid(3, depth=2).eval()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3).eval()
    cnn = build_model(18, "cbam", 3).eval()
    for model in (hybrid, vit, cnn):
        choices = cam_layer_choices(model)
        assert set(default_cam_layers(model, "gradcam")) <= set(choices)
        assert len(choices) == len(set(choices))
    assert cam_layer_choices(hybrid)[:4] == [
        "patch_embed.backbone.layer1", "patch_embed.backbone.layer2",
        "patch_embed.backbone.layer3", "blocks.1.norm1",
    ]  # fmt: skip
