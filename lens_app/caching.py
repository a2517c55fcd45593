"""What the app keeps between runs: models (`st.cache_resource`, shared by all sessions; `viz`
holds a per-model lock while hooks are attached), analyses (`st.cache_data`, keyed by image
hash, checkpoint sha256, class, method, layers and smoothing, so that changing how maps are
drawn never runs the network again) and the slow analyses of one session."""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading

import streamlit as st
import torch

import models
import viz

from . import keys
from .slow import SlowJob, SlowRun

SLOW_KEPT = 16  # slow analyses a session keeps
THREADS_ENV = "ATTENTION_LENS_TORCH_THREADS"
log = logging.getLogger("attention_lens.app")


def network_threads() -> None:
    """This run's network passes on one CPU thread each, unless $ATTENTION_LENS_TORCH_THREADS
    says how many (0: torch's own choice). A page's pass is one image, which gains little from
    threads and loses much when the cores have other work: threads wait on each other (a class
    change on 2 busy cores: 0.2 to 4.7 s with 2 threads, 0.13 to 0.19 s with 1), and sessions
    run side by side. Set per run: torch keeps the count per thread."""
    raw = os.environ.get(THREADS_ENV, "").strip() or "1"
    try:
        threads = int(raw)
        if threads < 0:
            raise ValueError
    except ValueError:
        log.warning("%s=%r is not a thread count; one thread per pass", THREADS_ENV, raw)
        threads = 1
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@st.cache_resource(show_spinner=False)
def plugin_errors() -> list[str]:
    """Load the operator's plugins (ATTENTION_LENS_PLUGINS) once per server; their errors."""
    return models.load_plugins(models.plugins_from_env())


@st.cache_resource(show_spinner=False, max_entries=8)
def model_from_path(path: str, mtime: float, size: int) -> models.Checkpoint:
    """Keyed by path and file stamp: a retrained file is read again."""
    Heap.grew()
    return models.load_checkpoint(path)


@st.cache_resource(show_spinner=False, max_entries=8)
def model_from_bytes(sha256: str, _data: bytes) -> models.Checkpoint:
    Heap.grew()
    return models.load_checkpoint(_data)


class Heap:
    """The server's long-lived objects (the libraries, the models) kept out of the garbage
    collector's passes. Streamlit collects every generation after each run (about 0.3 s over
    the 400 000 objects of torch, matplotlib and the rest, holding the interpreter: the page's
    last messages wait for it); frozen (`gc.freeze`) they are not walked again. `settle` freezes
    once the heap grew (the first run, a model loaded, a library imported), having collected
    everything first, the frozen objects too (`gc.unfreeze`): nothing stays frozen for good."""

    _lock = threading.Lock()
    _modules = 0  # len(sys.modules) when last settled
    _grown = True

    @classmethod
    def grew(cls) -> None:
        cls._grown = True

    @classmethod
    def settle(cls) -> None:
        """At the end of a run: freeze the heap if it grew (rare), else nothing."""
        if not cls._grown and len(sys.modules) == cls._modules:
            return
        with cls._lock:
            cls._grown, cls._modules = False, len(sys.modules)
            gc.unfreeze()
            gc.collect()
            gc.freeze()


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
    smoothing: tuple, ckpt, image, options: tuple = (), explain: tuple[str, object] = ("", None),
):  # fmt: skip
    """One image's analysis: quick methods cached for all sessions; the slow ones per session,
    in a thread of their own with a progress bar and a Stop button (widgets cannot live in a
    cached function). `options`: the method's options as (name, value) pairs. `explain`:
    (its key, a target callable) for a network that is not a classifier (`lens_app.explain`)."""
    explain_key, explain_target = explain
    if explain_target is not None:
        target = explain_target
    if not SlowRun.slow(method, smoothing):
        return quick_analysis(image_sha, ckpt_sha, None if explain_key else target, method,
                              layers, smoothing, ckpt, image, explain_key, target)  # fmt: skip
    kept = st.session_state.setdefault(keys.SLOW_ANALYSES, {})
    key = (image_sha, ckpt_sha, explain_key or target, method, layers, smoothing, options)
    if key not in kept:
        label = SlowRun.label(method, smoothing)
        jobs = st.session_state.setdefault(keys.SLOW_JOBS, {})
        SlowRun.cancel(but=key)
        asked = st.session_state.setdefault(keys.LONG_RUNS, {})
        agreed = (ckpt_sha, method, layers, smoothing, options)
        unasked = agreed not in st.session_state.get(keys.LONG_RUNS_AGREED, set())
        if key in asked and unasked:  # measured too long to start unasked: the user says
            SlowRun.ask_to_run(label, *asked[key], on_run=agree_to_run, args=(agreed,))
        job = jobs.get(key)
        if job is None or job.cancelled:  # else a rerun found it running: wait on
            job = jobs[key] = SlowJob(lambda progress: viz.analyze_images(
                ckpt, [image], target, method=method, layers=layers, smoothing=smoothing,
                options=dict(options), progress=progress))  # fmt: skip
        cost = None
        try:
            cost = SlowRun.follow(job, label, ask_after=LONG_RUN_SECONDS if unasked else None)
        finally:
            SlowRun.done(keep_place=cost is not None)  # the question goes where the bar was
        jobs.pop(key, None)
        if cost is not None:
            asked[key] = cost
            while len(asked) > SLOW_KEPT:
                asked.pop(next(iter(asked)))
            SlowRun.ask_to_run(label, *cost, on_run=agree_to_run, args=(agreed,))
        if job.error is not None:
            raise job.error
        kept[key] = job.result
        while len(kept) > SLOW_KEPT:
            kept.pop(next(iter(kept)))
    return kept[key]


LONG_RUN_SECONDS = 60.0
"""A slow method measured (on its first passes) to need longer asks before it runs on; once
agreed, the same method, settings and model run unasked for other images and classes."""


def agree_to_run(agreed: tuple) -> None:
    """The "Run" button's callback: analyses with these settings (model, method, layers,
    smoothing, options) run unasked from now on, for any image and class."""
    st.session_state.setdefault(keys.LONG_RUNS_AGREED, set()).add(agreed)


@st.cache_data(show_spinner=False, max_entries=512)
def quick_analysis(
    image_sha: str, ckpt_sha: str, target: int | None, method: str, layers: tuple,
    smoothing: tuple, _ckpt, _image, explain_key: str = "", _target=None,
):  # fmt: skip
    """Keyed by the class, or by `explain_key` for a target callable (`_target`)."""
    what = _target if explain_key else target
    return viz.analyze_images(_ckpt, [_image], what, method=method, layers=layers,
                              smoothing=smoothing)  # fmt: skip


@st.cache_data(show_spinner=False, max_entries=64)
def causal_scores(
    image_sha: str, ckpt_sha: str, target: int | None, saliency_key: str, steps: int,
    _ckpt, _image, _saliency, explain_key: str = "", _explain=None,
):  # fmt: skip
    """Keyed by the class, or by `explain_key` for a target callable (`_explain`)."""
    x = _ckpt.preprocess.batch([_image])
    # ties in random order, as in the data-set report: a flat map scores at chance
    return viz.deletion_insertion(
        _ckpt.model, x, _saliency, _explain if explain_key else target, steps=steps,
        tie_seeds=[viz.seed_of(image_sha)],
    )  # fmt: skip
