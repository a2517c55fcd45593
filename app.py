"""Attention Lens, the Streamlit app: `streamlit run app.py`.

A shell over the library: widgets, caching, layout and error display. Every computation is a
call into `models` or `viz`. Models are cached with `st.cache_resource` (shared by all browser
sessions; `viz` holds a per-model lock while hooks are attached), analyses with `st.cache_data`
keyed by (image hash, checkpoint sha256, target, method, layers), so changing how maps are drawn
never runs the network again.

The environment variable ATTENTION_LENS_CHECKPOINTS points the app at another checkpoint folder;
ATTENTION_LENS_PLUGINS lists the operator's plugins (`models.plugins`), loaded once per server.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st
from matplotlib.figure import Figure
from PIL import Image

from models import (
    Checkpoint,
    CheckpointError,
    checkpoint_dir,
    default_checkpoint,
    embedded_checkpoints,
    load_checkpoint,
    load_plugins,
    plugins_from_env,
)
from viz import (
    ATTRIBUTION_METHODS,
    CAM_METHODS,
    DEFAULT_CMAP,
    DELETION_CHOICES,
    FIGURES,
    FORMATS,
    IMAGE_FIGURES,
    IMAGE_TYPES,
    NETWORK_MAP,
    NUM_SAMPLES,
    RENDERS,
    SCALES,
    FigureSettings,
    GridModel,
    ImageError,
    KeptUploads,
    ReportOptions,
    ServePolicy,
    UsageError,
    agreement_table,
    analyze_images,
    attribute,
    cam_layer_choices,
    carry_saliency_choice,
    channel_statistics,
    check_upload_size,
    class_index,
    default_cam_layers,
    default_modules,
    default_sanity,
    deletion_insertion,
    deletion_insertion_csv,
    describe_checkpoint,
    digest,
    draw_image_figure,
    figure_bytes,
    figures,
    grid_stand_in,
    image_bundle,
    inputs_for,
    label_of,
    layers_for_method,
    load_image,
    md_text,
    methods_for,
    model_grid_rows,
    no_spatial_maps,
    npz_bytes,
    open_report,
    parse_class_names,
    parse_labels,
    random_saliency,
    readable_summary,
    run_report,
    safe_stem,
    sample_images,
    seed_of,
    serve_policy,
    shown_at_stage,
    smoothings_for,
    temporary_report_folder,
    top_predictions,
    write_report,
    zip_bundle,
)

SAMPLES = Path(__file__).resolve().parent / "samples"
DEFAULT_SAMPLE = "english_springer_4972.jpg"
USER_ERRORS = (CheckpointError, ImageError, ValueError, OSError)
CMAPS = tuple(
    dict.fromkeys((DEFAULT_CMAP, "viridis", "inferno", "magma", "cividis", "turbo", "gray"))
)
MIME = {"png": "image/png", "pdf": "application/pdf", "svg": "image/svg+xml"}  # FORMATS
SCREEN_DPI = 150  # on screen; downloads use figure_bytes at 300 dpi
OTHER = -1  # the "another class" choice of the target radio
CAM_TAB = "Class activation map"
log = logging.getLogger("attention_lens.app")


@dataclass(frozen=True)
class ImageItem:
    name: str
    data: bytes
    sha: str
    image: Image.Image


# --- caches -----------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def plugin_errors() -> list[str]:
    """Load the operator's plugins (ATTENTION_LENS_PLUGINS) once per server; their errors."""
    return load_plugins(plugins_from_env())


@st.cache_resource(show_spinner=False, max_entries=8)
def model_from_path(path: str, mtime: float, size: int) -> Checkpoint:
    """Keyed by path and file stamp: a retrained file is read again."""
    return load_checkpoint(path)


@st.cache_resource(show_spinner=False, max_entries=8)
def model_from_bytes(sha256: str, _data: bytes) -> Checkpoint:
    return load_checkpoint(_data)


def analysis(
    image_sha: str, ckpt_sha: str, target: int | None, method: str, layers: tuple,
    smoothing: tuple, ckpt, image, options: tuple = (),
):  # fmt: skip
    """One image's analysis: quick methods cached for all sessions; the slow ones per session,
    in a thread of their own with a progress bar and a Stop button (widgets cannot live in a
    cached function). `options`: the method's options as (name, value) pairs."""
    if not SlowRun.slow(method, smoothing):
        return quick_analysis(image_sha, ckpt_sha, target, method, layers, smoothing, ckpt, image)
    kept = st.session_state.setdefault("slow_analyses", {})
    key = (image_sha, ckpt_sha, target, method, layers, smoothing, options)
    if key not in kept:
        jobs = st.session_state.setdefault("slow_jobs", {})
        SlowRun.cancel(but=key)
        job = jobs.get(key)
        if job is None or job.cancelled:  # else a rerun found it running: wait on
            job = jobs[key] = SlowJob(lambda progress: analyze_images(
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


SLOW_KEPT = 16  # slow analyses a session keeps


@st.cache_data(show_spinner=False, max_entries=512)
def quick_analysis(
    image_sha: str, ckpt_sha: str, target: int | None, method: str, layers: tuple,
    smoothing: tuple, _ckpt, _image,
):  # fmt: skip
    return analyze_images(_ckpt, [_image], target, method=method, layers=layers,
                          smoothing=smoothing)  # fmt: skip


class Cancelled(Exception):
    """Raised inside a slow analysis whose user pressed Stop or moved on."""


class SlowJob:
    """A slow analysis in a thread of its own: a rerun of the page (any widget changed) stops
    the script, not the analysis, and the next run waits on where it got to. A job nobody has
    watched for `UNWATCHED_SECONDS` (its page was closed or reloaded, Streamlit's own Stop, a
    rerun that wants other maps) cancels itself at its next batch, so it neither runs on for
    nothing nor keeps the model's lock from other pages."""

    UNWATCHED_SECONDS = 4.0

    def __init__(self, run: Callable[[Callable[[int, int], None]], object]) -> None:
        self.done = self.total = 0
        self.first: tuple[float, int] | None = None  # (time, done) of the first report
        self.estimate: tuple[float, float] | None = None  # (time, seconds left) then
        self.watched = time.monotonic()
        self.cancelled = False
        self.result = self.error = None
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True)
        self._thread.start()

    def _report(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.watched > self.UNWATCHED_SECONDS:
            self.cancelled = True
        if self.cancelled:
            raise Cancelled
        if self.first is None:  # the set-up before the first report is not a pass
            self.first = (now, done)
        elif done > self.first[1]:
            start, then = self.first
            self.estimate = (now, (now - start) / (done - then) * (total - done))
        self.done, self.total = done, total

    def _work(self, run) -> None:
        try:
            self.result = run(self._report)
        except Exception as exc:  # handed to the page that waits on it
            self.error = exc

    def running(self) -> bool:
        return self._thread.is_alive()

    def watch(self) -> None:
        """A page is waiting on this job (called at every redraw)."""
        self.watched = time.monotonic()

    def time_left(self) -> float | None:
        """Seconds left, from the pass rate at the last report, counting down between reports."""
        if self.estimate is None:
            return None
        then, left = self.estimate
        return max(0.0, left - (time.monotonic() - then))


# While a slow method runs, its Stop (which also goes back to Grad-CAM) is the only one: the
# Stop of Streamlit's status widget, which would stop the page but not the analysis, is hidden
# (this style goes with the bar when the run ends)
ONE_STOP = '<style>[data-testid="stStatusWidget"] button {display: none;}</style>'


class _PerRun(threading.local):
    """The running analysis's bar and Stop button, in `box`: per script run (each session runs
    its script in its own thread, so two users never share them)."""

    bar = None
    box = None


_RUN = _PerRun()


class SlowRun:
    """Progress with time left, and a Stop button, for the CAM methods that take extra passes.

    Stop cancels the job and switches the method back to Grad-CAM (and smoothing off) in its
    callback, so the rerun it starts does not start the slow one again.
    """

    POLL_SECONDS = 0.25

    @staticmethod
    def slow(method: str, smoothing: tuple) -> bool:
        return CAM_METHODS[method].needs == "passes" or "aug" in smoothing

    @staticmethod
    def label(method: str, smoothing: tuple) -> str:
        """What runs, in words: the method, and the augmentation that makes it slow if so."""
        return CAM_METHODS[method].label + (" with augmentation" if "aug" in smoothing else "")

    @classmethod
    def quick(cls, method: str, smoothing: tuple) -> tuple[str, tuple]:
        """What to run where only the predictions count: Grad-CAM instead of a slow method."""
        return ("gradcam", ()) if cls.slow(method, smoothing) else (method, smoothing)

    @classmethod
    def follow(cls, job: SlowJob, label: str) -> None:
        """Draw the job's progress until it ends (each redraw is where a rerun stops us)."""
        while job.running():
            job.watch()
            if _RUN.bar is None:
                if _RUN.box is None:
                    _RUN.box = st.empty()
                with _RUN.box.container():
                    st.markdown(ONE_STOP, unsafe_allow_html=True)
                    st.button("Stop", key=f"stop-slow:{time.monotonic_ns()}", on_click=_stop_slow,
                              args=(label,), icon=":material/stop_circle:")  # fmt: skip
                    _RUN.bar = st.progress(0.0)
            text, left = f"{label}: {job.done} of {job.total} passes", job.time_left()
            if not job.total:
                text = f"{label}: starting…"
            elif left is not None:
                text += f", about {left:.0f} s left"
            _RUN.bar.progress(job.done / max(job.total, 1), text=text)
            time.sleep(cls.POLL_SECONDS)

    @staticmethod
    def cancel(but: tuple | None = None) -> None:
        """Stop this session's slow jobs (all, or all but the one with key `but`)."""
        for key, job in list(st.session_state.get("slow_jobs", {}).items()):
            if key != but:
                job.cancelled = True
                st.session_state["slow_jobs"].pop(key, None)

    @classmethod
    def reserve(cls) -> None:
        """The bar's place, kept in every run, drawn or not: the tabs below keep their place in
        the page, so the tab a user has open stays open while and after a slow method runs."""
        _RUN.box, _RUN.bar = st.empty(), None

    @classmethod
    def done(cls) -> None:
        """The run ended: its bar and Stop button go (a late Stop would undo finished work)."""
        if _RUN.box is not None:
            _RUN.box.empty()
        _RUN.bar = _RUN.box = None


def _stop_slow(label: str) -> None:
    SlowRun.cancel()
    st.session_state["method"], st.session_state["smoothing"] = "gradcam", []
    st.session_state["stopped"] = f"{label} stopped; back to Grad-CAM."


@st.cache_data(show_spinner=False, max_entries=64)
def causal_scores(
    image_sha: str,
    ckpt_sha: str,
    target: int | None,
    saliency_key: str,
    steps: int,
    _ckpt,
    _image,
    _saliency,
):
    x = _ckpt.preprocess.batch([_image])
    # ties in random order, as in the data-set report: a flat map scores at chance
    return deletion_insertion(
        _ckpt.model, x, _saliency, target, steps=steps, tie_seeds=[seed_of(image_sha)]
    )


def load_path(path: str) -> Checkpoint:
    p = policy().check_path(path, "file")  # shared mode: inside the allowed roots only
    stat = p.stat()
    return model_from_path(str(p), stat.st_mtime, stat.st_size)


def policy() -> ServePolicy:
    """This deployment's permissions and limits (`viz.serving`): local or shared."""
    return serve_policy()


# --- small rendering helpers ------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """How this page draws and names what it offers: the sidebar's settings, the model's stem."""

    settings: FigureSettings
    prefix: str  # download file names start with it


def show_figure(build: Callable[[], Figure], name: str, key: str, view: View, errors) -> None:
    """Draw a figure as PNG, close it, and offer it as PNG/PDF/SVG (rendered on click)."""
    try:
        fig = build()
    except USER_ERRORS as exc:
        errors.error(md_text(exc))
        return
    try:
        st.image(figure_bytes(fig, "png", dpi=SCREEN_DPI))
    finally:
        fig.clear()
    for col, fmt in zip(st.columns(len(MIME)), MIME):
        file_name = f"{view.prefix}_{name}.{fmt}"
        col.download_button(
            fmt.upper(), file_name=file_name, mime=MIME[fmt], key=f"dl:{key}:{fmt}",
            icon=":material/download:",
            **Downloads.of_session().on_click(lambda fmt=fmt: _render(build, fmt, view.settings.dpi), file_name),
        )  # fmt: skip


def _render(build: Callable[[], Figure], fmt: str, dpi: int) -> bytes:
    fig = build()
    try:
        return figure_bytes(fig, fmt, dpi=dpi)
    finally:
        fig.clear()


class Downloads:
    """This session's files made on click (Streamlit runs a download's `data` callable outside
    the script, where an exception only reaches the server log): a failure is logged and said
    on the page in one line, by the rerun the click starts, which waits for the file first."""

    GRACE_SECONDS = 2.0  # for the file's request to arrive beside the click's rerun
    LIMIT_SECONDS = 600.0  # the longest a rerun waits on a file being made

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._ended = -float("inf")  # time.monotonic() when the last file was done
        self._failures: list[str] = []

    @staticmethod
    def of_session() -> Downloads:
        found = st.session_state.get("downloads")
        if found is None:
            found = st.session_state["downloads"] = Downloads()
        return found

    def on_click(self, make: Callable[[], bytes], file_name: str) -> dict:
        """A download button's `data` and `on_click`: `make` guarded, and the wait for it."""
        return {"data": self.guarded(make, file_name), "on_click": self.settle}

    def guarded(self, make: Callable[[], bytes], file_name: str) -> Callable[[], bytes]:
        def run() -> bytes:
            with self._lock:
                self._running += 1
            try:
                return make()
            except Exception as exc:
                log.exception("download %s failed", file_name)
                what = exc if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self._failures.append(f"{file_name} could not be made: {what}")
                raise
            finally:
                with self._lock:
                    self._running -= 1
                    self._ended = time.monotonic()

        return run

    def settle(self) -> None:
        """The click's callback, at the start of its rerun: wait until the file is made (or
        none came), so that the page this run draws says whether it failed."""
        start = time.monotonic()
        while True:
            now = time.monotonic()
            with self._lock:
                running, ended = self._running, self._ended
            if running and now - start < self.LIMIT_SECONDS:
                pass
            elif running or ended >= start - self.GRACE_SECONDS or now - start > self.GRACE_SECONDS:
                return
            time.sleep(0.05)

    def report(self, errors) -> None:
        """Show the failures since the last run, one error line each."""
        with self._lock:
            failures, self._failures = self._failures, []
        for line in failures:
            errors.error(md_text(line, limit=300))


def state(key: str, default):
    return st.session_state.setdefault(key, default)


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOption:
    source: str  # shown as "Source" with what was detected
    load: Callable[[], Checkpoint]


def choose_model(errors) -> tuple[str, Checkpoint | None, dict[str, ModelOption]]:
    """Sidebar: embedded, uploaded or server-path checkpoints. Returns (label, ckpt, options)."""
    embedded = embedded_checkpoints()
    models = {
        e.label: ModelOption(
            f"embedded {e.path.name}", lambda e=e: model_from_path(str(e.path), e.mtime, e.size)
        )
        for e in embedded
        if e.error is None
    }
    for e in embedded:
        if e.error:
            errors.warning(md_text(e.error))
    extra: dict[str, ModelOption] = state("extra_models", {})  # this session's own
    models.update(extra)

    st.sidebar.header("Model")
    picker = st.sidebar.container()  # filled below, once uploads have been read
    with st.sidebar.expander("Add a checkpoint", expanded=not models):
        limit_mb = int(st.get_option("server.maxUploadSize"))
        shown = f"{limit_mb / 1024:g} GB" if limit_mb >= 1024 else f"{limit_mb} MB"
        upload = st.file_uploader(f"Upload a checkpoint (up to {shown})", key="ckpt_upload")
        if upload is not None:
            seen: dict = state("ckpt_seen", {})  # file id -> None or its error
            if upload.file_id not in seen:
                try:
                    check_upload_size(upload.size, limit_mb * 2**20, upload.name)
                    with st.spinner(f"Reading {upload.name}…"):
                        data = upload.getvalue()
                        ckpt = model_from_bytes(digest(data), data)
                    label = f"{ckpt.label} (upload {upload.name}, {ckpt.sha256[:8]})"
                    extra[label] = models[label] = ModelOption(
                        f"upload {upload.name}", lambda ckpt=ckpt: ckpt
                    )
                    seen[upload.file_id] = None
                    st.session_state["model"] = label
                except USER_ERRORS as exc:
                    seen[upload.file_id] = f"{upload.name}: {exc}"
            if seen[upload.file_id]:
                errors.error(md_text(seen[upload.file_id]))
        path = ""
        if policy().server_paths:
            path = st.text_input("…or a checkpoint path on the server", key="ckpt_path").strip()
        if path and st.button("Load path", key="ckpt_path_load"):
            try:
                with st.spinner(f"Reading {path}…"):
                    ckpt = load_path(path)
                label = f"{ckpt.label} ({Path(path).name}, {ckpt.sha256[:8]})"
                extra[label] = models[label] = ModelOption(path, lambda path=path: load_path(path))
                st.session_state["model"] = label
            except USER_ERRORS as exc:
                errors.error(md_text(f"{path}: {exc}"))

    if not embedded:
        errors.info(
            f"No embedded checkpoint in {md_text(checkpoint_dir())} yet: upload a checkpoint or give a "
            "path on the server in the sidebar."
        )
    if not models:
        return "", None, models
    labels = list(models)
    if st.session_state.get("model") not in labels:
        first = default_checkpoint(embedded)
        st.session_state["model"] = first.label if first and first.label in labels else labels[0]
    label = picker.selectbox("Model in use", labels, key="model")
    with st.spinner(f"Loading {label}…"):
        ckpt = models[label].load()
    class_names_box(ckpt, errors)  # may give this session's names to the model
    ckpt = with_class_names(ckpt)
    rows = describe_checkpoint(ckpt, source=models[label].source)
    picker.markdown("  \n".join(f"**{k}**: {md_text(v)}" for k, v in rows.items()))
    return label, ckpt, models


def with_class_names(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint with the class names this session gave it, if any (the model is shared)."""
    names = state("class_names", {}).get(ckpt.sha256)
    return ckpt if names is None else dataclasses.replace(ckpt, class_names=names)


def class_names_box(ckpt: Checkpoint, errors) -> None:
    """Sidebar: give a model its class names (a state dict often has none: "class 0", ...)."""
    generic = ckpt.class_names == [f"class {i}" for i in range(len(ckpt.class_names))]
    given: dict = state("class_names", {})
    with st.sidebar.expander("Class names", expanded=generic and ckpt.sha256 not in given):
        upload = st.file_uploader(
            f"A text file, one name per line ({len(ckpt.class_names)} lines)", type=["txt"],
            key=f"names_file:{ckpt.sha256[:16]}", max_upload_size=1,
        )  # fmt: skip
        if upload is None or st.session_state.get("names_seen") == upload.file_id:
            return
        st.session_state["names_seen"] = upload.file_id
        try:
            text = upload.getvalue().decode("utf-8-sig")
            given[ckpt.sha256] = parse_class_names(text, len(ckpt.class_names), upload.name)
        except (UnicodeDecodeError, ValueError) as exc:
            errors.error(md_text(f"{upload.name}: {exc}"))


# --- images ------------------------------------------------------------------------------------


def choose_images(errors) -> list[ImageItem]:
    st.sidebar.header("Images")
    limits = policy()
    uploads = st.sidebar.file_uploader(
        "Upload images", type=list(IMAGE_TYPES), accept_multiple_files=True, key="images",
        max_upload_size=max(1, limits.max_image_bytes // 2**20),
    )  # fmt: skip
    uploads = list(uploads or [])
    if len(uploads) > limits.max_images:
        errors.warning(
            f"{len(uploads)} images uploaded; this server analyses the first {limits.max_images}"
        )
        uploads = uploads[: limits.max_images]
    sources: list[tuple[str, bytes]] = []
    for f in uploads:
        if f.size > limits.max_image_bytes:
            errors.error(
                md_text(f"{f.name}: {f.size / 2**20:.1f} MB, over the "
                        f"{limits.max_image_bytes / 2**20:.0f} MB limit per image")
            )  # fmt: skip
            continue
        sources.append((f.name, f.getvalue()))
    sources = ReloadedImages(limits).follow(bool(uploads), sources, errors)
    items = decoded(sources, limits, errors)
    if not items:  # nothing uploaded, or nothing that could be read: the samples stay at hand
        samples = {s.path.name: s for s in sample_images(SAMPLES)}
        default = [DEFAULT_SAMPLE] if DEFAULT_SAMPLE in samples and not sources else []
        picked = st.sidebar.multiselect(
            "Sample images", list(samples), default=default, key="samples"
        )
        items = decoded([(n, samples[n].path.read_bytes()) for n in picked], limits, errors)
    return items


@st.cache_resource(show_spinner=False)
def kept_uploads(max_bytes: int, seconds: float) -> KeptUploads:
    """The server's store of uploaded images kept for reloaded pages (all sessions)."""
    return KeptUploads(max_bytes, seconds)


class ReloadedImages:
    """Uploaded images survive a reload of the page (which starts a new session, its upload box
    empty): kept on the server (`KeptUploads`, bounded by the serve policy) under a random key
    that the page's address carries (`?images=…`) and, where the browser has Streamlit's XSRF
    cookie, that browser only. Removing the uploads from the box, or "Forget them", drops them.

    Per session, `st.session_state["reload_images"]`: "uploaded:<digest>" (kept), "restored"
    (shown from the store after a reload), "none"; absent in a new session.
    """

    PARAM, STATE = "images", "reload_images"

    def __init__(self, limits: ServePolicy) -> None:
        self.store = kept_uploads(limits.kept_upload_bytes, limits.kept_upload_seconds)
        self.on = limits.kept_upload_bytes > 0

    def _key(self, token: str) -> str:
        return f"{token}:{digest(self._browser().encode())}"

    @staticmethod
    def _browser() -> str:
        """This browser's secret: the token of Streamlit's XSRF cookie, unmasked (the cookie is
        "2|mask|masked token|time", masked anew at each page load); "" without the cookie."""
        cookie = (st.context.cookies or {}).get("_streamlit_xsrf", "")
        try:
            version, mask, masked, _ = cookie.split("|")
            mask_bytes, token = bytes.fromhex(mask), bytes.fromhex(masked)
        except ValueError:
            return cookie
        if version != "2" or len(mask_bytes) != 4:
            return cookie
        return bytes(b ^ mask_bytes[i % 4] for i, b in enumerate(token)).hex()

    def follow(self, uploaded: bool, sources: list[tuple[str, bytes]], errors) -> list:
        """The images to analyse: this run's uploads (kept for a reload), else those kept
        before the page was reloaded."""
        if not self.on:
            return sources
        token, was = st.query_params.get(self.PARAM), st.session_state.get(self.STATE)
        if uploaded:
            stamp = "uploaded:" + digest(b"".join(digest(d).encode() for _, d in sources))
            if was != stamp:
                token = token or KeptUploads.new_key()
                st.query_params[self.PARAM] = token
                if not self.store.put(self._key(token), sources):
                    errors.info("These images are too large to keep for a reload of the page.")
                st.session_state[self.STATE] = stamp
            return sources
        restored = self.store.get(self._key(token)) if token and was in (None, "restored") else []
        if not restored:  # removed from the box, forgotten, expired, or another address
            self.forget(token)
            return []
        st.session_state[self.STATE] = "restored"
        st.sidebar.caption(f"{len(restored)} image(s) kept from before the page was reloaded.")
        st.sidebar.button("Forget them", key="forget_images", on_click=self.forget, args=(token,),
                          icon=":material/delete:")  # fmt: skip
        return restored

    def forget(self, token: str | None) -> None:
        if token:
            self.store.drop(self._key(token))
            st.query_params.pop(self.PARAM, None)
        if self.STATE in st.session_state:
            st.session_state[self.STATE] = "none"


def decoded(sources: list[tuple[str, bytes]], limits, errors) -> list[ImageItem]:
    """The images that decode (allow-listed formats, pixel limit); one error line each other."""
    items = []
    for name, data in sources:
        try:
            image = load_image(_named(data, name), max_pixels=limits.max_pixels)
            items.append(ImageItem(name, data, digest(data), image))
        except ImageError as exc:
            errors.error(md_text(exc))
    return items


def _named(data: bytes, name: str) -> io.BytesIO:
    """The bytes as a file object that carries the name (so an ImageError names the file)."""
    fh = io.BytesIO(data)
    fh.name = name
    return fh


# --- the page ----------------------------------------------------------------------------------


def choose_method(ckpt, errors) -> tuple[str, list, int | None, bool]:
    """The sidebar's CAM method, its layers, its noisy samples (None: not a noisy method) and
    whether it gives one map for the whole network (no layers)."""
    st.sidebar.header("Class activation map")
    methods = methods_for(ckpt.model) if ckpt else list(CAM_METHODS)
    if st.session_state.get("method") not in methods:  # e.g. rollout kept from a ViT
        st.session_state["method"] = "gradcam"
    method = st.sidebar.selectbox(
        "Method", methods, format_func=lambda m: CAM_METHODS[m].label, key="method",
        help="rollout, GAE and LeGrad read a vision transformer's self-attention: one map "
             "for the whole network",
    )  # fmt: skip
    if CAM_METHODS[method].needs == "activations":  # Eigen-CAM
        st.sidebar.caption(
            f"{CAM_METHODS[method].label} reads the activations only: its map is the same "
            "for every class."
        )
    choices = cam_layer_choices(ckpt.model) if ckpt else []
    stages = default_cam_layers(ckpt.model, method) if ckpt else []
    whole = CAM_METHODS[method].needs in ("network", "attention")  # one map, no layers
    # one choice per model and default: the forward-per-channel methods start at the last stage;
    # kept apart from the widget, whose state Streamlit drops while the other one shows
    key = f"layers:{ckpt.sha256 if ckpt else ''}:{CAM_METHODS[method].default_layers}"
    kept = [name for name in st.session_state.get(f"kept {key}", stages) if name in choices]
    layers = st.sidebar.multiselect(
        "Layers", choices, default=kept, key=key, disabled=whole,
        help="not used by this method: it gives one map for the whole network" if whole else None,
    )  # fmt: skip
    st.session_state[f"kept {key}"] = layers
    if whole:  # the greyed-out layers are kept for the next layer method, not used by this one
        layers = []
    elif ckpt:
        layers, note = layers_for_method(ckpt.model, method, layers)
        if note:
            errors.info(md_text(note))
    samples = None
    if method in NUM_SAMPLES:
        samples = st.sidebar.number_input(
            "Noisy samples", 1, 1000, NUM_SAMPLES[method], key=f"num_samples:{method}",
            help="noisy copies per channel (SS-CAM, IS-CAM) or per image (SmoothGrad-CAM++); "
                 "the passes grow in proportion",
        )  # fmt: skip
    return method, layers, None if samples is None else int(samples), whole


def main() -> None:
    st.set_page_config(page_title="Attention Lens", page_icon=":mag:", layout="wide")
    st.title("Attention Lens")
    st.caption(
        "What attention does inside a network: every BAM/CBAM/SE module's spatial map and "
        "channel weights, a vision transformer's self-attention per block and head, CAMs from "
        "the same pass, and how much they agree."
    )
    errors = st.container()  # the one place where problems are reported
    Downloads.of_session().report(errors)
    for line in plugin_errors():
        errors.warning(md_text(line, limit=400))
    if policy().warning:
        errors.warning(md_text(policy().warning))
    try:
        label, ckpt, models = choose_model(errors)
        items = choose_images(errors)
        method, layers, samples, whole = choose_method(ckpt, errors)
        st.sidebar.header("Drawing")
        offered = smoothings_for(method)
        if set(st.session_state.get("smoothing", [])) - set(offered):
            st.session_state["smoothing"] = [
                s for s in st.session_state["smoothing"] if s in offered
            ]
            errors.info(
                f"{CAM_METHODS[method].label} is a principal component already (or has no "
                "channels): principal-component smoothing is off."
            )
        # one settings object drives the screen, every download, the zip and its manifest
        smoothing = st.sidebar.multiselect(
            "Smoothing", offered, key="smoothing",
            format_func={"aug": "augmentation (6x passes)", "eigen": "principal component"}.get,
            help="aug: the mean map over mirrored and brightened copies of the image; eigen: "
                 "the first principal component of the weighted activations",
        )  # fmt: skip
        if "stopped" in st.session_state:
            errors.info(st.session_state.pop("stopped"))
        settings = FigureSettings(
            method=method,
            layers=tuple(layers) or None,
            smoothing=tuple(smoothing),
            num_samples=samples,
            cmap=st.sidebar.selectbox("Colour map", CMAPS, key="cmap"),
            alpha=st.sidebar.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="alpha"),
            scale=st.sidebar.radio("Scale", SCALES, horizontal=True, key="scale",
                                   help="shared: one colour scale with real values; "
                                        "per-map: each map stretched to its own min-max"),
            width=st.sidebar.radio("Figure width", ["double", "single"], horizontal=True,
                                   key="width", help="double: 6.9 in, single: 3.3 in (a paper column)"),
            dpi=st.sidebar.select_slider("Download dpi", [150, 300, 600], value=300, key="dpi"),
            render=st.sidebar.radio("Maps drawn", RENDERS, horizontal=True, key="render",
                                    help="smooth: enlarged bilinearly, as in the papers; cells: "
                                         "one flat block per map cell, the grid drawn"),
        )  # fmt: skip
        if ckpt is None:
            return
        if not items:
            st.info("Upload images or pick sample images in the sidebar.")
            return
        if not layers and not whole:
            raise ValueError("choose at least one CAM layer in the sidebar")
        page(ckpt, label, models, items, View(settings, safe_stem(ckpt.label)), errors)
    except USER_ERRORS as exc:
        errors.error(md_text(exc))
    except Exception as exc:  # a bug of ours: one line on the page, the traceback in the log
        log.exception("unexpected error")
        errors.error(
            md_text(f"Unexpected error ({type(exc).__name__}: {exc}); the server log has details.")
        )


def predict_all(ckpt: Checkpoint, items: list[ImageItem], method: str, layers: tuple,
                smoothing: tuple) -> list:  # fmt: skip
    bar = st.progress(0.0, text="Analysing images…") if len(items) > 1 else None
    out = []
    with st.spinner("Running the network…"):
        for i, item in enumerate(items):
            out.append(analysis(item.sha, ckpt.sha256, None, method, layers, smoothing, ckpt,
                                item.image))  # fmt: skip
            if bar:
                bar.progress((i + 1) / len(items), text=f"Analysed {i + 1} of {len(items)} images")
    if bar:
        bar.empty()
    return out


def chosen_target(item: ImageItem, ckpt: Checkpoint) -> int | None:
    """The class the user picked for this image and model (None: the top-1 prediction)."""
    key = f"{item.sha[:16]}:{ckpt.sha256[:16]}"
    choice = st.session_state.get(f"t5:{key}")
    if choice == OTHER:
        choice = st.session_state.get(f"tall:{key}")
    return None if choice is None else int(choice)


def page(ckpt, label, models, items, view: View, errors) -> None:
    settings = view.settings
    # the picker needs every image's prediction; a slow method runs on the picked image only
    quick, quick_smoothing = SlowRun.quick(settings.method, settings.smoothing)
    base = predict_all(ckpt, items, quick, settings.layers, quick_smoothing)
    # the network's crop at the original's resolution: the same photo as in the downloads
    crops = [ckpt.preprocess.display_crop(item.image) for item in items]
    pick = pick_image(ckpt, label, items, base, crops)
    item, crop = items[pick], crops[pick]
    tkey = f"{item.sha[:16]}:{ckpt.sha256[:16]}"
    target, an = explained_class(ckpt, label, item, crop, base[pick], settings, tkey)
    # a transformer has heads where a CNN has channel weights
    transformer = any(rec.kind == "self-attention" for rec in an.trace)
    # "Class activation map" whatever the method (the figure names it): a tab renamed by a
    # change of method would close, the browser going back to the first tab
    tabs = st.tabs(
        ["Spatial attention", "Attention heads" if transformer else "Channel attention",
         CAM_TAB, "Agreement & deletion/insertion", "BAM hierarchy", "Compare models",
         "Class statistics", "Data set"]
    )  # fmt: skip
    stem = safe_stem(item.name)

    def draw(name: str, **extra):
        return lambda: draw_image_figure(name, crop, an, ckpt.class_names, settings, **extra)

    with tabs[0]:
        if an.trace.spatial_records:
            show_figure(draw("overview"), f"{stem}_spatial", f"sp:{tkey}", view, errors)
        else:  # a note, not a figure to download
            st.info(no_spatial_maps(md_text(ckpt.label), an.trace))
    with tabs[1]:
        if transformer:
            show_figure(draw("heads"), f"{stem}_heads", f"hd:{tkey}", view, errors)
        else:
            channel_tab(ckpt, items, base, pick, view, stem, tkey, errors)
    with tabs[2]:
        show_figure(draw("gradcam"), f"{stem}_gradcam", f"gc:{tkey}", view, errors)
        captum_panel(ckpt, item, target, view, stem, tkey, errors)
    with tabs[3]:
        agreement_tab(ckpt, item, an, target, view, errors)
    with tabs[4]:
        if FIGURES["bam-hierarchy"].unavailable(an) is None:
            show_figure(draw("bam-hierarchy"), f"{stem}_bam_hierarchy", f"bam:{tkey}", view, errors)
        else:
            st.info("The BAM hierarchy exists only for BAM models; choose one in the sidebar.")
    with tabs[5]:
        compare_tab(ckpt, label, models, items, crops, view, errors)
    with tabs[6]:
        if an.trace.channel_records:
            class_stats_tab(ckpt, view, errors)
        else:  # the statistics are channel weights: none in a ViT or a plain network
            st.info(
                f"Class statistics average channel weights (SE, ECA, CBAM, BAM); "
                f"{md_text(ckpt.label)} has none"
                + (" (self-attention weighs tokens, not channels)." if transformer else ".")
            )
    with tabs[7]:
        dataset_tab(ckpt, label, settings.method, errors)


def pick_image(ckpt, label, items, base, crops) -> int:
    """With several images: a strip of them with their predictions, and which to inspect."""
    if len(items) == 1:
        return 0
    st.subheader(f"{len(items)} images · {md_text(label)}")
    for start in range(0, len(items), 5):
        for col, i in zip(st.columns(5), range(start, min(start + 5, len(items)))):
            top = top_predictions(base[i].probs[0], ckpt.class_names, 1)[0]
            col.image(
                crops[i],
                caption=f"{md_text(items[i].name)}: {md_text(top.name)} (P = {top.prob:.2f})",
            )
    return st.selectbox(
        "Inspect image", range(len(items)), format_func=lambda i: items[i].name, key="inspect"
    )


def explained_class(ckpt, label, item, crop, base, settings: FigureSettings, tkey: str):
    """The image, its top-5, the class to explain and the zip of everything; (target, analysis)."""
    names = ckpt.class_names
    left, right = st.columns([1, 2])
    left.image(crop, caption=f"{md_text(item.name)} as the network sees it")
    top5 = top_predictions(base.probs[0], names, 5)
    right.markdown(
        f"**Prediction: {md_text(top5[0].name)}** (P = {top5[0].prob:.3f}) · {md_text(label)}"
    )
    right.dataframe(
        pd.DataFrame({"class": [p.name for p in top5], "P": [round(p.prob, 4) for p in top5]}),
        hide_index=True,
    )
    choice = right.radio(
        "Explain class", [p.index for p in top5] + [OTHER], horizontal=True, key=f"t5:{tkey}",
        format_func=lambda i: "another class…" if i == OTHER else md_text(names[i]),
    )  # fmt: skip
    if choice == OTHER:
        choice = right.selectbox(
            "Search all classes", range(len(names)), index=top5[0].index,
            format_func=names.__getitem__, key=f"tall:{tkey}",
        )  # fmt: skip
    target = None if choice == top5[0].index else int(choice)
    SlowRun.reserve()
    if not SlowRun.slow(settings.method, settings.smoothing):
        SlowRun.cancel()  # a slow method left for a quick one: its job would run on for nothing
    an = analysis(item.sha, ckpt.sha256, target, settings.method, settings.layers,
                  settings.smoothing, ckpt, item.image,
                  tuple(settings.method_options().items()))  # fmt: skip
    SlowRun.done()
    if target is not None:
        right.markdown(
            f"Explaining **{md_text(names[target])}** (P = {float(an.target_probs[0]):.3f})"
        )
    file_name = f"{safe_stem(ckpt.label)}_{safe_stem(item.name)}_attention_lens.zip"
    right.download_button(
        "Everything for this image (zip)", icon=":material/folder_zip:",
        file_name=file_name, mime="application/zip", key=f"zip:{tkey}",
        help="All figures as PNG, PDF and SVG, the raw maps (maps.npz) and a manifest: the files "
        "`python -m viz export` writes.",
        **Downloads.of_session().on_click(lambda: zip_bundle(image_bundle(
            item.data, ckpt, name=item.name, figures=IMAGE_FIGURES, formats=FORMATS,
            target=target, analysis=an, settings=settings,
        )), file_name),
    )  # fmt: skip
    return target, an


CAPTUM_LABELS = {
    "guided-gradcam": "Guided Grad-CAM (2 passes)",
    "integrated-gradients": "Integrated Gradients (32 passes)",
    "occlusion": "Occlusion (one pass per 16-px step of a 32-px window)",
}


CAPTUM_KEPT = 8  # attributions kept per browser session


def captum_attribution(ckpt, item: ImageItem, target: int | None, method: str):
    """The attribution of this image, model, class and method: computed once per session.

    Not an `st.cache_data` function: the computation reports progress on the page, and a
    cached function must not touch Streamlit elements (its replay would fail on a revisit).
    """
    kept: dict = state("captum_results", {})
    key = (item.sha, ckpt.sha256, target, method)
    if key not in kept:
        bar = st.progress(0.0, text="Starting…")
        try:
            x = ckpt.preprocess.batch([item.image])
            kept[key] = attribute(ckpt.model, x, target, method=method, progress=lambda done, total: bar.progress(
                done / total, text=f"{done} of {total} images through the network"))  # fmt: skip
        finally:
            bar.empty()
        while len(kept) > CAPTUM_KEPT:
            kept.pop(next(iter(kept)))
    return kept[key]


def captum_panel(ckpt, item, target, view: View, stem, tkey, errors) -> None:
    with st.expander("Captum attributions at input resolution"):
        method = st.selectbox("Attribution method", list(ATTRIBUTION_METHODS), key="captum_method",
                              format_func=lambda m: CAPTUM_LABELS.get(m, m))  # fmt: skip
        if not st.toggle("Run", key="captum_run"):
            return
        try:
            attr = captum_attribution(ckpt, item, target, method)
        except USER_ERRORS as exc:
            errors.error(md_text(exc))
            return
        crop = ckpt.preprocess.crop_image(item.image)
        label = CAPTUM_LABELS.get(method, method).split(" (")[0]
        s = view.settings
        show_figure(
            lambda: figures.attribution_map(crop, attr[0], method_label=label, cmap=s.cmap, alpha=s.alpha, width=s.width),
            f"{stem}_{method}", f"captum:{tkey}:{method}", view, errors,
        )  # fmt: skip
        st.download_button(
            "Attribution (npz)", npz_bytes({"attribution": attr[0].numpy()}),
            file_name=f"{view.prefix}_{stem}_{method}.npz",
            key=f"captum_dl:{tkey}", on_click="ignore", icon=":material/download:",
        )  # fmt: skip


def channel_tab(ckpt, items, base, pick, view: View, stem, tkey, errors) -> None:
    trace = base[pick].trace
    if not len(trace):
        st.info(f"{md_text(ckpt.label)} has no attention modules, so no channel weights.")
        return
    c1, c2 = st.columns(2)
    top_k = c1.slider("Top channels of the last module", 4, 32, 10, key="top_k")
    others = [i for i in range(len(items)) if i != pick]
    other = c2.selectbox(
        "Compare with image", [None, *others], key="channel_compare",
        format_func=lambda i: "(none)" if i is None else items[i].name,
    )  # fmt: skip
    compare = None if other is None else base[other].trace
    labels = None if other is None else [items[pick].name, items[other].name]
    crop = ckpt.preprocess.display_crop(items[pick].image)
    show_figure(
        lambda: draw_image_figure("channels", crop, base[pick], ckpt.class_names, view.settings, top_k=top_k, compare=compare, labels=labels),
        f"{stem}_channels", f"ch:{tkey}", view, errors,
    )  # fmt: skip


def agreement_tab(ckpt, item, an, target, view: View, errors) -> None:
    method, layers = view.settings.method, view.settings.layers
    rows = agreement_table(an, 0)
    prefix = f"{safe_stem(ckpt.label)}_{safe_stem(item.name)}"
    if rows:
        table = pd.DataFrame(
            [(m, layer, a.pearson, a.spearman, a.iou, int(an.trace[m].spatial[0].numel()),
              "" if a.reason is None else f"n/a: {a.reason}")
             for m, layer, a in rows],
            columns=["attention module", f"{an.method_label} layer", "Pearson", "Spearman",
                     "IoU (top 20%)", "cells", "note"],
        )  # fmt: skip
        st.dataframe(
            table,
            hide_index=True,
            column_config={
                k: st.column_config.NumberColumn(format="%.3f")
                for k in ("Pearson", "Spearman", "IoU (top 20%)")
            },
        )
        st.download_button(
            "Agreement table (CSV)", table.to_csv(index=False).encode(), mime="text/csv",
            file_name=f"{prefix}_agreement.csv", key=f"agree_csv:{prefix}", on_click="ignore",
            icon=":material/download:",
        )  # fmt: skip
    else:
        st.info(f"No spatial attention map to compare with {an.method_label} in this model.")
    st.markdown(
        "**Deletion / insertion** (RISE): remove or reveal the most salient pixels first; "
        "a random map gives the chance level."
    )
    whole = CAM_METHODS[method].needs in ("network", "attention")  # one map, no layers
    maps, shown = saliency_maps(an, whole)
    chosen = choose_saliency_maps(maps, shown, whole)
    steps = st.slider("Steps", 8, 64, 16, 8, key="di_steps")
    if not chosen:
        st.info("Pick at least one saliency map to score.")
        return
    if st.toggle(f"Run ({len(chosen) + 1} maps x {2 * steps + 3} forward passes)", key="di_run"):
        results = {}
        bar = st.progress(0.0, text="Deleting and inserting pixels…")
        size = (ckpt.preprocess.crop, ckpt.preprocess.crop)  # the network input's side
        noise = random_saliency([seed_of(item.sha)], size)
        named = [(shown[m], maps[m]) for m in chosen] + [(figures.RANDOM_LABEL, noise)]
        for done, (name, saliency) in enumerate(named):
            key = f"{method}:{','.join(layers or ())}:{name}"
            results[name] = causal_scores(
                item.sha, ckpt.sha256, target, key, steps, ckpt, item.image, saliency
            )
            bar.progress((done + 1) / len(named), text=f"{done + 1} of {len(named)} maps")
        bar.empty()
        table = pd.DataFrame(
            [(m, float(r.deletion_auc[0]), float(r.insertion_auc[0])) for m, r in results.items()],
            columns=["map", "deletion AUC (lower is better)", "insertion AUC (higher is better)"],
        )  # fmt: skip
        st.dataframe(table, hide_index=True)
        show_figure(
            lambda: figures.deletion_insertion_curves(results, width=view.settings.width),
            f"{prefix}_deletion_insertion", f"di_fig:{prefix}", view, errors,
        )  # fmt: skip
        st.download_button(
            "Curves (CSV)", deletion_insertion_csv(results), mime="text/csv",
            file_name=f"{prefix}_deletion_insertion.csv", key=f"di_csv:{prefix}",
            on_click="ignore", icon=":material/download:",
        )  # fmt: skip


def saliency_maps(an, whole: bool) -> tuple[dict, dict[str, str]]:
    """The maps deletion/insertion can score, the method's first, and their names on screen.

    Keyed without the CAM method (`cam:<layer>`, `NETWORK_MAP` for the one map of a
    whole-network method, `attention:<module>`), so that a choice survives changing the method."""
    maps = {NETWORK_MAP if whole else f"cam:{k}": v for k, v in an.cams.items()}
    maps.update({f"attention:{r.name}": r.spatial for r in an.trace.spatial_records})
    shown = {m: an.method_label if m == NETWORK_MAP else f"{an.method_label} {m[4:]}"
             if m.startswith("cam:") else m.replace(":", " ", 1) for m in maps}  # fmt: skip
    return maps, shown


def choose_saliency_maps(maps: dict, shown: dict[str, str], whole: bool) -> list[str]:
    """The "Saliency maps" box: the user's choice carried over a change of method, layers or
    model (`carry_saliency_choice`), the method's map offered first."""
    before = st.session_state.get("di_maps")
    carried = carry_saliency_choice(before, list(maps), whole=whole,
                                    was_whole=st.session_state.get("di_whole"),
                                    layer_picks=st.session_state.get("di_layer_picks", ()))  # fmt: skip
    if before is not None and carried != before:
        st.session_state["di_maps"] = carried
    default = None if "di_maps" in st.session_state else carried
    chosen = st.multiselect("Saliency maps", list(maps), default=default,
                            format_func=shown.__getitem__, key="di_maps")  # fmt: skip
    st.session_state["di_whole"] = whole
    if not whole:  # what comes back after a whole-network method
        st.session_state["di_layer_picks"] = [m for m in chosen if m.startswith("cam:")]
    return chosen


def compare_tab(ckpt, label, models, items, crops, view: View, errors) -> None:
    s = view.settings
    method, layers, smoothing = s.method, s.layers, s.smoothing
    slow = SlowRun.slow(method, smoothing)
    if slow:  # extra passes for every model and image: the comparison shows Grad-CAM
        method, smoothing = SlowRun.quick(method, smoothing)
    intro = st.empty()  # what the grid shows: written once the stage and the rows are known
    # the user's picks stay as they are when another model is put in use (their work)
    default = None if "compare" in st.session_state else [label]
    picked = st.multiselect("Models side by side", list(models), default=default, key="compare")
    if not picked:
        intro.markdown(compare_intro(view.settings, method, st.session_state.get("grid_stage", 4)))
        st.info("Pick at least one model.")
        return
    loaded = {name: with_class_names(models[name].load()) for name in picked}
    classes = column_classes(ckpt, items, loaded, method, layers, smoothing, errors)
    stage = st.radio("Stage of the CAM", [4, 3, 2, 1], horizontal=True, key="grid_stage",
                     format_func=lambda s: f"stage {s}" + (" (last, as in the paper)" if s == 4 else ""),
                     help="The same stage in every row, whatever each network calls the layer; "
                          "a network without it (a ViT: one resolution throughout) shows the "
                          "layer at the same depth, named above the grid.")  # fmt: skip
    grid, notes = [], []
    bar = st.progress(0.0, text="Analysing…") if len(picked) > 1 else None
    for n, name in enumerate(picked):
        row, note = grid_row(loaded[name], models[name].source, items, classes, method,
                             smoothing, stage)  # fmt: skip
        grid.append(row)
        notes += [note] if note else []
        if bar:
            bar.progress((n + 1) / len(picked), text=f"Analysed {name}")
    if bar:
        bar.empty()
    intro.markdown(compare_intro(view.settings, method, stage, notes))
    # rows as in the papers (plain, SE, BAM, CBAM, then others), not in click order
    rows, missing = model_grid_rows(grid)
    show_figure(
        lambda: figures.model_grid(crops, rows, column_titles=classes, stage=stage, cmap=s.cmap, alpha=s.alpha, width=s.width, missing=missing, render=s.render),
        "model_grid", "grid", view, errors,
    )  # fmt: skip


def grid_row(other, source, items, classes, method, smoothing, stage) -> tuple[GridModel, str]:
    """One model's row of the comparison at `stage`, and a note when its network has no such
    stage (a ViT: the block at the same depth stands in, `grid_stand_in`)."""
    # a transformer method on a CNN row: that row shows Grad-CAM (its label says so)
    own = method if method in methods_for(other.model) else "gradcam"
    found, absent, stand_in = [], [], None
    for c, (item, cls) in enumerate(zip(items, classes)):
        t = other.class_names.index(cls) if cls in other.class_names else None
        if t is None:
            absent.append(c)  # drawn as n/a, not as another class under this title
        # each model's own stage layers: networks name their layers differently
        an = analysis(item.sha, other.sha256, t, own, None, smoothing, other, item.image)
        if c == 0:
            stand_in = grid_stand_in(other.model, an, stage)
        if stand_in is not None:
            if stand_in.layer not in an.cams:
                an = analysis(item.sha, other.sha256, t, own, (stand_in.layer,), smoothing,
                              other, item.image)  # fmt: skip
            an = shown_at_stage(an, stand_in.layer, stage)
        found.append(an)
    note = f"{md_text(other.label)}: {md_text(stand_in.note)}" if stand_in else ""
    return GridModel(other.label, source, other, found, absent), note


def compare_intro(settings: FigureSettings, method: str, stage: int, notes=()) -> str:
    """What the comparison shows: the method, the stage (the last only when it is), the rows
    that stand in for a stage their network does not have."""
    label = CAM_METHODS[method].label
    at = "of the last stage" if stage == 4 else f"at stage {stage}"
    if CAM_METHODS[method].needs in ("network", "attention"):  # no stages: one map per network
        shown = (f"{label} (one map for the whole network; a row whose network has no "
                 f"{label} shows its Grad-CAM {at})")  # fmt: skip
    else:
        shown = f"{label} {at}"
    text = (
        f"The CBAM paper's comparison: {shown}, one row per model, and the softmax score P of "
        "each column's class (the class chosen for that image, else the prediction of the model "
        "in use)."
    )
    if SlowRun.slow(settings.method, settings.smoothing):
        text += (f" {SlowRun.label(settings.method, settings.smoothing)} would take its extra "
                 "passes for every model and image, so the comparison shows Grad-CAM.")  # fmt: skip
    return "  \n".join([text, *notes])


FROM_MODEL = "(the model in use: its chosen class or top-1)"


def column_classes(ckpt, items, loaded, method, layers, smoothing, errors) -> list[str]:
    """The class of each column, per image and independent of the model in use: from an
    uploaded labels CSV, a choice made here, or else what the model in use explains."""
    upload = st.file_uploader(
        "Labels CSV (columns file,label: the image's file name and its class name)",
        type=["csv"], key="grid_labels", max_upload_size=5,
    )  # fmt: skip
    labels: dict[str, str] = {}
    if upload is not None:
        try:
            labels = parse_labels(upload.getvalue().decode("utf-8-sig"), upload.name)
        except (UnicodeDecodeError, UsageError) as exc:
            errors.error(md_text(f"{upload.name}: {exc}"))
    names = sorted(
        {n for other in loaded.values() for n in other.class_names} | set(ckpt.class_names)
    )
    classes = []
    with st.expander("Class of each column", expanded=bool(labels)):
        for item in items:
            key = f"colcls:{item.sha[:16]}"
            label = label_of(Path(item.name), labels) if labels else None
            if label is not None:
                found = class_index(label.strip(), names)
                label = label if found is None else names[found]
                if label not in names:
                    errors.warning(
                        md_text(f"{item.name}: label {label!r} is no class of these models")
                    )
                    label = None
            stamp = f"{key}:from"  # a new CSV sets the choice again; a choice made here stays
            if label is not None and st.session_state.get(stamp) != label:
                st.session_state[key], st.session_state[stamp] = label, label
            choice = st.selectbox(
                md_text(item.name), [FROM_MODEL, *names], key=key,
                help="The class every row explains in this column, whichever model is in use.",
            )  # fmt: skip
            if choice == FROM_MODEL:
                t = chosen_target(item, ckpt)
                if t is None:
                    quick, quick_smoothing = SlowRun.quick(method, smoothing)  # the top-1 only
                    t = int(analysis(item.sha, ckpt.sha256, None, quick, layers, quick_smoothing,
                                     ckpt, item.image).target[0])  # fmt: skip
                choice = ckpt.class_names[t]
            classes.append(choice)
    return classes


def class_stats_tab(ckpt, view: View, errors) -> None:
    s = view.settings
    st.markdown(
        "Mean channel weight per class over a folder on the server, one subfolder per class "
        "(ImageFolder layout)."
    )
    limits = policy()
    if not limits.server_paths:
        st.info("Server paths are turned off on this server (shared mode without allowed folders).")
        return
    folder = st.text_input("Image folder on the server", key="stats_folder").strip()
    results: dict = state("class_stats", {})
    key = (ckpt.sha256, folder)
    if st.button("Compute class statistics", disabled=not folder, key="stats_run"):
        bar = st.progress(0.0, text="Reading images…")
        try:
            root = limits.check_path(folder, "folder")
            results[key] = channel_statistics(
                ckpt.model, root, ckpt.preprocess,
                progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total} images"),
                max_images=limits.max_stats_images, max_seconds=limits.max_stats_seconds,
            )  # fmt: skip
        except USER_ERRORS as exc:
            errors.error(md_text(f"{folder}: {exc}"))
        bar.empty()
    if key in results:
        stats = results[key]
        chosen = st.multiselect(
            "Modules", list(stats.means), default=default_modules(stats),
            format_func=lambda n: stats.labels.get(n, n), key=f"stats_modules:{ckpt.sha256[:16]}",
            help="Default: the last module of each stage, as in the SENet paper; add any other.",
        )  # fmt: skip
        if not chosen:
            st.info("Pick at least one module.")
            return
        show_figure(
            lambda: figures.class_channel_stats(stats, modules=chosen, cmap=s.cmap, shared_scale=s.shared_scale, width=s.width),
            "class_channel_stats", f"stats:{ckpt.sha256[:16]}", view, errors,
        )  # fmt: skip


def offer_labels_csv(folder: str, limits: ServePolicy) -> None:
    """Say so when the image folder has a labels.csv (as samples/ has), where it may be read."""
    try:
        found = limits.check_path(str(Path(folder) / "labels.csv"), "file")
    except ValueError:  # none, or not to be read (shared mode: outside the allowed folders)
        return
    st.caption(f"{md_text(found)} is there: give it as the labels CSV to use it.")


def dataset_tab(ckpt, label, method, errors) -> None:
    st.markdown(
        "Numbers over a folder of images on the server (`python -m viz report`): accuracy, "
        "deletion/insertion AUC, attention ↔ CAM agreement, the randomisation sanity check, "
        "with 95% bootstrap intervals. Run it here on the model in use, or open a report folder."
    )
    limits = policy()
    if not limits.server_paths:
        st.info("Server paths are turned off on this server (shared mode without allowed folders).")
        return
    reports: dict = state("reports", {})
    if reports.get("model") != ckpt.sha256:  # a report of the model in use only
        reports["current"], reports["model"] = None, ckpt.sha256
    run_tab, open_tab = st.columns(2)
    with run_tab:
        folder = st.text_input(
            "Image folder (ImageFolder layout, or any images)", key="rep_images"
        ).strip()
        labels = st.text_input(
            "Labels CSV (optional; columns file,label)", key="rep_labels",
            help="the class of each image, by file name (as samples/labels.csv); overrides the "
                 "class folders of an ImageFolder; without labels and class folders there is "
                 "no accuracy",
        ).strip()  # fmt: skip
        if folder and not labels:
            offer_labels_csv(folder, limits)
        deletion = st.selectbox("Deletion/insertion on", DELETION_CHOICES, index=1, key="rep_del",
                                help="all maps, default (the last stage's CAM and a random map) "
                                "or off; each map costs 35 forwards per image")  # fmt: skip
        # each of the check's ~11 steps reruns the method: 2 images for the slow methods
        first = min(8, default_sanity(method))
        sanity = st.number_input("Sanity-check images", 0, 256, first, key=f"rep_sanity:{first}")
        if st.button("Run the report", disabled=not folder, key="rep_run"):
            bar = st.progress(0.0, text="Starting…")
            try:
                root = limits.check_path(folder, "folder")
                csv = str(limits.check_path(labels, "file")) if labels else None
                name = safe_stem(ckpt.label.replace(".", " "))  # the model, not the file name
                inputs = inputs_for([(name, label, ckpt)], root, labels=csv,
                                    max_images=limits.max_stats_images)  # fmt: skip
                out = temporary_report_folder(reports.get("folder"))
                reports["folder"], reports["current"] = out, None
                options = ReportOptions(method=method, deletion=deletion, sanity=int(sanity))
                rows = run_report(inputs, out, options, progress=lambda done, total: bar.progress(
                    done / max(1, total), text=f"{done:.1f} of {total} images"))  # fmt: skip
                write_report(out, rows, inputs, options)
                reports["current"] = open_report(out)
            except (*USER_ERRORS, UsageError) as exc:
                errors.error(md_text(f"{folder}: {exc}"))
            bar.empty()
    with open_tab:
        done_folder = st.text_input("A finished report folder", key="rep_open").strip()
        if st.button("Open", disabled=not done_folder, key="rep_open_go"):
            try:
                reports["current"] = open_report(limits.check_path(done_folder, "folder"))
            except USER_ERRORS as exc:
                errors.error(md_text(f"{done_folder}: {exc}"))
    report = reports.get("current")
    if report is None:
        return
    st.subheader("Summary")
    for title, rows in readable_summary(report.summary).items():
        if rows:  # file text shown as data, never as Markdown
            st.caption(title)
            st.dataframe(pd.DataFrame(rows), hide_index=True)
    for name, image in report.figures.items():
        st.image(image, caption=name)
    if report.per_image:
        with st.expander("Per image"):
            st.dataframe(pd.DataFrame(report.per_image), hide_index=True)
    cols = st.columns(4)
    for i, (name, path) in enumerate(report.files.items()):
        cols[i % 4].download_button(
            name, data=path.read_bytes(), file_name=name, key=f"rep_dl:{name}", on_click="ignore",
            mime="text/html" if name.endswith(".html") else "text/plain",
        )  # fmt: skip


main()
