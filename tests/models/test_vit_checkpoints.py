"""Vision transformers' state dicts open by themselves (issue #26): timm ViT, DeiT (distilled),
register-token ViTs and Swin, torchvision ViT and Swin; recognised by keys and shapes, exactly."""

from __future__ import annotations

import io

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save as save_safetensors

from models import CheckpointError, ForeignArch, load_checkpoint, save_checkpoint
from models.checkpoints import architectures as archs
from models.checkpoints.checkpoint import imagenet_class_names
from models.checkpoints.vit_recognition import (
    _TIMM_DISTILLED,
    _TIMM_REGISTERS,
    _TIMM_SWIN,
    _TIMM_VIT,
    _TORCHVISION_SWIN,
    _TORCHVISION_VIT,
)

# id: (builder, classes, input size, expected source, expected name)
NETWORKS = {
    "timm vit_tiny": (
        lambda n: timm.create_model("vit_tiny_patch16_224", num_classes=n), 10, 224,
        "timm", "vit_tiny_patch16_224",
    ),
    "timm vit_small (another width)": (
        lambda n: timm.create_model("vit_small_patch16_224", num_classes=n), 1000, 224,
        "timm", "vit_small_patch16_224",
    ),
    "timm deit_tiny_distilled": (
        lambda n: timm.create_model("deit_tiny_distilled_patch16_224", num_classes=n), 10, 224,
        "timm", "deit_tiny_distilled_patch16_224",
    ),
    "timm vit_little_reg4 (register tokens)": (
        lambda n: timm.create_model("vit_little_patch16_reg4_gap_256", num_classes=n), 10, 256,
        "timm", "vit_little_patch16_reg4_gap_256",
    ),
    "timm swin_tiny": (
        lambda n: timm.create_model("swin_tiny_patch4_window7_224", num_classes=n), 10, 224,
        "timm", "swin_tiny_patch4_window7_224",
    ),
    "torchvision vit_b_16": (
        lambda n: torchvision.models.vit_b_16(num_classes=n), 10, 224, "torchvision", "vit_b_16",
    ),
    "torchvision vit_b_32": (
        lambda n: torchvision.models.vit_b_32(num_classes=n), 10, 224, "torchvision", "vit_b_32",
    ),
    "torchvision swin_t": (
        lambda n: torchvision.models.swin_t(num_classes=n), 10, 224, "torchvision", "swin_t",
    ),
}  # fmt: skip


def _pth(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors(state: dict) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in state.items()})


def _logits(model, size: int) -> torch.Tensor:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        return model.eval()(x)


# every network in both layouts, but the largest (ViT-B/16, 330 MiB) in one
PAIRS = [(n, layout) for n in NETWORKS for layout in ("torch.save", "safetensors")
         if (n, layout) != ("torchvision vit_b_16", "torch.save")]  # fmt: skip


@pytest.fixture(scope="module")
def network(request):
    build, classes, size, source, name = NETWORKS[request.param]
    torch.manual_seed(0)
    model = build(classes).eval()
    return model, classes, size, source, name


@pytest.mark.parametrize(("network", "layout"), PAIRS, indirect=["network"])
def test_transformer_state_dicts_load_exactly(network, layout):
    model, classes, size, source, name = network
    state = model.state_dict()
    data = _pth(state) if layout == "torch.save" else _safetensors(state)
    ckpt = load_checkpoint(data)
    assert isinstance(ckpt.arch, ForeignArch)
    assert (ckpt.arch.source, ckpt.arch.name, ckpt.arch.num_classes) == (source, name, classes)
    assert ckpt.arch.attention == "self-attention"
    assert torch.equal(_logits(ckpt.model, size), _logits(model, size))
    if classes == 1000:
        assert ckpt.class_names == imagenet_class_names()
    else:
        assert ckpt.class_names == [f"class {i}" for i in range(classes)]
    assert ckpt.preprocess.crop == size


def test_preprocessing_comes_from_the_network():
    # timm: the pretrained config (DeiT: ImageNet mean/std; augreg ViT: 0.5; crop_pct 0.9)
    deit = load_checkpoint(_pth(timm.create_model("deit_tiny_distilled_patch16_224").state_dict()))
    assert (deit.preprocess.resize, deit.preprocess.crop) == (249, 224)
    assert deit.preprocess.mean == (0.485, 0.456, 0.406)
    reg = load_checkpoint(_pth(timm.create_model("vit_wee_patch16_reg1_gap_256").state_dict()))
    assert (reg.preprocess.resize, reg.preprocess.crop, reg.preprocess.mean) == (
        269, 256, (0.5, 0.5, 0.5),
    )  # fmt: skip
    # torchvision: ImageNet mean/std, the resize and crop of its weights
    swin = load_checkpoint(_pth(torchvision.models.swin_t(num_classes=3).state_dict()))
    assert (swin.preprocess.resize, swin.preprocess.crop) == (232, 224)


def test_a_distilled_deit_averages_its_two_heads():
    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4).eval()
    ckpt = load_checkpoint(_pth(model.state_dict()))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        feats = ckpt.model.forward_features(x)
        cls, dist = ckpt.model.head(feats[:, 0]), ckpt.model.head_dist(feats[:, 1])
        torch.testing.assert_close(ckpt.model(x), (cls + dist) / 2)


def test_class_names_come_from_the_metadata(tmp_path):
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3)
    arch = ForeignArch("deit_tiny_distilled_patch16_224", "timm", 3, "self-attention")
    path = tmp_path / "deit.safetensors"
    save_checkpoint(path, model, arch=arch, class_names=["a", "b", "c"])
    ckpt = load_checkpoint(path)
    assert ckpt.class_names == ["a", "b", "c"] and ckpt.arch == arch
    assert ckpt.format == "attention-lens" and ckpt.label == "timm deit_tiny_distilled_patch16_224"


def _tiny_vit(**extra):
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2) | extra
    return timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, **options), options


def test_a_network_built_with_options_is_described_by_its_metadata(tmp_path):
    torch.manual_seed(2)
    model, options = _tiny_vit()
    arch = ForeignArch("deit_tiny_distilled_patch16_224", "timm", 5, "self-attention", options)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model.eval(), arch=arch)
    ckpt = load_checkpoint(path)
    assert ckpt.arch == arch and ckpt.arch.to_dict()["options"] == options
    assert torch.equal(_logits(ckpt.model, 32), _logits(model, 32))
    # the pretrained config's preprocessing, at the size the network was built for
    assert (ckpt.preprocess.resize, ckpt.preprocess.crop) == (36, 32)
    # without the metadata the weights fit no registered network
    with pytest.raises(CheckpointError, match="closest known architecture is timm deit_"):
        load_checkpoint(_pth(model.state_dict()))


def test_metadata_the_weights_do_not_fit_is_refused(tmp_path):
    model, options = _tiny_vit()
    wrong = ForeignArch("deit_tiny_distilled_patch16_224", "timm", 5, "self-attention",
                        dict(options, depth=3))  # fmt: skip
    path = tmp_path / "lie.safetensors"
    save_checkpoint(path, model, arch=wrong)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert "\n" not in text and "metadata says timm deit_tiny_distilled_patch16_224" in text
    assert "missing blocks.2." in text
    sneaky = ForeignArch("deit_tiny_distilled_patch16_224", "timm", 5, None,
                         dict(options, pretrained_cfg_overlay="x"))  # fmt: skip
    save_checkpoint(path, model, arch=sneaky)
    with pytest.raises(CheckpointError, match="option 'pretrained_cfg_overlay' is not one of"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncated", "closest known architecture is timm vit_tiny_patch16_224: missing blocks.11."),
        ("pos_embed", "pos_embed is [1, 50, 192], expected [1, 197, 192]"),
        ("head_dist", "closest known architecture is timm deit_tiny_distilled_patch16_224: "
                      "missing head_dist.bias"),
    ],
)  # fmt: skip
def test_a_damaged_vit_state_dict_is_one_clear_line(damage, expected):
    name = "deit_tiny_distilled_patch16_224" if damage == "head_dist" else "vit_tiny_patch16_224"
    with archs.meta_build():
        shapes = {
            k: v.shape for k, v in timm.create_model(name, num_classes=10).state_dict().items()
        }
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    if damage == "truncated":
        state = {k: v for k, v in state.items() if not k.startswith("blocks.11.")}
    elif damage == "pos_embed":
        state["pos_embed"] = torch.zeros(1, 50, 192)
    else:
        state = {k: v for k, v in state.items() if not k.startswith("head_dist.")}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_pth(state))
    assert "\n" not in str(info.value) and expected in str(info.value)


def _transformer_candidates() -> list[archs.Architecture]:
    names = [row[0] for rows in (_TIMM_VIT, _TIMM_DISTILLED, _TIMM_REGISTERS, _TIMM_SWIN,
                                 _TORCHVISION_VIT, _TORCHVISION_SWIN) for row in rows]  # fmt: skip
    registry = archs.registered_architectures()
    return [registry[n] for n in names]


def test_every_transformer_candidate_has_the_facts_it_claims():
    """Each candidate's hint and cheap shapes accept its own keys (else it could never match),
    and each is told apart from every other one by its facts and full signature."""
    seen = {}
    for arch in _transformer_candidates():
        shapes, classifier = archs._signature(arch)
        state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        assert arch.hint(set(shapes)), arch.name
        assert archs._facts_met(arch, state) == len(arch.shapes), arch.name
        assert classifier and all(shapes[k][0] == 1000 for k in classifier), arch.name
        key = tuple(sorted(shapes.items()))
        assert key not in seen, f"{arch.name} has the keys and shapes of {seen.get(key)}"
        seen[key] = arch.name


def test_cnn_files_never_build_a_transformer_and_vit_files_build_few(monkeypatch):
    built = []
    real = archs._signature

    def counting(arch):
        if archs._cache_key(arch) not in archs._signatures:
            built.append(arch.name)
        return real(arch)

    monkeypatch.setattr(archs, "_signature", counting)
    archs.forget_signatures()
    load_checkpoint(_pth(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict()))
    transformers = {a.name for a in _transformer_candidates()}
    assert built and not transformers & set(built)
    built.clear()
    load_checkpoint(_pth(timm.create_model("vit_small_patch16_224", num_classes=3).state_dict()))
    assert built == ["vit_small_patch16_224"]
    built.clear()
    load_checkpoint(_pth(timm.create_model("vit_small_patch16_384", num_classes=3).state_dict()))
    assert built == ["vit_small_patch16_384"]  # the 224 px one was tried from the cache


def test_a_timm_eva02_file_is_recognised_and_its_rotary_attention_traced(tmp_path):
    """EVA-02 (issue 39, tried in the app): a classifier fine-tune's state dict opens by its keys
    and shapes; every block's attention is read (its unfused softmax, rotary embeddings in)."""
    import timm
    from safetensors.torch import save_file

    from viz import record_attention

    torch.manual_seed(0)
    net = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=10).eval()
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "eva.safetensors"
    )
    ckpt = load_checkpoint(tmp_path / "eva.safetensors")
    assert (ckpt.arch.name, ckpt.arch.num_classes) == ("eva02_tiny_patch14_224", 10)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with record_attention(ckpt.model) as trace, torch.no_grad():
        logits = ckpt.model(x)
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x))
    assert len([r for r in trace if r.kind == "self-attention"]) == 12
