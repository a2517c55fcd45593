"""Segmenters, detectors and embedding networks from files (issue 40): recognised by
`load_checkpoint`, their gates traced, and explained by `python -m viz export --target
segment:K | box:x0,y0,x1,y1[:label] | similar-to:IMAGE`, with the region outlined."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models import load_checkpoint
from models.checkpoints.architectures import register_architecture, unregister_architecture
from models.images import load_image
from tests.conftest import ROOT, randomize_bn
from tests.viz.engine.test_explain_any_output import TinyCbamUNet
from viz import record_attention
from viz.commands.cli import main

IMAGE = ROOT / "samples" / "tench_12881.jpg"


def _saved(tmp_path, name: str, **options) -> str:
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(name, weights=None, weights_backbone=None, num_classes=6, **options)
    path = tmp_path / f"{name}.pth"
    torch.save(randomize_bn(model).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("seg"), "lraspp_mobilenet_v3_large")


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("det"), "fasterrcnn_mobilenet_v3_large_fpn")


def _export(capsys, tmp_path, *argv) -> tuple[int, str, dict]:
    out = tmp_path / "out"
    code = main(["export", "--images", str(IMAGE), "--out", str(out), *argv])
    err = capsys.readouterr().err
    manifest = out / "manifest.json"
    return code, err, json.loads(manifest.read_text()) if manifest.is_file() else {}


def test_a_headless_timm_vit_opens_and_draws_its_attention_without_a_target(capsys, tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(net.state_dict(), tmp_path / "dino_like.safetensors")
    ckpt = load_checkpoint(tmp_path / "dino_like.safetensors")
    assert (ckpt.arch.name, ckpt.arch.num_classes) == ("vit_tiny_patch16_224", 0)
    code, err, manifest = _export(capsys, tmp_path, "--checkpoint",
                                  str(tmp_path / "dino_like.safetensors"),
                                  "--figure", "dino-heads", "token-norms")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == [
        "dino-heads.png", "token-norms.png"]  # fmt: skip


@pytest.mark.parametrize(
    "name, options, arch",
    [
        ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}, "deeplabv3_mobilenet_v3_large+aux"),
        ("ssdlite320_mobilenet_v3_large", {}, "ssdlite320_mobilenet_v3_large"),
    ],
)
def test_torchvision_segmenters_and_detectors_are_recognised_and_their_gates_traced(
    tmp_path, name, options, arch
):
    ckpt = load_checkpoint(_saved(tmp_path, name, **options))
    assert (ckpt.arch.name, ckpt.arch.num_classes, ckpt.arch.attention) == (arch, 6, "se")
    assert ckpt.class_names[:2] == ["class 0", "class 1"]  # 6 classes: no known names
    with record_attention(ckpt.model) as trace, torch.no_grad():
        ckpt.model(torch.rand(1, 3, 96, 96))  # runs: no tensor left on the meta device
    assert len(trace) > 0 and {rec.kind for rec in trace} == {"se"}


def test_segment_target_from_the_command_line(capsys, tmp_path, segmenter):
    ckpt = load_checkpoint(segmenter)
    with torch.no_grad():
        out = ckpt.model(ckpt.preprocess(load_image(IMAGE)))["out"]
    category = int(out.argmax(1).flatten().mode().values)  # a category it predicts somewhere
    code, err, manifest = _export(capsys, tmp_path, "--checkpoint", segmenter,
                                  "--target", f"segment:{category}", "--figure", "gradcam",
                                  "model-grid")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "out" / "model-grid.png").is_file()  # a row explaining the segment
    (result,) = manifest["results"]
    assert result["explained"] == f"segment class {category} ({category}, predicted mask)"
    assert result["score"] > 0 and "P" not in result
    assert manifest["options"]["target"] == f"segment:{category}"
    maps = np.load(next((tmp_path / "out").rglob("maps.npz")))
    assert maps["outline"].shape == out.shape[-2:] and "logits" not in maps
    figure = Image.open(next((tmp_path / "out").rglob("gradcam.png")))
    assert figure.width > 1000
    code = main(["export", "--checkpoint", segmenter, "--images", str(IMAGE), "--out",
                 str(tmp_path / "o"), "--target", "segment:9"])  # fmt: skip
    assert code == 2 and "--target segment 9 is out of range 0..5" in capsys.readouterr().err


def test_box_target_from_the_command_line(capsys, tmp_path, detector):
    ckpt = load_checkpoint(detector)
    with torch.no_grad():
        found = ckpt.model(ckpt.preprocess(load_image(IMAGE)))[0]
    box = found["boxes"][0].round().int().tolist()
    text = ",".join(map(str, box))
    code, err, manifest = _export(capsys, tmp_path, "--checkpoint", detector,
                                  "--target", f"box:{text}", "--figure", "gradcam")  # fmt: skip
    assert code == 0, err
    (result,) = manifest["results"]
    assert result["explained"].startswith(f"box ({', '.join(map(str, box))}) class ")
    assert result["score"] > 1.0  # IoU near 1 plus the detection's score
    assert result["cam_layers"][0].startswith("backbone.body.")  # never the shared RPN head
    maps = np.load(next((tmp_path / "out").rglob("maps.npz")))
    np.testing.assert_allclose(maps["outline"], [box])
    from torchvision.ops import box_iou

    near = box_iou(found["boxes"][:1], found["boxes"])[0] > 0.5
    other = next(k for k in range(6) if not (near & (found["labels"] == k)).any())
    code = main(["export", "--checkpoint", detector, "--images", str(IMAGE), "--out",
                 str(tmp_path / "o2"), "--target", f"box:{text}:{other}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and f"no detection of label {other} overlaps the box" in err


@pytest.mark.parametrize(
    "target, message",
    [
        ("box:1,2,3", "must be four numbers x0,y0,x1,y1"),
        ("box:10,10,5,50", "a box needs 0 <= x0 < x1"),
        ("box:", "box: needs a value"),
    ],
)
def test_a_malformed_box_is_one_line_before_anything_loads(capsys, tmp_path, target, message):
    code = main(["export", "--checkpoint", "missing.pth", "--images", str(IMAGE),
                 "--out", str(tmp_path / "o"), "--target", target])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_box_outside_the_image_or_far_from_detections_is_one_line(capsys, tmp_path, detector):
    code, err, _ = _export(capsys, tmp_path, "--checkpoint", detector,
                           "--target", "box:0,0,600,90")  # fmt: skip
    assert code == 1 and "lies outside the image as the network sees it (512 x 512" in err
    code, err, _ = _export(capsys, tmp_path, "--checkpoint", detector,
                           "--target", "box:0,0,3,3", "--overwrite")  # fmt: skip
    assert code == 1 and "no detection overlaps the box by IoU > 0.5" in err


def test_similar_to_target_and_a_cbam_unet_from_the_command_line(capsys, tmp_path):
    """Plugins: an embedding network (a ResNet-18 without classifier) and a U-Net with CBAM."""
    from torchvision.models import resnet18

    def headless(num_classes: int) -> nn.Module:
        model = resnet18(weights=None, num_classes=num_classes)
        model.fc = nn.Identity()
        return model

    register_architecture("headless-r18", headless, hint=lambda keys: "fc.weight" not in keys)
    register_architecture(
        "cbam-unet", lambda n: TinyCbamUNet(n), hint=lambda k: "enc1.0.weight" in k
    )
    try:
        torch.manual_seed(0)
        torch.save(headless(1000).state_dict(), tmp_path / "embed.pth")
        other = tmp_path / "other.png"
        Image.fromarray((np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8)).save(
            other
        )
        code, err, manifest = _export(capsys, tmp_path, "--checkpoint", str(tmp_path / "embed.pth"),
                                      "--target", f"similar-to:{other}", "--figure", "gradcam")  # fmt: skip
        assert code == 0, err
        assert manifest["results"][0]["explained"] == "cosine similarity to a 512-d embedding"
        code, err, _ = _export(capsys, tmp_path, "--checkpoint", str(tmp_path / "embed.pth"),
                               "--figure", "gradcam", "--overwrite")  # fmt: skip
        assert code == 1 and "no classifier" in err  # no silent argmax of an embedding
        code, err, manifest = _export(capsys, tmp_path, "--checkpoint", str(tmp_path / "embed.pth"),
                                      "--figure", "overview", "--overwrite")  # fmt: skip
        assert code == 0, err  # attention alone needs no target
        assert manifest["results"][0]["explained"].startswith("attention only")
        assert manifest["results"][0]["score"] is None

        unet = TinyCbamUNet(3).eval()
        torch.save(unet.state_dict(), tmp_path / "unet.pth")
        ckpt = load_checkpoint(tmp_path / "unet.pth")
        with torch.no_grad():
            category = int(
                ckpt.model(ckpt.preprocess(load_image(IMAGE))).argmax(1).flatten().mode().values
            )
        code, err, manifest = _export(capsys, tmp_path, "--checkpoint", str(tmp_path / "unet.pth"),
                                      "--target", f"segment:{category}", "--figure", "gradcam",
                                      "--layers", "enc2", "--overwrite")  # fmt: skip
        assert code == 0, err
        maps = np.load(next((tmp_path / "out").rglob("maps.npz")))
        assert any(k.startswith("attention/enc2.3/spatial") for k in maps)  # the CBAM's M_s
    finally:
        unregister_architecture("headless-r18")
        unregister_architecture("cbam-unet")


def test_voc_and_coco_counts_get_their_category_names(tmp_path):
    voc = load_checkpoint(_saved_with(tmp_path, "lraspp_mobilenet_v3_large", 21))
    assert voc.class_names[:3] == ["__background__", "aeroplane", "bicycle"]
    coco = load_checkpoint(_saved_with(tmp_path, "ssdlite320_mobilenet_v3_large", 91))
    assert coco.class_names[1] == "person" and "N/A (12)" in coco.class_names
    assert len(set(coco.class_names)) == 91  # COCO's placeholders made unique


def _saved_with(tmp_path, name: str, classes: int) -> str:
    from torchvision.models import get_model

    path = tmp_path / f"{name}_{classes}.pth"
    torch.save(
        get_model(name, weights=None, weights_backbone=None, num_classes=classes).state_dict(), path
    )
    return str(path)


def test_a_segmenters_default_cam_layers_are_its_backbones(segmenter):
    """Was: LR-ASPP's `classifier` (its head, the output) was the deepest stage layer."""
    from viz.engine.cam import stage_layers

    layers = stage_layers(load_checkpoint(segmenter).model)
    assert len(layers) == 4 and all(name.startswith("backbone.") for name in layers)
