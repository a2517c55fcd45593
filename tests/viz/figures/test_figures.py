"""Paper figures: each builds for tiny random models of every attention type, sizes and labels."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from models import Preprocess, build_model
from tests.conftest import randomize_bn
from viz import figures
from viz.engine.cam import analyze
from viz.figures import (
    DOUBLE_COLUMN,
    SINGLE_COLUMN,
    attention_vs_gradcam,
    bam_hierarchy,
    channel_weights,
    class_channel_stats,
    model_grid,
    spatial_overview,
)
from viz.interactive import stack_analyses
from viz.measures.metrics import ChannelStats

KINDS = [None, "se", "bam", "cbam"]
PREPROCESS = Preprocess(resize=64, crop=64)


def _images(n: int = 2, seed: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((72, 90, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def _analysis(depth: int, attention: str | None, images: list[Image.Image]):
    torch.manual_seed(0)
    model = randomize_bn(build_model(depth, attention, num_classes=7)).eval()
    return analyze(model, PREPROCESS.batch(images))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return _images()


@pytest.fixture(scope="module")
def crop(images) -> Image.Image:
    return PREPROCESS.crop_image(images[0])


@pytest.fixture(scope="module")
def analyses(images) -> dict:
    """ResNet-18 of each attention type, two 64 px images each."""
    return {kind: _analysis(18, kind, images) for kind in KINDS}


def _texts(fig: Figure) -> list[str]:
    found = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    return [t for t in found if t]


def _image_count(fig: Figure) -> int:
    return sum(len(ax.images) for ax in fig.axes)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k or "plain")
def test_spatial_overview_builds_for_every_attention_type(analyses, crop, kind):
    fig = spatial_overview(crop, analyses[kind].trace, index=1)
    assert isinstance(fig, Figure)
    assert fig.get_size_inches()[0] == pytest.approx(DOUBLE_COLUMN)
    text = " ".join(_texts(fig))
    if kind == "cbam":
        assert _image_count(fig) == 1 + 8  # the input and 8 blocks
        # stage labels give each map's real grid (input 64 px: 16x16 at stride 4)
        assert {"stage 1 · 16×16", "stage 4 · 2×2", "block 0", "block 1"} <= set(_texts(fig))
        assert "M_s" in text
    elif kind == "bam":
        assert _image_count(fig) == 1 + 3
        assert r"\sigma(M_s)" in text  # BAM's M_s is a logit: the label says sigmoid
    elif kind == "se":
        assert "no spatial map" in text
    else:
        assert "no attention modules" in text


def test_spatial_overview_options(analyses, crop):
    trace = analyses["cbam"].trace
    single = spatial_overview(
        crop, trace, width="single", shared_scale=False, title="cat", alpha=0.3
    )
    assert single.get_size_inches()[0] == pytest.approx(SINGLE_COLUMN)
    assert "cat" in _texts(single)
    assert any("own min–max" in t for t in _texts(single))
    assert spatial_overview(crop, trace, width=5.0).get_size_inches()[0] == pytest.approx(5.0)
    wrapped = spatial_overview(crop, trace, max_columns=2)
    assert "stage 1 · 16×16" in _texts(wrapped)
    with pytest.raises(ValueError, match="width"):
        spatial_overview(crop, trace, width="triple")
    with pytest.raises(IndexError):
        spatial_overview(crop, trace, index=5)


def test_spatial_overview_draws_all_panels_on_one_axes(analyses, crop):
    """The speed of the overview comes from one Axes for all panels (plus the colour bar)."""
    fig = spatial_overview(crop, analyses["cbam"].trace)
    assert len(fig.axes) == 2


def test_figures_module_uses_no_pyplot_and_leaves_rcparams_alone(analyses, crop):
    source = "\n".join(f.read_text() for f in Path(figures.__file__).parent.glob("*.py"))
    assert not re.search(
        r"import matplotlib\.pyplot|from matplotlib(\.pyplot)? import pyplot|plt\.", source
    )
    before = dict(matplotlib.rcParams)
    spatial_overview(crop, analyses["cbam"].trace)
    channel_weights(analyses["bam"].trace)
    assert dict(matplotlib.rcParams) == before


@pytest.mark.parametrize("kind", ["se", "bam", "cbam"])
def test_channel_weights_builds_with_and_without_compare(analyses, kind):
    trace = analyses[kind].trace
    fig = channel_weights(trace, top_k=5)
    texts = _texts(fig)
    assert len({t for t in texts if t.startswith("c ")}) == 5  # top-5 bars labelled by channel
    both = channel_weights(trace, compare=trace, compare_index=1, labels=["cat", "dog"])
    assert {"cat", "cat − dog"} <= set(_texts(both))
    assert any("sorted by cat" in t for t in _texts(both))


def test_channel_weights_refuses_what_it_cannot_show(analyses):
    with pytest.raises(ValueError, match="no"):
        channel_weights(analyses[None].trace)
    with pytest.raises(ValueError, match="same model"):
        channel_weights(analyses["cbam"].trace, compare=analyses["se"].trace)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k or "plain")
def test_attention_vs_gradcam_builds(analyses, crop, kind):
    analysis = analyses[kind]
    fig = attention_vs_gradcam(crop, analysis, class_names=[f"k{i}" for i in range(7)])
    text = " ".join(_texts(fig))
    assert all(f"stage {s}" in text for s in range(1, 5))
    if kind in ("cbam", "bam"):
        assert "Pearson r" in text and "IoU (top 20%)" in text
    if kind == "se":
        assert "no spatial map" in text
    if kind == "bam":  # no BAM after the last stage
        assert "agreement n/a:\nno attention map\nat this stage" in _texts(fig)
    # CBAM: a module per block, so each heading names the block whose M_s is shown (the last)
    headings = [t for t in _texts(fig) if t.startswith("stage ")]
    if kind == "cbam":
        assert [h.rsplit("vs ", 1)[-1] for h in headings] == [
            f"layer{s}.1.cbam" for s in range(1, 5)
        ]
    else:  # one module per stage (BAM) or no map: nothing to tell apart
        assert len(headings) == 4 and not any("vs " in h for h in headings)
    target = int(analysis.target[0])
    assert f"target: k{target}, P={float(analysis.target_probs[0]):.3f}" in _texts(fig)


@pytest.mark.parametrize("width", ["single", "double"])
def test_attention_vs_gradcam_draws_a_block_layer_beside_the_stage_layers(images, crop, width):
    torch.manual_seed(0)
    model = randomize_bn(build_model(18, "cbam", num_classes=7)).eval()
    both = analyze(model, PREPROCESS.batch(images), cam_layers=["layer4.0", "layer4"])
    fig = attention_vs_gradcam(crop, both, width=width)
    texts = _texts(fig)
    assert any("layer4.0" in t for t in texts) and any(
        t.startswith("stage 4 · layer4\n") for t in texts
    )
    assert sum(t.startswith("Pearson r") for t in texts) == 2  # each against the stage's M_s
    assert _image_count(fig) == 4


def test_a_constant_cam_says_why_it_has_no_agreement(analyses, crop):
    an = analyses["cbam"]
    flat = dataclasses.replace(an, cams={**an.cams, "layer1": torch.zeros_like(an.cams["layer1"])})
    texts = _texts(attention_vs_gradcam(crop, flat))
    assert any(t.startswith("agreement n/a:\nconstant CAM") for t in texts)
    assert not any("nan" in t for t in texts)


def test_model_grid_mixes_depths_and_attention(images):
    crops = [PREPROCESS.crop_image(im) for im in images]
    rows = [
        ("ResNet-18 + CBAM", _analysis(18, "cbam", images)),
        ("ResNet-50", _analysis(50, None, images)),
    ]
    fig = model_grid(crops, rows, column_titles=["tench", "church"])
    texts = _texts(fig)
    assert {"tench", "church", "input", "ResNet-18 + CBAM", "ResNet-50"} <= set(texts)
    for _, analysis in rows:
        for p in analysis.target_probs.tolist():
            assert f"P={p:.2f}" in texts
    # two decimals (issue 36: five were printed)
    assert all(re.fullmatch(r"P=\d\.\d{2}", t) for t in texts if t.startswith("P="))
    assert _image_count(fig) == 2 * 3
    with pytest.raises(ValueError, match="column titles"):
        model_grid(crops, rows, column_titles=["one"])
    with pytest.raises(ValueError, match="layer9"):
        model_grid(crops, rows, column_titles=["a", "b"], layer="layer9")


def test_model_grid_long_row_labels_stay_beside_their_row(images):
    crops = [PREPROCESS.crop_image(im) for im in images] * 3
    analysis = stack_analyses([_analysis(18, "cbam", images)] * 3)
    label = "ResNet-18 + CBAM (imagenette2-224, our own training run)"
    fig = model_grid(crops, [(label, analysis)], column_titles=["a", "b"] * 3)
    renderer = FigureCanvasAgg(fig).get_renderer()
    panels = [im.get_window_extent(renderer) for im in fig.axes[0].images]
    (text,) = [t for t in fig.axes[0].texts if "ResNet-18" in t.get_text()]
    box = text.get_window_extent(renderer)
    # centred on its panel, at most into the row's own head and foot (0.15 in each)
    row = panels[-1].expanded(1.0, (panels[-1].height + 0.3 * fig.dpi) / panels[-1].height)
    assert box.x0 >= 0 and row.y0 <= box.y0 and box.y1 <= row.y1, (box, row)
    assert text.get_text().replace("\n", " ") == label


def test_model_grid_says_which_method_and_stage_it_shows(images):
    """Issue 36, item 6: the grid never said which stage or method it showed."""
    crops = [PREPROCESS.crop_image(im) for im in images]
    rows = [("ResNet-18 + CBAM", _analysis(18, "cbam", images))]
    titles = ["tench", "church"]
    assert "Grad-CAM at stage 4" in _texts(model_grid(crops, rows, column_titles=titles))
    assert "Grad-CAM at stage 2" in _texts(model_grid(crops, rows, column_titles=titles, stage=2))
    assert "Grad-CAM at layer3" in _texts(model_grid(crops, rows, column_titles=titles,
                                                     layer="layer3"))  # fmt: skip
    texts = _texts(model_grid(crops, rows, column_titles=titles, title="Figure 4"))
    assert "Figure 4 · Grad-CAM at stage 4" in texts
    # a transformer's whole-network map beside a CNN's Grad-CAM: both said, each row its own
    plain = rows[0][1]
    whole = dataclasses.replace(plain, method="gae", cams={"gae": plain.cams["layer4"]},
                                cam_stages={"gae": 0})  # fmt: skip
    fig = model_grid(crops, [rows[0], ("a ViT", whole)], column_titles=titles)
    texts = " ".join(_texts(fig))
    assert "Grad-CAM at stage 4 · GAE (Chefer et al.) for the whole network" in texts
    assert "(Grad-CAM)" in texts and "(GAE)" in texts


def test_model_grid_flags_a_constant_cam(images):
    """Issue 36, item 6: an all-zero CAM was drawn as a darkened photo with no flag."""
    crops = [PREPROCESS.crop_image(im) for im in images]
    an = _analysis(18, "bam", images)
    zero = dataclasses.replace(an, cams={k: torch.zeros_like(v) for k, v in an.cams.items()})
    fig = model_grid(crops, [("BAM", zero), ("BAM again", an)], column_titles=["a", "b"])
    texts = _texts(fig)
    assert texts.count("constant\nCAM") == 2  # the zero row's two panels, not the other row
    assert sum(t.startswith("P=") for t in texts) == 4  # P still printed under every map
    # the flagged panels show the photo itself, not one darkened by a flat colour
    drawn = [im.get_array() for ax in fig.axes for im in ax.images]
    photos = [np.asarray(c) for c in crops]
    assert sum(any(np.array_equal(d, p) for p in photos) for d in drawn) == 2 + 2  # inputs too


@pytest.mark.parametrize("depth", [18, 50])
def test_bam_hierarchy_on_bam_resnets(images, depth):
    analysis = _analysis(depth, "bam", images)
    fig = bam_hierarchy(PREPROCESS.crop_image(images[0]), analysis.trace, index=1, width="single")
    assert _image_count(fig) == 1 + 3 * 3  # input + (before, gate, after) per BAM
    texts = _texts(fig)
    assert {"F (before)", "1 + M(F)", "F′ (after)"} <= set(texts)
    assert any(t.startswith("BAM 3") for t in texts)


def test_bam_hierarchy_refuses_models_without_bam(analyses, crop):
    with pytest.raises(ValueError, match="needs a model with BAM modules; it has CBAM"):
        bam_hierarchy(crop, analyses["cbam"].trace)
    with pytest.raises(ValueError, match="no attention modules"):
        bam_hierarchy(crop, analyses[None].trace)


def test_class_channel_stats_heat_maps():
    gen = torch.Generator().manual_seed(0)
    names = ["layer1.0.se", "layer1.1.se", "layer2.1.se", "layer4.1.se"]
    means = {n: torch.rand(3, 16 * (i + 1), generator=gen) for i, n in enumerate(names)}
    means["layer4.1.se"][1] = float("nan")  # a class without images
    stages = {n: int(n[5]) for n in names}  # as channel_statistics records them
    labels = {n: f"stage {n[5]} · block {n[7]}" for n in names}
    stats = ChannelStats(
        ["tench", "church", "golf ball"], torch.tensor([2, 0, 3]), means, labels, stages
    )
    fig = class_channel_stats(stats)
    texts = _texts(fig)
    # default: the last module of each stage
    assert [t for t in texts if "(layer" in t] == [
        "stage 1 · block 1 (layer1.1.se)", "stage 2 · block 1 (layer2.1.se)",
        "stage 4 · block 1 (layer4.1.se)",
    ]  # fmt: skip
    assert "church (0)" in texts
    one = class_channel_stats(stats, modules=["layer1.0.se"], width="single", shared_scale=False)
    assert one.get_size_inches()[0] == pytest.approx(SINGLE_COLUMN)
    with pytest.raises(ValueError, match="unknown modules"):
        class_channel_stats(stats, modules=["layer9.0.se"])


def test_bam_hierarchy_needs_feature_means(images):
    from viz.engine.trace import record_attention

    assert all(r.feature_in is not None for r in _analysis(18, "bam", images).trace)
    torch.manual_seed(0)
    net = randomize_bn(build_model(18, "bam", num_classes=3)).eval()
    x = PREPROCESS.batch(images)
    with torch.no_grad(), record_attention(net) as trace:
        net(x)
    with pytest.raises(ValueError, match="feature_means=True"):
        bam_hierarchy(PREPROCESS.crop_image(images[0]), trace)
    with torch.no_grad(), record_attention(net, feature_means=True) as trace:
        net(x)
    assert isinstance(bam_hierarchy(PREPROCESS.crop_image(images[0]), trace), Figure)


def test_cells_rendering_shows_each_cell_flat_with_the_grid():
    from viz.engine.maps import cell_grid, overlay

    m = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    photo = Image.new("RGB", (64, 64), (0, 0, 0))
    smooth = np.asarray(overlay(photo, m, "viridis", alpha=1.0))
    cells = np.asarray(overlay(photo, m, "viridis", alpha=1.0, render="cells"))
    grid = cell_grid((2, 2), (64, 64))
    assert grid[32].all() and grid[:, 32].all() and grid.sum() == 64 + 64 - 1  # one cross
    # inside each cell a single colour, the cell's own; the smooth map has a gradient
    for (r, c), v in {(0, 0): 0.0, (0, 1): 1.0, (1, 0): 0.5, (1, 1): 0.25}.items():
        inside = [slice(0, 32), slice(33, 64)]  # row/column 32 holds the grid line
        block = cells[inside[r], inside[c]].reshape(-1, 3)
        assert len(np.unique(block, axis=0)) == 1
        want = np.round(np.asarray(matplotlib.colormaps["viridis"](v)[:3]) * 255)
        assert np.abs(block[0] - want).max() <= 1
    assert len(np.unique(smooth[:31, :31].reshape(-1, 3), axis=0)) > 10
    # the grid is drawn in grey over the colours, a 7x7 map at 224 px gets 6 + 6 lines
    assert not np.array_equal(cells[32], cells[31])
    assert cell_grid((7, 7), (224, 224))[:, 0].sum() == 6
    assert not cell_grid((1, 1), (50, 50)).any()
    with pytest.raises(ValueError, match="render must be"):
        overlay(photo, m, render="blocky")


def test_every_map_figure_takes_the_cells_rendering(analyses, crop):
    from viz.figures import attention_vs_gradcam, bam_hierarchy, model_grid, spatial_overview

    an = analyses["cbam"]
    for fig in (
        spatial_overview(crop, an.trace, render="cells"),
        attention_vs_gradcam(crop, an, render="cells"),
        model_grid([crop], [("cbam", an.select(0))], column_titles=["x"], render="cells"),
        bam_hierarchy(crop, analyses["bam"].trace, render="cells"),
    ):
        assert isinstance(fig, Figure)


def test_model_grid_shows_the_chosen_stage_of_every_row(analyses, crop, monkeypatch):
    import sys

    grid_module = sys.modules["viz.figures.model_grid"]  # the package exports the function

    drawn = []
    real = grid_module.overlay

    def spy(pic, m, *args, **kwargs):
        drawn.append(m.shape)
        return real(pic, m, *args, **kwargs)

    monkeypatch.setattr(grid_module, "overlay", spy)
    rows = [("cbam", analyses["cbam"].select(0)), ("se", analyses["se"].select(0))]
    model_grid([crop], rows, column_titles=["x"], stage=3)
    expected = analyses["cbam"].cams["layer3"].shape[-2:]
    assert drawn == [expected, expected]
    with pytest.raises(ValueError, match="no stage 7"):
        model_grid([crop], rows, column_titles=["x"], stage=7)
