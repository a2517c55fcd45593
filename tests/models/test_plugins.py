"""Plugins end to end: the worked example trained, saved, opened by the CLI and by the app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from streamlit.testing.v1 import AppTest

from models import load_checkpoint
from models.checkpoints import architectures
from models.checkpoints.plugins import PLUGINS_ENV, forget_plugins, load_plugin, load_plugins
from models.probes import registry as probes
from tests.conftest import ROOT, plain
from viz.commands.cli import main as cli

EXAMPLE = str(ROOT / "examples" / "plugin_custom_cbam.py")


@pytest.fixture
def clean_registries():
    """Each test starts without plugins and leaves none behind."""
    archs = dict(architectures._registry)
    attn = dict(probes._probes)
    forget_plugins()
    yield
    forget_plugins()
    architectures._registry.clear()
    architectures._registry.update(archs)
    architectures._signatures.clear()
    probes._probes.clear()
    probes._probes.update(attn)
    probes._generation += 1


def _red_blue(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is their dominant colour: red (0) or blue (1)."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.rand(n, 3, 64, 64, generator=gen) * 0.3
    x[y == 0, 0] += 0.7
    x[y == 1, 2] += 0.7
    return x, y


@pytest.fixture
def trained_plugin_checkpoint(clean_registries, tmp_path) -> Path:
    module = load_plugin(EXAMPLE)
    torch.manual_seed(0)
    model = module.SmallCBAMNet(num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        x, y = _red_blue(16, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "mine.pth"
    torch.save(model.state_dict(), path)
    # the trained network tells red from blue: training really happened
    x, y = _red_blue(32, gen)
    with torch.no_grad():
        assert (model.eval()(x).argmax(1) == y).float().mean() >= 0.9
    return path


def _image(tmp_path: Path) -> Path:
    arr = np.zeros((80, 80, 3), dtype=np.uint8)
    arr[..., 0] = 230
    path = tmp_path / "red.png"
    Image.fromarray(arr).save(path)
    return path


def test_the_example_loads_and_is_traced(trained_plugin_checkpoint):
    ckpt = load_checkpoint(trained_plugin_checkpoint)
    assert ckpt.arch.to_dict() == {
        "source": "plugin", "name": "small_cbam_net", "num_classes": 2, "attention": "cbam",
    }  # fmt: skip
    assert (ckpt.preprocess.resize, ckpt.preprocess.crop) == (73, 64)
    from viz import analyze

    result = analyze(ckpt.model, torch.rand(1, 3, 64, 64))
    assert [r.stage for r in result.trace] == [1, 2, 3, 4]
    assert all(r.spatial is not None and r.channel is not None for r in result.trace)
    assert list(result.cams) == ["stages.0", "stages.1", "stages.2", "stages"]


def test_the_example_through_the_command_line(trained_plugin_checkpoint, tmp_path):
    forget_plugins()  # the CLI loads it itself
    out = tmp_path / "out"
    status = cli([
        "export", "--plugin", EXAMPLE, "--checkpoint", str(trained_plugin_checkpoint),
        "--images", str(_image(tmp_path)), "--out", str(out), "--figure", "overview", "gradcam",
    ])  # fmt: skip
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoints"][0]["arch"]["name"] == "small_cbam_net"
    figures = sorted(p.name for p in out.rglob("*.png"))
    assert figures == ["gradcam.png", "overview.png"]
    with np.load(next(out.rglob("maps.npz"))) as maps:
        spatial = [k for k in maps.files if "spatial" in k]
    assert len(spatial) == 4


def test_a_broken_plugin_is_one_line(clean_registries, tmp_path, capsys):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("import torch\nraise RuntimeError('no GPU here,\\n sorry')\n")
    errors = load_plugins([str(bad), str(tmp_path / "missing.py"), "no_such_module_xyz"])
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "bad_plugin.py" in errors[0] and "RuntimeError: no GPU here, sorry" in errors[0]
    assert "no such file" in errors[1]
    assert "ModuleNotFoundError" in errors[2]
    status = cli(["export", "--plugin", str(bad), "--checkpoint", "x", "--images", "y",
                  "--out", str(tmp_path / "o")])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: plugin ")


def test_the_example_in_the_app(trained_plugin_checkpoint, tmp_path, monkeypatch):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("raise ValueError('broken on purpose')\n")
    forget_plugins()
    monkeypatch.setenv(PLUGINS_ENV, f"{EXAMPLE}:{bad}")
    import streamlit as st

    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    assert not at.exception
    warnings = [plain(w.value) for w in at.warning]
    assert any("broken_plugin.py" in w and "broken on purpose" in w for w in warnings), warnings
    at.sidebar.file_uploader(key="ckpt_upload").set_value(
        ("mine.pth", trained_plugin_checkpoint.read_bytes(), "application/octet-stream")
    ).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    label = at.sidebar.selectbox(key="model").value
    assert label.startswith("plugin small_cbam_net")
    described = plain(" ".join(m.value for m in at.sidebar.markdown))
    assert "small_cbam_net (plugin)" in described and "CBAM" in described
    at.sidebar.file_uploader(key="images").set_value(
        [("red.png", _image(tmp_path).read_bytes(), "image/png")]
    ).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.image) >= 2  # the spatial maps and the other figures
    st.cache_resource.clear()
