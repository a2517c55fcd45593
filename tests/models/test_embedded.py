"""The embedded checkpoints: they load, their metadata is complete, they classify the samples."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from models import load_checkpoint
from models.networks.hybrid import HYBRID_NAME
from models.training.card import GOAL_SIZE, GOAL_TOP1, VIT_GOAL_TOP1, meets_goal, model_card
from tests.conftest import ROOT
from viz import load_image

NAMES = ["plain", "se", "bam", "cbam"]
SAMPLES = ROOT / "samples"
HYBRID = ROOT / "checkpoints" / f"{HYBRID_NAME}_imagenette.safetensors"


def _checkpoint(name: str) -> Path:
    path = ROOT / "checkpoints" / f"resnet18_{name}_imagenette.safetensors"
    assert path.is_file(), f"{path.name} is missing: the app's default models ship with the project"
    return path


def _samples_right(ckpt) -> tuple[int, int]:
    """(samples whose labelled class is the model's top-1, samples)."""
    with (SAMPLES / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    images = [load_image(SAMPLES / r["file"]) for r in rows]
    with torch.no_grad():
        pred = ckpt.model(ckpt.preprocess.batch(images)).argmax(1).tolist()
    return sum(ckpt.class_names[p] == r["label"] for p, r in zip(pred, rows)), len(rows)


@pytest.mark.parametrize("name", NAMES)
def test_embedded_checkpoint_metadata_is_complete(name):
    ckpt = load_checkpoint(_checkpoint(name))
    meta = ckpt.metadata
    assert ckpt.format == "attention-lens"
    assert ckpt.arch.depth == 18 and ckpt.arch.num_classes == 10 and ckpt.arch.stem == "imagenet"
    assert ckpt.arch.attention == (None if name == "plain" else name)
    assert ckpt.class_names[:2] == ["tench", "English springer"]
    for key in ("name", "dataset", "training", "accuracy", "preprocess", "arch"):
        assert key in meta, key
    assert meta["accuracy"]["images"] == 3439
    assert len(meta["training"]["history"]) == meta["training"]["recipe"]["epochs"]


@pytest.mark.parametrize("name", NAMES)
def test_embedded_checkpoint_meets_the_224_goal_or_the_card_says_it_does_not(name):
    path = _checkpoint(name)
    ckpt = load_checkpoint(path)
    meta = ckpt.metadata
    if meets_goal(meta):
        # runs at 224 px as the official evaluation, chosen on a hold-out, scored once on val
        assert (ckpt.preprocess.resize, ckpt.preprocess.crop) == (256, GOAL_SIZE)
        assert meta["accuracy"]["top1"] >= GOAL_TOP1
        selection = meta["training"]["selection"]
        assert selection["split"] == "holdout" and selection["images"] == 947
        assert meta["accuracy"]["selected_on"] == "holdout"
    else:  # the card must not hide it
        status = next(
            line for line in model_card(ROOT / "checkpoints").splitlines() if "**Status:**" in line
        )
        assert f"`{path.name}` (" in status.split("not by", 1)[1]
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_embedded_checkpoint_classifies_the_samples(name):
    correct, n = _samples_right(load_checkpoint(_checkpoint(name)))
    # chance is 2/20; the four models (85-89% top-1) get 15-19 of these right
    assert correct >= 13, f"{correct}/{n} samples right"


def test_model_card_lists_every_embedded_checkpoint():
    card = model_card(ROOT / "checkpoints")
    for n in NAMES:
        assert f"resnet18_{n}_imagenette.safetensors" in card
    committed = (ROOT / "checkpoints" / "README.md").read_text()
    assert committed == card, "checkpoints/README.md is stale: run python -m models.card"


def test_readme_gives_the_embedded_hybrids_top1_from_its_file():
    """Was: the summary still gave an earlier hybrid's 87.7%, the grid's caption a rounded 88.0%
    (the goal it is short of): the summary, the grid's caption and its section give the file's."""
    top1 = load_checkpoint(HYBRID).metadata["accuracy"]["top1"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert readme.count(f"{top1:.2f}% top-1") >= 3, f"the README does not give {top1:.2f}%"


def test_model_card_status_names_the_checkpoints_short_of_the_goal(tmp_path):
    from models.checkpoints.zoo import EmbeddedCheckpoint
    from models.training.card import _status

    def entry(name, top1):
        return EmbeddedCheckpoint(tmp_path / name, 1, 0.0, {"accuracy": {"top1": top1}})

    good, close = entry("a.safetensors", GOAL_TOP1), entry("b.safetensors", GOAL_TOP1 - 0.01)
    old = EmbeddedCheckpoint(
        tmp_path / "d.safetensors", 1, 0.0, {"accuracy": {"top1": 90.0, "test_size": 160}}
    )
    assert "not by `d.safetensors` (90.0% at 160 px)" in _status([good, old])
    assert _status([good]).endswith("every checkpoint below reaches it.")
    line = _status([good, close, entry("c.safetensors", None)])
    short = f"`b.safetensors` ({round(GOAL_TOP1 - 0.01, 2)}%)"
    assert f"reached by `a.safetensors`; not by {short}, `c.safetensors`" in line


def test_the_vision_transformer_has_its_own_goal_at_its_own_size(tmp_path):
    from models.checkpoints.zoo import EmbeddedCheckpoint
    from models.training.card import _status

    vit = {"arch": {"source": "timm", "attention": "self-attention"}}

    def entry(name, top1, meta):
        acc = {"accuracy": {"top1": top1, "test_size": 160}}
        return EmbeddedCheckpoint(tmp_path / name, 1, 0.0, meta | acc)

    assert meets_goal(entry("v", VIT_GOAL_TOP1, vit).metadata)  # at 160 px: its size
    assert not meets_goal(entry("v", VIT_GOAL_TOP1 - 0.1, vit).metadata)
    assert not meets_goal(entry("r", GOAL_TOP1, {}).metadata)  # a ResNet at 160 px
    line = _status([entry("vit.safetensors", VIT_GOAL_TOP1 - 0.1, vit)])
    assert f"{VIT_GOAL_TOP1:g}% for the vision transformer" in line
    assert f"not by `vit.safetensors` ({VIT_GOAL_TOP1 - 0.1}% at 160 px)" in line


def _entry(path, top1, history, vit=True, size=160):
    from models.checkpoints.zoo import EmbeddedCheckpoint

    arch = {"source": "timm", "attention": "self-attention"} if vit else {"depth": 18}
    meta = {"arch": arch, "accuracy": {"top1": top1, "test_size": size},
            "training": {"history": history}}  # fmt: skip
    return EmbeddedCheckpoint(path, 1, 0.0, meta)


def test_the_vision_transformers_card_text_comes_from_its_history(tmp_path):
    from models.training.card import _status, _vit_intro

    history = [
        {"epoch": e, "seconds": s, "holdout_acc": h}
        for e, s, h in ((1, 600.0, None), (2, 1200.0, 40.0), (3, 900.0, None), (4, 900.0, 52.5))
    ]
    vit = _entry(tmp_path / "vit.safetensors", 50.0, history)
    line = _status([vit])
    assert "`vit.safetensors`'s hold-out top-1: 40.0% after epoch 2, 52.5% after epoch 4;" in line
    assert "still rising at the last evaluation, so more epochs" in line
    history[3]["holdout_acc"] = 30.0  # a fall: not put down to the number of epochs
    assert "30.0% after epoch 4; another recipe is the next thing" in _status([vit])
    history[1]["holdout_acc"] = None  # one evaluation shows no trend
    assert "another recipe" in _status([vit])
    intro = _vit_intro(vit)
    assert "`vit.safetensors`" in intro and "Its 4 epochs took 1.0 hours" in intro
    assert "in float32 (the fastest epoch 10 minutes)" in intro
    assert "so unlike the ResNets' it was never trained on" in intro
    vit.metadata["training"]["init"] = {"file": "earlier.safetensors"}
    assert "never trained on" not in _vit_intro(vit)  # continued: its hold-out saw training
    del vit.metadata["training"]["init"]
    vit.metadata["training"]["recipe"] = {"teachers": [{"file": "t.safetensors"}], "img_size": 160}
    taught = _vit_intro(vit)
    assert "`t.safetensors` (the teacher, shown the same 160 px pixels) gives each" in taught
    reached = _entry(tmp_path / "vit.safetensors", VIT_GOAL_TOP1, history)
    assert "hold-out top-1" not in _status([reached])  # nothing to explain


def test_a_kept_best_epochs_command_says_which_epochs_were_candidates():
    from models.training.card import _command

    recipe = {"arch": "timm:deit_tiny_distilled_patch16_224", "epochs": 6, "keep_best": True}
    every_third = _command(recipe, "v.safetensors", attention=None, init=None, evaluated=[3, 6])
    assert "--keep-best --eval-every 3" in every_third
    each = _command(recipe, "v.safetensors", attention=None, init=None, evaluated=[1, 2, 3])
    assert "--eval-every" not in each  # every epoch: the default
    recipe["keep_best"] = False  # without a choice the spacing changes nothing
    assert "--eval-every" not in _command(recipe, "v", attention=None, init=None, evaluated=[3])


def test_the_resnets_hold_out_note_shows_only_when_a_resnet_is_short(tmp_path):
    from models.training.card import _status

    history = [{"epoch": 1, "holdout_acc": 91.5}]
    good = _entry(tmp_path / "r.safetensors", GOAL_TOP1, history, vit=False, size=GOAL_SIZE)
    short = _entry(tmp_path / "s.safetensors", GOAL_TOP1 - 1, history, vit=False, size=GOAL_SIZE)
    vit = _entry(tmp_path / "vit.safetensors", 50.0, [{"epoch": 5, "holdout_acc": 50.0}])
    assert "after the last stage" not in _status([good, vit])  # only the ViT is short
    assert "`vit.safetensors`'s hold-out top-1: 50.0% after epoch 5" in _status([good, vit])
    line = _status([good, short])
    assert "after the last stage: `r.safetensors` 91.5%, `s.safetensors` 91.5%." in line


def test_the_embedded_hybrid_is_recognised_with_its_training_record():
    assert HYBRID.is_file(), (
        f"{HYBRID.name} is missing: the app's transformer ships with the project"
    )
    assert HYBRID.stat().st_size <= 25 * 2**20  # float16, within the budget
    ckpt = load_checkpoint(HYBRID)
    meta = ckpt.metadata
    assert ckpt.arch.name == HYBRID_NAME and ckpt.arch.attention == "cbam+self-attention"
    assert meta["arch"]["name"] == HYBRID_NAME  # the file says what it is; the keys agree
    assert ckpt.class_names[:2] == ["tench", "English springer"]
    assert (ckpt.preprocess.resize, ckpt.preprocess.crop) == (256, 224)
    assert meta["accuracy"]["test_size"] == 224 and meta["accuracy"]["images"] == 3439
    assert meta["accuracy"]["selected_on"] == "holdout"
    training = meta["training"]
    assert training["selection"]["split"] == "holdout" and training["selection"]["images"] == 947
    assert training["selection"]["epoch"] in [h["epoch"] for h in training["history"]]
    tuned = training["recipe"].get("tune_layer3") or {"epochs": 0}  # its second stage
    assert len(training["history"]) == training["recipe"]["epochs"] + tuned["epochs"]
    assert training["wall_seconds"] <= 2.5 * 3600  # trained start to end within one run
    card = model_card(ROOT / "checkpoints")
    assert f"`{HYBRID.name}`" in card and f"{meta['accuracy']['top1']}%" in card
    assert "python -m models.train_hybrid" in card


def test_the_embedded_hybrid_is_traced_cbam_then_self_attention_and_classifies_the_samples():
    from viz import analyze, record_attention

    ckpt = load_checkpoint(HYBRID)
    x = ckpt.preprocess.batch([load_image(SAMPLES / "tench_12881.jpg")])
    with torch.no_grad(), record_attention(ckpt.model) as trace:
        ckpt.model(x)
    kinds = [r.kind for r in trace]
    depth = len(ckpt.model.blocks)
    assert kinds == ["cbam"] * 6 + ["self-attention"] * depth  # forward order: trunk, blocks
    assert [r.name for r in trace][-1] == f"blocks.{depth - 1}.attn"
    assert all(r.heads.shape == (1, 3, 14, 14) for r in trace if r.kind == "self-attention")
    for method in ("rollout", "gae", "legrad"):
        cam = analyze(ckpt.model, x, method=method).cams[method]
        assert cam.shape == (1, 14, 14) and torch.isfinite(cam).all() and cam.std() > 0
    right, n = _samples_right(ckpt)
    # at least what its validation top-1 predicts, less a margin for 20 images
    expected = int(ckpt.metadata["accuracy"]["top1"] / 100 * n) - 3
    assert right >= expected, f"{right}/{n} samples right"
