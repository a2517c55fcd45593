"""`pip install .` gives the library, the `attention-lens` command and the embedded checkpoints,
working from any folder (issue 37)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _pins(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


def test_pyproject_pins_what_the_requirements_pin():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == _pins("requirements.txt")
    assert project["optional-dependencies"]["dev"] == _pins("requirements-dev.txt")
    assert project["scripts"]["attention-lens"] == "viz.commands.front_door:main"


def test_front_door_lists_its_subcommands_and_refuses_a_typo(capsys):
    from viz.commands.front_door import main

    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(f"attention-lens {cmd} " in usage for cmd in ("app", "export", "report", "train"))
    assert main(["exprot"]) == 2
    assert "unknown subcommand 'exprot'" in capsys.readouterr().err


def test_embedded_checkpoint_opens_by_name_from_another_folder(tmp_path, monkeypatch):
    from models import load_checkpoint

    monkeypatch.chdir(tmp_path)
    assert load_checkpoint("resnet18_cbam_imagenette").arch.attention == "cbam"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple:
    """The wheel built from this checkout, installed (no dependencies) into a fresh folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.state.pt")
    for name in ("models", "viz", "bench", "lens_app", "checkpoints", "samples"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "app.py"):
        shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
             "-q", "-w", str(tmp / "dist")]  # fmt: skip
    subprocess.run(build, check=True, capture_output=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("attention_lens-*.whl")
    target = tmp / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
               str(wheel)]  # fmt: skip
    subprocess.run(install, check=True, capture_output=True, cwd=tmp)
    env = dict(os.environ, PYTHONPATH=str(target), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    work = tmp / "elsewhere"
    work.mkdir()
    return target, env, work


@pytest.mark.slow
def test_installed_library_and_command_work_from_any_folder(installed):
    target, env, work = installed
    code = ("import models, viz; from models import load_checkpoint; "
            "c = load_checkpoint('resnet18_cbam_imagenette'); "
            "print(models.__file__, c.arch.attention)")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.startswith(str(target)) and run.stdout.split()[-1] == "cbam"
    photo = work / "photo.jpg"
    photo.write_bytes((ROOT / "samples" / "tench_12881.jpg").read_bytes())
    command = [str(target / "bin" / "attention-lens"), "export", "--checkpoint",
               "resnet18_cbam_imagenette", "--images", "photo.jpg", "--figure", "overview",
               "--out", "figures", "--dpi", "40", "--jobs", "1"]  # fmt: skip
    run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-500:]
    assert list((work / "figures").rglob("overview.png"))
    app = subprocess.run([str(target / "bin" / "attention-lens"), "app", "--help"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert app.returncode == 0 and "streamlit" in app.stdout
    # the app's script finds its package (its views) in the installed copy
    assert (target / "app.py").is_file()
    code = "import lens_app.page; print(lens_app.page.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.startswith(str(target / "lens_app"))
