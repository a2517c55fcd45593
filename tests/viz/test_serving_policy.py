"""The deployment model: a lab server (ATTENTION_LENS_SERVE=shared) and safe server paths."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import streamlit as st
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from models import build_model, save_checkpoint
from models.checkpoints.zoo import CHECKPOINT_DIR_ENV
from models.images import image_folder
from tests.conftest import ROOT, plain
from viz import ImageError, load_image
from viz.serving_policy import ROOTS_ENV, SERVE_ENV, PathRefused, serve_policy


def test_local_is_the_default_and_allows_paths(tmp_path):
    policy = serve_policy({})
    assert policy.mode == "local" and policy.server_paths
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    assert policy.check_path(str(f)) == f.resolve()
    with pytest.raises(PathRefused, match="no such file"):
        policy.check_path(str(tmp_path / "nope"))


def test_shared_without_roots_has_no_paths():
    policy = serve_policy({SERVE_ENV: "shared"})
    assert policy.shared and not policy.server_paths
    with pytest.raises(PathRefused, match="turned off"):
        policy.check_path("/etc/passwd")


def test_shared_paths_stay_inside_the_roots_and_reveal_nothing_outside(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "m.pth").write_bytes(b"x")
    (tmp_path / "secret.pth").write_bytes(b"x")
    (allowed / "escape.pth").symlink_to(tmp_path / "secret.pth")
    policy = serve_policy({SERVE_ENV: "shared", ROOTS_ENV: str(allowed)})
    assert policy.check_path(str(allowed / "sub" / "m.pth")).name == "m.pth"
    outside = []
    for path in ("/etc/shadow", "/root/.ssh/id_rsa", "/no/such/file", str(tmp_path / "secret.pth"),
                 str(allowed / "escape.pth"), str(allowed / ".." / "secret.pth")):  # fmt: skip
        with pytest.raises(PathRefused) as info:
            policy.check_path(path)
        outside.append(str(info.value).replace(repr(path), "PATH"))
    # existing or not, readable or not: the same words
    assert len(set(outside)) == 1 and "not inside the folders this server allows" in outside[0]


def test_an_unknown_mode_runs_as_shared_with_a_warning():
    policy = serve_policy({SERVE_ENV: "shraed"})
    assert policy.shared and "unknown ATTENTION_LENS_SERVE 'shraed'" in policy.warning


def test_fifo_device_and_proc_files_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path, phrase in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                         ("/proc/self/status", "empty")):  # fmt: skip
        done = []
        worker = threading.Thread(
            target=lambda p=path, out=done: out.append(_refusal(p)), daemon=True
        )
        worker.start()
        worker.join(10)
        assert done and phrase in done[0], (path, done)
    with pytest.raises(PathRefused, match="not a regular file"):
        serve_policy({}).check_path(str(fifo))


def _refusal(path) -> str:
    try:
        load_image(path)
    except ImageError as exc:
        return str(exc)
    return "loaded"


def test_folder_walks_skip_symlink_loops_and_are_bounded(tmp_path):
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    (root / "cat" / "loop").symlink_to(root)  # a loop back to the top
    (root / "dog").mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8)).save(root / "dog" / f"{i}.png")
    start = time.monotonic()
    samples, classes = image_folder(root)
    assert time.monotonic() - start < 5
    assert classes == ["cat", "dog"] and len(samples) == 6
    with pytest.raises(ImageError, match="over 3 images"):
        image_folder(root, max_images=3)
    with pytest.raises(ImageError, match="over 4 entries"):
        image_folder(root, max_entries=4)


def _checkpoints(folder: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(folder / "tiny.safetensors", build_model(18, "cbam", num_classes=3).eval(),
                    class_names=["a", "b", "c"])  # fmt: skip


def _shared_app(tmp_path, monkeypatch, roots: str = "") -> AppTest:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    _checkpoints(ckpts)
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(ckpts))
    monkeypatch.setenv(SERVE_ENV, "shared")
    if roots:
        monkeypatch.setenv(ROOTS_ENV, roots)
    st.cache_resource.clear()
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)


def test_shared_app_has_no_path_boxes(tmp_path, monkeypatch):
    at = _shared_app(tmp_path, monkeypatch).run()
    assert not at.exception and not at.error
    for view, box in (("stats", "stats_folder"), ("dataset", "rep_images")):
        at.button_group(key="view").set_value(view).run()  # the app's views: one at a time
        assert not at.exception and not at.error
        keys = {t.key for t in at.text_input}
        assert "ckpt_path" not in keys and box not in keys
        assert any("Server paths are turned off" in i.value for i in at.info)


def test_shared_app_limits_uploads_with_a_clear_message(tmp_path, monkeypatch):
    at = _shared_app(tmp_path, monkeypatch).run()
    big = Image.new("RGB", (5000, 4000), (10, 20, 30))  # 20 megapixels > 16
    import io

    buf = io.BytesIO()
    big.save(buf, "PNG")
    small = io.BytesIO()
    Image.new("RGB", (32, 32)).save(small, "PNG")
    files = [("big.png", buf.getvalue(), "image/png")]
    files += [(f"s{i}.png", small.getvalue(), "image/png") for i in range(17)]
    at.sidebar.file_uploader(key="images").set_value(files).run()
    assert not at.exception
    warnings = [plain(w.value) for w in at.warning]
    errors = [plain(e.value) for e in at.error]
    assert any("18 images uploaded; this server analyses the first 16" in w for w in warnings)
    assert any("big.png" in e and "megapixels" in e for e in errors), errors


def test_shared_app_with_a_root_reads_inside_it_only(tmp_path, monkeypatch):
    allowed = tmp_path / "lab"
    allowed.mkdir()
    at = _shared_app(tmp_path, monkeypatch, roots=str(allowed)).run()
    at.sidebar.text_input(key="ckpt_path").set_value("/etc/passwd").run()
    at.button(key="ckpt_path_load").click().run()
    assert [plain(e.value) for e in at.error] == [
        "/etc/passwd: '/etc/passwd' is not inside the folders this server allows"
    ]
    st.cache_resource.clear()
