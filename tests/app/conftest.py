"""The app's fixtures: small random-weight checkpoints (ResNet-18 CBAM, plain and BAM, a
DeiT-tiny; 10 Imagenette classes) in a temporary folder that ATTENTION_LENS_CHECKPOINTS points
the app at, the app under AppTest, and spies on what it computes and serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from models import build_model, save_checkpoint
from models.checkpoints.zoo import CHECKPOINT_DIR_ENV

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app.py"
CLASSES = (ROOT / "checkpoints" / "imagenette_classes.txt").read_text().split("\n")[:10]
TIMEOUT = 180  # seconds per script run: the CPU is shared with other work


def write_checkpoints(folder: Path, kinds=("cbam", None, "bam")) -> dict[str, Path]:
    """Random-weight ResNet-18s with 10 classes, saved as float16 Attention Lens checkpoints."""
    paths = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = build_model(18, kind, num_classes=10).eval()
        path = folder / f"resnet18_{kind or 'plain'}_tiny.safetensors"
        save_checkpoint(
            path, model, class_names=CLASSES, metadata={"name": f"tiny {kind or 'plain'}"},
            dtype=torch.float16,
        )  # fmt: skip
        paths[kind or "plain"] = path
    return paths


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    return write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def app(tiny_checkpoints, monkeypatch) -> AppTest:
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(next(iter(tiny_checkpoints.values())).parent))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


@pytest.fixture
def analyses(monkeypatch) -> list[dict]:
    """The keyword arguments of every `viz.analyze_images` call the app makes."""
    import viz

    calls, real = [], viz.analyze_images

    def spy(ckpt, images, target=None, **k):
        calls.append(k)
        return real(ckpt, images, target, **k)

    monkeypatch.setattr(viz, "analyze_images", spy)
    return calls


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    """A random-weight timm DeiT-tiny (a plain ViT: one resolution throughout, rollout, GAE and
    LeGrad) with the 10 classes, saved as an Attention Lens checkpoint."""
    import timm
    from safetensors.torch import save_file

    from models import load_checkpoint

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(folder / "raw"))
    raw = load_checkpoint(folder / "raw")  # recognised from its keys
    path = folder / "deit_tiny.safetensors"
    save_checkpoint(path, raw.model, class_names=CLASSES, arch=raw.arch, preprocess=raw.preprocess,
                    metadata={"name": "tiny deit"}, dtype=torch.float16)  # fmt: skip
    return path


@pytest.fixture
def vit_app(tiny_checkpoints, tiny_vit, tmp_path, monkeypatch) -> AppTest:
    """The app over a DeiT-tiny and the tiny CBAM, plain and BAM ResNets."""
    for path in (tiny_vit, *tiny_checkpoints.values()):
        (tmp_path / path.name).symlink_to(path)
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


@pytest.fixture
def deferred(monkeypatch) -> dict:
    """file id -> the callable Streamlit runs when a download button made on click is clicked
    (and its file name, as `made.names[file id]`)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    class Made(dict):
        names: dict[str, str | None]  # file id -> file name

    made, real = Made(), MediaFileManager.add_deferred
    made.names = {}

    def spy(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        file_id = real(self, data_callable, mimetype, coordinates, file_name, **kwargs)
        made[file_id], made.names[file_id] = data_callable, file_name
        return file_id

    monkeypatch.setattr(MediaFileManager, "add_deferred", spy)
    return made


@pytest.fixture(scope="session")
def checkpoint_writer():
    """`write_checkpoints`, for the browser tests' server."""
    return write_checkpoints
