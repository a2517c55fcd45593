"""python -m models.train end to end on a tiny generated ImageFolder, --resume and --init."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from models import build_model, load_checkpoint
from models.training import batches
from models.training.card import model_card
from models.training.cli import main as train_main
from models.training.cli import parse_args
from models.training.data import holdout_split
from models.training.evaluation import evaluate_checkpoint
from tests.conftest import interrupt_in_second_epoch, red_blue_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return red_blue_folder(tmp_path_factory.mktemp("tiny"))


def _args(data, out, epochs, *extra):
    return [
        "--data", str(data), "--out", str(out), "--depth", "18", "--attention", "cbam",
        "--epochs", str(epochs), "--batch-size", "4", "--img-size", "32", "--cache-size", "40",
        "--eval-sizes", "32,40", "--class-names", "blue,red", "--no-bf16", *extra,
    ]  # fmt: skip


def test_train_writes_a_checkpoint_with_full_metadata(tiny_folder, tmp_path):
    out = tmp_path / "m.safetensors"
    assert train_main(_args(tiny_folder, out, 1)) == 0
    ckpt = load_checkpoint(out)
    meta = ckpt.metadata
    assert ckpt.format == "attention-lens"
    assert ckpt.arch.attention == "cbam" and ckpt.arch.num_classes == 2
    assert ckpt.class_names == ["blue", "red"]
    assert meta["training"]["recipe"]["epochs"] == 1 and len(meta["training"]["history"]) == 1
    assert meta["accuracy"]["images"] == 8 and 0 <= meta["accuracy"]["top1"] <= 100
    assert ckpt.preprocess.crop == meta["accuracy"]["test_size"]
    assert next(iter(ckpt.model.parameters())).dtype.is_floating_point
    assert not out.with_name(out.name + ".state.pt").exists()
    # the recorded accuracy is the one of the stored weights
    top1, n = evaluate_checkpoint(out, tiny_folder / "val")
    assert (round(top1, 2), n) == (meta["accuracy"]["top1"], 8)


def test_resume_continues_where_it_stopped(tiny_folder, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full.safetensors"
    train_main(_args(tiny_folder, full, 2))
    history_full = load_checkpoint(full).metadata["training"]["history"]

    out = tmp_path / "cut.safetensors"
    interrupt_in_second_epoch(monkeypatch, _args(tiny_folder, out, 2), out)
    capsys.readouterr()
    assert train_main(_args(tiny_folder, out, 2, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out
    history = load_checkpoint(out).metadata["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    # the resumed run continues the same trajectory as the uninterrupted one
    assert json.dumps([h["train_loss"] for h in history]) == json.dumps(
        [h["train_loss"] for h in history_full]
    )


def test_keep_best_ships_the_best_hold_out_epoch_across_a_resume(
    tiny_folder, tmp_path, monkeypatch
):
    """Hold-out top-1 50, 80, 60 over three epochs: epoch 2's weights ship, also when the run
    was stopped in epoch 3 and resumed (the best epoch's weights live in the state file)."""
    scripted, weights = [50.0, 80.0, 60.0], []

    def scripted_eval(model, *a, **k):
        if len(weights) == 2 and stop[0]:
            raise KeyboardInterrupt  # the session is stopped in epoch 3's evaluation
        weights.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        return scripted[len(weights) - 1] if len(weights) <= 3 else 70.0  # then: test sizes

    stop = [True]
    monkeypatch.setenv("KEEP_TRAIN_STATE", "1")
    monkeypatch.setattr(batches, "evaluate_cached", scripted_eval)
    out = tmp_path / "best.safetensors"
    args = _args(tiny_folder, out, 3, "--eval-every", "1", "--holdout", "0.25", "--keep-best")
    with pytest.raises(KeyboardInterrupt):
        train_main(args)
    stop[0] = False
    assert train_main([*args, "--resume"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.metadata["training"]["selection"]["epoch"] == 2
    assert ckpt.metadata["training"]["recipe"]["keep_best"] is True
    shipped = ckpt.model.state_dict()
    key = "layer4.1.conv2.weight"
    # float16 storage: equal to epoch 2's weights up to rounding, unlike epoch 3's
    torch.testing.assert_close(shipped[key], weights[1][key], atol=1e-3, rtol=1e-3)
    assert (shipped[key] - weights[2][key]).abs().max() > 1e-2
    card = model_card(tmp_path)
    assert "Epoch chosen on the hold-out: 2 of 3" in card and "--keep-best" in card
    # without a hold-out the choice would be made on val/, the split scored at the end
    no_holdout = [a for a in args if a not in ("--holdout", "0.25")]
    assert train_main(no_holdout) == 2


def test_missing_split_is_a_usage_error(tmp_path):
    assert train_main(["--data", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_eval_every_skips_validation_but_not_the_last_epoch(tiny_folder, tmp_path):
    out = tmp_path / "m.safetensors"
    assert train_main(_args(tiny_folder, out, 3, "--eval-every", "2")) == 0
    history = load_checkpoint(out).metadata["training"]["history"]
    assert [h["val_acc"] is None for h in history] == [True, False, False]


def _tiny_args(data, out, epochs, *extra):
    """Training options without an architecture (it comes from --init or the defaults)."""
    return [
        "--data", str(data), "--out", str(out), "--epochs", str(epochs), "--batch-size", "4",
        "--img-size", "32", "--cache-size", "40", "--eval-sizes", "32,40", "--no-bf16", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained_cbam(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "start.safetensors"
    assert train_main(_args(tiny_folder, out, 1)) == 0
    return out


def test_init_continues_from_a_checkpoint_and_records_it(tiny_folder, trained_cbam, tmp_path):
    start = load_checkpoint(trained_cbam)
    out = tmp_path / "continued.safetensors"
    # lr 0: the copied weights must come out unchanged (BatchNorm statistics still move)
    assert (
        train_main(_tiny_args(tiny_folder, out, 1, "--init", str(trained_cbam), "--lr", "0")) == 0
    )
    ckpt = load_checkpoint(out)
    assert ckpt.arch == start.arch  # the architecture came from --init
    for key in (
        "conv1.weight",
        "layer4.1.conv2.weight",
        "fc.weight",
        "layer1.0.cbam.SpatialGate.spatial.conv.weight",
    ):
        assert torch.equal(ckpt.model.state_dict()[key], start.model.state_dict()[key]), key
    init = ckpt.metadata["training"]["init"]
    assert init["file"] == "start.safetensors" and init["sha256"] == start.sha256
    assert init["classifier"] == "kept"
    assert init["training"]["recipe"]["epochs"] == 1  # the starting point's own record
    assert init["accuracy"] == start.metadata["accuracy"]
    assert len(ckpt.metadata["training"]["history"]) == 1
    # the model card tells both stages apart and gives both commands
    card = model_card(tmp_path)
    assert "| `continued.safetensors` | cbam | 1 + 1 |" in card
    assert "Then continued from that checkpoint (top-1" in card
    assert f"sha256 `{start.sha256[:16]}" in card
    assert "--attention cbam --epochs 1 " in card  # the first stage, from scratch
    assert "--init checkpoints/start.safetensors --epochs 1 --batch-size 4 --lr 0" in card


def test_init_with_another_class_count_gets_a_new_classifier(tiny_folder, trained_cbam, tmp_path):
    three = tmp_path / "three"
    for split in ("train", "val"):
        for label in ("a", "b", "c"):
            (three / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (60 * i, 80, 200)).save(
                    three / split / label / f"{i}.png"
                )
    out = tmp_path / "finetuned.safetensors"
    args = _tiny_args(three, out, 1, "--init", str(trained_cbam), "--lr", "0")
    assert train_main(args) == 0
    ckpt, start = load_checkpoint(out), load_checkpoint(trained_cbam)
    assert ckpt.arch.num_classes == 3 and ckpt.arch.attention == "cbam"
    assert ckpt.metadata["training"]["init"]["classifier"] == "new"
    assert torch.equal(ckpt.model.conv1.weight, start.model.conv1.weight)


def test_init_that_contradicts_an_option_is_a_usage_error(
    tiny_folder, trained_cbam, tmp_path, capsys
):
    out = tmp_path / "x.safetensors"
    args = _tiny_args(tiny_folder, out, 1, "--init", str(trained_cbam), "--attention", "se")
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --attention se contradicts --init") and "\n" not in err
    assert not out.exists()


def test_broken_init_is_one_line_before_any_decoding(tiny_folder, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    monkeypatch.setattr(batches, "load_split", lambda *a: pytest.fail("decoded the data"))
    assert (
        train_main(_tiny_args(tiny_folder, tmp_path / "x.safetensors", 1, "--init", str(bad))) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --init {bad}: ") and "\n" not in err


def test_init_from_an_official_checkpoint_fine_tunes_to_new_classes(tiny_folder, tmp_path):
    # the official release's training dict: `module.` keys, legacy serialization, 1000 classes
    torch.manual_seed(3)
    official = build_model(18, "bam", num_classes=1000)
    path = tmp_path / "RESNET18_IMAGENET_BAM_best.pth.tar"
    saved = {
        "epoch": 90,
        "arch": "resnet",
        "state_dict": {f"module.{k}": v for k, v in official.state_dict().items()},
        "best_prec1": torch.tensor(70.0),
    }
    torch.save(saved, path, _use_new_zipfile_serialization=False)
    out = tmp_path / "bam_tiny.safetensors"
    assert train_main(_tiny_args(tiny_folder, out, 1, "--init", str(path), "--lr", "0")) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.arch.attention == "bam" and ckpt.arch.num_classes == 2
    init = ckpt.metadata["training"]["init"]
    assert (init["format"], init["classifier"]) == ("official", "new")
    # float16 storage: the copied weights come back to within its rounding
    got, want = (
        ckpt.model.bam2.channel_att.gate_c.gate_c_fc_0.weight,
        official.bam2.channel_att.gate_c.gate_c_fc_0.weight,
    )
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(got, torch.zeros_like(got))


def _eps_named_jpg(path):
    """An EPS file (Pillow would hand it to Ghostscript) under an image name."""
    path.write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
        b"(/tmp/pwned) (w) file closefile\nshowpage\n%%EOF\n"
    )


def test_an_eps_file_among_the_training_images_is_never_decoded(tiny_folder, tmp_path, monkeypatch):
    import shutil

    from PIL import EpsImagePlugin

    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    _eps_named_jpg(data / "train" / "red" / "evil.jpg")
    _eps_named_jpg(data / "val" / "blue" / "evil.jpg")
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda *a: calls.append(a))
    out = tmp_path / "m.safetensors"
    assert train_main(_args(data, out, 1)) == 0
    assert calls == []  # the EPS plugin was never asked to open the file
    meta = load_checkpoint(out).metadata
    assert meta["accuracy"]["images"] == 8  # the EPS file is skipped, not counted


def test_holdout_is_stratified_seeded_and_disjoint():
    labels = torch.tensor([0] * 30 + [1] * 50 + [2] * 20)
    keep, held = holdout_split(labels, 0.1, seed=3)
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(100))
    assert torch.bincount(labels[held]).tolist() == [3, 5, 2]
    again = holdout_split(labels, 0.1, seed=3)[1]
    other = holdout_split(labels, 0.1, seed=4)[1]
    assert torch.equal(held, again) and not torch.equal(held, other)


def test_holdout_training_chooses_on_train_images_and_scores_val_once(tiny_folder, tmp_path):
    out = tmp_path / "m.safetensors"
    extra = ("--holdout", "0.25", "--holdout-seed", "1", "--test-crop-ratio", "0.8",
             "--eval-sizes", "32")  # fmt: skip
    assert train_main(_args(tiny_folder, out, 1, *extra)) == 0
    ckpt = load_checkpoint(out)
    meta = ckpt.metadata
    selection = meta["training"]["selection"]
    assert selection == {
        "split": "holdout", "fraction": 0.25, "seed": 1, "stratified": True, "images": 4,
        "train_images": 12, "note": "carved from train/; val/ scored once, after training",
    }  # fmt: skip
    assert "holdout_acc" in meta["training"]["history"][0]
    assert (ckpt.preprocess.resize, ckpt.preprocess.crop) == (40, 32)
    assert meta["accuracy"]["selected_on"] == "holdout" and meta["accuracy"]["images"] == 8


def test_init_from_another_library_is_one_line(tiny_folder, tmp_path, capsys):
    import torchvision

    other = tmp_path / "effnet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=2).state_dict(), other)
    out = tmp_path / "m.safetensors"
    code = train_main(["--data", str(tiny_folder), "--out", str(out), "--init", str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "torchvision mobilenet_v3_small" in err[0]


# --- several processes (torchrun, gloo on the CPU) --------------------------------------------


def _torchrun(n: int, argv: list[str]):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
                if n > 1 else [])  # fmt: skip
    return subprocess.run([sys.executable, *launcher, "-m", "models.train", *argv], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_two_processes_train_exactly_what_one_does(tiny_folder, tmp_path):
    """DDP over 2 ranks, each with half of every global batch, equals one process (BN frozen)."""
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"ranks{n}.safetensors"
        argv = _args(tiny_folder, out, 2, "--freeze-bn", "--no-float16", "--eval-sizes", "32")
        run = _torchrun(n, argv)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[n] = load_checkpoint(out)
    one, two = runs[1], runs[2]
    start = build_model(18, "cbam", 2)
    moved = 0.0
    for (key, a), b in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
        if (
            key in start.state_dict()
            and a.is_floating_point()
            and a.shape == start.state_dict()[key].shape
        ):
            moved = max(moved, float((a - start.state_dict()[key]).abs().max()))
    assert moved > 1e-3  # the weights did train
    h1, h2 = one.metadata["training"]["history"], two.metadata["training"]["history"]
    assert [h["train_loss"] for h in h1] == pytest.approx([h["train_loss"] for h in h2], abs=2e-4)
    assert two.metadata["training"]["recipe"]["processes"] == 2


def test_streamed_data_trains_on_two_ranks(tiny_folder, tmp_path):
    out = tmp_path / "stream.safetensors"
    run = _torchrun(2, _args(tiny_folder, out, 1, "--data-loading", "stream", "--workers", "1",
                             "--eval-sizes", "32"))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = load_checkpoint(out)
    assert ckpt.metadata["accuracy"]["images"] == 8 and ckpt.preprocess.crop == 32
    assert run.stdout.count("wrote ") == 1  # rank 0 alone logs and writes


def test_distributed_options_are_checked(tiny_folder, tmp_path, capsys, monkeypatch):
    from models.distributed import Ranks
    from models.training import cli

    out = tmp_path / "x.safetensors"
    assert train_main(_args(tiny_folder, out, 1, "--sync-bn")) == 2
    assert "--sync-bn needs --device cuda" in capsys.readouterr().err
    # as rank 0 of 2 (a rank failing under a real torchrun: test_report)
    monkeypatch.setattr(cli, "start_distributed", lambda device: Ranks(0, 2))
    assert train_main(_args(tiny_folder, out, 1, "--batch-size", "3")) == 2
    assert "--batch-size 3 is not divisible by the 2 ranks" in capsys.readouterr().err


def test_each_rank_gets_its_half_of_every_global_batch(tiny_folder):
    from models.distributed import Ranks

    args = parse_args(_args(tiny_folder, "x.safetensors", 1))
    whole = list(batches.CachedData(args, Ranks(0, 1)).batches(0, torch.Generator().manual_seed(5)))
    halves = [
        list(batches.CachedData(args, Ranks(r, 2)).batches(0, torch.Generator().manual_seed(5)))
        for r in (0, 1)
    ]
    assert len(whole) == len(halves[0]) == len(halves[1]) == 4
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert len(y0) == len(y1) == 2
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
