"""Deterministic export (PNG/PDF/SVG bytes, .npz, manifest, zip) and the `python -m viz export` CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from models import Preprocess, build_model, load_checkpoint, save_checkpoint
from models.checkpoints.checkpoint import Checkpoint
from models.images import load_image
from tests.conftest import randomize_bn
from viz.commands.cli import main
from viz.commands.export import (
    ZIP_DATE,
    ExportError,
    FigureSettings,
    analysis_arrays,
    figure_bytes,
    image_bundle,
    npz_bytes,
    prepare_output,
    write_atomic,
    write_files,
    zip_bundle,
)
from viz.engine.cam import analyze
from viz.figures import spatial_overview
from viz.interactive import analyze_images
from viz.text import safe_name

PREPROCESS = Preprocess(resize=64, crop=64)
CLASSES = ["tench", "church", "golf ball"]


def _model(depth: int, attention: str | None):
    torch.manual_seed(0)
    return randomize_bn(build_model(depth, attention, num_classes=len(CLASSES))).eval()


def _picture(seed: int, size=(70, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    _picture(seed).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cbam():
    model = _model(18, "cbam")
    return Checkpoint(model, model.arch, CLASSES, PREPROCESS, "attention-lens", "ab" * 32, {})


@pytest.fixture(scope="module")
def overview_figures(cbam):
    """The same figure built twice from the same inputs."""
    image = _picture(0)
    x = PREPROCESS.batch([image])
    crop = PREPROCESS.crop_image(image)
    return [spatial_overview(crop, analyze(cbam.model, x).trace) for _ in range(2)]


# --- bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_same_figure_gives_identical_bytes(overview_figures, fmt):
    first, second = (figure_bytes(fig, fmt, dpi=100) for fig in overview_figures)
    assert first == second
    assert figure_bytes(overview_figures[0], fmt, dpi=100) == first  # saving again changes nothing


def test_png_carries_the_dpi(overview_figures):
    data = figure_bytes(overview_figures[0], "png", dpi=150)
    with Image.open(io.BytesIO(data)) as im:
        assert tuple(round(v) for v in im.info["dpi"]) == (150, 150)
        assert im.width == round(overview_figures[0].get_size_inches()[0] * 150)
        assert "Matplotlib" not in im.info.get("Software", "")


def test_pdf_embeds_truetype_fonts_and_no_date(overview_figures):
    data = figure_bytes(overview_figures[0], "pdf", dpi=100)
    assert data.startswith(b"%PDF")
    assert b"/FontFile2" in data  # Type 42: TrueType embedded
    assert b"/CreationDate" not in data and b"Matplotlib" not in data
    assert b"/Type3" not in data  # no bitmap-like Type 3 fonts, mathtext included


def test_svg_is_xml_with_text_as_text(overview_figures):
    data = figure_bytes(overview_figures[0], "svg", dpi=100)
    root = ElementTree.fromstring(data)
    texts = [el for el in root.iter() if el.tag.endswith("}text") or el.tag == "text"]
    assert texts and b"<text" in data
    assert b"Matplotlib v" not in data and b"<dc:date>" not in data


def test_export_leaves_rcparams_alone(overview_figures):
    before = dict(matplotlib.rcParams)
    for fmt in ("png", "pdf", "svg"):
        figure_bytes(overview_figures[0], fmt, dpi=72)
    assert dict(matplotlib.rcParams) == before


def test_figure_bytes_refuses_unknown_format_and_dpi(overview_figures):
    with pytest.raises(ExportError, match="format"):
        figure_bytes(overview_figures[0], "jpg")
    with pytest.raises(ExportError, match="dpi"):
        figure_bytes(overview_figures[0], "png", dpi=0)


# --- names and files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("../../x.png", "x.png"),
        ("..\\..\\x.png", "x.png"),
        ("/etc/passwd", "etc_passwd"),
        ("a/b c.jpg", "a_b_c.jpg"),
        ("..", "unnamed"),
        ("", "unnamed"),
        (".hidden", "hidden"),
        ("-rf", "rf"),
        ("CON.png", "_CON.png"),
        ("chat noir é.png", "chat_noir_e.png"),
    ],
)
def test_safe_name_gives_a_plain_name(text, expected):
    name = safe_name(text)
    assert name == expected
    assert "/" not in name and "\\" not in name and not name.startswith(".")


def test_safe_name_keeps_the_suffix_when_shortening():
    name = safe_name("x" * 300 + ".png", max_length=40)
    assert len(name) == 40 and name.endswith(".png")


def test_write_files_stays_inside_the_folder(tmp_path):
    for bad in ("../x.png", "/abs.png", "a/../../x.png", ".hidden", "a/b c"):
        with pytest.raises(ExportError, match="unsafe"):
            write_files(tmp_path, {bad: b"1"})
    assert list(tmp_path.iterdir()) == []
    assert write_files(tmp_path, {"a/b.png": b"1", "c.txt": b"2"}) == ["a/b.png", "c.txt"]
    assert (tmp_path / "a" / "b.png").read_bytes() == b"1"


def test_write_atomic_leaves_no_half_file(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    write_atomic(target, b"old")

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # no temporary left behind


def test_written_files_get_ordinary_permissions(tmp_path):
    write_atomic(tmp_path / "fig.png", b"png")
    (tmp_path / "plain.png").write_bytes(b"png")  # what open() gives under this umask
    assert (tmp_path / "fig.png").stat().st_mode == (tmp_path / "plain.png").stat().st_mode


def test_prepare_output_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "out"
    assert prepare_output(out) == out and out.is_dir()
    assert prepare_output(out) == out  # empty: fine
    (out / "old.png").write_bytes(b"x")
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        prepare_output(out)
    assert prepare_output(out, overwrite=True) == out
    with pytest.raises(ExportError, match="not a folder"):
        prepare_output(out / "old.png")


# --- raw maps, bundles --------------------------------------------------------------------------


def test_npz_holds_every_raw_map_with_its_shape(cbam):
    x = PREPROCESS.batch([_picture(0), _picture(1)])
    analysis = analyze(cbam.model, x)
    arrays = analysis_arrays(analysis, index=1)
    data = npz_bytes(arrays)
    assert data == npz_bytes(arrays)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        got = {k: npz[k] for k in npz.files}
    assert got["logits"].shape == got["probs"].shape == (3,)
    assert got["target"].shape == () and int(got["target"]) == int(analysis.target[1])
    np.testing.assert_allclose(got["probs"], analysis.probs[1].numpy())
    # 64 px input: stages at 16, 8, 4, 2 px; ResNet-18 widths 64..512
    for stage, (size, width) in enumerate([(16, 64), (8, 128), (4, 256), (2, 512)], start=1):
        assert got[f"cam/layer{stage}"].shape == (size, size)
        for block in range(2):
            prefix = f"attention/layer{stage}.{block}.cbam/"
            assert got[prefix + "channel"].shape == (width,)
            for part in ("spatial", "gate", "feature_in", "feature_out"):
                assert got[prefix + part].shape == (size, size)
    rec = analysis.trace["layer3.1.cbam"]
    np.testing.assert_allclose(got["attention/layer3.1.cbam/spatial"], rec.spatial[1].numpy())
    assert len([k for k in got if k.startswith("attention/")]) == 8 * 5


def test_image_bundle_is_deterministic_and_complete(cbam):
    png = _png(0)
    options = {"name": "tench_1", "figures": ("overview", "gradcam"), "formats": ("png", "svg")}
    files = image_bundle(png, cbam, settings=FigureSettings(dpi=72), **options)
    assert sorted(files) == [
        "gradcam.png",
        "gradcam.svg",
        "manifest.json",
        "maps.npz",
        "overview.png",
        "overview.svg",
    ]
    again = image_bundle(png, cbam, settings=FigureSettings(dpi=72), **options)
    assert files == again
    manifest = json.loads(files["manifest.json"])
    assert manifest["checkpoints"][0]["sha256"] == cbam.sha256
    assert manifest["images"] == [
        {"name": "tench_1", "sha256": hashlib.sha256(png).hexdigest(), "sha256_of": "file"}
    ]
    assert manifest["options"]["dpi"] == 72 and manifest["options"]["formats"] == ["png", "svg"]
    assert set(manifest["versions"]) == {
        "python",
        "torch",
        "torchvision",
        "matplotlib",
        "numpy",
        "captum",
        "pillow",
    }
    assert manifest["files"]["overview.png"] == hashlib.sha256(files["overview.png"]).hexdigest()
    assert manifest["results"][0]["target_name"] in CLASSES
    archive = zip_bundle(files, root="tench_1")
    assert archive == zip_bundle(again, root="tench_1")
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert all(info.date_time == ZIP_DATE for info in zf.infolist())
        assert zf.read("tench_1/overview.png") == files["overview.png"]


def test_image_bundle_notes_figures_a_model_cannot_show(cbam):
    files = image_bundle(_picture(2), cbam, figures=("bam-hierarchy",), formats=("png",))
    manifest = json.loads(files["manifest.json"])
    assert "bam-hierarchy.png" not in files
    assert any("no BAM modules" in note for note in manifest["notes"])
    assert manifest["images"][0]["sha256_of"] == "pixels"
    with pytest.raises(ExportError, match="per-image figures"):
        image_bundle(_picture(2), cbam, figures=("model-grid",))


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for depth, attention in [(18, "cbam"), (50, None), (18, "bam"), (18, "se")]:
        path = folder / f"r{depth}_{attention or 'plain'}.safetensors"
        save_checkpoint(path, _model(depth, attention), class_names=CLASSES, preprocess=PREPROCESS)
        paths[path.stem] = path
    return paths


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Two classes in ImageFolder layout, one image each."""
    for i, cls in enumerate(["tench", "church"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        _picture(i).save(tmp_path / "imgs" / cls / f"{i}.png")
    return tmp_path / "imgs"


def _run(capsys, *argv) -> tuple[int, str]:
    argv = [str(a) for a in argv]
    if "--jobs" not in argv:  # one process unless a test asks: workers take seconds to start
        argv += ["--jobs", "1"]
    code = main(["export", *argv])
    return code, capsys.readouterr().err


def _export(capsys, ckpt, images, out, *extra) -> tuple[int, str]:
    return _run(capsys, "--checkpoint", ckpt, "--images", images, "--out", out, *extra)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_cli_exports_and_is_reproducible(ckpts, image_dir, tmp_path, capsys):
    ckpt = ckpts["r18_cbam"]
    runs = []
    for out in ("out1", "out2"):
        options = ["--format", "png,pdf,svg", "--dpi", "72", "--target", "church"]
        code, err = _export(capsys, ckpt, image_dir, tmp_path / out, *options)
        assert code == 0, err
        runs.append(_files(tmp_path / out))
    assert runs[0] == runs[1]  # figures, maps and manifest byte for byte
    names = set(runs[0])
    for image in ("church_1", "tench_0"):
        assert {f"r18_cbam/{image}/overview.{fmt}" for fmt in ("png", "pdf", "svg")} <= names
        assert f"r18_cbam/{image}/maps.npz" in names
    manifest = json.loads(runs[0]["manifest.json"])
    assert manifest["checkpoints"][0]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert {i["name"] for i in manifest["images"]} == {"church_1", "tench_0"}
    assert all(r["target_name"] == "church" for r in manifest["results"])
    assert manifest["failures"] == [] and manifest["options"]["target"] == "church"
    assert set(manifest["files"]) == names - {"manifest.json"}


def test_cli_names_failures_and_exports_the_rest(ckpts, image_dir, tmp_path, capsys):
    broken = image_dir / "church" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(broken) in lines[0]
    assert (out / "r18_cbam" / "tench_0" / "overview.png").is_file()
    assert (out / "r18_cbam" / "church_1" / "overview.png").is_file()
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert [f["input"] for f in manifest["failures"]] == [str(broken)]


@pytest.mark.parametrize(
    "argv",
    [
        ["--format", "jpg"],
        ["--width", "triple"],
        ["--dpi", "0"],
        ["--figure", "nonsense"],
        ["--target", "zebra"],
        ["--target", "7"],
    ],
)
def test_cli_usage_errors_exit_2(ckpts, image_dir, tmp_path, capsys, argv):
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, tmp_path / "o", *argv)
    assert code == 2 and "error" in err
    assert not (tmp_path / "o").exists()


def test_a_transformer_method_on_a_cnn_is_refused_once_before_any_image(
    ckpts, image_dir, tmp_path, capsys
):
    for command in ("export", "report"):
        argv = [command, "--checkpoint", str(ckpts["r18_cbam"]), "--images", str(image_dir),
                "--out", str(tmp_path / command), "--method", "rollout"]  # fmt: skip
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and "needs a vision transformer" in err, err
        assert not (tmp_path / command).exists()


def test_cli_missing_inputs_exit_2_with_one_line(ckpts, image_dir, tmp_path, capsys):
    code, err = _export(capsys, tmp_path / "nope.pth", image_dir, tmp_path / "o")
    assert code == 2 and err.strip().count("\n") == 0 and "nope.pth" in err
    code, err = _export(capsys, ckpts["r18_cbam"], tmp_path / "none", tmp_path / "o")
    assert code == 2 and "none" in err
    assert main([]) == 2
    assert main(["export", "--help"]) == 0
    assert "exit status" in capsys.readouterr().out


def test_cli_refuses_non_empty_output_without_overwrite(ckpts, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out)
    assert code == 2 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _ = _export(capsys, ckpts["r18_cbam"], image_dir, out, "--overwrite")
    assert (
        code == 0 and (out / "keep.txt").read_text() == "mine" and (out / "manifest.json").is_file()
    )


def test_cli_output_names_cannot_escape(ckpts, tmp_path, capsys):
    odd = tmp_path / "in" / ".." / "in"
    (tmp_path / "in").mkdir()
    _picture(0).save(tmp_path / "in" / "x..y.png")
    _picture(2).save(tmp_path / "in" / ".hidden.png")  # hidden files are not inputs
    _picture(1).save(tmp_path / "in" / "a b;c.png")
    out = tmp_path / "deep" / "out"
    code, err = _export(capsys, ckpts["r18_cbam"], odd, out)
    assert code == 0, err
    written = [
        p.resolve() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".png", ".npz")
    ]
    outside = [
        p
        for p in written
        if out.resolve() not in p.parents and p.parent != (tmp_path / "in").resolve()
    ]
    assert outside == []
    assert {p.name for p in (out / "r18_cbam").iterdir()} == {"x.y", "a_b_c"}


def test_cli_model_grid_bam_hierarchy_and_class_stats(ckpts, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(
        capsys, "--checkpoint", ckpts["r18_cbam"], "--checkpoint", ckpts["r50_plain"], "--checkpoint",
        ckpts["r18_bam"], "--images", image_dir, "--out", out, "--figure", "model-grid", "bam-hierarchy",
        "--figure", "class-stats", "--width", "single", "--dpi", "50",
    )  # fmt: skip
    assert code == 0, err
    assert "note: bam-hierarchy skipped for ResNet-18 + CBAM" in err
    assert "note: bam-hierarchy skipped for ResNet-50" in err
    assert (out / "model-grid.png").is_file()
    with Image.open(out / "model-grid.png") as im:
        assert im.width == round(3.3 * 50)
    assert (out / "r18_bam" / "tench_0" / "bam-hierarchy.png").is_file()
    assert not (out / "r18_cbam" / "tench_0" / "bam-hierarchy.png").exists()
    assert (out / "r18_cbam" / "class-stats-imgs.png").is_file()
    with np.load(out / "r18_cbam" / "class-stats-imgs.npz") as npz:
        assert list(npz["class_names"]) == ["church", "tench"]
        assert npz["means/layer4.1.cbam"].shape == (2, 512)
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert len(manifest["notes"]) == 3  # bam-hierarchy x2, class-stats of the plain model
    assert [c["name"] for c in manifest["checkpoints"]] == ["r18_cbam", "r50_plain", "r18_bam"]


def test_cli_model_grid_rows_explain_the_column_class(ckpts, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first, second = ckpts["r18_cbam"], ckpts["r18_bam"]
    code, err = _run(capsys, "--checkpoint", first, "--checkpoint", second, "--images", image_dir,
                     "--out", out, "--figure", "model-grid", "--format", "svg")  # fmt: skip
    assert code == 0, err
    svg = (out / "model-grid.svg").read_text()
    a, b = load_checkpoint(first), load_checkpoint(second)
    pictures = [load_image(p) for p in sorted(image_dir.rglob("*.png"))]
    columns = analyze_images(a, pictures).target.tolist()
    own = analyze_images(b, pictures).target.tolist()
    assert own != columns, "fixture: the two models must disagree somewhere to test this"
    explained = analyze_images(b, pictures, columns).target_probs.tolist()
    for p in explained:
        assert f"P={p:.2f}" in svg  # two decimals (issue 36: five were printed)


def test_cli_labels_explain_each_image_own_class(ckpts, image_dir, tmp_path, capsys):
    # labels that differ from the folders, so a run that ignored them could not pass by chance;
    # one row names the file, the other the end of its path
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n0.png,church\nchurch/1.png,0\n")
    out = tmp_path / "out"
    first, second = ckpts["r18_cbam"], ckpts["r18_bam"]
    code, err = _run(capsys, "--checkpoint", first, "--checkpoint", second, "--images", image_dir,
                     "--out", out, "--figure", "model-grid", "overview", "--format", "svg",
                     "--labels", labels)  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_bytes())
    got = {(r["checkpoint"], r["image"]): r["target_name"] for r in manifest["results"]}
    assert got == {
        ("r18_cbam", "tench_0"): "church",
        ("r18_cbam", "church_1"): "tench",
        ("r18_bam", "tench_0"): "church",
        ("r18_bam", "church_1"): "tench",
    }
    assert (
        manifest["options"]["labels"]["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    )
    # the grid prints each row's probability of the labelled class (to its 2 printed digits)
    printed = [float(v) for v in re.findall(r"P=([0-9.]+)<", (out / "model-grid.svg").read_text())]
    pictures = [
        load_image(image_dir / "church" / "1.png"),
        load_image(image_dir / "tench" / "0.png"),
    ]
    wanted = [CLASSES.index("tench"), CLASSES.index("church")]
    expected = [  # rows in the papers' order: BAM before CBAM
        p
        for path in (second, first)
        for p in analyze_images(load_checkpoint(path), pictures, wanted).target_probs.tolist()
    ]
    assert printed == pytest.approx(expected, abs=0.0051)


@pytest.mark.parametrize(
    "csv_text, message",
    [
        ("file,label\n0.png,church\n", "has no row for"),
        (
            "file,label\n0.png,zebra\n1.png,tench\n",
            "--labels: 0.png's label 'zebra' is not a class name",
        ),
        ("name,class\n0.png,church\n", "needs the columns file,label"),
        ("file,label\n0.png,\n", "line 2 has an empty file or label"),
        ("file,label\n0.png,church\n0.png,tench\n", "listed with two labels"),
    ],
)
def test_cli_bad_labels_exit_2_with_one_line(ckpts, image_dir, tmp_path, capsys, csv_text, message):
    labels = tmp_path / "labels.csv"
    labels.write_text(csv_text)
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, tmp_path / "o", "--labels", labels)
    assert code == 2 and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "o").exists()


def test_cli_labels_and_target_exclude_each_other(ckpts, image_dir, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n0.png,church\n1.png,tench\n")
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, tmp_path / "o", "--labels", labels,
                        "--target", "church")  # fmt: skip
    assert code == 2 and "not allowed with argument" in err
    code, err = _export(
        capsys, ckpts["r18_cbam"], image_dir, tmp_path / "o", "--labels", tmp_path / "nope.csv"
    )
    assert code == 2 and "cannot read it" in err and err.strip().count("\n") == 0


# --- no output lost or misplaced (hardening) ---------------------------------------------------


def test_unique_names_never_take_another_inputs_name():
    from viz.commands.inputs import unique_names

    assert unique_names(["x", "x", "x-2", "X"]) == ["x", "x-3", "x-2", "X-4"]
    assert unique_names(["m", "m"]) == ["m", "m-2"]


def test_same_stem_inputs_get_their_own_folders(ckpts, tmp_path, capsys):
    for folder in ("A", "B"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / folder / "x.png")
    code, _ = _run(capsys, "--checkpoint", ckpts["r18_cbam"], "--images", tmp_path / "A" / "x.png",
                   tmp_path / "B" / "x.png", "--out", tmp_path / "o")  # fmt: skip
    assert code == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [i["name"] for i in manifest["images"]] == ["x", "x-2"]
    assert len(list((tmp_path / "o").rglob("overview.png"))) == 2


def test_a_symlink_inside_the_output_is_not_followed(ckpts, image_dir, tmp_path, capsys):
    out, elsewhere = tmp_path / "o", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    model = Path(ckpts["r18_cbam"]).stem
    (out / model).symlink_to(elsewhere, target_is_directory=True)
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out, "--overwrite")
    assert list(elsewhere.iterdir()) == []  # nothing written outside --out
    assert "symbolic link" in err and code in (0, 1)


def test_an_unwritable_manifest_is_one_line_and_exit_1(ckpts, image_dir, tmp_path, capsys):
    out = tmp_path / "o"
    (out / "manifest.json").mkdir(parents=True)  # a folder where the manifest goes
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out, "--overwrite")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: cannot write the output")
    assert list(out.rglob("overview.png"))  # the figures written before are there, complete


def test_a_fifo_as_labels_or_image_does_not_hang(ckpts, image_dir, tmp_path, capsys):
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, tmp_path / "o", "--labels", fifo)
    assert code == 2 and "not a regular file" in err
    pipe_png = tmp_path / "pipes" / "p.png"
    pipe_png.parent.mkdir()
    os.mkfifo(pipe_png)
    code, err = _export(capsys, ckpts["r18_cbam"], pipe_png, tmp_path / "o2")
    assert code == 2 and "p.png" in err


def test_a_huge_sparse_image_file_is_refused_by_size(ckpts, tmp_path, capsys):
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(8 * 2**30)  # 8 GiB, sparse: no disk used
    ok = tmp_path / "ok.png"
    Image.new("RGB", (40, 40)).save(ok)
    code, err = _run(capsys, "--checkpoint", ckpts["r18_cbam"], "--images", big, ok,
                     "--out", tmp_path / "o")  # fmt: skip
    assert code == 1 and "over 256 MB" in err
    assert list((tmp_path / "o").rglob("overview.png"))  # the good image is exported


def test_the_bundle_follows_its_settings(cbam):
    from viz.figures import attention_vs_gradcam, spatial_overview
    from viz.interactive import analyze_images

    png = _png(0)
    settings = FigureSettings(method="gradcam++", cmap="viridis", alpha=0.7, scale="per-map",
                              width="single", dpi=80, render="cells")  # fmt: skip
    files = image_bundle(png, cbam, figures=("overview", "gradcam"), formats=("png",),
                         settings=settings)  # fmt: skip
    options = json.loads(files["manifest.json"])["options"]
    assert options["cam_method"] == "gradcam++" and options["cmap"] == "viridis"
    assert options["alpha"] == 0.7 and options["scale"] == "per-map" and options["dpi"] == 80
    assert options["scale_drawn"]["overview"] == "per-map"
    assert options["width_inches"] == pytest.approx(3.3) and options["render"] == "cells"
    pil = load_image(png)
    analysis = analyze_images(cbam, [pil], method="gradcam++")
    crop = cbam.preprocess.display_crop(pil)
    overview = spatial_overview(crop, analysis.trace, cmap="viridis", alpha=0.7,
                                shared_scale=False, width="single", render="cells")  # fmt: skip
    assert files["overview.png"] == figure_bytes(overview, "png", dpi=80)
    gradcam = attention_vs_gradcam(crop, analysis, class_names=cbam.class_names, cmap="viridis",
                                   alpha=0.7, width="single", render="cells")  # fmt: skip
    assert files["gradcam.png"] == figure_bytes(gradcam, "png", dpi=80)
    with np.load(io.BytesIO(files["maps.npz"])) as maps:
        cams = [k for k in maps.files if k.startswith("cam/")]
        assert cams and np.allclose(maps[cams[-1]], analysis.cams["layer4"][0].numpy())
    with pytest.raises(ExportError, match="another CAM method"):
        image_bundle(png, cbam, analysis=analysis, settings=FigureSettings(method="layercam"))


def test_settings_are_checked_in_one_line():
    for bad in ({"method": "score-cam"}, {"smoothing": ("blur",)}, {"cmap": "nope"}, {"alpha": 2}, {"scale": "global"},
                {"dpi": 5}, {"width": "triple"}, {"render": "blocky"}):  # fmt: skip
        with pytest.raises(ExportError) as info:
            FigureSettings(**bad)
        assert "\n" not in str(info.value)


def test_the_manifest_says_which_figures_follow_the_shared_scale():
    from viz.commands.export import scales_drawn

    drawn = scales_drawn(["overview", "gradcam", "model-grid", "class-stats"], "shared")
    assert drawn["overview"] == drawn["class-stats"] == "shared"
    assert drawn["gradcam"].startswith("per-map") and drawn["model-grid"].startswith("per-map")


def test_cli_settings_flags_reach_the_manifest_and_the_maps(ckpts, image_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out, "--method", "layercam",
                        "--layers", "layer3,layer4", "--cmap", "viridis", "--alpha", "0.8",
                        "--scale", "per-map", "--width", "single", "--render", "cells")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    options = manifest["options"]
    assert (options["cam_method"], options["cam_layers"]) == ("layercam", ["layer3", "layer4"])
    assert (options["cmap"], options["alpha"], options["scale"]) == ("viridis", 0.8, "per-map")
    assert options["render"] == "cells"
    assert all(r["cam_method"] == "layercam" for r in manifest["results"])
    with np.load(next(out.rglob("maps.npz"))) as maps:
        assert sorted(k for k in maps.files if k.startswith("cam/")) == ["cam/layer3", "cam/layer4"]
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, tmp_path / "o2", "--cmap", "nope")
    assert code == 2 and "unknown colour map 'nope'" in err


def test_cli_runs_a_pass_method_with_smoothing_and_records_both(ckpts, image_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out, "--method", "ablationcam",
                        "--smooth", "eigen", "--layers", "layer4", "--figure", "gradcam")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["cam_smoothing"] == ["eigen"]
    assert all(r["cam_method"] == "ablationcam" for r in manifest["results"])
    assert all(r["cam_smoothing"] == ["eigen"] for r in manifest["results"])
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, tmp_path / "o2", "--smooth", "blur")
    assert code == 2 and "--smooth" in err and "\n" not in err.strip()


def test_cli_num_samples_reaches_the_method_and_the_manifest(ckpts, image_dir, tmp_path, capsys,
                                                             monkeypatch):  # fmt: skip
    import viz.interactive

    given, real = [], viz.interactive.analyze

    def spy(*args, **kwargs):
        given.append(kwargs.get("options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(viz.interactive, "analyze", spy)
    out = tmp_path / "o"
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out, "--method", "smoothgradcam++",
                        "--num-samples", "2", "--layers", "layer4", "--figure", "gradcam")  # fmt: skip
    assert code == 0, err
    assert given and all(o == {"num_samples": 2} for o in given)
    assert json.loads((out / "manifest.json").read_text())["options"]["cam_num_samples"] == 2
    for bad, message in ((["--num-samples", "0"], "--num-samples must be from 1"),
                         (["--method", "eigencam", "--smooth", "eigen"],
                          "Eigen-CAM takes no eigen smoothing"),
                         (["--num-samples", "3"], "num_samples applies to sscam, iscam, "
                                                  "smoothgradcam++ only, not to Grad-CAM")):  # fmt: skip
        code, err = _export(capsys, ckpts["r18_cbam"], image_dir, tmp_path / "o2", *bad)
        assert code == 2 and message in err and "\n" not in err.strip(), err


def test_cli_model_grid_rows_follow_the_papers_order(ckpts, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, "--checkpoint", ckpts["r18_cbam"], "--checkpoint", ckpts["r18_bam"],
                     "--checkpoint", ckpts["r50_plain"], "--images", image_dir, "--out", out,
                     "--figure", "model-grid", "--format", "svg")  # fmt: skip
    assert code == 0, err
    svg = (out / "model-grid.svg").read_text()
    # rows are drawn top to bottom: plain, then BAM, then CBAM, whatever the command-line order
    plain, bam, cbam = (svg.index(f">{label}<") for label in
                        ("ResNet-50", "ResNet-18 + BAM", "ResNet-18 + CBAM"))  # fmt: skip
    assert plain < bam < cbam


def test_parallel_export_writes_the_same_bytes(ckpts, tmp_path, capsys):
    # every figure kind, four models, some figures skipped for some (channels of the plain
    # network, the BAM hierarchy of all but BAM); a parallel run against a serial one
    images = tmp_path / "imgs"
    for i, cls in enumerate(["tench", "church", "tench"]):
        (images / cls).mkdir(parents=True, exist_ok=True)
        _picture(i).save(images / cls / f"{i}.png")
    models = [a for name in ("r18_cbam", "r18_bam", "r50_plain", "r18_se")
              for a in ("--checkpoint", ckpts[name])]  # fmt: skip
    outs = {}
    for run in ("1", "2"):
        out = tmp_path / run
        code, err = _run(capsys, *models, "--images", images, "--out", out, "--figure",
                         "overview", "channels", "gradcam", "bam-hierarchy", "model-grid",
                         "--format", "png", "--dpi", "20", "--width", "single",
                         "--jobs", run)  # fmt: skip
        assert code == 0, err
        outs[run] = _files(out)
    assert "model-grid.png" in outs["1"] and "manifest.json" in outs["1"]
    assert "r18_bam/tench_0/bam-hierarchy.png" in outs["1"]
    assert "r18_cbam/tench_0/bam-hierarchy.png" not in outs["1"]
    assert "r50_plain/tench_0/channels.png" not in outs["1"]
    assert outs["1"] == outs["2"]


def test_deletion_insertion_csv_has_every_map():
    from viz.commands.export import deletion_insertion_csv
    from viz.measures.metrics import DeletionInsertion

    f = torch.linspace(0, 1, 3)
    one = DeletionInsertion(torch.tensor([0.2]), torch.tensor([0.7]), f,
                            torch.tensor([[1.0, 0.5, 0.1]]), torch.tensor([[0.0, 0.6, 0.9]]),
                            torch.tensor([0]))  # fmt: skip
    text = deletion_insertion_csv({"cam": one, "random map": one}).decode()
    lines = text.splitlines()
    assert lines[0] == ("fraction,cam deletion,cam insertion,random map deletion,"
                        "random map insertion")  # fmt: skip
    assert lines[2] == "0.500000,0.500000,0.600000,0.500000,0.600000" and len(lines) == 4
    with pytest.raises(ExportError):
        deletion_insertion_csv({})


def test_mistyped_options_and_layers_are_one_line_before_any_work(ckpts, image_dir, tmp_path,
                                                                   capsys):  # fmt: skip
    out = tmp_path / "o"
    for extra, phrase in ((["--figure", "overveiw"], "invalid choice: 'overveiw'"),
                          (["--jobs", "0"], "jobs must be from 1 to 64"),
                          (["--method", "scorcam"], "did you mean scorecam or sscam?"),
                          (["--layers", "layer9"], "unknown layer 'layer9'")):  # fmt: skip
        code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out, *extra)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and phrase in lines[0], err
        assert not out.exists()  # refused before anything was written
    code, err = _export(capsys, ckpts["r18_cbam"], image_dir, out)
    assert code == 0 and f"files to {out}" in err.strip().splitlines()[-1]


# --- a CNN beside a vision transformer; attention no probe reads (issue 36, items 8 and 3) ------


def _timm_checkpoint(
    path: Path, name: str, attention: str | None, preprocess=PREPROCESS, **options
) -> Path:
    import timm

    from models import ForeignArch

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=len(CLASSES), **options)
    arch = ForeignArch(name, "timm", len(CLASSES), attention, options)
    save_checkpoint(path, net.eval(), arch=arch, class_names=CLASSES, preprocess=preprocess)
    return path


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit")
    return _timm_checkpoint(folder / "deit.safetensors", "deit_tiny_distilled_patch16_224",
                            "self-attention", depth=2, img_size=64)  # fmt: skip


def test_cli_gae_on_a_cnn_beside_a_vit_falls_back_to_gradcam_and_says_so(
    ckpts, vit_ckpt, image_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    code, err = _run(capsys, "--checkpoint", ckpts["r18_cbam"], "--checkpoint", vit_ckpt,
                     "--images", image_dir, "--out", out, "--method", "gae",
                     "--figure", "overview", "gradcam", "model-grid")  # fmt: skip
    assert code == 0, err  # was 2: "needs a vision transformer's self-attention"
    said = "--method gae (GAE (Chefer et al.)) needs a vision transformer's self-attention: " \
           "r18_cbam shows Grad-CAM instead"  # fmt: skip
    assert err.count(said) == 1, err
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert said in manifest["notes"]
    assert {c["name"]: c["cam_method"] for c in manifest["checkpoints"]} == {
        "r18_cbam": "gradcam", "deit": "gae"}  # fmt: skip
    assert {(r["checkpoint"], r["cam_method"]) for r in manifest["results"]} == {
        ("r18_cbam", "gradcam"), ("deit", "gae")}  # fmt: skip
    assert (out / "model-grid.png").is_file() and not manifest["failures"]
    assert (out / "r18_cbam" / "tench_0" / "gradcam.png").is_file()
    assert (out / "deit" / "tench_0" / "gradcam.png").is_file()


def test_cli_warns_once_about_attention_no_probe_reads(ckpts, image_dir, tmp_path, capsys):
    pvt = _timm_checkpoint(tmp_path / "pvt.safetensors", "pvt_v2_b0", None, Preprocess(224, 224))
    unread = "Attention"
    line = f"warning: {pvt}: attention modules no probe reads: {unread};"
    code, err = _export(capsys, pvt, image_dir, tmp_path / "out", "--figure", "gradcam")
    assert code == 0, err
    assert err.count(line) == 1 and "UnreadAttentionWarning" not in err, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_bytes())
    layers = {tuple(r["cam_layers"]) for r in manifest["results"]}
    assert layers == {("stages.0", "stages.1", "stages.2", "stages")}  # its stages' features
    report = ["report", "--checkpoint", str(pvt), "--checkpoint", str(ckpts["r18_cbam"]),
              "--images", str(image_dir), "--out", str(tmp_path / "report"), "--steps", "2",
              "--sanity", "0", "--workers", "0"]  # fmt: skip
    assert main(report) == 0
    err = capsys.readouterr().err
    assert err.count(line) == 1 and "UnreadAttentionWarning" not in err, err
    assert "r18_cbam" not in err.split("wrote")[0]  # only the network with unread attention
