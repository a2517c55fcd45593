"""Shared fixtures and builders: tiny random-weight models, checkpoint helpers, Markdown checks and
paths to the reference data copied from the release."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import CheckpointError, build_model, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "reference"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny test inputs gain nothing from intra-op threads, and lose much when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def own_temporary_folder(tmp_path_factory):
    """What the code under test leaves in the system's temporary folder (the app's report runs
    keep theirs there for a day) goes to this session's pytest folder, which pytest prunes;
    TMPDIR carries it to the app and command-line processes the tests start."""
    folder = tmp_path_factory.mktemp("system_tmp")
    patch = pytest.MonkeyPatch()
    patch.setattr(tempfile, "tempdir", str(folder))
    patch.setenv("TMPDIR", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def manifests() -> dict:
    return json.loads((REFERENCE / "official_resnet_manifests.json").read_text())


@pytest.fixture(scope="session")
def module_vectors() -> dict:
    with np.load(REFERENCE / "official_module_vectors.npz") as data:
        return {k: data[k] for k in data.files}


def leftovers(model: torch.nn.Module) -> int:
    """Hooks and taps (`viz.engine.taps`) still on `model`: 0 after any trace, also a failed one."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + ("_attention_lens_taps" in m.__dict__)
        + (type(m).forward.__name__ == "tapped_forward")
        for m in model.modules()
    )


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics so eval-mode tests are not degenerate."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean = 0.1 * torch.randn(n, generator=gen)
            m.running_var = 0.5 + torch.rand(n, generator=gen)
    return model


@pytest.fixture(params=[None, "se", "bam", "cbam"], ids=lambda a: a or "plain")
def tiny_model(request) -> torch.nn.Module:
    """ResNet-18 of each attention type, random weights, eval mode."""
    torch.manual_seed(0)
    return randomize_bn(build_model(18, request.param, num_classes=7)).eval()


@pytest.fixture
def image_batch() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def plain(markdown: str) -> str:
    """The text a Markdown source shows: backslash escapes removed (the app escapes file text)."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown)


# the patterns GitHub-flavoured Markdown (remark-gfm, as Streamlit renders) turns into links,
# matched on the text after backslash escapes are undone
GFM_AUTOLINKS = [
    r"(?i)(https?://|www(?=\.))[-.\w]+",
    r"(?i)(mailto:|xmpp:)?[-.\w+]+@[-\w]+(\.[-\w]+)+",
]


def autolinks(markdown: str) -> list[str]:
    """The bare addresses GFM would link in what `markdown` shows."""
    import re

    text = plain(markdown)
    return [m.group(0) for p in GFM_AUTOLINKS for m in re.finditer(p, text)]


# --- checkpoints ---------------------------------------------------------------------------------


def torch_bytes(obj: object, legacy: bool = False) -> bytes:
    """What torch.save writes: the zip format, or with `legacy` the PyTorch <= 1.5 format."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def logits(model: nn.Module, stem: str = "imagenet") -> torch.Tensor:
    size = 32 if stem == "cifar" else 64
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(x)


def assert_same_logits(loaded: nn.Module, original: nn.Module, stem: str = "imagenet") -> None:
    torch.testing.assert_close(logits(loaded, stem), logits(original, stem), atol=1e-5, rtol=0)


def refused(source, *phrases: str, **kwargs) -> str:
    """Assert load_checkpoint refuses `source` with a one-line message holding every phrase."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(source, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    for phrase in phrases:
        assert phrase in message
    return message


def new_model(depth: int, attention: str | None, num_classes: int = 10, **kwargs) -> nn.Module:
    torch.manual_seed(depth)
    return randomize_bn(build_model(depth, attention, num_classes, **kwargs)).eval()


# --- data sets --------------------------------------------------------------------------------


def red_blue_folder(root: Path, suffix: str = ".png", **save) -> Path:
    """A tiny ImageFolder under `root`: train/ 8 and val/ 4 images per class, each class's image
    dominated by its colour (red, blue); `save`: Pillow's options for `suffix`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for label in ("red", "blue"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((40, 48, 3)) * 120).astype("uint8")
                arr[..., 0 if label == "red" else 2] = 255
                Image.fromarray(arr).save(root / split / label / f"{i}{suffix}", **save)
    return root


def interrupt_in_second_epoch(monkeypatch, argv: list[str], out: Path) -> None:
    """`python -m models.train argv`, stopped during epoch 2's evaluation (a Ctrl-C): the training
    state is kept (KEEP_TRAIN_STATE=1) and no checkpoint written; the evaluation is restored."""
    from models.training import batches
    from models.training.cli import main

    real_eval, calls = batches.evaluate_cached, []

    def stop_in_second_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*a, **k)

    monkeypatch.setenv("KEEP_TRAIN_STATE", "1")
    monkeypatch.setattr(batches, "evaluate_cached", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert out.with_name(out.name + ".state.pt").exists() and not out.exists()
    monkeypatch.setattr(batches, "evaluate_cached", real_eval)


# --- peers --------------------------------------------------------------------------------------

PYTORCH_GRAD_CAM = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "gradcamelementwise": "GradCAMElementWise",
}
"""Our gradient CAM methods and the pytorch-grad-cam classes their maps equal."""


def reference_rollout(probs: list, prefix: int, class_token: bool) -> torch.Tensor:
    """Rollout (Abnar & Zuidema) written out: mean of heads, plus identity, rows renormalised."""
    joint = None
    for a in probs:
        fused = a.double().mean(1)
        fused = (fused + torch.eye(fused.shape[-1])) / 2
        fused = fused / fused.sum(-1, keepdim=True)
        joint = fused if joint is None else fused @ joint
    return joint[:, 0, prefix:] if class_token else joint[:, prefix:, prefix:].mean(1)
