"""The Streamlit app through streamlit.testing's AppTest (in-process, no browser).

Small random-weight checkpoints (ResNet-18 CBAM, plain and BAM, 10 Imagenette classes) are written
to a temporary folder that ATTENTION_LENS_CHECKPOINTS points the app at, so these tests do not
depend on the embedded checkpoints; one test uses the real embedded CBAM checkpoint when present.
Streamlit 1.67's AppTest drives `st.file_uploader` directly (`set_value`), so uploads are tested
through the real widgets.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import streamlit as st
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from models import build_model, save_checkpoint
from models.checkpoints.zoo import CHECKPOINT_DIR_ENV
from tests.conftest import plain

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app.py"
SAMPLES = ROOT / "samples"
CLASSES = (ROOT / "checkpoints" / "imagenette_classes.txt").read_text().split("\n")[:10]
REAL_CBAM = ROOT / "checkpoints" / "resnet18_cbam_imagenette.safetensors"
REAL_VIT = ROOT / "checkpoints" / "resnet18_cbam_vit_hybrid_imagenette.safetensors"
TIMEOUT = 180  # seconds per script run: the CPU is shared with other work
DEFAULT_SAMPLE = "english_springer_4972.jpg"  # the app's worked example

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def vit_label(at: AppTest) -> str:
    (label,) = [o for o in at.sidebar.selectbox(key="model").options if o.startswith("tiny deit")]
    return label


VIEWS = [
    "Spatial attention", "Channel attention", "Class activation map",
    "Agreement & deletion/insertion", "BAM hierarchy", "Compare models", "Class statistics",
    "Data set",
]  # fmt: skip


def show(at: AppTest, view: str) -> AppTest:
    """Open a view (its id: spatial, channels, cam, agreement, bam, compare, stats, dataset)."""
    at.button_group(key="view").set_value(view).run()
    assert_clean(at)
    return at


def views(at: AppTest) -> list[str]:
    """The views offered, by their names on screen."""
    return at.button_group(key="view").options


def download(at: AppTest, deferred: dict, label: str) -> bytes:
    """What clicking the download button `label` (made on click) gives, as the server makes it."""
    (button,) = [b.proto for b in at.get("download_button") if b.proto.label == label]
    return deferred[button.deferred_file_id]()


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def prediction(at: AppTest) -> str:
    lines = [m.value for m in at.markdown if m.value.startswith("**Prediction: ")]
    assert len(lines) == 1, [m.value for m in at.markdown]
    return lines[0]


def model_label(at: AppTest, kind: str) -> str:
    (label,) = [
        o for o in at.sidebar.selectbox(key="model").options if o.startswith(f"tiny {kind} ")
    ]
    return label


def sample_bytes(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def png_bytes(size=(96, 80), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_default_view_is_a_worked_example(app):
    at = app.run()
    assert_clean(at)
    # the CBAM checkpoint is chosen first, on a sample image
    assert at.sidebar.selectbox(key="model").value.startswith("tiny cbam ")
    assert any(name in prediction(at) for name in CLASSES)
    detected = plain(next(m.value for m in at.sidebar.markdown if "**Depth**" in m.value))
    assert "**Depth**: 18" in detected and "**Attention**: CBAM" in detected
    assert "**Classes**: 10" in detected
    assert "**Format**: attention-lens" in detected
    assert "**Source**: embedded resnet18_cbam_tiny.safetensors" in detected
    assert views(at) == VIEWS
    assert at.button_group(key="view").value == "spatial"
    assert len(at.image) == 2  # the input and the spatial maps: the one view shown
    assert not at.info
    assert len(at.dataframe) == 1  # top-5
    show(at, "bam")
    assert [i.value for i in at.info] == [
        "The BAM hierarchy exists only for BAM models; choose one in the sidebar."
    ]
    show(at, "agreement")
    assert len(at.dataframe) == 2  # top-5 and the agreement table


def test_uploaded_images_are_analysed_with_downloads(app):
    at = app.run()
    files = [
        ("tench.jpg", sample_bytes("tench_12881.jpg"), "image/jpeg"),
        ("red square.png", png_bytes(), "image/png"),
        ("tench.jpg", sample_bytes("tench_12881.jpg"), "image/jpeg"),  # the same file again
    ]
    at.sidebar.file_uploader(key="images").set_value(files).run()
    assert_clean(at)
    assert len(at.selectbox(key="inspect").options) == 2  # the file given twice is shown once
    captions = [c for img in at.image for c in img.captions]
    assert any(c.startswith("tench.jpg: ") for c in captions), captions
    assert any(c.startswith("red square.png: ") for c in captions), captions
    assert any(name in prediction(at) for name in CLASSES)
    downloads = [b.label for b in at.download_button]
    assert "Everything for this image (zip)" in downloads
    assert {"PNG", "PDF", "SVG"} <= set(downloads)
    # inspect the second image
    at.selectbox(key="inspect").set_value(1).run()
    assert_clean(at)
    assert any(
        "red square.png as the network sees it" in c for img in at.image for c in img.captions
    )
    show(at, "channels")
    at.selectbox(key="channel_compare").set_value(0).run()
    assert_clean(at)


def test_broken_upload_is_one_error_naming_it(app):
    at = app.run()
    files = [
        ("good.jpg", sample_bytes("church_29612.jpg"), "image/jpeg"),
        ("broken.png", b"\x89PNG\r\n\x1a\n this is not really a png", "image/png"),
        ("notes.jpg", b"hello, I am text", "image/jpeg"),
    ]
    at.sidebar.file_uploader(key="images").set_value(files).run()
    assert not at.exception
    errors = [plain(e.value) for e in at.error]
    assert len(errors) == 2, errors
    assert "'broken.png'" in errors[0] and "'notes.jpg'" in errors[1]
    assert all("\n" not in e for e in errors)
    # the good image is still analysed
    assert any(name in prediction(at) for name in CLASSES)
    assert any("good.jpg as the network sees it" in c for img in at.image for c in img.captions)


def test_when_no_upload_can_be_read_the_samples_are_still_offered(app):
    at = app.run()
    at.sidebar.file_uploader(key="images").set_value(
        [("broken.jpg", sample_bytes("church_29612.jpg")[:300], "image/jpeg")]
    ).run()
    assert not at.exception and len(at.error) == 1
    picker = at.sidebar.multiselect(key="samples")  # was hidden while any upload existed
    picker.set_value(["tench_12881.jpg"]).run()
    assert not at.exception
    assert any(
        "tench_12881.jpg as the network sees it" in plain(c) for i in at.image for c in i.captions
    )


def test_switch_models(app):
    at = app.run()
    at.sidebar.selectbox(key="model").set_value(model_label(at, "plain")).run()
    assert_clean(at)
    detected = plain(next(m.value for m in at.sidebar.markdown if "**Depth**" in m.value))
    assert "**Attention**: none" in detected
    assert any(name in prediction(at) for name in CLASSES)
    infos = [i.value for i in at.info]
    assert any("no attention modules" in i for i in infos), infos

    at.sidebar.selectbox(key="model").set_value(model_label(at, "bam")).run()
    assert_clean(at)
    assert "BAM hierarchy exists only" not in " ".join(i.value for i in at.info)
    assert "**Attention**: BAM" in next(
        m.value for m in at.sidebar.markdown if "**Depth**" in m.value
    )

    # two models side by side in the paper's grid
    show(at, "compare")
    labels = [model_label(at, "cbam"), model_label(at, "plain")]
    at.multiselect(key="compare").set_value(labels).run()
    assert_clean(at)


def test_switch_target_class(app):
    at = app.run()
    radio = next(r for r in at.radio if r.key.startswith("t5:"))
    top5 = list(at.dataframe[0].value["class"])
    assert radio.options == [*top5, "another class…"]
    radio.set_value(CLASSES.index(top5[1])).run()
    assert_clean(at)
    explaining = [m.value for m in at.markdown if m.value.startswith("Explaining **")]
    assert len(explaining) == 1 and explaining[0].startswith(f"Explaining **{top5[1]}**")

    # search all classes
    radio = next(r for r in at.radio if r.key.startswith("t5:"))
    radio.set_value(-1).run()
    search = next(s for s in at.selectbox if s.key.startswith("tall:"))
    last = CLASSES[-1]
    search.set_value(CLASSES.index(last)).run()
    assert_clean(at)
    explaining = [m.value for m in at.markdown if m.value.startswith("Explaining **")]
    top1 = prediction(at).split("**")[1].removeprefix("Prediction: ")
    assert explaining == [] if top1 == last else explaining[0].startswith(f"Explaining **{last}**")


def _layers(at):
    return next(m for m in at.sidebar.multiselect if m.key.startswith("layers:"))


def test_cam_options_and_bad_layers(app):
    at = app.run()
    assert _layers(at).value == ["layer1", "layer2", "layer3", "layer4"]
    for method in ("gradcam++", "hirescam", "xgradcam", "layercam"):
        at.sidebar.selectbox(key="method").set_value(method).run()
        assert_clean(at)
    _layers(at).set_value(["layer3", "layer4", "layer4.1"]).run()
    assert_clean(at)
    _layers(at).set_value([]).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["choose at least one CAM layer in the sidebar"]


def test_deletion_insertion_runs_on_demand(app):
    at = show(app.run(), "agreement")
    images = len(at.image)
    assert at.multiselect(key="di_maps").value == ["cam:layer4", "attention:layer4.1.cbam"]
    at.slider(key="di_steps").set_value(8).run()
    at.multiselect(key="di_maps").set_value(["cam:layer3", "attention:layer4.1.cbam"]).run()
    at.toggle(key="di_run").set_value(True).run()
    assert_clean(at)
    table = next(d.value for d in at.dataframe if "map" in d.value.columns)
    assert list(table["map"]) == ["Grad-CAM layer3", "attention layer4.1.cbam", "random map"]
    aucs = table[["deletion AUC (lower is better)", "insertion AUC (higher is better)"]]
    assert ((aucs >= 0) & (aucs <= 1)).all().all()
    assert len(at.image) == images + 1  # the curves figure
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Agreement table (CSV)" in labels and "Curves (CSV)" in labels


def test_download_names_carry_the_cam_method_so_methods_do_not_overwrite_each_other(
    app, deferred, monkeypatch
):
    """A walk-through saved Grad-CAM, Eigen-CAM and FullGrad figures all as `..._gradcam.png`:
    each download replaced the last in the browser's folder."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    offered, real_add = [], MediaFileManager.add  # file names of the buttons holding their bytes

    def add(self, content, mimetype, coordinates, file_name=None, *args, **kwargs):
        offered.append(file_name)
        return real_add(self, content, mimetype, coordinates, file_name, *args, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", add)
    at = show(app.run(), "cam")
    by_method = {}
    for method in ("gradcam", "gradcam++"):
        at.sidebar.selectbox(key="method").set_value(method).run()
        at.sidebar.multiselect(key="smoothing").set_value(["aug"]).run()
        deferred.names.clear(), offered.clear()
        show(at, "cam"), show(at, "agreement")
        by_method[method] = {n for n in [*deferred.names.values(), *offered] if n}
        at.sidebar.multiselect(key="smoothing").set_value([]).run()
    stem = "tiny_cbam_english_springer_4972"
    for method, tag in (("gradcam", "gradcam_aug"), ("gradcam++", "gradcampp_aug")):
        assert {f"{stem}_{tag}.png", f"{stem}_{tag}.svg", f"{stem}_{tag}_attention_lens.zip",
                f"{stem}_{tag}_agreement.csv"} <= by_method[method], by_method[method]  # fmt: skip
    assert not by_method["gradcam"] & by_method["gradcam++"]
    deferred.names.clear(), offered.clear()
    show(at, "compare")  # the comparison's grid: named by its stage (was model_grid.* for all)
    names = {n for n in [*deferred.names.values(), *offered] if n}
    assert any(n.endswith("model_grid_stage4.png") for n in names), names


def test_the_chosen_saliency_maps_survive_changing_the_method_and_the_layers(app):
    at = show(app.run(), "agreement")
    chosen = ["cam:layer4", "attention:layer4.1.cbam"]
    assert at.multiselect(key="di_maps").value == chosen
    at.sidebar.selectbox(key="method").set_value("gradcam++").run()
    assert_clean(at)
    assert at.multiselect(key="di_maps").value == chosen  # was: the CAM dropped
    layers = next(m for m in at.sidebar.multiselect if m.key.startswith("layers:"))
    layers.set_value(["layer3"]).run()  # layer4 gone: its choice goes, nothing breaks
    assert_clean(at)
    assert at.multiselect(key="di_maps").value == ["attention:layer4.1.cbam"]
    at.multiselect(key="di_maps").set_value([]).run()
    assert any("Pick at least one saliency map" in i.value for i in at.info)


def test_drawing_changes_do_not_run_the_network(app, monkeypatch):
    import viz.interactive

    calls = []
    real = viz.interactive.analyze

    def counting(*args, **kwargs):
        calls.append(kwargs.get("method"))
        return real(*args, **kwargs)

    monkeypatch.setattr(viz.interactive, "analyze", counting)
    st.cache_data.clear()
    at = app.run()
    assert_clean(at)
    first = len(calls)
    assert first >= 1
    at.sidebar.selectbox(key="cmap").set_value("viridis").run()
    at.sidebar.slider(key="alpha").set_value(0.8).run()
    at.sidebar.radio(key="scale").set_value("shared").run()
    assert_clean(at)
    assert len(calls) == first  # cached: drawing is not computing
    at.sidebar.selectbox(key="method").set_value("gradcam++").run()
    assert len(calls) > first  # a new method is a new analysis


def test_checkpoint_upload_and_failures(app, tiny_checkpoints):
    at = app.run()
    before = at.sidebar.selectbox(key="model").value
    # a broken upload: one error naming it, the model in use stays
    at.sidebar.file_uploader(key="ckpt_upload").set_value(
        ("broken.pth", b"\x80\x02 not a pickle at all", "application/octet-stream")
    ).run()
    assert not at.exception
    errors = [plain(e.value) for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("broken.pth: "), errors
    assert at.sidebar.selectbox(key="model").value == before
    assert any(name in prediction(at) for name in CLASSES)

    # a good upload becomes the model in use
    data = tiny_checkpoints["plain"].read_bytes()
    at.sidebar.file_uploader(key="ckpt_upload").set_value(
        ("mine.safetensors", data, "application/octet-stream")
    ).run()
    assert_clean(at)
    label = at.sidebar.selectbox(key="model").value
    assert "upload mine.safetensors" in label
    detected = plain(next(m.value for m in at.sidebar.markdown if "**Depth**" in m.value))
    assert "**Attention**: none" in detected and "**Source**: upload mine.safetensors" in detected

    # switching back to an embedded one still works; the upload stays available
    at.sidebar.selectbox(key="model").set_value(before).run()
    assert_clean(at)
    assert label in at.sidebar.selectbox(key="model").options


def test_checkpoint_from_server_path(app, tiny_checkpoints, tmp_path):
    at = app.run()
    before = at.sidebar.selectbox(key="model").value
    at.sidebar.text_input(key="ckpt_path").set_value(str(tmp_path / "missing.pth")).run()
    at.button(key="ckpt_path_load").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "missing.pth" in at.error[0].value
    assert at.sidebar.selectbox(key="model").value == before

    at.sidebar.text_input(key="ckpt_path").set_value(str(tiny_checkpoints["bam"])).run()
    at.button(key="ckpt_path_load").click().run()
    assert_clean(at)
    assert "resnet18_bam_tiny.safetensors" in at.sidebar.selectbox(key="model").value


def test_no_embedded_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    infos = [i.value for i in at.info]
    assert len(infos) == 1 and infos[0].startswith("No embedded checkpoint in ")
    assert at.sidebar.file_uploader(key="ckpt_upload") is not None
    assert at.sidebar.text_input(key="ckpt_path") is not None


def test_class_statistics_on_a_folder(app, tmp_path):
    for cls, sample in (("tench", "tench_12881.jpg"), ("church", "church_29612.jpg")):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / sample).write_bytes(sample_bytes(sample))
    at = show(app.run(), "stats")
    images = len(at.image)
    at.text_input(key="stats_folder").set_value(str(tmp_path)).run()
    at.button(key="stats_run").click().run()
    assert_clean(at)
    assert len(at.image) == images + 1
    modules = next(m for m in at.multiselect if m.key.startswith("stats_modules:"))
    # default: the last block of each stage; every module can be added
    assert modules.value == ["layer1.1.cbam", "layer2.1.cbam", "layer3.1.cbam", "layer4.1.cbam"]
    assert len(modules.options) == 8
    modules.set_value(["layer1.0.cbam", "layer4.1.cbam"]).run()
    assert_clean(at)
    assert len(at.image) == images + 1
    at.text_input(key="stats_folder").set_value(str(tmp_path / "nowhere")).run()
    at.button(key="stats_run").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "nowhere" in at.error[0].value


@pytest.mark.slow
@pytest.mark.skipif(
    not REAL_CBAM.is_file(), reason=f"the embedded checkpoint {REAL_CBAM.name} is not trained yet"
)
def test_real_embedded_cbam_checkpoint(monkeypatch):
    monkeypatch.delenv(CHECKPOINT_DIR_ENV, raising=False)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert_clean(at)
    assert "resnet18_cbam_imagenette.safetensors" in at.sidebar.selectbox(key="model").value
    # the default sample is an English springer; a trained model recognises it
    assert prediction(at).startswith("**Prediction: English springer**")


def test_unexpected_error_is_one_line_not_a_traceback(app, monkeypatch):
    import viz

    def broken(*_a, **_k):
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(viz, "analyze_images", broken)  # what the app imports
    st.cache_data.clear()  # earlier tests cached this analysis
    at = app.run()
    assert not at.exception
    assert [plain(e.value) for e in at.error] == [
        "Unexpected error (RuntimeError: simulated bug second line); the server log has details."
    ]


def test_non_default_settings_drive_the_screen_and_the_downloads(app, monkeypatch):
    import viz

    drawn = []
    real = viz.draw_image_figure

    def spy(name, crop, analysis, class_names, settings, **extra):
        drawn.append((name, settings))
        return real(name, crop, analysis, class_names, settings, **extra)

    monkeypatch.setattr(viz, "draw_image_figure", spy)  # what the app draws every figure with
    at = app.run()
    at.sidebar.selectbox(key="method").set_value("hirescam").run()
    at.sidebar.selectbox(key="cmap").set_value("viridis").run()
    at.sidebar.slider(key="alpha").set_value(0.7).run()
    at.sidebar.radio(key="scale").set_value("per-map").run()
    at.sidebar.radio(key="width").set_value("single").run()
    at.sidebar.radio(key="render").set_value("cells").run()
    assert_clean(at)
    assert "figure_settings" not in at.session_state  # no side channel: passed explicitly
    settings = drawn[-1][1]
    for view in ("channels", "cam"):
        show(at, view)
    assert {name for name, _ in drawn} >= {"overview", "gradcam", "channels"}
    assert drawn[-1][1] == settings
    assert settings == viz.FigureSettings(
        method="hirescam", layers=("layer1", "layer2", "layer3", "layer4"), cmap="viridis",
        alpha=0.7, scale="per-map", width="single", dpi=300, render="cells",
    )  # fmt: skip
    names = [b.proto.label for b in at.get("download_button")]
    assert "Everything for this image (zip)" in names


def test_compare_a_timm_network_beside_ours(app):
    import timm

    torch.manual_seed(0)
    other = timm.create_model(
        "resnet18", pretrained=False, num_classes=10, block_args={"attn_layer": "cbam"}
    )
    buf = io.BytesIO()
    torch.save(other.state_dict(), buf)
    at = app.run()
    ours = at.sidebar.selectbox(key="model").value
    at.sidebar.file_uploader(key="ckpt_upload").set_value(
        ("timm_cbam.pth", buf.getvalue(), "application/octet-stream")
    ).run()
    assert_clean(at)
    theirs = at.sidebar.selectbox(key="model").value
    assert theirs.startswith("timm resnet18+cbam")
    show(at, "compare")
    images_before = len(at.image)
    at.multiselect(key="compare").set_value([ours, theirs]).run()
    assert_clean(at)
    assert len(at.image) >= images_before  # the grid of both families is drawn
    described = plain(" ".join(m.value for m in at.sidebar.markdown))
    assert "resnet18+cbam (timm)" in described and "**Attention**: CBAM" in described


def test_data_set_report_runs_and_opens(app, tmp_path, monkeypatch):
    from streamlit.runtime.media_file_manager import MediaFileManager

    import viz

    offered, real_add = [], MediaFileManager.add  # the report files' download names

    def add(self, content, mimetype, coordinates, file_name=None, *args, **kwargs):
        offered.append(file_name)
        return real_add(self, content, mimetype, coordinates, file_name, *args, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", add)
    for cls, sample in (("tench", "tench_12881.jpg"), ("church", "church_29612.jpg")):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / sample).write_bytes(sample_bytes(sample))
    at = show(app.run(), "dataset")
    images = len(at.image)
    at.text_input(key="rep_images").set_value(str(tmp_path)).run()
    at.number_input(key="rep_sanity:8").set_value(1).run()
    at.button(key="rep_run").click().run()
    assert_clean(at)
    assert len(at.image) >= images + 2  # sanity curves and sample maps
    summary = next(d.value for d in at.dataframe if "mean [95% CI]" in d.value.columns)
    assert list(summary.columns) == ["model", "map", "metric", "n", "mean [95% CI]"]
    assert "top-1 accuracy" in set(summary["metric"])  # labels came from the class folders
    assert all(" [" in v for v in summary["mean [95% CI]"])  # the readable table, not raw CSV
    # named by model and folder (was report.html, …: a second report replaced the first's)
    names = [n for n in offered if n]
    assert f"tiny_cbam_{viz.safe_stem(tmp_path.name)}_report.html" in names, names
    # a folder that is no report: one error, the app goes on
    at.text_input(key="rep_open").set_value(str(tmp_path)).run()
    at.button(key="rep_open_go").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "not a finished report" in at.error[0].value


def test_grid_columns_take_their_class_from_the_image_not_the_model(app, monkeypatch):
    import viz.figures

    seen = []
    real = viz.figures.model_grid

    def spy(*args, **kwargs):
        seen.append(list(kwargs["column_titles"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(viz.figures, "model_grid", spy)
    at = show(app.run(), "compare")
    item = next(s for s in at.selectbox if s.key.startswith("colcls:"))
    at.file_uploader(key="grid_labels").set_value(
        ("labels.csv", b"file,label\nenglish_springer_4972.jpg,church\n", "text/csv")
    ).run()
    assert_clean(at)
    assert at.selectbox(key=item.key).value == "church" and seen[-1] == ["church"]
    # a choice made per image stays when the model in use changes
    at.selectbox(key=item.key).set_value("tench").run()
    at.sidebar.selectbox(key="model").set_value(model_label(at, "bam")).run()
    assert_clean(at)
    assert seen[-1] == ["tench"]
    # a label that no model has: a warning, and the column falls back to the model's class
    at.file_uploader(key="grid_labels").set_value(
        ("labels.csv", b"file,label\nenglish_springer_4972.jpg,zebra\n", "text/csv")
    ).run()
    assert not at.exception
    assert any("zebra" in w.value for w in at.warning)


def test_captum_attribution_runs_with_progress_on_demand(app):
    at = show(app.run(), "cam")
    images = len(at.image)
    assert at.selectbox(key="captum_method").options == [
        "Guided Grad-CAM (2 passes)", "Integrated Gradients (32 passes)",
        "Occlusion (one pass per 16-px step of a 32-px window)",
    ]  # fmt: skip
    at.toggle(key="captum_run").set_value(True).run()
    assert_clean(at)
    assert len(at.image) == images + 1
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Attribution (npz)" in labels and labels.count("PDF") >= 2  # the figure downloads too


def test_captum_panel_survives_coming_back_to_a_class_and_a_model(app):
    # a cached function that drew the progress bar failed on replay (CacheReplayClosureError)
    at = show(app.run(), "compare")
    at.multiselect(key="compare").set_value([model_label(at, "cbam"), model_label(at, "bam")])
    show(at, "cam")
    at.toggle(key="captum_run").set_value(True).run()
    assert_clean(at)
    images = len(at.image)

    def radio():
        return next(r for r in at.radio if r.key.startswith("t5:"))

    first, second = radio().options[:2]
    for choice in (second, first):  # another class, then the first one again
        radio().set_value(choice).run()
        assert_clean(at)
        assert len(at.image) == images
    cbam, plain_model = model_label(at, "cbam"), model_label(at, "plain")
    for label in (plain_model, cbam):  # model A -> B -> A
        at.sidebar.selectbox(key="model").set_value(label).run()
        assert_clean(at)
    assert len(at.image) == images
    show(at, "compare")
    assert len(at.multiselect(key="compare").value) == 2  # the comparison is not lost


def test_comparison_has_its_own_stage(app, monkeypatch):
    import viz.figures

    seen = []
    real = viz.figures.model_grid

    def spy(*args, **kwargs):
        seen.append(kwargs["stage"])
        return real(*args, **kwargs)

    monkeypatch.setattr(viz.figures, "model_grid", spy)
    at = show(app.run(), "compare")
    assert seen[-1] == 4
    at.radio(key="grid_stage").set_value(2).run()
    assert_clean(at)
    assert seen[-1] == 2
    # the sidebar's CAM layers do not limit it: analyses for the grid use every stage layer
    at.sidebar.multiselect(
        key=next(m.key for m in at.sidebar.multiselect if m.key.startswith("layers:"))
    ).set_value(["layer4"]).run()
    assert_clean(at)
    assert seen[-1] == 2


def test_addresses_in_file_text_are_shown_but_never_linked(tmp_path, monkeypatch):
    from tests.conftest import autolinks

    names = [f"https://evil.example/{i} www.evil{i}.example x{i}@evil.example" for i in range(10)]
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "links.safetensors", build_model(18, "cbam", num_classes=10).eval(),
                    class_names=names, metadata={"name": "www.evil.example model"})  # fmt: skip
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path))
    st.cache_resource.clear()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert_clean(at)
    shown = [e.value for e in (*at.markdown, *at.caption, *at.sidebar.markdown)]
    shown += [o for r in at.radio for o in r.options]
    text = "\n".join(shown)
    assert "evil.example" in text  # on the page as text...
    assert autolinks(text) == []  # ...with nothing GFM would turn into a link
    st.cache_resource.clear()


def test_a_state_dict_gets_its_class_names_from_a_file(app, tmp_path):
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(build_model(18, "cbam", num_classes=10).state_dict(), buf)  # no class names
    at = app.run()
    at.sidebar.file_uploader(key="ckpt_upload").set_value(
        ("mine.pth", buf.getvalue(), "application/octet-stream")
    ).run()
    assert_clean(at)
    assert "class " in prediction(at)  # "class 3": the file carried no names
    box = next(u for u in at.sidebar.file_uploader if u.key.startswith("names_file:"))
    box.set_value(("names.txt", "\n".join(CLASSES[:9]).encode(), "text/plain")).run()
    assert any("9 names for a model of 10 classes" in e.value for e in at.error)
    box = next(u for u in at.sidebar.file_uploader if u.key.startswith("names_file:"))
    box.set_value(("names2.txt", "\n".join(CLASSES).encode(), "text/plain")).run()
    assert not at.exception
    assert any(name in prediction(at) for name in CLASSES)


def test_sidebar_lists_each_colour_map_once_and_the_comparison_names_its_method(app):
    at = app.run()
    cmaps = at.sidebar.selectbox(key="cmap").options
    assert len(cmaps) == len(set(cmaps)) and "inferno" in cmaps
    at.sidebar.selectbox(key="method").set_value("gradcam++").run()
    show(at, "compare")
    assert any("Grad-CAM++ of the last stage" in m.value for m in at.markdown)


def test_a_slow_method_shows_progress_and_can_be_stopped(app, monkeypatch):
    """A Stop button shows with the bar while a slow method runs and goes when it ends (a late
    click would throw the finished map away); its callback puts Grad-CAM back. AppTest cannot
    click while the script runs, so the click's callback is called on the state it would get."""
    made, real_button = [], st.button

    def spy(label, *a, **k):
        made.append((label, k.get("on_click"), k.get("args")))
        return real_button(label, *a, **k)

    monkeypatch.setattr(st, "button", spy)
    at = app.run()
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer4"]).run()
    made.clear()
    at.sidebar.selectbox(key="method").set_value("ablationcam").run()
    assert_clean(at)
    ((label, on_click, args),) = [m for m in made if m[0] == "Stop"]  # shown while it ran
    assert not [b for b in at.button if b.label == "Stop"]  # and gone once it ended
    assert not at.get("progress")  # nor its bar
    state: dict = {}
    monkeypatch.setattr(st, "session_state", state)
    on_click(*args)  # what clicking Stop does, on the next run's state
    monkeypatch.undo()
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert at.sidebar.selectbox(key="method").value == "gradcam"
    assert any("Ablation-CAM stopped" in plain(i.value) for i in at.info)


def test_a_long_slow_method_asks_before_it_runs_on(app, monkeypatch):
    """A pass method measured on its first passes to need minutes is cancelled and asks: its
    cost, a Run button and one back to Grad-CAM; once run, the same settings run unasked for
    any class (also one asked about before)."""
    import viz

    real, calls = viz.analyze_images, []

    def slow_start(ckpt, images, target=None, progress=None, **k):
        calls.append(k["method"])
        if progress is None:  # a quick method
            return real(ckpt, images, target, **k)
        progress(1, 5000)  # the main pass, then a first batch of passes at 0.3 s each
        time.sleep(0.3)
        progress(2, 5000)
        time.sleep(1.0)  # long enough to be watched
        return real(ckpt, images, target, progress=progress, **k)

    monkeypatch.setattr(viz, "analyze_images", slow_start)
    at = show(app.run(), "cam")
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer4"]).run()
    at.sidebar.selectbox(key="method").set_value("scorecam").run()
    assert_clean(at)
    (warning,) = at.warning
    assert "Score-CAM needs 5,000 images through the network here: about" in plain(warning.value)
    assert "minutes" in warning.value  # 5,000 passes at ~0.3 s
    assert len(at.image) == 1 and not at.session_state["slow_jobs"]  # the input; nothing runs
    classes = next(r for r in at.radio if r.key.startswith("t5:"))
    first, other = classes.options[:2]
    classes.set_value(other).run()  # another class: asked too
    assert at.warning and calls.count("scorecam") == 2
    at.button(key="run_long").click().run()
    assert_clean(at)
    assert not at.warning and calls.count("scorecam") == 3  # cancelled twice, then run
    assert len(at.image) >= 2  # the input and the view's figures
    at.sidebar.selectbox(key="cmap").set_value("viridis").run()  # the same maps: not again
    assert calls.count("scorecam") == 3 and not at.warning
    next(r for r in at.radio if r.key.startswith("t5:")).set_value(first).run()
    assert not at.warning and calls.count("scorecam") == 4  # asked before, agreed since
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer3"]).run()  # other settings
    assert at.warning  # ask again
    at.button(key="back_to_gradcam").click().run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="method").value == "gradcam" and not at.warning
    # the view, not drawn while the page asked, is still the one chosen (in a browser it was
    # lost; AppTest kept it either way: checked there by hand)
    assert at.button_group(key="view").value == "cam"


def test_a_slow_method_runs_once_per_image_and_the_comparison_shows_grad_cam(app, analyses):
    at = app.run()
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer4"]).run()
    at.sidebar.selectbox(key="method").set_value("ablationcam").run()
    assert_clean(at)
    show(at, "compare")
    runs = [k.get("method") for k in analyses]
    assert runs.count("ablationcam") == 1  # the comparison does not run it again
    assert any("so the comparison shows Grad-CAM" in m.value for m in at.markdown)


def test_noisy_samples_reach_the_method_and_eigen_is_offered_where_it_applies(app, analyses):
    at = app.run()
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer4"]).run()
    at.sidebar.selectbox(key="method").set_value("smoothgradcam++").run()
    assert at.sidebar.number_input(key="num_samples:smoothgradcam++").value == 4
    at.sidebar.number_input(key="num_samples:smoothgradcam++").set_value(2).run()
    assert_clean(at)
    assert ("smoothgradcam++", {"num_samples": 2}) in [
        (k["method"], k.get("options")) for k in analyses
    ]
    at.sidebar.multiselect(key="smoothing").set_value(["eigen"]).run()
    at.sidebar.selectbox(key="method").set_value("eigencam").run()
    assert_clean(at)  # was: the eigen choice kept, silently doing nothing
    assert at.sidebar.multiselect(key="smoothing").value == []
    assert "eigen" not in at.sidebar.multiselect(key="smoothing").options
    assert any("principal-component smoothing is off" in plain(i.value) for i in at.info)
    assert any("the same for every class" in c.value for c in at.sidebar.caption)
    assert not [n for n in at.sidebar.number_input if n.key.startswith("num_samples:")]


def test_a_rerun_during_a_slow_method_does_not_start_it_again(app, monkeypatch, analyses):
    """Any widget change reruns the page and stops the script where it is (at a redraw of the
    bar); the slow analysis runs on in its thread and the next run waits on it."""
    import streamlit.delta_generator as dg

    stopped, real_progress = [], dg.DeltaGenerator.progress

    def stop_once(self, value, text=None):
        if text and text.startswith("Ablation-CAM") and not stopped:
            stopped.append(text)
            raise RuntimeError("stopped by a rerun")
        return real_progress(self, value, text=text)

    at = app.run()
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer4"]).run()
    monkeypatch.setattr(dg.DeltaGenerator, "progress", stop_once)
    at.sidebar.selectbox(key="method").set_value("ablationcam").run()
    assert stopped  # the run was stopped while Ablation-CAM ran
    at.sidebar.selectbox(key="cmap").set_value("viridis").run()  # a drawing change
    assert_clean(at)
    runs = [k.get("method") for k in analyses]
    assert runs.count("ablationcam") == 1  # was 2: the stopped analysis started again
    assert not at.session_state["slow_jobs"]


def test_a_slow_job_nobody_waits_on_cancels_itself(app, monkeypatch):
    """A page closed or reloaded while a slow method runs: its job stops within seconds, so it
    neither burns the CPU for nothing nor holds the model's lock against other pages."""
    import streamlit.delta_generator as dg

    gone, real_progress = [], dg.DeltaGenerator.progress

    def page_goes_away(self, value, text=None):
        if text and "passes" in text and not gone:
            gone.append(text)
            raise RuntimeError("the page went away")
        return real_progress(self, value, text=text)

    at = app.run()
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer4"]).run()
    monkeypatch.setattr(dg.DeltaGenerator, "progress", page_goes_away)
    at.sidebar.selectbox(key="method").set_value("scorecam").run()
    assert gone
    (job,) = at.session_state["slow_jobs"].values()
    deadline = time.monotonic() + 60
    while job.running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.cancelled and not job.running() and job.done < job.total  # was: ran to the end


def test_the_view_keeps_its_place_when_a_slow_method_runs(app):
    """The progress bar has a place of its own in every run, slow method or not: the view
    control stays where it was, and the chosen view stays chosen."""

    def control_at(at) -> int:
        kinds = [getattr(c, "type", "") for c in at.main.children.values()]
        return kinds.index("button_group")

    at = app.run()
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer4"]).run()
    show(at, "cam")
    quick = control_at(at)
    at.sidebar.selectbox(key="method").set_value("ablationcam").run()
    assert_clean(at)
    assert control_at(at) == quick and at.button_group(key="view").value == "cam"


def test_cam_with_every_stage_chosen_is_shown_at_the_last_one(app):
    at = app.run()
    at.sidebar.selectbox(key="method").set_value("cam").run()
    assert _layers(at).value == ["layer4"]  # CAM starts where it applies
    _layers(at).set_value(["layer1", "layer2", "layer3", "layer4"]).run()
    assert_clean(at)  # not an error for the three stages CAM cannot explain
    assert any("shown at layer4 only" in plain(i.value) for i in at.info)
    assert prediction(at)


def test_a_vision_transformer_gets_its_methods_and_heads(app, tmp_path):
    """A timm DeiT state dict opens by itself; the sidebar offers rollout, GAE and LeGrad, the
    second tab draws the heads; back on a CNN the transformer method falls back to Grad-CAM."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path / "deit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    at = app.run()
    cnn = at.sidebar.selectbox(key="model").value
    assert "attention rollout" not in at.sidebar.selectbox(key="method").options  # labels
    at.sidebar.text_input(key="ckpt_path").set_value(str(path)).run()
    at.button(key="ckpt_path_load").click().run()
    assert_clean(at)
    transformer_methods = {"attention rollout", "GAE (Chefer et al.)", "LeGrad"}
    assert transformer_methods <= set(at.sidebar.selectbox(key="method").options)
    assert "Attention heads" in views(at)
    at.sidebar.selectbox(key="method").set_value("rollout").run()
    assert_clean(at)
    (layers,) = [w for w in at.sidebar.multiselect if w.label == "Layers"]
    assert layers.disabled  # rollout is one map for the network: the layers do not apply
    # and it reads no gradient: the class explained changes nothing, and the page says so
    assert any("attention only: its map is the same for every class" in c.value
               for c in at.sidebar.caption)  # fmt: skip
    deit = at.sidebar.selectbox(key="model").value
    at.sidebar.selectbox(key="model").set_value(cnn).run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="method").value == "gradcam"
    # back on the transformer, rollout comes back (a walk-through lost it) ...
    at.sidebar.selectbox(key="model").set_value(deit).run()
    assert at.sidebar.selectbox(key="method").value == "rollout"
    # ... unless another method was chosen on the way
    at.sidebar.selectbox(key="model").set_value(cnn).run()
    at.sidebar.selectbox(key="method").set_value("gradcam++").run()
    at.sidebar.selectbox(key="model").set_value(deit).run()
    assert_clean(at)
    assert at.sidebar.selectbox(key="method").value == "gradcam++"


def test_the_layers_box_starts_where_the_method_does(app, monkeypatch):
    """Score-CAM and its kin run C forwards per layer: like `analyze` and the command line,
    the app starts them at the last stage; each default keeps its own choice."""
    import viz

    analyses, real = [], viz.analyze_images

    def asked(ckpt, images, target=None, **k):  # what the app asks for is recorded; Grad-CAM
        analyses.append(k)  # computes it (Score-CAM's 512 forwards prove nothing here)
        return real(ckpt, images, target, **{**k, "method": "gradcam"})

    monkeypatch.setattr(viz, "analyze_images", asked)
    at = app.run()
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer2", "layer3"]).run()
    at.sidebar.selectbox(key="method").set_value("scorecam").run()
    assert_clean(at)
    assert _layers(at).value == ["layer4"]
    scorecam = [k["layers"] for k in analyses if k["method"] == "scorecam"]
    assert scorecam and set(scorecam) == {("layer4",)}
    at.sidebar.selectbox(key="method").set_value("gradcam").run()
    assert _layers(at).value == ["layer2", "layer3"]  # the user's choice for Grad-CAM is kept


def test_real_embedded_vit_checkpoint(monkeypatch):
    """The embedded hybrid CNN + ViT is offered beside the CNNs and opens with its methods, its
    heads and its CNN gates' channel weights (a walk-through found no way to see those), and
    its Layers box starts at its CBAM stages and last block."""
    monkeypatch.delenv(CHECKPOINT_DIR_ENV, raising=False)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    (vit,) = [o for o in at.sidebar.selectbox(key="model").options if REAL_VIT.name in o]
    at.sidebar.selectbox(key="model").set_value(vit).run()
    assert_clean(at)
    assert "Attention heads" in views(at)
    assert prediction(at).startswith("**Prediction: ")
    trunk = [f"patch_embed.backbone.layer{i}" for i in (1, 2, 3)]
    assert _layers(at).value == [*trunk, "blocks.5.norm1"]
    import viz

    drawn, real_draw = [], viz.draw_image_figure
    monkeypatch.setattr(
        viz,
        "draw_image_figure",
        lambda kind, *a, **k: drawn.append(kind) or real_draw(kind, *a, **k),
    )
    show(at, "channels")
    figure = at.radio(key="head_figure")
    assert "Channel weights (CNN gates)" in figure.options
    figure.set_value("channels").run()
    assert_clean(at)
    assert drawn[-1] == "channels" and at.image  # the channel-weights figure, drawn
    at.sidebar.selectbox(key="method").set_value("rollout").run()
    assert_clean(at)


ZIP = "Everything for this image (zip)"


def test_the_zip_is_made_under_every_method_of_the_vision_transformer(
    vit_app, deferred, monkeypatch
):
    """Was: under rollout, GAE and LeGrad the zip failed on the server (the whole-network
    method compared with the greyed-out layer) and the page said nothing. Rollout (attention
    alone) and LeGrad (a gradient through the attention, as GAE) stand for the three; then back
    to a layer method."""
    from viz.commands import export

    real = export.figure_bytes  # every figure and format, drawn at 20 dpi (300 is tested elsewhere)
    monkeypatch.setattr(export, "figure_bytes", lambda fig, fmt, dpi=300: real(fig, fmt, dpi=20))
    at = vit_app.run()
    at.sidebar.selectbox(key="model").set_value(vit_label(at)).run()
    for method in ("rollout", "legrad", "gradcam"):
        at.sidebar.selectbox(key="method").set_value(method).run()
        assert_clean(at)
        with zipfile.ZipFile(io.BytesIO(download(at, deferred, ZIP))) as zf:
            manifest = json.loads(zf.read(next(n for n in zf.namelist() if "manifest" in n)))
            assert any(n.endswith("maps.npz") for n in zf.namelist())
        assert manifest["options"]["cam_method"] == method
    # FullGrad is one map for the whole network too, on a CNN
    at.sidebar.selectbox(key="model").set_value(model_label(at, "cbam")).run()
    at.sidebar.selectbox(key="method").set_value("fullgrad").run()
    assert_clean(at)
    with zipfile.ZipFile(io.BytesIO(download(at, deferred, ZIP))) as zf:
        assert zf.namelist()


def test_a_download_that_fails_says_so_on_the_page(app, deferred, monkeypatch):
    import viz

    def broken(*_a, **_k):
        raise RuntimeError("simulated failure\nsecond line")

    at = app.run()
    monkeypatch.setattr(viz, "image_bundle", broken)  # what the app makes the zip with
    at.run()
    assert_clean(at)
    failed = []

    def click() -> None:  # the file's request, beside the click's rerun
        try:
            download(at, deferred, ZIP)
        except RuntimeError as exc:
            failed.append(exc)

    (button,) = [b.proto for b in at.get("download_button") if b.proto.label == ZIP]
    request = threading.Thread(target=click)
    request.start()
    # the click's callback: waits for the file
    at.session_state["downloads"].settle(deferred.names[button.deferred_file_id])
    assert failed  # the rerun starts once the zip has failed...
    request.join()
    at.run()
    errors = [plain(e.value) for e in at.error]  # ...and says so, in one line
    assert len(errors) == 1 and errors[0].endswith(
        "_attention_lens.zip could not be made: RuntimeError: simulated failure second line"
    ), errors
    at.run()
    assert not at.error  # said once


def test_the_clicks_rerun_waits_for_a_file_request_that_arrives_late(monkeypatch):
    """Was: the click's rerun waited 2 s for the file's request; on a busy server it came later,
    the rerun had redrawn the button by then, and Streamlit refused it (no file, no word)."""
    from lens_app.widgets import Downloads

    downloads, said = Downloads(), []
    page = type("Errors", (), {"error": said.append})()
    downloads.report(page)  # a run starts
    made = []
    other = downloads.guarded(lambda: b"o", "other.png")
    late = threading.Timer(3.0, lambda: made.append(downloads.guarded(lambda: b"x", "f.png")()))
    late.start()
    other()  # another button's file does not end the wait
    downloads.settle("f.png")  # the click's rerun
    assert made == [b"x"]  # it went on only once the file was made
    late.join()

    monkeypatch.setattr(Downloads, "ARRIVAL_SECONDS", 0.2)
    downloads.report(page)
    started = time.monotonic()
    downloads.settle("f.png")  # no request came (Streamlit refused it): the page says so
    assert 0.2 <= time.monotonic() - started < 5
    downloads.report(page)
    assert [plain(line) for line in said] == [
        "f.png: the download did not start; click its button again"
    ]


def test_compare_a_vision_transformer_beside_a_cnn_at_every_stage(vit_app, monkeypatch):
    """Was: stages 1-3 failed with "row '…deit…' has no CAM for '(no stage 3)'" and the caption
    said "the last stage" whatever the stage."""
    import viz.figures

    drawn, masses = [], []
    real = viz.figures.model_grid

    def spy(images, rows, **kwargs):
        drawn.append({label: (an.method, list(an.cams)) for label, an in rows})
        masses.append(kwargs.get("class_token_mass"))
        return real(images, rows, **kwargs)

    monkeypatch.setattr(viz.figures, "model_grid", spy)
    at = show(vit_app.run(), "compare")
    vit = vit_label(at)
    at.multiselect(key="compare").set_value([vit, model_label(at, "cbam")]).run()
    assert_clean(at)

    def intro() -> str:
        return plain(next(m.value for m in at.markdown if "comparison" in m.value))

    assert "Grad-CAM of the last stage" in intro()
    for stage, block in ((3, "blocks.8.norm1"), (2, "blocks.5.norm1"), (1, "blocks.2.norm1")):
        at.radio(key="grid_stage").set_value(stage).run()
        assert_clean(at)
        (row,) = [v for k, v in drawn[-1].items() if "deit" in k]
        assert row == ("gradcam", [block])  # the block at the same depth
        k = int(block.split(".")[1]) + 1
        assert f"Grad-CAM at stage {stage}" in intro() and "last stage" not in intro()
        assert f"no stage {stage} (one resolution throughout): block {k} of 12 ({block})" in (
            intro()
        )
    # a whole-network method: the transformer row shows its own map at any stage
    at.sidebar.selectbox(key="model").set_value(vit).run()
    at.sidebar.selectbox(key="method").set_value("rollout").run()
    assert_clean(at)
    rows = drawn[-1]
    assert [v for k, v in rows.items() if "deit" in k] == [("rollout", ["rollout"])]
    assert [v[0] for k, v in rows.items() if "deit" not in k] == ["gradcam"]
    assert "shows its Grad-CAM at stage 1" in intro()
    # DINO's masks (offered: a picked network has a class token), at the mass chosen, the CNN
    # row n/a; then the CAMs again
    at.radio(key="grid_map").set_value("DINO masks").run()
    assert_clean(at)
    assert masses[-1] == 0.6 and any("DINO's masks" in m.value for m in at.markdown)
    assert at.radio(key="grid_stage").disabled  # the masks have no stage
    at.slider(key="grid_mass").set_value(0.8).run()
    assert masses[-1] == 0.8
    at.radio(key="grid_map").set_value("CAM").run()
    assert_clean(at)
    assert masses[-1] is None and not at.radio(key="grid_stage").disabled


def test_the_saliency_maps_follow_a_whole_network_method_and_back(vit_app):
    """Was: after rollout, GAE or LeGrad only the last block's attention stayed chosen; the
    CAM never came back and the rollout map was never offered first."""
    from viz import CAM_METHODS, network_map

    at = show(vit_app.run(), "agreement")
    at.sidebar.selectbox(key="model").set_value(vit_label(at)).run()
    assert_clean(at)
    start = at.multiselect(key="di_maps").value
    cam, gate = start
    assert cam == "cam:blocks.11.norm1" and gate.startswith("attention:blocks.11")
    for method in ("rollout", "gae", "legrad"):
        at.sidebar.selectbox(key="method").set_value(method).run()
        assert_clean(at)
        box = at.multiselect(key="di_maps")  # options as shown, the method's map first
        assert box.options[0] == CAM_METHODS[method].label
        assert box.value == [network_map(method), gate]  # its own map, by its own name
    at.sidebar.selectbox(key="method").set_value("gradcam").run()
    assert_clean(at)
    assert at.multiselect(key="di_maps").value == start  # the CAM comes back
    # a choice made under a whole-network method holds while another one is used
    at.sidebar.selectbox(key="method").set_value("rollout").run()
    at.multiselect(key="di_maps").set_value([gate]).run()
    at.sidebar.selectbox(key="method").set_value("gae").run()
    assert at.multiselect(key="di_maps").value == [gate]
    at.toggle(key="di_run").set_value(True).run()
    at.slider(key="di_steps").set_value(8).run()
    assert_clean(at)


def test_agreement_says_why_fullgrad_pairs_with_no_attention_map(app):
    """Was: "No spatial attention map to compare with FullGrad in this model" for a CBAM model
    with eight of them (found in the browser): FullGrad's one map belongs to no stage."""
    at = show(app.run(), "agreement")
    at.sidebar.selectbox(key="method").set_value("fullgrad").run()
    assert_clean(at)
    said = " ".join(i.value for i in at.info)
    assert "one map for the whole network, not one per stage" in said
    assert "No spatial attention map" not in said


def test_while_a_slow_method_runs_its_stop_is_the_only_one(app, monkeypatch):
    """Was: two Stop buttons, the app's (back to Grad-CAM) and Streamlit's (which stops the
    page, not the analysis): Streamlit's is hidden while the app's shows, and only then."""
    made, real_markdown = [], st.markdown

    def spy(body, *a, **k):
        made.append((body, k.get("unsafe_allow_html", False)))
        return real_markdown(body, *a, **k)

    monkeypatch.setattr(st, "markdown", spy)
    at = app.run()
    at.sidebar.multiselect(key=_layers(at).key).set_value(["layer4"]).run()
    assert not [b for b, _ in made if "stStatusWidget" in b]
    at.sidebar.selectbox(key="method").set_value("ablationcam").run()
    assert_clean(at)
    hidden = [(b, unsafe) for b, unsafe in made if "stStatusWidget" in b]
    assert hidden == [('<style>[data-testid="stStatusWidget"] button {display: none;}</style>',
                       True)]  # fmt: skip
    assert not [m for m in at.markdown if "stStatusWidget" in m.value]  # gone with the bar


def test_the_cam_tab_keeps_one_name_whatever_the_method(app):
    """Was: "Grad-CAM" under every method; a name that followed the method would close the tab
    at each change (the browser opens the first tab when the open one's name goes)."""
    at = app.run()
    for method in ("gradcam", "gradcam++", "eigencam", "fullgrad"):
        at.sidebar.selectbox(key="method").set_value(method).run()
        assert_clean(at)
        assert views(at)[2] == "Class activation map"


def test_a_model_without_spatial_maps_offers_no_placeholder_downloads(app):
    """Was: the plain ResNet's Spatial attention tab drew "no attention modules" as a figure
    with PNG, PDF and SVG downloads."""
    at = app.run()
    spatial = [b.proto.id for b in at.get("download_button") if ":sp:" in b.proto.id]
    assert len(spatial) == 3  # a CBAM model's spatial maps, as PNG, PDF and SVG
    at.sidebar.selectbox(key="model").set_value(model_label(at, "plain")).run()
    assert_clean(at)
    assert not [b for b in at.get("download_button") if ":sp:" in b.proto.id]
    infos = [plain(i.value) for i in at.info]
    assert any("has no attention modules: no spatial attention maps to show" in i for i in infos)
    assert "Everything for this image (zip)" in [b.proto.label for b in at.get("download_button")]


def test_data_set_report_takes_a_labels_csv_and_goes_with_the_model(app, tmp_path):
    """Was: no labels input (a flat folder, as samples/ with its labels.csv, had no accuracy),
    and the previous model's report stayed after a model switch."""
    for sample in ("tench_12881.jpg", "church_29612.jpg"):
        (tmp_path / sample).write_bytes(sample_bytes(sample))
    table = tmp_path / "labels.csv"
    table.write_text("file,label\ntench_12881.jpg,tench\nchurch_29612.jpg,church\n")
    at = show(app.run(), "dataset")
    at.text_input(key="rep_images").set_value(str(tmp_path)).run()
    assert any(str(table) in plain(c.value) for c in at.caption)  # the folder's CSV is offered
    at.text_input(key="rep_labels").set_value(str(table)).run()
    at.selectbox(key="rep_del").set_value("off").run()
    at.number_input(key="rep_sanity:8").set_value(0).run()
    at.button(key="rep_run").click().run()
    assert_clean(at)
    summary = next(d.value for d in at.dataframe if "mean [95% CI]" in d.value.columns)
    assert "top-1 accuracy" in set(summary["metric"])  # the labels came from the CSV
    assert "Summary" in [h.value for h in at.subheader]
    at.sidebar.selectbox(key="model").set_value(model_label(at, "plain")).run()
    assert_clean(at)
    assert "Summary" not in [h.value for h in at.subheader]  # that was another model's report
    assert not [d for d in at.dataframe if "mean [95% CI]" in d.value.columns]
    # a labels file that cannot be read: one error naming it
    at.text_input(key="rep_labels").set_value(str(tmp_path / "missing.csv")).run()
    at.button(key="rep_run").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "missing.csv" in at.error[0].value


def xsrf_cookie(token: bytes, mask: bytes) -> str:
    """Streamlit's XSRF cookie as a page load sets it: the browser's token, masked anew."""
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(token))
    return f"2|{mask.hex()}|{masked.hex()}|1796468913"


class Browser:
    """`st.context` as one browser's page sees it: only its cookies matter here."""

    def __init__(self, cookie: str) -> None:
        self.cookies = {"_streamlit_xsrf": cookie}


def test_a_reloaded_page_keeps_its_uploaded_images(app, monkeypatch):
    """Was: a reload (a new session, its upload box empty) dropped the uploaded images. They
    are kept on the server under a key the page's address carries, for that browser only,
    until removed."""
    mine, theirs = b"m" * 16, b"t" * 16
    monkeypatch.setattr(st, "context", Browser(xsrf_cookie(mine, b"\x01\x02\x03\x04")))
    at = app.run()
    files = [("tench.jpg", sample_bytes("tench_12881.jpg"), "image/jpeg")]
    at.sidebar.file_uploader(key="images").set_value(files).run()
    assert_clean(at)
    token = at.query_params["images"]
    assert len(token) >= 20

    def reload(address_token: str, cookie: str | None = None) -> AppTest:
        cookie = cookie or xsrf_cookie(mine, b"\x09\x08\x07\x06")  # masked anew
        monkeypatch.setattr(st, "context", Browser(cookie))
        again = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        again.query_params["images"] = address_token
        return again.run()

    def shown(page: AppTest) -> list[str]:
        return [plain(c) for img in page.image for c in img.captions if "network sees it" in c]

    worked_example = [f"{DEFAULT_SAMPLE} as the network sees it"]
    assert shown(reload(token, xsrf_cookie(theirs, b"\x01\x02\x03\x04"))) == worked_example
    again = reload(token)
    assert_clean(again)
    assert shown(again) == ["tench.jpg as the network sees it"]
    assert any("kept from before the page was reloaded" in c.value for c in again.sidebar.caption)
    assert "samples" not in [m.key for m in again.sidebar.multiselect]  # the kept one in use
    again.sidebar.button(key="forget_images").click().run()
    assert_clean(again)
    assert shown(again) == worked_example
    assert "images" not in again.query_params
    assert shown(reload(token)) == worked_example  # forgotten
    # removing the uploads from the box drops them too; a guessed key finds nothing
    at.sidebar.file_uploader(key="images").set_value(files).run()
    token = at.query_params["images"]
    at.sidebar.file_uploader(key="images").set_value([]).run()
    assert_clean(at)
    assert shown(reload(token)) == worked_example
    assert shown(reload("guessed")) == worked_example


def test_a_drawing_change_draws_only_the_view_shown(app, monkeypatch):
    """Was: `st.tabs` ran every tab on every rerun, so one opacity change drew the spatial,
    channel, CAM and model-grid figures (and every other tab's content) whatever was shown."""
    import viz
    import viz.figures

    drawn, real_draw, real_grid = [], viz.draw_image_figure, viz.figures.model_grid

    def draw(name, *args, **kwargs):
        drawn.append(name)
        return real_draw(name, *args, **kwargs)

    def grid(*args, **kwargs):
        drawn.append("model-grid")
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(viz, "draw_image_figure", draw)
    monkeypatch.setattr(viz.figures, "model_grid", grid)
    at = app.run()
    assert drawn == ["overview"]  # the first view only
    for view, figure in (("spatial", "overview"), ("cam", "gradcam"), ("compare", "model-grid")):
        show(at, view)
        drawn.clear()
        at.sidebar.slider(key="alpha").set_value(
            0.7 if at.sidebar.slider(key="alpha").value == 0.5 else 0.5
        ).run()
        assert_clean(at)
        assert drawn == [figure], (view, drawn)


def test_a_view_and_its_choices_are_kept_on_a_revisit(app):
    """Only the chosen view is drawn, yet its widgets keep their values while another view
    shows, and the chosen view stays chosen through a change of model or method."""
    at = show(app.run(), "compare")
    picks = [model_label(at, "cbam"), model_label(at, "bam")]
    at.multiselect(key="compare").set_value(picks).run()
    at.radio(key="grid_stage").set_value(2).run()
    show(at, "agreement")
    at.slider(key="di_steps").set_value(8).run()
    at.multiselect(key="di_maps").set_value(["cam:layer3"]).run()
    show(at, "spatial")
    at.sidebar.selectbox(key="model").set_value(model_label(at, "bam")).run()
    at.sidebar.selectbox(key="method").set_value("gradcam++").run()
    assert_clean(at)
    assert at.button_group(key="view").value == "spatial"
    show(at, "compare")
    assert at.multiselect(key="compare").value == picks and at.radio(key="grid_stage").value == 2
    show(at, "agreement")
    assert at.slider(key="di_steps").value == 8
    assert at.multiselect(key="di_maps").value == ["cam:layer3"]


def test_the_channel_view_stays_open_when_its_name_changes(vit_app, monkeypatch):
    """ "Channel attention" on a CNN is "Attention heads" on a transformer: the same view, kept
    open across the switch (a view known by its name would close)."""
    import viz

    drawn, real = [], viz.draw_image_figure

    def spy(name, *args, **kwargs):
        drawn.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(viz, "draw_image_figure", spy)
    at = show(vit_app.run(), "channels")
    assert views(at)[1] == "Channel attention" and drawn[-1] == "channels"
    at.sidebar.selectbox(key="model").set_value(vit_label(at)).run()
    assert_clean(at)
    assert views(at)[1] == "Attention heads"
    assert at.button_group(key="view").value == "channels" and drawn[-1] == "heads"


def test_attention_no_probe_reads_is_said_on_the_page(app, tmp_path):
    """Was: a network with attention the tool cannot read (timm's selective-kernel attention)
    showed its maps without a word; the library's warning line is said, as text."""
    import timm

    from models import ForeignArch

    torch.manual_seed(0)
    net = timm.create_model("skresnet18", pretrained=False, num_classes=10).eval()
    path = tmp_path / "sk.safetensors"
    save_checkpoint(path, net, class_names=CLASSES, arch=ForeignArch("skresnet18", "timm", 10),
                    metadata={"name": "tiny sk_net"}, dtype=torch.float16)  # fmt: skip
    at = app.run()
    assert not at.warning  # CBAM: every attention module is read
    at.sidebar.text_input(key="ckpt_path").set_value(str(path)).run()
    at.button(key="ckpt_path_load").click().run()
    assert not at.exception and not at.error
    (line,) = [w.value for w in at.warning]
    assert "tiny sk\\_net" in line  # file text escaped, never Markdown
    assert plain(line).startswith(
        "tiny sk_net: attention modules no probe reads: SelectiveKernelAttn;"
    )


def test_the_data_set_report_has_a_stop(app, tmp_path, monkeypatch):
    """Was: the report blocked the page (about 46 s on the samples) with no way to stop it. It
    runs in a job of its own with progress and one Stop, which ends it; AppTest cannot click
    while the script runs, so the Stop is clicked as it is drawn (its callback, in the run)."""
    for sample in ("tench_12881.jpg", "church_29612.jpg"):
        (tmp_path / sample).write_bytes(sample_bytes(sample))
    stops, real_button = [], st.button

    def click_stop(label, *a, **k):
        if label == "Stop" and k.get("on_click") and not stops:
            stops.append(k["args"])
            k["on_click"](*k["args"])
        return real_button(label, *a, **k)

    at = show(app.run(), "dataset")
    at.text_input(key="rep_images").set_value(str(tmp_path)).run()
    at.number_input(key="rep_sanity:8").set_value(1).run()
    monkeypatch.setattr(st, "button", click_stop)
    at.button(key="rep_run").click().run()
    assert not at.exception and not at.error
    assert stops == [("The data-set report",)]  # shown while it ran
    assert "The data-set report stopped." in [plain(i.value) for i in at.info]
    assert "Summary" not in [h.value for h in at.subheader]  # nothing half-done is shown
    assert "report_job" not in at.session_state
    assert not [b for b in at.button if b.label == "Stop"]  # gone with the run
    monkeypatch.undo()
    at.selectbox(key="rep_del").set_value("off")  # short: the full run is tested above
    at.number_input(key="rep_sanity:8").set_value(0).run()
    at.button(key="rep_run").click().run()  # and it runs to the end when left alone
    assert_clean(at)
    assert "Summary" in [h.value for h in at.subheader]


def test_a_png_download_is_made_ahead_from_the_figure_shown(app, deferred, monkeypatch):
    """The shown figure's PNG at the download dpi is made in the background: the click neither
    builds the figure again nor waits for more than that."""
    import viz

    built, real = [], viz.draw_image_figure

    def spy(name, *args, **kwargs):
        built.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(viz, "draw_image_figure", spy)
    at = app.run()
    at.sidebar.select_slider(key="dpi").set_value(150).run()
    assert_clean(at)
    before = len(built)
    # a click before the background job is done waits for it (or, not yet begun, renders it)
    made_ahead(at)
    (png,) = [b.proto for b in at.get("download_button") if b.proto.label == "PNG"]
    data = deferred[png.deferred_file_id]()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(built) == before  # not built again
    (pdf,) = [b.proto for b in at.get("download_button") if b.proto.label == "PDF"]
    assert deferred[pdf.deferred_file_id]()[:4] == b"%PDF" and len(built) == before + 1


def made_ahead(at: AppTest, limit: float = 120.0) -> None:
    """Wait until the background PNGs of the figures shown are made."""
    jobs = at.session_state["prerendered"]
    deadline = time.monotonic() + limit
    while any(job.state in ("waiting", "making") for job in jobs.values()):
        assert time.monotonic() < deadline, "background PNG not made"
        time.sleep(0.05)


def test_a_figure_shown_again_is_not_drawn_again(app, deferred, monkeypatch):
    """Was: every rerun drew its figure anew, a setting, class or view shown before too. A
    session keeps its figures (screen and download PNG) by what they show: back to an opacity,
    the same picture, its PNG download at once; a new opacity is drawn."""
    import viz

    drawn, real = [], viz.draw_image_figure

    def spy(name, *args, **kwargs):
        drawn.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(viz, "draw_image_figure", spy)
    at = app.run()
    made_ahead(at)
    first = at.image[1].proto.imgs[0].url
    at.sidebar.slider(key="alpha").set_value(0.7).run()
    made_ahead(at)
    assert drawn == ["overview", "overview"] and at.image[1].proto.imgs[0].url != first
    at.sidebar.slider(key="alpha").set_value(0.5).run()
    show(at, "cam")
    show(at, "spatial")
    assert_clean(at)
    assert drawn == ["overview", "overview", "gradcam"]  # the overview at 0.5 is not drawn again
    assert at.image[1].proto.imgs[0].url == first  # the same bytes (the media file's id)
    png = download(at, deferred, "PNG")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(drawn) == 3
    # the file is the library's, not the screen's
    assert Image.open(io.BytesIO(png)).info.get("dpi", (0,))[0] == pytest.approx(300, abs=1)


def test_a_slow_method_s_figure_is_drawn_every_time(app, monkeypatch):
    """The maps of a slow method are the session's own and may be computed anew (noisy
    samples): its figures are not kept."""
    import viz

    drawn, real = [], viz.draw_image_figure

    def spy(name, *args, **kwargs):
        drawn.append(name)
        return real(name, *args, **kwargs)

    at = app.run()
    at.sidebar.multiselect(key="smoothing").set_value(["aug"]).run()  # augmentation: slow
    made_ahead(at)
    monkeypatch.setattr(viz, "draw_image_figure", spy)
    at.sidebar.slider(key="alpha").set_value(0.7).run()
    made_ahead(at)
    at.sidebar.slider(key="alpha").set_value(0.5).run()
    assert_clean(at)
    assert drawn == ["overview", "overview"]


def test_the_screen_png_has_the_figure_files_pixels():
    """The screen's PNG (3 channels, fast zlib) shows exactly what `viz.figure_bytes` makes of
    the same figure (each drawn once: the constrained layout moves a little at a second draw)."""
    import numpy as np
    from matplotlib.figure import Figure

    import viz
    from lens_app.drawn import SCREEN_DPI, screen_png

    def figure(size):
        fig = Figure(figsize=size, layout="constrained")
        ax = fig.add_subplot(1, 2, 1)
        ax.imshow(np.random.default_rng(0).random((14, 14)), cmap="inferno")
        ax.set_title("stage 4 · block 1")
        fig.add_subplot(1, 2, 2).plot([0, 1], [1, 0.2])
        fig.colorbar(ax.images[0], ax=ax)
        return fig

    for size in ((6.9, 1.4544444), (3.3, 2.3), (6.9, 4.805)):
        mine = Image.open(io.BytesIO(screen_png(figure(size))))
        theirs = Image.open(io.BytesIO(viz.figure_bytes(figure(size), "png", dpi=SCREEN_DPI)))
        assert mine.mode == "RGB" and theirs.mode == "RGBA"
        assert mine.size == theirs.size
        assert (np.asarray(mine) == np.asarray(theirs.convert("RGB"))).all()
        assert (np.asarray(theirs)[..., 3] == 255).all()


def test_the_heap_is_frozen_once_it_grew(app, monkeypatch):
    """Streamlit collects garbage after every run (about 0.3 s over torch's and matplotlib's
    objects, holding the page's last messages): the app freezes the long-lived heap when it
    grows (first run, a model loaded), not on every run."""
    import gc

    freezes = []
    real = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freezes.append(1), real())[1])
    at = app.run()
    assert gc.get_freeze_count() > 0
    n = len(freezes)
    at.sidebar.slider(key="alpha").set_value(0.7).run()
    at.sidebar.selectbox(key="cmap").set_value("viridis").run()
    assert_clean(at)
    assert len(freezes) == n  # a drawing change: nothing new to freeze
    from lens_app.caching import Heap

    Heap.grew()  # as a model's first load does
    at.sidebar.slider(key="alpha").set_value(0.5).run()
    assert len(freezes) == n + 1


@pytest.mark.parametrize(("value", "wanted"), [("", 1), ("3", 3), ("0", None), ("many", 1)])
def test_a_network_pass_takes_one_thread_unless_told(value, wanted, monkeypatch):
    """A page's pass is one image: on busy cores two threads wait on each other (a class change
    took up to 4.7 s on 2 shared cores, 0.2 s on one thread); the operator may say otherwise."""
    from lens_app import caching

    calls = []
    monkeypatch.setenv(caching.THREADS_ENV, value)
    monkeypatch.setattr(caching.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(caching.torch, "set_num_threads", calls.append)
    caching.network_threads()
    assert calls == ([] if wanted is None else [wanted])


def test_the_attention_heads_view_draws_dino_and_token_norm_figures(vit_app):
    """Issue 39: the "Attention heads" view offers DINO's per-head figure (its block and mass
    chosen) and the registers paper's token norms beside every head."""
    at = vit_app.run()
    at.sidebar.selectbox(key="model").set_value(vit_label(at)).run()
    show(at, "channels")
    figure = at.radio(key="head_figure")
    assert figure.options == [
        "Every head", "DINO: class-token attention and its mass masks",
        "Output-token norms (registers)",
    ]  # fmt: skip
    figure.set_value("dino-heads").run()
    assert_clean(at)
    first = at.image[-1].proto.imgs[0].url
    at.slider(key="dino_mass").set_value(0.8).run()
    at.slider(key="dino-heads_block_12").set_value(3).run()
    assert_clean(at)
    assert at.image[-1].proto.imgs[0].url != first  # drawn again for block 3 at 80%
    at.radio(key="head_figure").set_value("token-norms").run()
    norms = at.image[-1].proto.imgs[0].url
    at.slider(key="norm_ratio").set_value(1.5).run()
    assert_clean(at)
    assert at.image[-1].proto.imgs[0].url not in (first, norms)
    assert [b.label for b in at.get("download_button") if "PNG" in b.label]


def _dense_checkpoint(tmp_path, name: str) -> str:
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(name, weights=None, weights_backbone=None, num_classes=6)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def _open_path(at: AppTest, path: str) -> None:
    at.sidebar.text_input(key="ckpt_path").set_value(path).run()
    at.button(key="ckpt_path_load").click().run()
    assert_clean(at)


def _said(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown) + "\n".join(i.value for i in at.info)


@pytest.mark.parametrize(
    "network, choice, words",
    [
        ("lraspp_mobilenet_v3_large", "ex:segment:", "returns a segmentation map"),
        ("fasterrcnn_mobilenet_v3_large_fpn", "ex:box:", "returns detected boxes"),
    ],
)
def test_a_segmenter_or_detector_is_explained_for_what_the_user_picks(
    app, tmp_path, monkeypatch, network, choice, words
):
    """Issue 40 in the app: the page offers the network's segments or detections instead of
    classes; the CAM view explains the pick (its region outlined), the attention views draw,
    and the class-only views say why they are empty."""
    at = app.run()
    _open_path(at, _dense_checkpoint(tmp_path, network))
    assert words in _said(at)
    (picker,) = [s for s in at.selectbox if s.key and s.key.startswith(choice)]
    assert len(picker.options) >= 1
    assert "Explaining **" in _said(at)
    for view in ("spatial", "channels", "agreement", "cam"):  # every view draws or says why not
        show(at, view)
    assert at.image  # the CAM figure
    if len(picker.options) > 1:
        at.selectbox(key=picker.key).set_value(picker.options[1]).run()
        assert_clean(at)
    assert ZIP in [b.label for b in at.download_button]
    # Compare models: each network of the kind explains the same (a classifier is left out)
    import viz.figures

    drawn, real = [], viz.figures.model_grid
    monkeypatch.setattr(viz.figures, "model_grid", lambda *a, **k: drawn.append(k) or real(*a, **k))
    show(at, "compare")
    (cbam,) = [o for o in at.multiselect(key="compare").options if o.startswith("tiny cbam")]
    at.multiselect(key="compare").set_value([*at.multiselect(key="compare").value, cbam]).run()
    assert_clean(at)
    assert "every row explains" in _said(at) and "returns class logits: left out" in _said(at)
    assert at.image and drawn[-1]["missing"] == [[]]  # one row, its own pick explained: no n/a
    assert drawn[-1]["column_titles"] == [DEFAULT_SAMPLE]
    at.sidebar.selectbox(key="model").set_value(cbam).run()  # among classifiers, the same
    assert_clean(at)
    assert f"{words}: left out." in _said(at) and at.image


def test_an_embedding_network_explains_the_likeness_to_another_image(app, tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(net.state_dict(), tmp_path / "dino_like.safetensors")  # no classifier
    at = app.run()
    _open_path(at, str(tmp_path / "dino_like.safetensors"))
    assert "returns an embedding" in _said(at)
    (source,) = [r for r in at.radio if r.key and r.key.startswith("ex:concept_source:")]
    assert source.options == ["a region of this image"]  # one image: a part of it
    assert "likeness to the region x 25-75%, y 25-75% of" in _said(at).replace("\\", "")
    show(at, "cam")
    assert at.image
    (across,) = [s for s in at.slider if s.key and s.key.startswith("ex:region_x:")]
    at.slider(key=across.key).set_value((40, 42)).run()  # too thin: said, nothing explained
    assert "at least 5% wide" in _said(at)
    show(at, "channels")  # the heads draw without a target
    assert at.image
    files = [("tench.jpg", sample_bytes("tench_12881.jpg"), "image/jpeg"),
             ("red square.png", png_bytes(), "image/png")]  # fmt: skip
    at.sidebar.file_uploader(key="images").set_value(files).run()
    assert_clean(at)
    (source,) = [r for r in at.radio if r.key and r.key.startswith("ex:concept_source:")]
    at.radio(key=source.key).set_value("another image").run()
    (picker,) = [s for s in at.selectbox if s.key and s.key.startswith("ex:concept:")]
    assert "likeness to red square.png" in _said(at).replace("\\", "")
    show(at, "cam")
    assert at.image
    show(at, "compare")  # every column explains the likeness to the same concept
    assert at.image and "the likeness to the same concept" in _said(at)


def test_a_zipped_hugging_face_folder_uploads_and_draws_its_heads(app, tmp_path):
    """Issue 39: a transformers save_pretrained folder, zipped, is a checkpoint upload like any
    other: its classes from id2label, its heads in the Attention heads view, rollout."""
    import io
    import zipfile

    import transformers as tf

    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, image_size=32, patch_size=8, num_labels=3,
                          id2label={0: "cat", 1: "dog", 2: "fox"})  # fmt: skip
    torch.manual_seed(0)
    tf.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted((tmp_path / "vit").iterdir()):
            zf.write(path, f"my-vit/{path.name}")
    at = app.run()
    at.sidebar.file_uploader(key="ckpt_upload").set_value(
        ("my-vit.zip", buffer.getvalue(), "application/zip")
    ).run()
    assert_clean(at)
    assert "upload my-vit.zip" in at.sidebar.selectbox(key="model").value
    assert any(name in prediction(at) for name in ("cat", "dog", "fox"))
    assert "Attention heads" in views(at)
    show(at, "channels")
    assert at.image
    at.sidebar.selectbox(key="method").set_value("rollout").run()
    assert_clean(at)


def test_a_noisy_methods_file_names_carry_its_sample_count():
    """SS-CAM with 35 and with 2 samples gives other maps: their downloads must not replace
    each other (a walk-through saved both as `…_sscam.png`)."""
    import viz
    from lens_app.context import cam_file_name

    assert cam_file_name(viz.FigureSettings(method="sscam", num_samples=35)) == "sscam35"
    assert cam_file_name(viz.FigureSettings(method="sscam", num_samples=2)) == "sscam2"
    plus = viz.FigureSettings(method="gradcam++", smoothing=("aug",))
    assert cam_file_name(plus) == "gradcampp_aug"
