"""Hugging Face transformers image classifiers (issue 39): a save_pretrained folder, sharded or
zipped, opens with load_checkpoint; the records equal the model's own `output_attentions` under
eager attention while the model keeps sdpa (Swin's window probabilities too); rollout and GAE
equal their formulas; bad folders are refused in one line. Tiny seeded random configs, saved into tmp_path; nothing downloads
(every socket is refused)."""

from __future__ import annotations

import io
import json
import socket
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as tf

from models import CheckpointError, load_checkpoint
from tests.conftest import leftovers, reference_rollout
from viz import analyze, record_attention

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=8)  # fmt: skip
LABELS = {0: "cat", 1: "dog", 2: "fox"}
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _configs() -> dict[str, tuple[object, type, int]]:
    """name -> (config, class, prefix tokens)."""
    heads = dict(num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    dino = {**SMALL, "mlp_ratio": 2}
    return {
        "vit": (tf.ViTConfig(**SMALL, **heads), tf.ViTForImageClassification, 1),
        "deit teacher": (
            tf.DeiTConfig(**SMALL, **heads), tf.DeiTForImageClassificationWithTeacher, 2
        ),
        "deit": (tf.DeiTConfig(**SMALL, **heads), tf.DeiTForImageClassification, 2),
        "beit": (
            tf.BeitConfig(**SMALL, **heads, use_relative_position_bias=True),
            tf.BeitForImageClassification, 1,
        ),
        "dinov2": (tf.Dinov2Config(**dino, **heads), tf.Dinov2ForImageClassification, 1),
        "dinov2 registers": (
            tf.Dinov2WithRegistersConfig(**dino, **heads, num_register_tokens=4),
            tf.Dinov2WithRegistersForImageClassification, 5,
        ),
        "clip": (
            tf.CLIPConfig(vision_config=SMALL, text_config=TEXT, **heads),
            tf.CLIPForImageClassification, 1,
        ),
        "siglip": (
            tf.SiglipConfig(vision_config=SMALL, text_config=TEXT, **heads),
            tf.SiglipForImageClassification, 0,
        ),
    }  # fmt: skip


ARCHS = list(_configs())


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _eager(name: str) -> torch.nn.Module:
    """The architecture with seeded random weights, eager attention (the reference)."""
    config, cls, _ = _configs()[name]
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # every weight non-trivial, so a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (save_pretrained folder, the eager model that was saved)."""
    root = tmp_path_factory.mktemp("hf")
    found = {}
    for name in ARCHS:
        model = _eager(name)
        folder = root / name.replace(" ", "_")
        model.save_pretrained(folder)
        found[name] = (folder, model)
    return found


def _zipped(folder: Path, inner: str = "my-model/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, inner + path.name)
    return buffer.getvalue()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ARCHS)
def test_each_architecture_loads_from_its_folder_and_its_zip(saved, tmp_path, name):
    folder, reference = saved[name]
    x = _x()
    with torch.no_grad():
        expected = reference(x).logits
    archive = tmp_path / "model.zip"
    archive.write_bytes(_zipped(folder))
    for source in (folder, str(folder), archive.read_bytes(), archive):
        ckpt = load_checkpoint(source)
        assert ckpt.format == "transformers"
        assert ckpt.arch.source == "transformers" and ckpt.arch.name == type(reference).__name__
        assert ckpt.arch.num_classes == 3 and ckpt.arch.attention == "self-attention"
        assert ckpt.class_names == ["cat", "dog", "fox"]
        assert ckpt.preprocess.crop == 32
        assert ckpt.model.hf.config._attn_implementation == "sdpa"  # the fast path is kept
        assert not ckpt.model.training
        with torch.no_grad():
            torch.testing.assert_close(ckpt.model(x), expected, atol=1e-5, rtol=1e-5)
    assert ckpt.cost is not None and ckpt.cost.tokens == 16 + _configs()[name][2]


@pytest.mark.parametrize("name", ARCHS)
def test_records_equal_output_attentions_and_logits_are_unchanged(saved, name):
    folder, reference = saved[name]
    prefix = _configs()[name][2]
    model = load_checkpoint(folder).model
    x = _x()
    with torch.no_grad():
        expected = reference(x, output_attentions=True)
        plain = model(x)
        with record_attention(model) as trace:
            traced = model(x)
    assert torch.equal(plain, traced)
    torch.testing.assert_close(traced, expected.logits, atol=1e-5, rtol=1e-5)
    assert leftovers(model) == 0
    records = list(trace)
    assert len(records) == 2 and [r.layer for r in records] == [0, 1]
    for rec, probs in zip(records, expected.attentions):
        assert rec.kind == "self-attention" and rec.attention.shape == (2, 2, 16 + prefix,
                                                                         16 + prefix)  # fmt: skip
        torch.testing.assert_close(rec.attention, probs, atol=1e-6, rtol=1e-5)
        rows = probs[:, :, 0, prefix:] if prefix else probs[:, :, :, prefix:].mean(2)
        torch.testing.assert_close(rec.heads, rows.reshape(2, 2, 4, 4), atol=1e-6, rtol=1e-5)
        assert rec.class_token == bool(prefix)


@pytest.mark.parametrize("name", ["vit", "deit teacher", "dinov2 registers"])
def test_rollout_and_gae_equal_their_formulas(saved, name):
    folder, reference = saved[name]
    prefix = _configs()[name][2]
    model = load_checkpoint(folder).model
    x = _x()
    out = reference(x, output_attentions=True)  # eager: the probabilities are in the graph
    for a in out.attentions:
        a.retain_grad()
    target = out.logits.argmax(1)
    out.logits.gather(1, target[:, None]).sum().backward()

    got = analyze(model, x, method="rollout")
    expected = reference_rollout([a.detach() for a in out.attentions], prefix, True)
    torch.testing.assert_close(got.cams["rollout"], expected.float().reshape(2, 4, 4))

    relevance = torch.eye(16 + prefix, dtype=torch.float64).expand(2, -1, -1)
    for a in out.attentions:
        relevance = relevance + torch.relu(a.grad.double() * a.double()).mean(1) @ relevance
    rows = relevance[:, 0, prefix:].reshape(2, 4, 4)
    got = analyze(model, x, method="gae")
    assert torch.equal(got.target, target)
    scale = rows.abs().max()
    torch.testing.assert_close(got.cams["gae"] / scale, (rows / scale).float(), atol=1e-5,
                               rtol=1e-4)  # fmt: skip
    assert leftovers(model) == 0


@pytest.mark.parametrize("name", ARCHS)
def test_legrad_and_gradcam_on_the_tokens(saved, name):
    model = load_checkpoint(saved[name][0]).model
    x = _x(1)
    legrad = analyze(model, x, method="legrad").cams["legrad"]
    assert legrad.shape == (1, 4, 4) and torch.isfinite(legrad).all()
    cams = analyze(model, x).cams  # Grad-CAM at the last block's first norm
    [(layer, cam)] = cams.items()
    assert layer.startswith("hf.") and ".1." in layer and cam.shape == (1, 4, 4)
    assert leftovers(model) == 0


def test_a_sharded_folder_loads(tmp_path):
    model = _eager("vit")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ckpt = load_checkpoint(tmp_path)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x), model(x).logits, atol=1e-5, rtol=1e-5)
    assert load_checkpoint(_zipped(tmp_path, "")).sha256 != ckpt.sha256  # the zip's own hash


def test_preprocessing_comes_from_the_processor_config(saved, tmp_path):
    folder = _copy(saved["dinov2"][0], tmp_path)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "crop_size": {"height": 24, "width": 24},
        "size": {"shortest_edge": 28}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5] * 3,
    }))  # fmt: skip
    found = load_checkpoint(folder).preprocess
    assert (found.resize, found.crop, found.mean, found.std) == (28, 24, (0.1, 0.2, 0.3),
                                                                 (0.5, 0.5, 0.5))  # fmt: skip
    folder = _copy(saved["vit"][0], tmp_path / "vit")  # a fixed-size model: its image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 48,
                                                                          "width": 48}}))  # fmt: skip
    assert load_checkpoint(folder).preprocess.crop == 32


def test_bare_transformers_models_are_traced_too():
    """A model a user builds (no load_checkpoint): its attention and its token layout are
    known as soon as transformers' model code is imported; headless models have no LeGrad."""
    torch.manual_seed(0)
    model = tf.Dinov2WithRegistersModel(
        tf.Dinov2WithRegistersConfig(**{**SMALL, "mlp_ratio": 2}, num_register_tokens=2)
    ).eval()
    with torch.no_grad(), record_attention(model) as trace:
        model(_x())
    assert len(trace) == 2 and trace[0].heads.shape == (2, 2, 4, 4)


@pytest.mark.parametrize("version", ["swin", "swinv2"])
def test_swin_window_attention_equals_its_own_and_is_placed_on_each_stage(tmp_path, version):
    """Swin (sdpa) and Swin v2 (cosine attention, eager only): each block's window
    probabilities equal the model's own; one Grad-CAM layer per stage; no rollout."""
    from models.probes.selfattention import received_on_grid

    config_cls, cls = {
        "swin": (tf.SwinConfig, tf.SwinForImageClassification),
        "swinv2": (tf.Swinv2Config, tf.Swinv2ForImageClassification),
    }[version]
    config = config_cls(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2],
                        num_heads=[2, 2], window_size=4, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    reference = cls._from_config(config, attn_implementation="eager").eval()
    reference.save_pretrained(tmp_path)
    ckpt = load_checkpoint(_zipped(tmp_path))
    assert ckpt.model.hf.config._attn_implementation == ("sdpa" if version == "swin" else "eager")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = []  # each block's probabilities (windows, heads, 16, 16), as the model returns them
    hooks = [m.register_forward_hook(lambda _m, _i, out: expected.append(out[1]))
             for name, m in reference.named_modules() if name.endswith(".attention")]  # fmt: skip
    with torch.no_grad():
        logits = reference(x, output_attentions=True).logits
        with record_attention(ckpt.model) as trace:
            traced = ckpt.model(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(traced, logits, atol=1e-5, rtol=1e-5)
    calls = trace.attention_calls()
    assert len(calls) == len(expected) == 4
    shifts = []
    for (watch, parts, rec), probs in zip(calls, expected):
        geo = watch.reader.geometry(watch.module, parts)
        shifts.append(geo.shift)
        torch.testing.assert_close(watch.reader.probabilities(watch.module, parts), probs,
                                   atol=1e-6, rtol=1e-5)  # fmt: skip
        torch.testing.assert_close(rec.heads, received_on_grid(probs, geo, 2), atol=1e-6,
                                   rtol=1e-5)  # fmt: skip
        assert rec.attention is None
    assert shifts == [(0, 0), (2, 2)] * 2
    assert [r.heads.shape[-1] for r in trace] == [16, 16, 8, 8]
    assert leftovers(ckpt.model) == 0
    cams = analyze(ckpt.model, x).cams
    assert [m.shape[-1] for m in cams.values()] == [16, 8]
    with pytest.raises(ValueError, match="window attention"):
        analyze(ckpt.model, x, method="rollout")


# --- refusals: one line each, nothing run -------------------------------------------------------


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _refused(source, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as caught:
        load_checkpoint(source)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_an_unknown_model_type_or_task_is_refused(saved, tmp_path):
    folder = _copy(saved["vit"][0], tmp_path)
    _edit_config(folder, model_type="gpt2")
    _refused(folder, "model_type 'gpt2'; Attention Lens reads vit, deit")
    _edit_config(folder, model_type="vit", architectures=["ViTForMaskedImageModeling"])
    _refused(folder, "for vit Attention Lens reads ViTForImageClassification, ViTModel")
    _refused(_zipped(folder), "for vit Attention Lens reads ViTForImageClassification, ViTModel")


def test_custom_code_is_refused(saved, tmp_path):
    folder = _copy(saved["vit"][0], tmp_path / "auto_map")
    _edit_config(folder, auto_map={"AutoModel": "modeling_evil.EvilModel"})
    _refused(folder, "custom code is never run")
    folder = _copy(saved["vit"][0], tmp_path / "code")
    (folder / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    _refused(folder, "Python code .*modeling_evil.py")
    _refused(_zipped(folder), "Python code .*modeling_evil.py")


def test_a_config_whose_sizes_disagree_with_the_weights_is_refused(saved, tmp_path):
    folder = _copy(saved["vit"][0], tmp_path)
    _edit_config(folder, intermediate_size=48)  # fewer weights than the file holds
    _refused(
        folder, r"sizes do not fit the weights: .*mlp\.fc1\.bias is \[64\] in the file, \[48\] by"
    )
    _edit_config(folder, intermediate_size=64, num_hidden_layers=3)  # more than it holds
    _refused(folder, "describes ViTForImageClassification with .* weights but the file holds")
    _edit_config(folder, num_hidden_layers=1)
    _refused(folder, r"no place for: .*\.1\.")


def test_a_huge_image_size_is_refused_before_running(tmp_path):
    config, cls, _ = _configs()["vit"]
    big = tf.ViTConfig(**{**config.to_dict(), "image_size": 1024, "patch_size": 4})
    torch.manual_seed(0)
    cls._from_config(big).save_pretrained(tmp_path)  # 65,537 tokens: 8 MB of position table
    _refused(tmp_path, "one image would cost .* 65,537 tokens .*refused before running")
    _edit_config(tmp_path, image_size=10**6)
    _refused(tmp_path, "image_size 1000000 is not a size between 1 and 8192")


def test_pickled_or_missing_weights_are_refused(saved, tmp_path):
    folder = _copy(saved["vit"][0], tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    _refused(folder, "no model.safetensors .*pytorch_model.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, "no config.json")


HEADLESS = {  # name -> (config, class, width of the embedding)
    "vit": (tf.ViTConfig(**SMALL), tf.ViTModel),
    "dinov2": (tf.Dinov2Config(**SMALL, mlp_ratio=2), tf.Dinov2Model),
    "dinov2 registers": (
        tf.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=4),
        tf.Dinov2WithRegistersModel,
    ),
    "clip vision": (tf.CLIPVisionConfig(**SMALL), tf.CLIPVisionModel),
    "siglip vision": (tf.SiglipVisionConfig(**SMALL), tf.SiglipVisionModel),
}


@pytest.mark.parametrize("name", list(HEADLESS))
def test_headless_models_open_as_embedding_networks(tmp_path, name):
    """A backbone without classifier (DINOv2, CLIP's vision tower): its embedding, its
    attention traced, and CAMs only with a target (issue 40's SimilarityScore)."""
    from viz.targets import SimilarityScore

    config, cls = HEADLESS[name]
    torch.manual_seed(0)
    cls._from_config(config).eval().save_pretrained(tmp_path / "m")
    ckpt = load_checkpoint(tmp_path / "m")
    assert (ckpt.arch.name, ckpt.arch.num_classes, ckpt.class_names) == (cls.__name__, 0, [])
    x = _x(2)
    with record_attention(ckpt.model) as trace, torch.no_grad():
        embedding = ckpt.model(x)
    assert embedding.shape == (2, 32)
    assert len([r for r in trace if r.kind == "self-attention"]) == 2
    with pytest.raises(ValueError, match="no classifier"):
        analyze(ckpt.model, x)
    result = analyze(ckpt.model, x, SimilarityScore(embedding[1]), method="gae")
    assert result.scores[1] > 0.99  # the second image is its own concept
    assert leftovers(ckpt.model) == 0
