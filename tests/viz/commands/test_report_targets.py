"""`python -m viz report --target segment:K | similar-to:IMAGE` (issue 40): a data set measured for
a segmenter's category or an embedding's likeness; images without the segment said per image; a
class or a box refused in one line."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from models import load_checkpoint
from models.checkpoints.architectures import register_architecture, unregister_architecture
from models.images import load_image
from tests.viz.engine.test_explain_any_output import TinyCbamUNet
from viz.commands.cli import main


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture()
def unet_and_images(tmp_path):
    """A CBAM U-Net (a plugin architecture) and three images, the category predicted in some
    of them but not all."""
    register_architecture(
        "cbam-unet", lambda n: TinyCbamUNet(n), hint=lambda k: "enc1.0.weight" in k
    )
    try:
        torch.manual_seed(0)
        torch.save(TinyCbamUNet(3).eval().state_dict(), tmp_path / "unet.pth")
        ckpt = load_checkpoint(tmp_path / "unet.pth")
        folder = tmp_path / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        pictures = {
            "noise": (rng.random((96, 96, 3)) * 255).astype(np.uint8),
            "dark": np.full((96, 96, 3), 10, np.uint8),
            "bright": np.full((96, 96, 3), 245, np.uint8),
        }
        present = {}
        for name, array in pictures.items():
            Image.fromarray(array).save(folder / f"{name}.png")
            with torch.no_grad():
                out = ckpt.model(ckpt.preprocess(load_image(folder / f"{name}.png")))
            present[name] = set(out.argmax(1).unique().tolist())
        # a category some images have and another lacks
        category = next(
            k for k in range(3) if 0 < sum(k in found for found in present.values()) < 3
        )
        yield tmp_path / "unet.pth", folder, category, present
    finally:
        unregister_architecture("cbam-unet")


def test_report_for_a_segment_scores_it_and_says_which_images_lack_it(
    unet_and_images, tmp_path, capsys
):
    unet, folder, category, present = unet_and_images
    out = tmp_path / "report"
    code = main(["report", "--checkpoint", str(unet), "--images", str(folder), "--out", str(out),
                 "--target", f"segment:{category}", "--layers", "enc2", "--steps", "2",
                 "--sanity", "3", "--workers", "0"])  # fmt: skip
    err = capsys.readouterr().err
    lacking = {name for name, found in present.items() if category not in found}
    assert code == 0, err  # an image without the segment is no failure: it is left out
    per_image = {r["image"]: r for r in _rows(out / "per_image.csv")}
    for name, row in per_image.items():
        assert row["error"] == ""
        if name in lacking:
            assert row["left_out"].startswith(f"no pixel is predicted as segment class {category}")
        else:
            assert row["left_out"] == "" and row["prob"] == "" and row["correct"] == ""
            assert row["target_name"] == f"segment class {category} ({category}, predicted mask)"
            assert float(row["score"]) != 0 and row["deletion_auc"] != ""
    per_map = [r for r in _rows(out / "per_map.csv") if r["map"] == "cam/stage2"]
    assert per_map and all(0 <= float(r["mask_energy"]) <= 1 for r in per_map)
    assert all(r["mask_pointing"] in ("0.0", "1.0") for r in per_map)
    assert _rows(out / "sanity.csv")  # the randomisation check ran with the fixed segment
    page = (out / "report.md").read_text()
    assert "energy in the segment" in page
    said = page.replace("\\", "")  # Markdown escapes
    assert f"{3 - len(lacking)} images ({len(lacking)} left out: nothing to explain" in said


@pytest.mark.parametrize(
    "target, message",
    [
        ("box:1,1,20,20", "a box belongs to one image"),
        ("class:3", "report --target takes"),
        ("segment:3", "returns (1, 10), not a segmentation map"),
    ],
)
def test_report_refuses_a_box_or_a_class_target_in_one_line(tmp_path, capsys, target, message):
    code = main(["report", "--checkpoint", "resnet18_cbam_imagenette", "--images", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--target", target])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_report_for_a_concept_follows_the_likeness_to_another_image(
    unet_and_images, tmp_path, capsys
):
    """An embedding network (a ResNet-18 without its classifier) against another image."""
    from torch import nn
    from torchvision.models import resnet18

    def headless(num_classes: int) -> nn.Module:
        model = resnet18(weights=None, num_classes=num_classes)
        model.fc = nn.Identity()
        return model

    _, folder, _, _ = unet_and_images
    register_architecture("headless-r18", headless, hint=lambda keys: "fc.weight" not in keys)
    try:
        torch.manual_seed(0)
        torch.save(headless(1000).state_dict(), tmp_path / "embed.pth")
        out = tmp_path / "report"
        code = main(["report", "--checkpoint", str(tmp_path / "embed.pth"), "--images", str(folder),
                     "--out", str(out), "--target", f"similar-to:{folder / 'noise.png'}",
                     "--steps", "2", "--sanity", "0", "--workers", "0"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        rows = {r["image"]: r for r in _rows(out / "per_image.csv")}
        assert float(rows["noise"]["score"]) == pytest.approx(1.0, abs=1e-4)  # itself
        assert all(
            r["target_name"] == "cosine similarity to a 512-d embedding" for r in rows.values()
        )
        assert all(r["deletion_auc"] != "" for r in rows.values())
        code = main(["report", "--checkpoint", str(tmp_path / "embed.pth"), "--images", str(folder),
                     "--out", str(tmp_path / "r2"), "--target", "similar-to:missing.png"])  # fmt: skip
        assert code == 2 and "missing.png" in capsys.readouterr().err
    finally:
        unregister_architecture("headless-r18")
