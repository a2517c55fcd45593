"""Every figure at single (3.3 in) and double (6.9 in) column width, with 6 images, 4 models and
long class names: no text overlapping other text, none off the page, no font under 6 pt.

Text extents come from matplotlib's own renderer (what the PDF and PNG will show).
"""

from __future__ import annotations

import dataclasses
import itertools

import matplotlib
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from PIL import Image

from models import Preprocess, build_model
from tests.conftest import randomize_bn
from viz import analyze, figures
from viz.measures.metrics import ChannelStats

LONG_NAMES = [
    "English springer spaniel (long-haired)", "cassette player with a very long name",
    "chain saw", "church or cathedral building", "French horn", "garbage truck",
]  # fmt: skip
PRE = Preprocess(resize=64, crop=64)
MIN_POINTS = 6


def _images() -> list[Image.Image]:
    gen = torch.Generator().manual_seed(0)
    return [
        Image.fromarray((torch.rand(64, 64, 3, generator=gen) * 255).byte().numpy())
        for _ in range(6)
    ]


@pytest.fixture(scope="module")
def models():
    out = {}
    for kind in (None, "se", "bam", "cbam"):
        torch.manual_seed(0)
        out[kind] = randomize_bn(build_model(18, kind, num_classes=6)).eval()
    return out


@pytest.fixture(scope="module")
def analyses(models):
    x = PRE.batch(_images())
    return {k: analyze(m, x, target=1) for k, m in models.items()}


def _texts(fig):
    canvas = FigureCanvasAgg(fig)
    with matplotlib.rc_context(figures.FIGURE_STYLE):  # as figure_bytes draws it
        canvas.draw()
    renderer = canvas.get_renderer()
    found = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        found.append((t, t.get_window_extent(renderer)))
    return found, fig.bbox


def _problems(fig) -> list[str]:
    texts, page = _texts(fig)
    problems = []
    for t, box in texts:
        if t.get_fontsize() < MIN_POINTS - 1e-6:
            problems.append(f"{t.get_text()!r} at {t.get_fontsize():.1f} pt")
        if (
            box.x0 < page.x0 - 1
            or box.y0 < page.y0 - 1
            or box.x1 > page.x1 + 1
            or box.y1 > page.y1 + 1
        ):
            problems.append(f"{t.get_text()!r} runs off the page")
    for (a, ba), (b, bb) in itertools.combinations(texts, 2):
        w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
        h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
        if w > 0.5 and h > 0.5:  # pixels at 100 dpi: more than a touch
            problems.append(f"{a.get_text()!r} overlaps {b.get_text()!r}")
    return problems


WIDTHS = ["single", "double"]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", [None, "se", "bam", "cbam"])
def test_overview_and_gradcam_figures(analyses, width, kind):
    crop = PRE.crop_image(_images()[0])
    one = analyses[kind]
    for fig in (
        figures.spatial_overview(crop, one.trace, width=width),
        figures.attention_vs_gradcam(crop, one, class_names=LONG_NAMES, width=width),
    ):
        assert _problems(fig) == []


@pytest.mark.parametrize("width", WIDTHS)
def test_hybrid_overview_at_per_map_scale(width):
    """CBAM gates and self-attention in one figure, each map its own min-max: the one colour
    bar's long label was cut on both sides at single width (a walk-through's PDF)."""
    from models.networks.hybrid import build_hybrid
    from viz import record_attention

    torch.manual_seed(0)
    model = build_hybrid(6, depth=2).eval()
    pre = Preprocess(resize=224, crop=224)
    image = _images()[0].resize((224, 224))
    with torch.no_grad(), record_attention(model) as trace:
        model(pre.batch([image]))
    fig = figures.spatial_overview(pre.crop_image(image), trace, width=width, shared_scale=False)
    assert _problems(fig) == []


def test_one_layer_gradcam_figure_uses_a_double_columns_width(models):
    from matplotlib.image import AxesImage

    crop = PRE.crop_image(_images()[0])
    one = analyze(models["cbam"], PRE.batch(_images()[:1]), target=1, cam_layers=["layer4"])
    fig = figures.attention_vs_gradcam(crop, one, class_names=LONG_NAMES, width="double")
    assert _problems(fig) == []
    FigureCanvasAgg(fig).draw()
    texts, page = _texts(fig)
    boxes = [im.get_window_extent() for im in fig.findobj(AxesImage)] + [b for _, b in texts]
    left, right = min(b.x0 for b in boxes), max(b.x1 for b in boxes)
    assert (right - left) / page.width > 0.8  # was 0.55: panels capped as for many rows


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["se", "bam", "cbam"])
def test_channel_figures(analyses, width, kind):
    trace = analyses[kind].trace
    assert _problems(figures.channel_weights(trace, width=width)) == []
    compare = figures.channel_weights(
        trace, compare=trace, compare_index=1, labels=["tench, image one", "tench, image two"],
        width=width,
    )  # fmt: skip
    assert _problems(compare) == []


@pytest.mark.parametrize("width", WIDTHS)
def test_model_grid_with_six_images_and_four_models(analyses, width):
    crops = [PRE.crop_image(im) for im in _images()]
    rows = [
        ("ResNet-18 (plain, our embedded baseline)", analyses[None]),
        ("ResNet-18 + SE", analyses["se"]),
        ("ResNet-18 + BAM (official product fusion)", analyses["bam"]),
        ("ResNet-18 + CBAM", analyses["cbam"]),
    ]
    fig = figures.model_grid(crops, rows, column_titles=LONG_NAMES, width=width)
    assert _problems(fig) == []


@pytest.mark.parametrize("width", WIDTHS)
def test_model_grid_with_a_long_timm_name_keeps_each_label_in_its_row(analyses, width):
    """Issue 36, item 6: the DeiT row's label (a long timm name) ran into the next row at a
    single column's width (19 overlapping characters)."""
    crops = [PRE.crop_image(im) for im in _images()]
    rows = [
        ("ResNet-18 (imagenette2-224)", analyses[None]),
        ("ResNet-18 + SE (imagenette2-224)", analyses["se"]),
        ("ResNet-18 + BAM (imagenette2-224)", analyses["bam"]),
        ("ResNet-18 + CBAM (imagenette2-224)", analyses["cbam"]),
        ("timm deit_tiny_distilled_patch16_224 (distilled) (imagenette2)", analyses["cbam"]),
    ]
    fig = figures.model_grid(crops, rows, column_titles=LONG_NAMES, width=width)
    assert _problems(fig) == []
    texts, _ = _texts(fig)
    deit = [t.get_text() for t, _ in texts if "deit_tiny" in t.get_text()]
    assert len(deit) == 1 and deit[0].replace("\n", "").replace(" ", "") == (
        "timmdeit_tiny_distilled_patch16_224(distilled)(imagenette2)"
    )  # wrapped, not cut
    # two methods in one grid (a CNN's Grad-CAM beside a ViT's GAE): the heading says both
    whole = dataclasses.replace(analyses["cbam"], method="gae", cam_stages={"gae": 0},
                                cams={"gae": analyses["cbam"].cams["layer4"]})  # fmt: skip
    mixed = [*rows[:4], (rows[4][0], whole)]
    assert _problems(figures.model_grid(crops, mixed, column_titles=LONG_NAMES, width=width)) == []


@pytest.mark.parametrize("width", WIDTHS)
def test_bam_hierarchy(analyses, width):
    fig = figures.bam_hierarchy(PRE.crop_image(_images()[0]), analyses["bam"].trace, width=width)
    assert _problems(fig) == []


@pytest.mark.parametrize("width", WIDTHS)
def test_class_statistics(width):
    gen = torch.Generator().manual_seed(0)
    names = ["layer1.1.se", "layer2.1.se", "layer3.1.se", "layer4.1.se"]
    means = {n: torch.rand(6, 64 * 2**i, generator=gen) for i, n in enumerate(names)}
    stats = ChannelStats(
        LONG_NAMES, torch.tensor([3, 4, 5, 6, 7, 8]), means,
        {n: f"stage {i + 1} · block 1" for i, n in enumerate(names)},
        {n: i + 1 for i, n in enumerate(names)},
    )  # fmt: skip
    assert _problems(figures.class_channel_stats(stats, width=width)) == []


def test_model_grid_shows_na_where_a_model_lacks_the_class(analyses):
    crops = [PRE.crop_image(im) for im in _images()[:3]]
    rows = [("ours", analyses["cbam"].select(0)), ("other", analyses["se"].select(0))]
    rows = [(label, _stack(an, 3)) for label, an in rows]
    fig = figures.model_grid(crops, rows, column_titles=["a", "b", "c"], missing=[[], [1]])
    texts = [t.get_text() for t in fig.findobj(Text)]
    assert sum("n/a" in t for t in texts) == 1
    assert sum(t.startswith("P=") for t in texts) == 5  # 6 cells, one of them n/a
    with pytest.raises(ValueError, match="missing has 1 entries for 2 rows"):
        figures.model_grid(crops, rows, column_titles=["a", "b", "c"], missing=[[]])


def _stack(one, n):
    from viz.interactive import stack_analyses

    return stack_analyses([one] * n)


def _causal(n_maps: int):
    from viz.measures.metrics import DeletionInsertion

    gen = torch.Generator().manual_seed(0)
    f = torch.linspace(0, 1, 17)
    out = {}
    for i in range(n_maps):
        d, ins = torch.rand(1, 17, generator=gen), torch.rand(1, 17, generator=gen)
        out[i] = DeletionInsertion(d.mean(1), ins.mean(1), f, d, ins, torch.tensor([1]))
    return list(out.values())


@pytest.mark.parametrize("width", WIDTHS)
def test_deletion_insertion_curves_with_long_map_names(width):
    names = ["Grad-CAM++ layer4 (a rather long layer name)", "attention layer4.1.cbam spatial gate",
             "attention features.7.0.block.2 squeeze-excitation", figures.RANDOM_LABEL]  # fmt: skip
    fig = figures.deletion_insertion_curves(dict(zip(names, _causal(4))), width=width,
                                            title=LONG_NAMES[1])  # fmt: skip
    assert _problems(fig) == []


@pytest.mark.parametrize("width", WIDTHS)
def test_attribution_map(width):
    gen = torch.Generator().manual_seed(0)
    heavy = torch.randn(64, 64, generator=gen) ** 5  # heavy-tailed, as Integrated Gradients
    fig = figures.attribution_map(PRE.crop_image(_images()[0]), heavy, width=width,
                                  method_label="Integrated Gradients (32 steps, black baseline)")  # fmt: skip
    assert _problems(fig) == []


def test_attribution_map_clips_at_the_percentile():
    from viz.figures.attribution import clipped_magnitude

    values = torch.cat([torch.ones(99), torch.tensor([1000.0])]).reshape(10, 10)
    shown, clip = clipped_magnitude(-values, 99.0)
    assert clip < 20 and float(shown.max()) == clip  # one outlier no longer sets the scale
    zeros, clip = clipped_magnitude(torch.zeros(4, 4))
    assert clip == 1.0 and float(zeros.max()) == 0.0
