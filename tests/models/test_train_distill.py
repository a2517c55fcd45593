"""python -m models.train --arch timm:... --teacher ...: a DeiT-style ViT trained from scratch with
hard distillation from a CNN teacher (issue #27), on a tiny generated ImageFolder of JPEGs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from models import ForeignArch, build_model, load_checkpoint, save_checkpoint
from models.training import loop, run
from models.training.augment import StrongAugment
from models.training.cli import main as train_main
from models.training.distill import Teachers, distillation_loss, inference_logits, teacher_labels
from models.training.evaluation import evaluate_checkpoint
from tests.conftest import interrupt_in_second_epoch, red_blue_folder

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
NAME = "deit_tiny_distilled_patch16_224"


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return red_blue_folder(tmp_path_factory.mktemp("jpegs"), ".jpg", quality=90)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet18.safetensors"
    save_checkpoint(path, build_model(18, "cbam", 2).eval(), class_names=["blue", "red"])
    return path


def _args(data, out, teacher, epochs=2, *extra):
    return [
        "--data", str(data), "--out", str(out), "--arch", f"timm:{NAME}",
        "--arch-kwargs", json.dumps(TINY_VIT), "--img-size", "32", "--cache-size", "40",
        "--batch-size", "4", "--epochs", str(epochs), "--teacher", str(teacher),
        "--optimizer", "adamw", "--augment", "strong", "--class-names", "blue,red",
        "--no-bf16", *extra,
    ]  # fmt: skip


# --- the loss, on hand values -----------------------------------------------------------------


def test_teacher_labels_are_the_argmax_of_the_mean_softmax():
    # probabilities given as log-probabilities: softmax gives them back
    t1 = torch.tensor([[0.9, 0.1, 1e-9], [0.2, 0.7, 0.1]]).log()
    t2 = torch.tensor([[1e-9, 0.7, 0.3], [0.1, 0.2, 0.7]]).log()
    # row 0: mean probabilities (0.45, 0.4, 0.15) -> 0, although the mean logits say 1
    # row 1: (0.15, 0.45, 0.4) -> 1
    assert teacher_labels([t1, t2]).tolist() == [0, 1]
    assert ((t1 + t2) / 2).argmax(1).tolist()[0] == 1  # the rule this is not
    assert teacher_labels([t2]).tolist() == [1, 2]  # one teacher: its own argmax


def test_hard_distillation_loss_on_hand_values():
    cls = torch.tensor([[0.0, 0.0]])  # CE against any label: ln 2
    dist = torch.tensor([[math.log(3.0), 0.0]])  # softmax (3/4, 1/4)
    label = torch.tensor([1])
    # DeiT: half the class head on the label, half the distillation head on the teacher's label
    for teacher, dist_term in ((0, math.log(4 / 3)), (1, math.log(4.0))):
        got = distillation_loss((cls, dist), label, torch.tensor([teacher]))
        assert got.item() == pytest.approx(0.5 * math.log(2) + 0.5 * dist_term)
    # label smoothing touches the label term only (ln 2 under any smoothing for uniform logits)
    smoothed = distillation_loss((dist, dist), label, torch.tensor([0]), label_smoothing=0.2)
    ce_label = -(0.1 * math.log(3 / 4) + 0.9 * math.log(1 / 4))
    assert smoothed.item() == pytest.approx(0.5 * ce_label + 0.5 * math.log(4 / 3))
    # one head: both terms on it; no teacher: the label on both heads, or plain CE
    one = distillation_loss(dist, label, torch.tensor([0]))
    assert one.item() == pytest.approx(0.5 * math.log(4) + 0.5 * math.log(4 / 3))
    assert distillation_loss((cls, dist), label, None).item() == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(4)
    )
    assert distillation_loss(dist, label, None).item() == pytest.approx(math.log(4))
    # soft targets (MixUp/CutMix) on the label term
    soft = torch.tensor([[0.25, 0.75]])
    got = distillation_loss((dist, dist), soft, torch.tensor([1]))
    expected = 0.5 * -(0.25 * math.log(3 / 4) + 0.75 * math.log(1 / 4)) + 0.5 * math.log(4)
    assert got.item() == pytest.approx(expected)
    assert torch.equal(inference_logits((cls, dist)), (cls + dist) / 2)


def test_strong_augmentation_is_seeded_and_mixes_labels():
    aug = StrongAugment(3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    labels, seeds = torch.tensor([0, 1, 2, 0]), torch.arange(4) + 10
    before = torch.get_rng_state()
    x1, y1 = aug(images, labels, seeds, 7)
    x2, y2 = aug(images, labels, seeds, 7)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is not touched
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.float32 and y1.shape == (4, 3)
    assert torch.allclose(y1.sum(1), torch.ones(4))
    x3, _ = aug(images, labels, seeds + 1, 7)
    assert not torch.equal(x1, x3)


# --- training end to end -----------------------------------------------------------------------


def test_a_distilled_vit_trains_and_its_checkpoint_opens(
    jpeg_folder, teacher, tmp_path, monkeypatch
):
    seen = {"teacher": [], "student": [], "targets": []}
    real_labels, real_loss = Teachers.labels, loop.distillation_loss

    def spy_labels(self, x, *a):
        labels = real_labels(self, x, *a)
        seen["teacher"].append(x.clone())
        # what the teachers say, computed here from their own logits
        pixels = x * torch.tensor(a[1]).view(1, 3, 1, 1) + torch.tensor(a[0]).view(1, 3, 1, 1)
        pre = self.checkpoints[0].preprocess
        own = (pixels - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(
            1, 3, 1, 1
        )
        own = own.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert torch.equal(labels, self.checkpoints[0].model(own).argmax(1))
        return labels

    def spy_loss(output, target, teacher_label, smoothing):
        seen["targets"].append((target, teacher_label))
        return real_loss(output, target, teacher_label, smoothing)

    real_build = run.set_distilled_training

    def spy_build(model):
        model.register_forward_pre_hook(
            lambda m, inp: seen["student"].append(inp[0].clone()) if m.training else None
        )
        return real_build(model)

    monkeypatch.setattr(Teachers, "labels", spy_labels)
    monkeypatch.setattr(loop, "distillation_loss", spy_loss)
    monkeypatch.setattr(run, "set_distilled_training", spy_build)
    out = tmp_path / "deit.safetensors"
    assert train_main(_args(jpeg_folder, out, teacher)) == 0
    # the teacher saw exactly the (augmented, mixed) images the student saw, every step
    assert len(seen["teacher"]) == len(seen["student"]) == 8
    for t, s in zip(seen["teacher"], seen["student"]):
        assert torch.equal(t, s)
    assert all(target.shape == (4, 2) and hard.shape == (4,) for target, hard in seen["targets"])

    ckpt = load_checkpoint(out)
    assert ckpt.arch == ForeignArch(NAME, "timm", 2, "self-attention", TINY_VIT)
    assert ckpt.class_names == ["blue", "red"] and ckpt.preprocess.crop == 32
    history = ckpt.metadata["training"]["history"]
    assert len(history) == 2 and all(math.isfinite(h["train_loss"]) for h in history)
    recipe = ckpt.metadata["training"]["recipe"]
    assert recipe["teachers"][0]["file"] == "resnet18.safetensors"
    assert recipe["arch"] == f"timm:{NAME}" and recipe["optimizer"].startswith("AdamW")
    assert "TrivialAugmentWide" in recipe["augmentation"] and "MixUp" in recipe["augmentation"]
    # the stored network gives the mean of its two heads, as timm at inference
    x = ckpt.preprocess(Image.open(jpeg_folder / "val" / "red" / "0.jpg"))
    with torch.inference_mode():
        feats = ckpt.model.forward_features(x)
        heads = (ckpt.model.head(feats[:, 0]) + ckpt.model.head_dist(feats[:, 1])) / 2
        torch.testing.assert_close(ckpt.model(x), heads)
    top1, n = evaluate_checkpoint(out, jpeg_folder / "val")
    assert (round(top1, 2), n) == (ckpt.metadata["accuracy"]["top1"], 8)
    # the model card gives it the transformer's goal and its command
    from models.training.card import model_card

    card = model_card(tmp_path)
    assert "**The vision transformer**" in card and "% for the vision transformer" in card
    assert f"--arch timm:{NAME}" in card and "--teacher checkpoints/resnet18.safetensors" in card
    assert f"--dataset-name {ckpt.metadata['dataset']} " in card  # the name it was trained under


def test_an_interrupted_distillation_resumes_to_the_same_weights(
    jpeg_folder, teacher, tmp_path, monkeypatch, capsys
):
    # stochastic depth draws from the global RNG, which the training state must carry too
    kwargs = ("--arch-kwargs", json.dumps(TINY_VIT | {"drop_path_rate": 0.2}), "--no-float16")
    full = tmp_path / "full.safetensors"
    assert train_main(_args(jpeg_folder, full, teacher, 2, *kwargs)) == 0

    out = tmp_path / "cut.safetensors"
    interrupt_in_second_epoch(monkeypatch, _args(jpeg_folder, out, teacher, 2, *kwargs), out)
    capsys.readouterr()
    assert train_main(_args(jpeg_folder, out, teacher, 2, *kwargs, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out
    a, b = load_checkpoint(full), load_checkpoint(out)
    assert a.arch.options == TINY_VIT  # the training-only rate is not part of the network
    for (key, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), key
    losses = [[h["train_loss"] for h in c.metadata["training"]["history"]] for c in (a, b)]
    assert losses[0] == losses[1]
    # the same command once more: finished, so it refuses rather than start over
    monkeypatch.setenv("KEEP_TRAIN_STATE", "0")
    out.with_name(out.name + ".state.pt").unlink()
    assert train_main(_args(jpeg_folder, out, teacher, 2, *kwargs, "--resume")) == 2
    assert "is finished" in capsys.readouterr().err
    assert load_checkpoint(out).sha256 == b.sha256


def _exit_code(argv: list[str]) -> int:
    try:
        return train_main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


def test_vit_options_are_checked_in_one_line(jpeg_folder, teacher, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    cases = [
        (["--arch", "timm:no_such_net"], "timm has no model 'no_such_net'"),
        (["--arch", "vit"], "expected resnet or timm:NAME"),
        (["--arch", f"timm:{NAME}", "--arch-kwargs", "[1]"], "must be a JSON object"),
        (["--arch", f"timm:{NAME}", "--arch-kwargs", '{"img_size": 64}', "--img-size", "32"],
         "img_size 64 is not --img-size 32"),
        (["--arch", f"timm:{NAME}", "--arch-kwargs", '{"act_layer": "x"}'],
         "option 'act_layer' is not one of"),
        (["--arch", f"timm:{NAME}", "--depth", "18"], "--depth is for --arch resnet"),
        (["--arch", f"timm:{NAME}", "--eval-sizes", "160,224", "--img-size", "224"],
         "takes 224-px inputs only"),
        (["--teacher", str(tmp_path / "missing.pt")], "--teacher"),
    ]  # fmt: skip
    for extra, message in cases:
        code = _exit_code(["--data", str(jpeg_folder), "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1], (extra, err)
    # a teacher for other classes
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, build_model(18, None, 2), class_names=["cat", "dog"])
    code = train_main(_args(jpeg_folder, out, other, 1))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "same classes in the same order" in err and "\n" not in err
    assert not out.exists()
