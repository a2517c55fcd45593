"""`python -m viz report` end to end on tiny checkpoints: files, resuming, failures, torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import Preprocess, build_model, save_checkpoint
from tests.conftest import ROOT, plain, randomize_bn
from viz.commands.cli import main
from viz.commands.report import PER_IMAGE_COLUMNS, chunks_of_rank

CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("ckpt")
    paths = []
    for seed, attention in enumerate(["cbam", None]):
        torch.manual_seed(seed)
        model = randomize_bn(build_model(18, attention, num_classes=3), seed).eval()
        path = folder / f"tiny_{attention or 'plain'}.safetensors"
        save_checkpoint(path, model, class_names=CLASSES, preprocess=Preprocess(72, 64))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    gen = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for k in range(3):
            w, h = 70 + 9 * k, 80 - 5 * c
            Image.fromarray(gen.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                root / name / f"{k}.png"
            )
    return root


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _report(out: Path, checkpoints, images, *extra: str) -> int:
    args = ["report", "--images", str(images), "--out", str(out), "--workers", "0",
            "--batch-size", "4", "--steps", "4", "--sanity", "3"]  # fmt: skip
    for c in checkpoints:
        args += ["--checkpoint", c]
    return main(args + list(extra))


def test_chunks_are_dealt_round_robin():
    assert chunks_of_rank(10, 4, 0, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunks_of_rank(10, 4, 0, 2) == [[0, 1, 2, 3], [8, 9]]
    assert chunks_of_rank(10, 4, 1, 2) == [[4, 5, 6, 7]]
    assert chunks_of_rank(3, 4, 1, 2) == []


def test_report_files_and_columns(tmp_path, checkpoints, image_folder, capsys):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,x0,y0,x1,y1\ncat/0.png,10,10,50,60\ndog/1.png,0,0,30,30\n")
    out = tmp_path / "out"
    assert _report(out, checkpoints, image_folder, "--boxes", str(boxes)) == 0
    assert f"wrote the report to {out}" in capsys.readouterr().err.splitlines()[-1]
    for name in ("per_image.csv", "per_map.csv", "sanity.csv", "summary.csv", "report.md",
                 "report.html", "manifest.json", "figures/sanity.png"):  # fmt: skip
        assert (out / name).is_file(), name
    per_image = _rows(out / "per_image.csv")
    assert list(per_image[0]) == list(PER_IMAGE_COLUMNS)
    assert len(per_image) == 9 * 2
    # labels come from the class folders; the explained class is the label
    cat = next(r for r in per_image if r["image"] == "cat_0" and r["checkpoint"] == "tiny_cbam")
    assert (cat["label"], cat["target"], cat["target_name"]) == ("cat", "0", "cat")
    assert all(0.0 <= float(r["deletion_auc"]) <= 1.0 for r in per_image)
    per_map = _rows(out / "per_map.csv")
    cbam = {r["map"] for r in per_map if r["checkpoint"] == "tiny_cbam"}
    assert {"cam/stage4", "random", "attention/layer4.1.cbam"} <= cbam
    assert {r["map"] for r in per_map if r["checkpoint"] == "tiny_plain"} == {
        "cam/stage1", "cam/stage2", "cam/stage3", "cam/stage4", "random"}  # fmt: skip
    located = [r for r in per_map if r["image"] in ("cat_0", "dog_1")]
    assert all(r["pointing"] in ("0.0", "1.0") for r in located)
    assert all(r["pointing"] == "" for r in per_map if r["image"] == "fish_2")  # no boxes
    gated = [r for r in per_map if r["map"].startswith("attention/")]
    assert gated and any(r["spearman"] != "" for r in gated)
    # a constant map (an untrained gate, a zero CAM) is n/a in every agreement column alike
    assert all((r["pearson"] == "") == (r["spearman"] == "") == (r["iou"] == "") for r in gated)
    sanity = _rows(out / "sanity.csv")
    assert {r["image"] for r in sanity} == {"cat_0", "cat_1", "cat_2"}  # the first --sanity 3
    summary = _rows(out / "summary.csv")
    paired = [r for r in summary if r["section"] == "paired"]
    assert paired and all(r["compared_to"] == "tiny_plain" for r in paired)
    acc = next(r for r in summary if r["metric"] == "correct" and r["checkpoint"] == "tiny_cbam")
    correct = [int(r["correct"]) for r in per_image if r["checkpoint"] == "tiny_cbam"]
    assert float(acc["mean"]) == pytest.approx(np.mean(correct))
    page = (out / "report.html").read_text()
    assert "<h2>Sanity check: each map" in page and "<h2>figures/" not in page  # captions
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tool"] == "attention-lens report"
    assert manifest["options"]["steps"] == 4 and len(manifest["images"]) == 9


def test_rerun_skips_finished_work_and_refuses_to_mix(tmp_path, checkpoints, image_folder,
                                                      monkeypatch):  # fmt: skip
    out = tmp_path / "out"
    assert _report(out, checkpoints[:1], image_folder, "--deletion", "off") == 0
    first = (out / "per_image.csv").read_bytes()
    import viz.commands.report

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished chunk was run again")

    monkeypatch.setattr(viz.commands.report, "_run_chunk", must_not_run)
    assert _report(out, checkpoints[:1], image_folder, "--deletion", "off") == 0
    assert (out / "per_image.csv").read_bytes() == first
    # another option: refused, nothing changed
    assert _report(out, checkpoints[:1], image_folder, "--deletion", "default") == 2
    assert (out / "per_image.csv").read_bytes() == first
    monkeypatch.undo()
    assert _report(out, checkpoints[:1], image_folder, "--deletion", "default",
                   "--overwrite") == 0  # fmt: skip
    assert _rows(out / "per_image.csv")[0]["deletion_auc"] != ""


def test_broken_images_and_hostile_names(tmp_path, checkpoints, image_folder, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(["<b>bold<i>.png", "ok.png"]):
        Image.fromarray(np.full((70, 70, 3), 40 * i, np.uint8)).save(images / name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    assert _report(out, checkpoints[:1], images, "--deletion", "off") == 1
    err = capsys.readouterr().err
    assert "1 image(s) could not be read" in err and f"wrote the report to {out}" in err
    # the page counts what was analysed, the sanity check included (was: "3 images", "all 3")
    intro = plain((out / "report.md").read_text())  # the text a reader sees
    assert "2 images (1 more could not be read)" in intro and "sanity check on all 2" in intro
    assert "no deletion/insertion" in intro
    rows = _rows(out / "per_image.csv")
    broken = next(r for r in rows if r["image"] == "broken")
    assert broken["error"] and broken["prob"] == ""
    assert all(r["label"] == "" for r in rows)  # no labels: the top-1 is explained
    page = (out / "report.html").read_text()
    assert "<b>bold" not in page


def test_bad_options_are_one_line(tmp_path, checkpoints, image_folder, capsys):
    out = tmp_path / "out"
    assert _report(out, checkpoints, tmp_path / "missing") == 2
    assert _report(out, checkpoints, image_folder, "--boxes", str(tmp_path / "x.txt")) == 2
    assert _report(out, checkpoints, image_folder, "--steps", "0") == 2
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(
        f"{c}/{k}.png,{'zebra' if c == 'dog' else c}\n" for c in CLASSES for k in range(3)))  # fmt: skip
    assert _report(out, checkpoints, image_folder, "--labels", str(labels)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) >= 3 and any("zebra" in line for line in errors)


def _python_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def test_torchrun_two_ranks_equal_one_process(tmp_path, checkpoints, image_folder):
    common = ["--images", str(image_folder), "--workers", "1", "--batch-size", "2",
              "--steps", "3", "--sanity", "2"]  # fmt: skip
    for c in checkpoints:
        common += ["--checkpoint", c]
    alone = subprocess.run(
        [sys.executable, "-m", "viz", "report", "--out", str(tmp_path / "one"), *common],
        env=_python_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-2000:]
    ranks = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "viz", "report", "--out", str(tmp_path / "two"), *common],
        env=_python_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    for name in ("per_image.csv", "per_map.csv", "sanity.csv", "summary.csv"):
        one = (tmp_path / "one" / name).read_text().splitlines()
        two = (tmp_path / "two" / name).read_text().splitlines()
        assert one == two, name
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["options"]["world_size"] == 2


def test_a_failing_rank_fails_the_run_without_a_report(tmp_path, checkpoints, image_folder):
    plugin = tmp_path / "fail_rank1.py"
    plugin.write_text(
        "import os\n"
        "import viz.commands.report\n"
        "if os.environ.get('RANK') == '1':\n"
        "    def boom(*args, **kwargs):\n"
        "        raise RuntimeError('disk on fire')\n"
        "    viz.commands.report._run_chunk = boom\n"
    )
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "viz", "report", "--out", str(out), "--images", str(image_folder),
         "--checkpoint", checkpoints[1], "--workers", "0", "--batch-size", "2",
         "--deletion", "off", "--sanity", "0", "--plugin", str(plugin)],
        env=_python_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode != 0
    assert "rank 1: RuntimeError: disk on fire" in run.stderr
    assert not (out / "report.md").exists() and not (out / "per_image.csv").exists()


def test_report_pages_show_file_text_as_text():
    from viz.commands.report_page import _html_table, _markdown

    hostile = "<script>alert(1)</script> | **x** [a](http://b)"
    page = _html_table(["h"], [[hostile]])
    assert "<script>" not in page and "&lt;script&gt;" in page
    md = _markdown(["h"], [[hostile]])
    row = md.splitlines()[-1]
    assert row.count("|") - row.count("\\|") == 2  # the cell's own pipe cannot split the row
    assert "\\*\\*x\\*\\*" in row and "\\[a\\]" in row


def test_class_folders_named_by_id_are_classes_in_order(tmp_path, checkpoints):
    """Imagenette's folders are WordNet ids: the i-th folder is class i, shown by its name."""
    for i, wnid in enumerate(["n03", "n01", "n02"]):
        (tmp_path / "img" / wnid).mkdir(parents=True)
        Image.fromarray(np.full((70, 70, 3), 60 * i, np.uint8)).save(
            tmp_path / "img" / wnid / "a.png"
        )
    out = tmp_path / "out"
    assert _report(out, checkpoints, tmp_path / "img", "--deletion", "off", "--sanity", "0") == 0
    rows = {(r["checkpoint"], r["image"]): r for r in _rows(out / "per_image.csv")}
    assert rows[("tiny_plain", "n01_a")]["label"] == "cat"  # sorted folders: n01 is class 0
    assert rows[("tiny_plain", "n03_a")]["target"] == "2"


def test_the_apps_temporary_report_folders_do_not_pile_up(tmp_path, monkeypatch):
    import os
    import tempfile

    from viz.commands.report_page import temporary_report_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / "attention_lens_report_old"
    stale.mkdir()
    os.utime(stale, (1_000_000, 1_000_000))
    mine = tmp_path / "unrelated"  # not one of ours: never touched
    mine.mkdir()
    first = temporary_report_folder()
    (first / "summary.csv").write_text("x")
    second = temporary_report_folder(first)
    assert second.is_dir() and second.parent == tmp_path
    assert not first.exists() and not stale.exists() and mine.is_dir()


def test_defaults_score_two_maps_and_progress_moves_within_a_chunk(tmp_path, checkpoints,
                                                                    image_folder):  # fmt: skip
    from models import load_checkpoint
    from viz.commands.report import ReportOptions, inputs_for, run_report

    inputs = inputs_for([(Path(c).stem, c, load_checkpoint(c)) for c in checkpoints], image_folder)
    options = ReportOptions(steps=4, sanity=2)  # one chunk of 9 images (batch size 16)
    seen: list[tuple[float, int]] = []
    rows = run_report(inputs, tmp_path / "out", options, progress=lambda d, t: seen.append((d, t)))
    scored = {r["map"] for r in rows["per_map"] if r.get("deletion_auc") is not None}
    assert scored == {"cam/stage4", "random"}  # the default: the last CAM and the chance level
    done = [d for d, _ in seen]
    assert {t for _, t in seen} == {9} and done[0] == 0 and done[-1] == 9
    assert done == sorted(done) and len({round(d, 3) for d in done if 0 < d < 9}) >= 9


def test_progress_weighs_analyses_by_their_planned_passes():
    from viz.commands.report import _Work

    seen: list[float] = []
    # 10 images with 100 units of deletion/insertion, and 20 analyses of the sanity check
    work = _Work(seen.append, units=100, analyses=10 + 20)
    analysing = work.part(analyses=10, plans=True)
    analysing(10, 10 + 5120)  # the main pass says: 5120 extra passes to come (Score-CAM)
    analysing(5130, 5130)
    # one analysis of one image is 3 + 512 forwards: the main analysis is a third of the work
    total = 100 + 30 * (3 + 512)
    assert seen[-1] == pytest.approx(10 * 515 / total)
    work.part(units=100)(1, 1)
    assert seen[-1] == pytest.approx((10 * 515 + 100) / total)
    checking = work.part(analyses=20)
    checking(0.5, 20)  # within the first step: the bar moves before the step ends
    assert (10 * 515 + 100) / total < seen[-1] < 1
    checking(20, 20)
    assert seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)


def test_pass_methods_check_fewer_images_and_explain_the_last_stage():
    from viz.commands.report import ReportOptions, default_sanity
    from viz.engine.cam import CAM_METHODS

    assert ReportOptions().sanity == 32 and ReportOptions(method="scorecam").sanity == 2
    assert ReportOptions(method="scorecam", sanity=5).sanity == 5
    assert {m for m in CAM_METHODS if default_sanity(m) == 2} == {
        "scorecam", "sscam", "iscam", "ablationcam", "smoothgradcam++"}  # fmt: skip
    # C full forwards per layer: the last stage only, unless layers are given
    assert {m for m, spec in CAM_METHODS.items() if spec.default_layers == "last"} == {
        "cam", "scorecam", "sscam", "iscam"}  # fmt: skip


def test_layers_samples_and_method_column(tmp_path, checkpoints, image_folder, monkeypatch):
    """--layers chooses the CAMs, the method is in per_map.csv, the sample figure reuses the
    run's maps (no second analysis after the bar), --num-samples reaches the method."""
    import viz.engine.cam

    calls: list[dict] = []
    real = viz.engine.cam.analyze

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(viz.engine.cam, "analyze", counted)
    out = tmp_path / "out"
    code = _report(out, checkpoints[:1], image_folder, "--layers", "layer3,layer4",
                   "--method", "smoothgradcam++", "--num-samples", "2", "--sanity", "1",
                   "--deletion", "off")  # fmt: skip
    assert code == 0
    cams = [r for r in _rows(out / "per_map.csv") if r["kind"] == "cam"]
    assert {r["map"] for r in cams} == {"cam/stage3", "cam/stage4"}
    assert {r["method"] for r in cams} == {"smoothgradcam++"}
    assert all(r["method"] == "" for r in _rows(out / "per_map.csv") if r["kind"] != "cam")
    # 3 chunks of 4, 4, 1 images + 11 randomisation steps of the one sanity image; no more
    assert len(calls) == 3 + 11
    assert all(c["options"] == {"num_samples": 2} for c in calls)
    assert (out / "figures" / "samples.png").is_file()
    with Image.open(out / "figures" / "samples.png") as samples:  # 150 dpi
        # 4 images under one model's 2 CAMs + attention: small panels (was 6.9 x 10 inches)
        assert samples.height <= 150 * (0.8 + 4 * 1.6) and samples.width <= 150 * 6.9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["layers"] == ["layer3", "layer4"]
    assert manifest["options"]["num_samples"] == 2


def test_eigen_smoothing_of_an_eigen_method_and_a_typo_are_refused(tmp_path, checkpoints,
                                                                   image_folder, capsys):  # fmt: skip
    for bad, message in ((["--method", "eigencam", "--smooth", "eigen"],
                          "Eigen-CAM takes no eigen smoothing"),
                         (["--method", "gradcamm"], "did you mean gradcam"),
                         (["--num-samples", "3"], "num_samples applies to sscam"),
                         (["--method", "cam", "--layers", "layer3"],
                          "CAM needs global average pooling")):  # fmt: skip
        code = _report(tmp_path / "out", checkpoints[:1], image_folder, *bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists()


def _tiny_deit(tmp_path: Path, depth: int) -> Path:
    import timm

    from models import ForeignArch

    torch.manual_seed(0)
    options = {"depth": depth, "img_size": 64}
    net = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3,
                            **options)  # fmt: skip
    vit = tmp_path / "deit.safetensors"
    arch = ForeignArch("deit_tiny_distilled_patch16_224", "timm", 3, "self-attention", options)
    save_checkpoint(vit, net, arch=arch, class_names=CLASSES, preprocess=Preprocess(72, 64))
    return vit


def _one_image(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.open(ROOT / "samples" / "tench_12881.jpg").save(images / "tench.png")
    return images


def test_a_cnn_beside_a_vit_under_gae_shows_grad_cam(tmp_path, checkpoints, capsys):
    """Issue 36: `report` with a CNN beside a ViT under GAE exited 2; like export and the app,
    the CNN now shows Grad-CAM, said once on stderr and in the report's summary line."""
    vit, images = _tiny_deit(tmp_path, depth=2), _one_image(tmp_path)
    out = tmp_path / "out"
    code = main(["report", "--checkpoint", checkpoints[0], "--checkpoint", str(vit),
                 "--images", str(images), "--out", str(out), "--method", "gae", "--steps", "2",
                 "--sanity", "0", "--workers", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "needs a vision transformer's self-attention" in err and "Grad-CAM instead" in err
    methods = {
        (r["checkpoint"], r["method"]) for r in _rows(out / "per_map.csv") if r["kind"] == "cam"
    }
    assert {m for _, m in methods} == {"gradcam", "gae"} and len(methods) == 2
    assert "(Grad-CAM for " in (out / "report.md").read_text().replace("\\", "")  # Markdown escapes
    outliers = {r["checkpoint"]: r["outlier_tokens"] for r in _rows(out / "per_image.csv")}
    assert outliers["tiny_cbam"] == "" and 0.0 <= float(outliers["deit"]) <= 1.0


def test_rollout_report_names_its_map_and_sorts_blocks_by_number(tmp_path, capsys):
    """Issue 36, item 9, on an 11-block DeiT: the map is `rollout` (was `cam/stage0`) and the
    blocks come 0, 1, ..., 9, 10 (were 0, 1, 10, 2, ...)."""
    vit, images = _tiny_deit(tmp_path, depth=11), _one_image(tmp_path)
    out = tmp_path / "out"
    code = main(["report", "--checkpoint", str(vit), "--images", str(images), "--out", str(out),
                 "--method", "rollout", "--deletion", "all", "--steps", "2", "--sanity", "1",
                 "--workers", "0"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    maps = list(dict.fromkeys(r["map"] for r in _rows(out / "summary.csv")))
    blocks = [m for m in maps if m.startswith("attention/blocks.")]
    assert blocks == [f"attention/blocks.{b}.attn" for b in range(11)]
    assert "rollout" in maps and not any(m.startswith("cam/") for m in maps)
    assert {r["map"] for r in _rows(out / "per_map.csv") if r["kind"] == "cam"} == {"rollout"}
    sanity = list(dict.fromkeys(r["map"] for r in _rows(out / "sanity_summary.csv")))
    assert [m for m in sanity if m.startswith("attention/blocks.")] == blocks
    assert "rollout" in sanity
    report = (out / "report.md").read_text()
    assert report.index("attention/blocks.9.attn") < report.index("attention/blocks.10.attn")
