"""What the app keeps between runs: models (`st.cache_resource`, shared by all sessions; `viz`
holds a per-model lock while hooks are attached), analyses (`st.cache_data`, keyed by image
hash, checkpoint sha256, class, method, layers and smoothing, so that changing how maps are
drawn never runs the network again) and the slow analyses of one session."""

from __future__ import annotations

import streamlit as st

import models
import viz

from . import keys
from .slow import SlowJob, SlowRun

SLOW_KEPT = 16  # slow analyses a session keeps


@st.cache_resource(show_spinner=False)
def plugin_errors() -> list[str]:
    """Load the operator's plugins (ATTENTION_LENS_PLUGINS) once per server; their errors."""
    return models.load_plugins(models.plugins_from_env())


@st.cache_resource(show_spinner=False, max_entries=8)
def model_from_path(path: str, mtime: float, size: int) -> models.Checkpoint:
    """Keyed by path and file stamp: a retrained file is read again."""
    return models.load_checkpoint(path)


@st.cache_resource(show_spinner=False, max_entries=8)
def model_from_bytes(sha256: str, _data: bytes) -> models.Checkpoint:
    return models.load_checkpoint(_data)


def policy() -> viz.ServePolicy:
    """This deployment's permissions and limits (`viz.serving_policy`): local or shared."""
    return viz.serve_policy()


def load_path(path: str) -> models.Checkpoint:
    p = policy().check_path(path, "file")  # shared mode: inside the allowed roots only
    stat = p.stat()
    return model_from_path(str(p), stat.st_mtime, stat.st_size)


@st.cache_resource(show_spinner=False)
def kept_uploads(max_bytes: int, seconds: float) -> viz.KeptUploads:
    """The server's store of uploaded images kept for reloaded pages (all sessions)."""
    return viz.KeptUploads(max_bytes, seconds)


def analysis(
    image_sha: str, ckpt_sha: str, target: int | None, method: str, layers: tuple,
    smoothing: tuple, ckpt, image, options: tuple = (),
):  # fmt: skip
    """One image's analysis: quick methods cached for all sessions; the slow ones per session,
    in a thread of their own with a progress bar and a Stop button (widgets cannot live in a
    cached function). `options`: the method's options as (name, value) pairs."""
    if not SlowRun.slow(method, smoothing):
        return quick_analysis(image_sha, ckpt_sha, target, method, layers, smoothing, ckpt, image)
    kept = st.session_state.setdefault(keys.SLOW_ANALYSES, {})
    key = (image_sha, ckpt_sha, target, method, layers, smoothing, options)
    if key not in kept:
        jobs = st.session_state.setdefault(keys.SLOW_JOBS, {})
        SlowRun.cancel(but=key)
        job = jobs.get(key)
        if job is None or job.cancelled:  # else a rerun found it running: wait on
            job = jobs[key] = SlowJob(lambda progress: viz.analyze_images(
                ckpt, [image], target, method=method, layers=layers, smoothing=smoothing,
                options=dict(options), progress=progress))  # fmt: skip
        try:
            SlowRun.follow(job, SlowRun.label(method, smoothing))
        finally:
            SlowRun.done()
        jobs.pop(key, None)
        if job.error is not None:
            raise job.error
        kept[key] = job.result
        while len(kept) > SLOW_KEPT:
            kept.pop(next(iter(kept)))
    return kept[key]


@st.cache_data(show_spinner=False, max_entries=512)
def quick_analysis(
    image_sha: str, ckpt_sha: str, target: int | None, method: str, layers: tuple,
    smoothing: tuple, _ckpt, _image,
):  # fmt: skip
    return viz.analyze_images(_ckpt, [_image], target, method=method, layers=layers,
                              smoothing=smoothing)  # fmt: skip


@st.cache_data(show_spinner=False, max_entries=64)
def causal_scores(
    image_sha: str, ckpt_sha: str, target: int | None, saliency_key: str, steps: int,
    _ckpt, _image, _saliency,
):  # fmt: skip
    x = _ckpt.preprocess.batch([_image])
    # ties in random order, as in the data-set report: a flat map scores at chance
    return viz.deletion_insertion(
        _ckpt.model, x, _saliency, target, steps=steps, tie_seeds=[viz.seed_of(image_sha)]
    )
