"""Widgets every view shares: a figure with its downloads (`show_figure`), the session's files
made on click (`Downloads`), and `state` for what a session keeps."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

import streamlit as st
from matplotlib.figure import Figure

import viz

from . import keys
from .context import USER_ERRORS, View
from .drawn import Drawn, screen_png

MIME = {"png": "image/png", "pdf": "application/pdf", "svg": "image/svg+xml"}  # viz.FORMATS
log = logging.getLogger("attention_lens.app")


def state(key: str, default):
    """What this session keeps under `key` (one of `lens_app.keys`), set to `default` once."""
    return st.session_state.setdefault(key, default)


def show_figure(build: Callable[[], Figure], name: str, key: str, view: View, errors) -> None:
    """Draw a figure as PNG and offer it as PNG/PDF/SVG: the PNG at the download dpi is made
    from the same figure in the background once it is shown (the likeliest click answers at
    once), PDF and SVG are rendered on click. A `Drawing` with a key is kept by this session
    (`Drawn`): shown again, with its PNG made, it is not drawn at all."""
    figure_key, drawn, dpi = getattr(build, "key", None), Drawn.of_session(), view.settings.dpi
    screen = png = fig = None
    if figure_key is not None:
        screen, png = drawn.get((figure_key, "screen")), drawn.get((figure_key, dpi))
    if screen is None or png is None:  # drawn (the PNG made ahead is its second draw, as ever)
        try:
            fig = build()
        except USER_ERRORS as exc:
            errors.error(viz.md_text(exc))
            return
    try:
        if fig is not None:
            screen = screen_png(fig)
            if figure_key is not None:
                drawn.put((figure_key, "screen"), screen)
        st.image(screen, output_format="PNG")  # as it is (auto: a 3-channel PNG made a JPEG)
    except BaseException:
        if fig is not None:
            fig.clear()
        raise
    if png is None:
        keep = None if figure_key is None else partial(drawn.put, (figure_key, dpi))
        take_png = partial(Prerendered.start(fig, dpi, key, keep).take, build)  # closes the figure
    else:
        take_png = partial(bytes, png)
    for col, fmt in zip(st.columns(len(MIME)), MIME):
        file_name = f"{view.prefix}_{name}.{fmt}"
        make = take_png if fmt == "png" else partial(_render, build, fmt, dpi)
        col.download_button(
            fmt.upper(), file_name=file_name, mime=MIME[fmt], key=keys.figure_download(key, fmt),
            icon=":material/download:", **Downloads.of_session().on_click(make, file_name),
        )  # fmt: skip


def _render(build: Callable[[], Figure], fmt: str, dpi: int) -> bytes:
    fig = build()
    try:
        return viz.figure_bytes(fig, fmt, dpi=dpi)
    finally:
        fig.clear()


class Prerendered:
    """A shown figure's PNG at the download dpi, made by one background thread per server
    (newest first; a figure shown again under the same key supersedes the older one, which is
    dropped unmade), so a PNG download need not render when clicked. `take` returns it,
    waiting if it is being made, or renders it anew if it was dropped."""

    KEPT = 16  # figures a session keeps a slot for
    _lock = threading.Condition()
    _queue: list[Prerendered] = []  # waiting, oldest first
    _worker: threading.Thread | None = None

    def __init__(self, fig: Figure, dpi: int, keep: Callable[[bytes], None] | None = None) -> None:
        self.fig, self.dpi, self.keep = fig, dpi, keep
        self.state = "waiting"  # then "making", "made" or "dropped"
        self.data: bytes | None = None

    @classmethod
    def start(cls, fig: Figure, dpi: int, key: str,
              keep: Callable[[bytes], None] | None = None) -> Prerendered:  # fmt: skip
        """Queue the figure's PNG; `keep(png)` is called once it is made."""
        job, latest = cls(fig, dpi, keep), state(keys.PRERENDERED, {})  # key -> the newest
        with cls._lock:
            older = latest.get(key)
            if older is not None and older.state == "waiting":
                older._drop()
            latest.pop(key, None)
            latest[key] = job
            while len(latest) > cls.KEPT:  # the page's buttons hold their own; these are spares
                latest.pop(next(iter(latest)))
            cls._queue.append(job)
            if cls._worker is None or not cls._worker.is_alive():
                cls._worker = threading.Thread(target=cls._work, daemon=True)
                cls._worker.start()
            cls._lock.notify()
        return job

    def _drop(self) -> None:
        self.state = "dropped"
        self.fig.clear()
        self.fig = None

    @classmethod
    def _work(cls) -> None:
        while True:
            with cls._lock:
                while not cls._queue:
                    cls._lock.wait()
                job = cls._queue.pop()  # the newest: the figure a user looks at now
                if job.state != "waiting":
                    continue
                job.state = "making"
            try:
                data = viz.figure_bytes(job.fig, "png", dpi=job.dpi)
            except Exception:  # the click renders it again and says what fails
                log.exception("background PNG failed")
                data = None
            finally:
                job.fig.clear()
            if data is not None and job.keep is not None:
                job.keep(data)
            with cls._lock:
                job.fig, job.data = None, data
                job.state = "made" if data is not None else "dropped"
                cls._lock.notify_all()

    def take(self, build: Callable[[], Figure]) -> bytes:
        with self._lock:
            if self.state == "waiting":  # not begun: made here, the worker skips it
                self._drop()
            while self.state == "making":
                self._lock.wait()
            data = self.data
        return data if data is not None else _render(build, "png", self.dpi)


class Downloads:
    """This session's files made on click (Streamlit runs a download's `data` callable outside
    the script, where an exception only reaches the server log): a failure is logged and said
    on the page in one line, by the rerun the click starts, which waits for the file first."""

    # The click's rerun redraws the button, and Streamlit then refuses the file's request if it
    # has not arrived yet (the download fails silently): so the rerun waits for the request, as
    # long as a busy server may take to deliver it, and then for the file.
    ARRIVAL_SECONDS = 30.0
    LIMIT_SECONDS = 600.0  # the longest a rerun waits on a file being made

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._requests: Counter[str] = Counter()  # file name -> requests in this session
        self._requests_at_run_start: Counter[str] = Counter()
        self._failures: list[str] = []

    @staticmethod
    def of_session() -> Downloads:
        found = st.session_state.get(keys.DOWNLOADS)
        if found is None:
            found = st.session_state[keys.DOWNLOADS] = Downloads()
        return found

    def on_click(self, make: Callable[[], bytes], file_name: str) -> dict:
        """A download button's `data` and `on_click`: `make` guarded, and the wait for it."""
        return {"data": self.guarded(make, file_name), "on_click": partial(self.settle, file_name)}

    def guarded(self, make: Callable[[], bytes], file_name: str) -> Callable[[], bytes]:
        def run() -> bytes:
            with self._lock:
                self._running += 1
                self._requests[file_name] += 1
            try:
                return make()
            except Exception as exc:
                log.exception("download %s failed", file_name)
                what = exc if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {exc}"
                self._fail(f"{file_name} could not be made: {what}")
                raise
            finally:
                with self._lock:
                    self._running -= 1

        return run

    def settle(self, file_name: str) -> None:
        """The click's callback, at the start of its rerun: wait until the request for
        `file_name` has arrived (since the last run started) and the file is made, so that the
        button is redrawn only once the browser has it, and this run's page says whether it
        failed or never came (a click on a button already redrawn: Streamlit refuses it)."""
        start = time.monotonic()
        while True:
            waited = time.monotonic() - start
            with self._lock:
                running = self._running
                arrived = self._requests[file_name] > self._requests_at_run_start[file_name]
            if running and waited < self.LIMIT_SECONDS:
                pass
            elif arrived or running:
                return
            elif waited > self.ARRIVAL_SECONDS:
                self._fail(f"{file_name}: the download did not start; click its button again")
                return
            time.sleep(0.05)

    def _fail(self, line: str) -> None:
        with self._lock:
            self._failures.append(line)

    def report(self, errors) -> None:
        """Show the failures since the last run, one error line each (called as each run
        starts: a file asked for from now on was asked for on the page this run draws)."""
        with self._lock:
            failures, self._failures = self._failures, []
            self._requests_at_run_start = self._requests.copy()
        for line in failures:
            errors.error(viz.md_text(line, limit=300))


# a view's widgets keep their values while another view shows (Streamlit drops the state of a
# widget not drawn in a run, and only the chosen view is drawn)
KEEP = "page"
