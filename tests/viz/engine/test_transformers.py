"""Vision transformers' self-attention (issue #26): what the tracer records equals the unfused
path's probabilities; rollout and GAE equal the formulas written out here; LeGrad equals
TorchCAM's; Grad-CAM on tokens equals a hand reshape. Small random networks, no downloads."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.probes import unregister_attention
from models.probes.selfattention import WindowGeometry, received_on_grid
from tests.conftest import leftovers, reference_rollout
from viz import analyze, record_attention, register_attention


def _timm(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()


@pytest.fixture(scope="module")
def vits() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (network, input): class token, distillation token, registers without one."""
    g = torch.Generator().manual_seed(1)
    return {
        "vit": (_timm("vit_tiny_patch16_224", depth=3), torch.randn(2, 3, 224, 224, generator=g)),
        "deit distilled": (
            _timm("deit_tiny_distilled_patch16_224", depth=3),
            torch.randn(2, 3, 224, 224, generator=g),
        ),
        "registers, avg pool, 96x128": (
            _timm("vit_little_patch16_reg4_gap_256", depth=3, dynamic_img_size=True),
            torch.randn(1, 3, 96, 128, generator=g),
        ),
    }


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    return _timm("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2), embed_dim=48,
                 num_heads=(2, 2, 4, 4))  # fmt: skip


@pytest.fixture(scope="module")
def tv_vit() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip
    nn.init.normal_(net.heads.head.weight, std=0.5)  # torchvision starts it at zero
    return net.eval()


def _unfused_probabilities(net: nn.Module, x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """timm's own unfused path on a copy: the input of each block's attn_drop."""
    copy_ = copy.deepcopy(net)
    found = []
    for block in copy_.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, a, _o: found.append(a[0]))
    with torch.no_grad():
        logits = copy_(x)
    return found, logits


@pytest.mark.parametrize("which", ["vit", "deit distilled", "registers, avg pool, 96x128"])
def test_recorded_attention_is_the_unfused_probabilities(vits, which):
    net, x = vits[which]
    with torch.no_grad():
        plain = net(x)
        with record_attention(net) as trace:
            traced = net(x)
    assert torch.equal(plain, traced)  # fused attention stays fused: bit-identical logits
    assert leftovers(net) == 0
    reference, _ = _unfused_probabilities(net, x)
    records = list(trace)
    assert [r.kind for r in records] == ["self-attention"] * 3
    prefix = net.num_prefix_tokens
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    for rec, probs in zip(records, reference):
        torch.testing.assert_close(rec.attention, probs, atol=1e-6, rtol=1e-5)
        if net.has_class_token:  # the class token's row over the patches, per head
            expected = probs[:, :, 0, prefix:]
        else:  # the mean attention each patch receives
            expected = probs[:, :, :, prefix:].mean(2)
        torch.testing.assert_close(rec.heads, expected.reshape(len(x), -1, h, w), atol=1e-6,
                                   rtol=1e-5)  # fmt: skip
        torch.testing.assert_close(rec.spatial, rec.heads.mean(1))
    assert [r.layer for r in records] == [0, 1, 2]
    assert [r.stage for r in records] == [1, 2, 3]  # depth quarters of 3 blocks


def test_maps_need_only_the_class_row_and_the_full_matrix_comes_when_read(vits):
    """Lazy attention: a record's maps cost the class token's row; (N, heads, T, T) is
    computed on first read (rollout, GAE, LeGrad), for a slice of the batch, and pickled."""
    import pickle

    from viz.engine.trace import LazyTensor

    net, x = vits["vit"]
    with torch.no_grad(), record_attention(net) as trace:
        net(x)
    rec = list(trace)[-1]
    assert isinstance(rec.attention_source, LazyTensor)
    assert rec.attention_source._value is None  # the maps were made without it
    reference, _ = _unfused_probabilities(net, x)
    second = rec.select(1)
    torch.testing.assert_close(second.attention, reference[-1][1:], atol=1e-6, rtol=1e-5)
    copied = pickle.loads(pickle.dumps(rec))
    torch.testing.assert_close(copied.attention, reference[-1], atol=1e-6, rtol=1e-5)
    assert isinstance(rec.attention_source, LazyTensor)  # still the record's own


def test_torchvision_vit_gives_per_head_weights_only_while_tracing(tv_vit):
    x = torch.randn(2, 3, 64, 64)
    weights = []

    def ask(module, args, kwargs):
        weights.append(module.forward(*args, need_weights=True, average_attn_weights=False)[1])

    with torch.no_grad():
        plain = tv_vit(x)
        with record_attention(tv_vit) as trace:
            traced = tv_vit(x)
        handles = [b.self_attention.register_forward_pre_hook(ask, with_kwargs=True)
                   for b in tv_vit.encoder.layers]  # fmt: skip
        tv_vit(x)
        for h in handles:
            h.remove()
    torch.testing.assert_close(traced, plain, atol=1e-5, rtol=1e-5)
    assert leftovers(tv_vit) == 0
    for rec, expected in zip(trace, weights):
        torch.testing.assert_close(rec.attention, expected)
        assert rec.heads.shape == (2, 2, 4, 4)


def test_swin_window_attention_is_placed_back_on_each_stage_grid(swin):
    """The probabilities equal timm's unfused softmax; the map undoes windows and shift."""
    from timm.models.swin_transformer import window_reverse

    x = torch.randn(1, 3, 224, 224)
    copy_ = copy.deepcopy(swin)
    expected = []
    for stage in copy_.layers:
        for block in stage.blocks:
            block.attn.fused_attn = False

            def keep(_m, _a, probs, block=block):  # received per token, back on the grid
                ws, (sh, sw) = block.window_size, block.shift_size
                received = probs.mean(-2)  # (windows, heads, w*w)
                heads = received.shape[1]
                windows = received.permute(0, 2, 1).reshape(-1, ws[0], ws[1], heads)
                h, w = block.input_resolution
                grid = window_reverse(windows, ws, h, w)  # (1, H, W, heads)
                grid = torch.roll(grid, shifts=(sh, sw), dims=(1, 2))
                expected.append(grid.permute(0, 3, 1, 2))

            block.attn.softmax.register_forward_hook(keep)
    with torch.no_grad():
        plain = swin(x)
        with record_attention(swin) as trace:
            traced = swin(x)
        copy_(x)
    assert torch.equal(plain, traced)
    records = list(trace)
    assert len(records) == 8 and all(r.attention is None for r in records)
    assert [r.stage for r in records] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [r.spatial.shape[-1] for r in records] == [56, 56, 28, 28, 14, 14, 7, 7]
    assert any(any(b.shift_size) for s in swin.layers for b in s.blocks)  # shifts are tested
    for rec, grid in zip(records, expected):
        torch.testing.assert_close(rec.heads, grid, atol=1e-6, rtol=1e-5)


def test_torchvision_swin_recomputed_attention_equals_its_softmax(monkeypatch):
    """torchvision's Swin attention is functional: the reader recomputes it from the block's
    input; compared with the probabilities its own softmax produced (caught in this test)."""
    from torchvision.models import swin_transformer as tv_swin

    torch.manual_seed(0)
    net = torchvision.models.swin_t(num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), record_attention(net) as trace:
        net(x)
    records = list(trace)
    caught = []
    softmax = F.softmax

    def catching(t, dim=None, **kw):
        out = softmax(t, dim=dim, **kw)
        caught.append(out)
        return out

    monkeypatch.setattr(tv_swin.F, "softmax", catching)
    with torch.no_grad():
        net(x)
    modules = [m for m in net.modules() if isinstance(m, tv_swin.ShiftedWindowAttention)]
    assert len(caught) == len(records) == len(modules) == 12
    for rec, probs, module in zip(records, caught, modules):
        side = rec.spatial.shape[-1]  # 56, 28, 14, 7: no padding at 224 px
        ws = module.window_size[0]
        shift = module.shift_size[0] if ws < side else 0
        received = probs.mean(-2)  # (windows, heads, w*w)
        heads = received.shape[1]
        grid = received.reshape(side // ws, side // ws, heads, ws, ws)
        grid = grid.permute(2, 0, 3, 1, 4).reshape(1, heads, side, side)
        grid = torch.roll(grid, shifts=(shift, shift), dims=(2, 3))  # torchvision shifted by -s
        torch.testing.assert_close(rec.heads, grid, atol=1e-6, rtol=1e-5)
    assert [r.spatial.shape[-1] for r in records] == [56] * 2 + [28] * 2 + [14] * 6 + [7] * 2


@pytest.mark.parametrize("which", ["deit distilled", "registers, avg pool, 96x128"])
def test_rollout_and_gae_equal_the_formulas(vits, which):
    net, x = vits[which]
    prefix, cls = net.num_prefix_tokens, net.has_class_token
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    # unfused copy with the probabilities' gradients kept: Chefer et al. on their own terms
    copy_ = copy.deepcopy(net)
    probs = []
    for block in copy_.blocks:
        block.attn.fused_attn = False

        def keep(_m, _a, out):
            out.retain_grad()
            probs.append(out)

        block.attn.attn_drop.register_forward_hook(keep)
    logits = copy_(x)
    target = logits.argmax(1)
    logits.gather(1, target[:, None]).sum().backward()

    got = analyze(net, x, method="rollout")
    expected = reference_rollout([p.detach() for p in probs], prefix, cls)
    torch.testing.assert_close(got.cams["rollout"], expected.float().reshape(len(x), h, w))
    assert got.cam_stages == {"rollout": 0}

    relevance = torch.eye(probs[0].shape[-1], dtype=torch.float64).expand(len(x), -1, -1)
    for a in probs:
        relevance = relevance + torch.relu(a.grad.double() * a.double()).mean(1) @ relevance
    rows = relevance[:, 0, prefix:] if cls else relevance[:, prefix:, prefix:].mean(1)
    got = analyze(net, x, method="gae")
    scale = rows.abs().max()
    torch.testing.assert_close(got.cams["gae"] / scale, (rows / scale).float().reshape(len(x), h, w),
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    assert torch.equal(got.target, target)


def test_rollout_options(vits):
    net, x = vits["vit"]
    base = analyze(net, x, method="rollout").cams["rollout"]
    for options in ({"head_fusion": "max"}, {"discard": 0.5}, {"start_block": 1}):
        assert not torch.allclose(
            analyze(net, x, method="rollout", options=options).cams["rollout"], base
        )
    with pytest.raises(ValueError, match="head_fusion"):
        analyze(net, x, method="rollout", options={"head_fusion": "median"})
    with pytest.raises(ValueError, match="start"):
        analyze(net, x, method="rollout", options={"start_block": 3})


def test_legrad_equals_torchcam(tv_vit):
    from torchcam.methods import LeGrad

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ours = analyze(tv_vit, x, method="legrad")
    with LeGrad(tv_vit, list(tv_vit.encoder.layers)) as extractor:
        scores = tv_vit(x)
        theirs = extractor(ours.target.tolist(), scores, normalized=False)[0]
    assert ours.cams["legrad"].abs().max() > 0
    torch.testing.assert_close(ours.cams["legrad"], theirs, atol=1e-6, rtol=1e-4)
    assert leftovers(tv_vit) == 0


def test_legrad_of_a_callable_scores_each_block_through_the_head(tv_vit):
    """An output entry (RawScore) gives the class's LeGrad; a headless ViT explains the
    likeness to a concept through its final norm."""
    from viz.targets import RawScore, SegmentationScore, SimilarityScore

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    by_class = analyze(tv_vit, x, 4, method="legrad").cams["legrad"]
    torch.testing.assert_close(analyze(tv_vit, x, RawScore(4), method="legrad").cams["legrad"],
                               by_class)  # fmt: skip
    headless = copy.deepcopy(tv_vit)
    headless.heads = nn.Identity()
    with torch.no_grad():
        concept = headless(x).flip(0)  # each image against the other's embedding
    maps = analyze(headless, x, SimilarityScore(concept), method="legrad").cams["legrad"]
    assert maps.shape == (2, 4, 4) and (maps >= 0).all() and maps.flatten(1).std(1).min() > 0
    with pytest.raises(ValueError, match="needs a segmentation output"):  # one line, as ever
        analyze(headless, x, SegmentationScore(0), method="legrad")


def test_gradcam_on_tokens_equals_a_hand_reshape(vits, swin):
    net, x = vits["deit distilled"]
    kept = {}
    layer = net.blocks[-1].norm1
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.setdefault("t", out))
    logits = net(x)
    handle.remove()
    tokens = kept["t"]
    (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1)[:, None]).sum(), tokens)
    to_map = lambda t: t[:, 2:].transpose(1, 2).reshape(len(x), -1, 14, 14)  # noqa: E731
    acts, grads = to_map(tokens.detach()), to_map(grad)
    expected = torch.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1))
    got = analyze(net, x)  # default layer: the last block's norm1
    assert list(got.cams) == ["blocks.2.norm1"] and got.cam_stages == {"blocks.2.norm1": 4}
    torch.testing.assert_close(got.cams["blocks.2.norm1"], expected, atol=1e-6, rtol=1e-4)
    # Swin: one layer per stage, channels-last maps recognised
    maps = analyze(swin, torch.randn(1, 3, 224, 224)).cams
    assert list(maps) == [f"layers.{i}" for i in range(4)]
    assert [m.shape[-1] for m in maps.values()] == [56, 28, 14, 7]


def test_window_attention_has_no_rollout(swin):
    with pytest.raises(ValueError, match="window attention"):
        analyze(swin, torch.randn(1, 3, 224, 224), method="rollout")
    with pytest.raises(ValueError, match="no self-attention"):
        analyze(torchvision.models.resnet18(num_classes=3), torch.randn(1, 3, 64, 64), method="gae")


class _MyAttention(nn.Module):
    """A user's own attention: its softmax is a submodule."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.softmax = heads, nn.Linear(dim, 3 * dim), nn.Softmax(-1)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = self.softmax(q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5)
        return (a @ v).transpose(1, 2).reshape(n, t, c)


def test_a_users_self_attention_in_one_line():
    register_attention(_MyAttention, kind="self-attention", attention="softmax")
    try:
        net = nn.Sequential(_MyAttention(), _MyAttention())
        x = torch.randn(2, 1 + 16, 16)  # a class token and a 4x4 grid
        with torch.no_grad(), record_attention(net) as trace:
            net(x)
        assert len(trace) == 2 and trace[0].heads.shape == (2, 2, 4, 4)
        torch.testing.assert_close(trace[0].attention.sum(-1), torch.ones(2, 2, 17))
        with pytest.raises(ValueError, match="attention="):
            register_attention(_MyAttention, kind="self-attention")
    finally:
        unregister_attention(_MyAttention)


def test_multihead_attention_outside_a_vit_is_left_alone():
    """A text-style encoder (sequence-first, no patch grid) and a cross-attention call: no
    record, no error, and outputs as without tracing."""
    torch.manual_seed(0)
    encoder = nn.MultiheadAttention(16, 2).eval()  # batch_first=False
    cross = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    seq, q = torch.randn(7, 3, 16), torch.randn(3, 5, 16)
    with torch.no_grad():
        plain = (
            encoder(seq, seq, seq, need_weights=False)[0],
            cross(q, seq.transpose(0, 1), seq.transpose(0, 1))[0],
        )
        with record_attention(encoder) as a, record_attention(cross) as b:
            traced = (
                encoder(seq, seq, seq, need_weights=False)[0],
                cross(q, seq.transpose(0, 1), seq.transpose(0, 1))[0],
            )
    assert len(a) == 0 and len(b) == 0
    for x, y in zip(plain, traced):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_the_report_scores_every_block_and_the_network_map(tmp_path):
    """Deletion/insertion, localisation and the sanity check for each block's attention and
    the rollout map of a small DeiT (in-process, 2 images, few steps)."""
    from PIL import Image

    from models import ForeignArch, load_checkpoint, save_checkpoint
    from viz import ReportOptions, inputs_for, run_report

    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10,
                            depth=2)  # fmt: skip
    path = tmp_path / "deit.safetensors"
    arch = ForeignArch(
        "deit_tiny_distilled_patch16_224", "timm", 10, "self-attention", {"depth": 2}
    )
    save_checkpoint(path, net, arch=arch)
    ckpt = load_checkpoint(path)
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(160, 200, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"im{i}.png")
    (tmp_path / "boxes.csv").write_text(
        "file,x0,y0,x1,y1\nim0.png,10,10,100,90\nim1.png,50,40,190,150\n"
    )
    inputs = inputs_for([("deit", str(path), ckpt)], images, boxes=str(tmp_path / "boxes.csv"))
    options = ReportOptions(method="rollout", deletion="all", steps=2, sanity=1, batch_size=2)
    rows = run_report(inputs, tmp_path / "out", options)
    maps = {r["map"] for r in rows["per_map"]}
    # a whole-network map is named by its method (was cam/stage0)
    assert {"rollout", "attention/blocks.0.attn", "attention/blocks.1.attn"} <= maps
    assert not any(m.startswith("cam/") for m in maps)
    scored = [r for r in rows["per_map"] if r["map"] == "rollout"]
    assert all(r.get("deletion_auc") is not None for r in scored)
    assert all(r.get("pointing") is not None and r.get("energy") is not None for r in scored)
    assert {r["map"] for r in rows["sanity"]} >= {"rollout"}


def test_layer_methods_on_tokens_and_the_methods_offered(vits, swin):
    from viz import methods_for

    net, x = vits["deit distilled"]
    x = x[:1]
    for method, options in (("smoothgradcam++", {"num_samples": 2}), ("eigencam", {})):
        maps = analyze(net, x, method=method, options=options).cams
        assert maps["blocks.2.norm1"].shape == (1, 14, 14)
    with pytest.raises(ValueError, match="Ablation-CAM .* transformer"):
        analyze(net, x, method="ablationcam")
    offered = methods_for(net)
    assert {"rollout", "gae", "legrad", "scorecam"} <= set(offered)
    assert not {"cam", "fullgrad", "ablationcam"} & set(offered)
    assert "rollout" not in methods_for(swin) and "gradcam" in methods_for(swin)
    assert "rollout" not in methods_for(torchvision.models.resnet18())


def test_agreement_pairs_a_network_map_with_the_last_block(vits):
    from viz import agreement_table

    net, x = vits["vit"]
    rows = agreement_table(analyze(net, x, method="gae"), 1)
    assert [(a, b) for a, b, _ in rows] == [("blocks.2.attn", "gae")]
    assert -1 <= rows[0][2].pearson <= 1


# --- networks whose attention no probe reads (issue 36, item 3) ---------------------------------


@pytest.fixture(scope="module")
def pvt():
    """timm's PVT v2: spatial-reduction attention, which no probe reads."""
    return _timm("pvt_v2_b0")


def test_unread_attention_is_named_and_default_cams_are_feature_maps(pvt):
    from viz import UnreadAttentionWarning, network_levels, unread_attention

    assert unread_attention(pvt) == ["Attention"]
    with pytest.warns(UnreadAttentionWarning, match="no probe reads: Attention;") as seen:
        got = analyze(pvt, torch.randn(1, 3, 224, 224))
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    # EVA-02 had blocks.11.attn.k_norm (a (257, 64) token-by-channel array) and patch_embed.proj
    assert not any(".attn" in name or "patch_embed" in name for name in got.cams)
    assert [m.shape[-1] for m in got.cams.values()] == [56, 28, 14, 7]  # its four stages
    assert network_levels(pvt).stage_layer_names() == list(got.cams)
    with pytest.raises(ValueError, match="no probe reads this network's Attention"):
        with pytest.warns(UnreadAttentionWarning):
            analyze(pvt, torch.randn(1, 3, 224, 224), method="rollout")


# --- timm families read through their unfused softmax (issue 39) ---------------------------------

TIMM_FAMILIES = {
    "eva02 (rotary)": ("eva02_tiny_patch14_224", {"depth": 2}, 224),
    "beit (relative bias)": (
        "beit_base_patch16_224",
        {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 64},
        64,
    ),
    "swin v2 (cosine)": (
        "swinv2_tiny_window8_256",
        {"depths": (2, 1), "num_heads": (2, 4), "embed_dim": 32, "img_size": 64, "window_size": 4},
        64,
    ),
}


def _unfused_softmax(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What timm's own unfused path computes: every attention module's `attn_drop` input."""
    seen, handles = [], []
    for m in net.modules():
        if hasattr(m, "attn_drop") and hasattr(m, "num_heads"):
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(lambda _m, a, _o: seen.append(a[0])))
    try:
        with torch.no_grad():
            logits = net(x)
    finally:
        for h in handles:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("family", list(TIMM_FAMILIES))
def test_timm_family_records_equal_its_unfused_softmax(family):
    from viz import unread_attention

    name, options, size = TIMM_FAMILIES[family]
    net = _timm(name, **options)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    fused = [getattr(m, "fused_attn", None) for m in net.modules()]
    with torch.no_grad():
        plain = net(x)
    with record_attention(net) as trace:
        with torch.no_grad():
            traced = net(x)
    assert [getattr(m, "fused_attn", None) for m in net.modules()] == fused  # restored
    torch.testing.assert_close(traced, plain, rtol=1e-5, atol=1e-5)
    assert unread_attention(net) == []
    expected, _ = _unfused_softmax(net, x)
    records = [r for r in trace if r.kind == "self-attention"]
    blocks = [m for m in net.modules() if hasattr(m, "shift_size") and hasattr(m, "attn")]
    assert len(records) == len(expected) > 0
    for i, (rec, want) in enumerate(zip(records, expected)):
        if rec.attention is not None:  # global attention: the (N, heads, T, T) matrix itself
            torch.testing.assert_close(rec.attention, want.float(), rtol=1e-5, atol=1e-6)
        else:  # windows: each window's mean received attention, put back on the grid
            h, w = rec.heads.shape[-2:]
            block = blocks[i]
            geo = WindowGeometry(h, w, tuple(block.window_size), tuple(block.shift_size), True)
            torch.testing.assert_close(rec.heads, received_on_grid(want.float(), geo, 2))
    if blocks:
        assert any(any(b.shift_size) for b in blocks)  # a shifted window was compared too


def test_cait_records_are_its_softmax_on_the_network_tokens():
    """CaiT: the talking-heads blocks' (P, P) softmax padded with the class token's identity
    (it joins later), the class-attention blocks' (1, T) row above the patches' identity."""
    from viz import unread_attention

    net = _timm("cait_xxs24_224", depth=2)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = net(x)
    with record_attention(net) as trace:
        with torch.no_grad():
            torch.testing.assert_close(net(x), plain, rtol=1e-5, atol=1e-5)
    assert unread_attention(net) == []
    expected, _ = _unfused_softmax(net, x)
    records = [r for r in trace if r.kind == "self-attention"]
    assert [r.name for r in records] == [
        "blocks.0.attn",
        "blocks.1.attn",
        "blocks_token_only.0.attn",
        "blocks_token_only.1.attn",
    ]
    eye = torch.eye(197).expand(2, 4, -1, -1)
    for rec, want in zip(records[:2], expected[:2]):  # (2, 4, 196, 196)
        torch.testing.assert_close(rec.attention[:, :, 1:, 1:], want, rtol=1e-5, atol=1e-6)
        assert (rec.attention[:, :, 0] == eye[:, :, 0]).all()
        torch.testing.assert_close(rec.heads, want.mean(2).reshape(2, 4, 14, 14))
    for rec, want in zip(records[2:], expected[2:]):  # (2, 4, 1, 197)
        torch.testing.assert_close(rec.attention[:, :, :1], want, rtol=1e-5, atol=1e-6)
        assert (rec.attention[:, :, 1:] == eye[:, :, 1:]).all()
        torch.testing.assert_close(rec.heads, want[:, :, 0, 1:].reshape(2, 4, 14, 14))
    for method in ("rollout", "gae", "legrad"):
        got = analyze(net, x, method=method).cams[method]
        assert got.shape == (2, 14, 14) and torch.isfinite(got).all() and got.std() > 0
    assert list(analyze(net, x).cams) == ["blocks_token_only.1.norm1"]


def test_eva02_gives_every_transformer_method(tmp_path):
    name, options, size = TIMM_FAMILIES["eva02 (rotary)"]
    net = _timm(name, **options)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for method in ("rollout", "gae", "legrad"):
        got = analyze(net, x, method=method)
        assert list(got.cams) == [method] and got.cams[method].shape == (1, 16, 16)
        assert torch.isfinite(got.cams[method]).all() and got.cams[method].std() > 0
    assert list(analyze(net, x).cams) == ["blocks.1.norm1"]  # its last block's tokens


def test_attention_that_probes_read_is_not_warned_about(vits):
    import warnings

    from viz import UnreadAttentionWarning, unread_attention

    net, x = vits["deit distilled"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadAttentionWarning)
        analyze(net, x[:1])
        analyze(torchvision.models.resnet18(num_classes=3), torch.randn(1, 3, 64, 64))
    cbam = _timm("resnet18", block_args={"attn_layer": "cbam"})  # ChannelAttn inside CbamModule
    assert unread_attention(net) == [] and unread_attention(cbam) == []


def test_a_cnns_unread_attention_is_named_and_its_stages_stay(recwarn):
    from viz import UnreadAttentionWarning, unread_attention

    net = _timm("skresnet18")  # selective-kernel attention: no probe for it
    assert unread_attention(net) == ["SelectiveKernelAttn"]
    got = analyze(net, torch.randn(1, 3, 64, 64))
    assert list(got.cams) == ["layer1", "layer2", "layer3", "layer4"]
    assert [w.category for w in recwarn.list] == [UnreadAttentionWarning]
