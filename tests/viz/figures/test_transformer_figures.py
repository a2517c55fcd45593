"""The figures of vision transformers (a tiny random ViT and Swin): overview, gradcam (Grad-CAM
and rollout), heads and a model grid mixing a ResNet and a ViT, at single and double width,
with the layout checks of `test_figure_layout`; `heads` refused for a CNN; the export."""

from __future__ import annotations

import pytest
import torch
from matplotlib.text import Text
from PIL import Image

from models import Preprocess, build_model
from tests.viz.figures.test_figure_layout import LONG_NAMES, WIDTHS, _problems
from viz import analyze, figures
from viz.figures.registry import ExportError, FigureSettings, draw_image_figure

timm = pytest.importorskip("timm")

PRE = Preprocess(resize=224, crop=224)


def _image(seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(224, 224, 3, generator=gen) * 255).byte().numpy())


def _vit():
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, depth=4
    ).eval()


def _swin():
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, depths=(2, 2, 2, 2),
        embed_dim=48, num_heads=(2, 2, 4, 4),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def vit():
    return _vit()


@pytest.fixture(scope="module")
def analyses(vit):
    """{(network, method): Analysis of one image}."""
    x = PRE.batch([_image(0)])
    out = {("vit", m): analyze(vit, x, method=m) for m in ("gradcam", "rollout")}
    out["swin", "gradcam"] = analyze(_swin(), x, method="gradcam")
    return out


@pytest.fixture(scope="module")
def crop():
    return PRE.crop_image(_image(0))


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("net", ["vit", "swin"])
def test_overview_draws_each_block(analyses, crop, net, width):
    trace = analyses[net, "gradcam"].trace
    fig = figures.spatial_overview(crop, trace, width=width)
    assert _problems(fig) == []
    assert _problems(figures.spatial_overview(crop, trace, width=width, shared_scale=False)) == []
    texts = _texts(fig)
    if net == "vit":  # a ViT's blocks by their own index, no depth-quarter "stages"
        assert {f"block {k}" for k in range(4)} <= set(texts)
        assert not any(t.startswith("stage") for t in texts)
    else:
        assert sum(t.startswith("stage ") for t in texts) == 4


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("key", [("vit", "gradcam"), ("vit", "rollout"), ("swin", "gradcam")])
def test_gradcam_figure(analyses, crop, key, width):
    fig = figures.attention_vs_gradcam(crop, analyses[key], class_names=LONG_NAMES, width=width)
    assert _problems(fig) == []
    joined = " ".join(_texts(fig))
    assert "Pearson r" in joined  # every map has its attention partner and the numbers
    if key == ("vit", "rollout"):  # the network-wide map against the last block
        assert "whole network" in joined and "vs block 3" in joined


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("net", ["vit", "swin"])
def test_heads_grid(analyses, crop, net, width):
    trace = analyses[net, "gradcam"].trace
    fig = figures.attention_heads(crop, trace, width=width)
    assert _problems(fig) == []
    texts = _texts(fig)
    assert texts.count("block 0") == (1 if net == "vit" else 4)  # Swin: one per stage
    assert "2" in texts and "head" in texts  # the third head's column is numbered
    plain = figures.attention_heads(crop, trace, width=width, on_image=False, shared_scale=False)
    assert _problems(plain) == []


def test_heads_wraps_many_heads_and_refuses_a_cnn(analyses, crop):
    fig = figures.attention_heads(crop, analyses["vit", "gradcam"].trace, max_columns=2)
    assert _problems(fig) == [] and _texts(fig).count("head") == 8  # 4 blocks, 2 lines each
    cnn = build_model(18, "cbam", num_classes=10).eval()
    one = analyze(cnn, Preprocess(resize=64, crop=64).batch([_image(1)]))
    with pytest.raises(ExportError, match="heads cannot be drawn: no self-attention"):
        draw_image_figure("heads", crop, one, [], FigureSettings())
    with pytest.raises(ValueError, match="self-attention"):
        figures.attention_heads(crop, one.trace)


@pytest.mark.parametrize("width", WIDTHS)
def test_model_grid_mixes_a_resnet_and_a_vit(analyses, vit, width):
    small = Preprocess(resize=64, crop=64)
    images = [_image(0), _image(1)]
    torch.manual_seed(0)
    cnn = build_model(18, "cbam", num_classes=10).eval()
    rows = [
        ("ResNet-18 + CBAM", analyze(cnn, small.batch(images))),
        ("DeiT-tiny (4 blocks)", analyze(vit, PRE.batch(images))),
        ("DeiT-tiny, attention rollout", analyze(vit, PRE.batch(images), method="rollout")),
    ]
    crops = [small.crop_image(im) for im in images]
    fig = figures.model_grid(crops, rows, column_titles=LONG_NAMES[:2], width=width)
    assert _problems(fig) == []
    assert sum(t.startswith("P=") for t in _texts(fig)) == 6


@pytest.mark.parametrize("width", WIDTHS)
def test_model_grid_shows_dino_masks_and_a_cnn_row_as_na(vit, width):
    """The grid's DINO mode: each ViT row's last block (mean of heads) with the patches outside
    its 60%-mass mask dimmed; a CNN row has no class token: n/a, not its CAM."""
    small = Preprocess(resize=64, crop=64)
    images = [_image(0), _image(1)]
    torch.manual_seed(0)
    cnn = build_model(18, "cbam", num_classes=10).eval()
    deit = analyze(vit, PRE.batch(images))
    rows = [("ResNet-18 + CBAM", analyze(cnn, small.batch(images))), ("DeiT-tiny", deit)]
    crops = [small.crop_image(im) for im in images]
    fig = figures.model_grid(crops, rows, column_titles=LONG_NAMES[:2], width=width,
                             class_token_mass=0.6)  # fmt: skip
    assert _problems(fig) == []
    texts = _texts(fig)
    assert sum("n/a: no class" in t for t in texts) == 2  # the CNN's two cells
    assert sum(t.startswith("P=") for t in texts) == 2  # the ViT's
    assert any("holding 60% of it" in t for t in texts)
    from viz.figures.model_grid import _dino_maps

    attention, masks = _dino_maps(deit, 0.6)
    last = [r for r in deit.trace if r.layer is not None][-1]
    torch.testing.assert_close(attention, last.heads.mean(1))
    assert torch.equal(masks, figures.mass_masks(last.heads.mean(1), 0.6))


def test_export_of_a_vit_checkpoint(tmp_path, capsys):
    """The command line with rollout and with Grad-CAM (in-process: a subprocess is slow)."""
    from models import ForeignArch, save_checkpoint
    from viz.commands.cli import main

    ckpt = tmp_path / "deit_tiny_random.safetensors"  # the metadata says it has 4 blocks
    arch = ForeignArch("deit_tiny_distilled_patch16_224", "timm", 10, "self-attention",
                       {"depth": 4})  # fmt: skip
    save_checkpoint(ckpt, _vit(), arch=arch)
    _image(2).save(tmp_path / "tench.png")
    for method in ("rollout", "gradcam"):
        out = tmp_path / method
        code = main(["export", "--checkpoint", str(ckpt), "--images", str(tmp_path / "tench.png"),
                     "--out", str(out), "--figure", "overview", "heads", "gradcam", "dino-grid",
                     "--method", method, "--jobs", "1", "--dpi", "50"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 0, err
        made = {p.name for p in out.rglob("*.png")}
        assert {"overview.png", "heads.png", "gradcam.png", "dino-grid.png"} <= made, (made, err)


# --- DINO's figure (issue 39) --------------------------------------------------------------------


def test_mass_masks_keep_the_fewest_cells_holding_the_mass():
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 4, 4, generator=gen) ** 3
    for mass in (0.6, 0.25, 1.0):
        masks = figures.mass_masks(maps, mass)
        for m, keep in zip(maps, masks):
            values = m.double().flatten().sort(descending=True).values
            share = values.cumsum(0) / values.sum()
            fewest = int((share < mass - 1e-12).sum()) + 1  # brute force: the crossing cell too
            assert int(keep.sum()) == min(fewest, 16)
            assert m[keep].sum() / m.sum() >= mass - 1e-9  # holds the mass...
            assert m[keep].min() >= m[~keep].max() if (~keep).any() else True  # ...the largest
    with pytest.raises(ValueError, match="mass must be in"):
        figures.mass_masks(maps, 0.0)


@pytest.mark.parametrize("width", WIDTHS)
def test_dino_heads_at_both_widths_with_a_long_title(analyses, crop, width):
    trace = analyses["vit", "gradcam"].trace
    title = f"{LONG_NAMES[0]} · a headless DINO backbone $x$ · {LONG_NAMES[1]}"
    fig = figures.dino_heads(crop, trace, width=width, title=title)
    assert _problems(fig) == []
    texts = _texts(fig)
    assert {"head 0", "head 1", "head 2", "attention", "60% mass"} <= set(texts)
    assert any("block 3" in t for t in texts)  # the last block by default
    early = _texts(figures.dino_heads(crop, trace, width=width, block=0, mass=0.8))
    assert "80% mass" in early and any("block 0" in t for t in early)


def test_dino_heads_on_a_headless_vit_in_export_and_refusals(analyses, crop, tmp_path):
    from viz import record_attention

    torch.manual_seed(0)
    headless = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                 depth=2).eval()  # fmt: skip
    with record_attention(headless) as trace:
        with torch.no_grad():
            assert headless(PRE.batch([_image(0)])).shape == (1, 192)  # an embedding, no classes
    assert _problems(figures.dino_heads(crop, trace, width="single")) == []
    fig = draw_image_figure("dino-heads", crop, analyses["vit", "gradcam"], [], FigureSettings())
    assert _problems(fig) == []
    with pytest.raises(ExportError, match="dino-heads cannot be drawn: no class token"):
        draw_image_figure("dino-heads", crop, analyses["swin", "gradcam"], [], FigureSettings())
    with pytest.raises(ValueError, match="block must be one of 0..3"):
        figures.dino_heads(crop, analyses["vit", "gradcam"].trace, block=4)


# --- the registers figure (issue 39) -------------------------------------------------------------


def test_token_norms_are_the_blocks_output_norms_with_registers():
    from viz import record_attention
    from viz.measures.token_norms import token_norms

    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2,
                            reg_tokens=4).eval()  # fmt: skip
    outputs = []
    hook = net.blocks[1].register_forward_hook(lambda _m, _i, out: outputs.append(out))
    with record_attention(net) as trace, torch.no_grad():
        net(PRE.batch([_image(0), _image(1)]))
    hook.remove()
    rec = [r for r in trace if r.kind == "self-attention"][-1]
    torch.testing.assert_close(rec.token_norms, outputs[0].norm(dim=-1))  # 1 + 4 + 196 tokens
    got = token_norms(trace, ratio=1.05)
    patches = outputs[0][:, 5:].norm(dim=-1).reshape(2, 14, 14)
    torch.testing.assert_close(got.patches, patches)
    median = patches.flatten(1).median(1).values
    assert torch.equal(got.outliers, patches > 1.05 * median[:, None, None])
    assert got.others == 4 and got.outliers.any()
    torch.testing.assert_close(got.prefix_share, rec.attention[:, :, 0, 1:5].sum(-1).mean(1))
    assert 0 < float(got.outlier_fraction[0]) < 1


@pytest.mark.parametrize("width", WIDTHS)
def test_token_norms_figure_at_both_widths_and_refusals(analyses, crop, width):
    trace = analyses["vit", "gradcam"].trace
    title = f"{LONG_NAMES[0]} · $x$ · {LONG_NAMES[1]}"
    fig = figures.token_norms(crop, trace, width=width, title=title, ratio=1.05)
    assert _problems(fig) == []
    joined = " ".join(_texts(fig)).replace("\n", " ")
    assert "above 1.05× the median norm" in joined and "after block 3" in joined
    assert "1 other prefix token" in joined  # DeiT's distillation token
    with pytest.raises(ExportError, match="token-norms cannot be drawn: no global self-attention"):
        draw_image_figure("token-norms", crop, analyses["swin", "gradcam"], [], FigureSettings())
    with pytest.raises(ValueError, match="ratio must be above 1"):
        figures.token_norms(crop, trace, ratio=1.0)


@pytest.fixture(scope="module")
def hybrid_analysis():
    from models.networks.hybrid import build_hybrid

    torch.manual_seed(0)
    return analyze(build_hybrid(10).eval(), PRE.batch([_image(0)]))


@pytest.mark.parametrize("width", WIDTHS)
def test_a_hybrids_overview_scales_gates_and_attention_apart(crop, hybrid_analysis, width):
    """Was: one shared scale for CBAM's gates (0-1) and the blocks' probabilities (~1/196), so
    the transformer's maps were a flat wash: each unit now has its own scale and colour bar."""
    analysis = hybrid_analysis
    fig = figures.spatial_overview(crop, analysis.trace, width=width)
    assert _problems(fig) == []
    bars = [ax for ax in fig.axes if ax.get_xlabel()]
    labels = [ax.get_xlabel().replace("\n", " ") for ax in bars]
    assert len(bars) == 2 and "CBAM" in labels[0] and "class-token attention" in labels[1]
    top = [float(ax.get_xlim()[1]) for ax in bars]
    assert top[1] < 0.5 < top[0]  # probabilities on their own, far smaller, range
    # its CAM figure: the trunk's long layer names and CBAM modules by the end of their names
    # (was: the rows' headings ran off the page's left edge; "vs block 1" meant layer3.1.cbam)
    fig = figures.attention_vs_gradcam(crop, analysis, class_names=[str(k) for k in range(10)],
                                       width=width)  # fmt: skip
    assert _problems(fig) == []
    texts = " ".join(_texts(fig))
    assert "…backbone.layer3" in texts and "…layer3.1.cbam" in texts
