"""Widgets every view shares: a figure with its downloads (`show_figure`), the session's files
made on click (`Downloads`), and `state` for what a session keeps."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import streamlit as st
from matplotlib.figure import Figure

import viz

from . import keys
from .context import USER_ERRORS, View

MIME = {"png": "image/png", "pdf": "application/pdf", "svg": "image/svg+xml"}  # viz.FORMATS
SCREEN_DPI = 150  # on screen; downloads use figure_bytes at the sidebar's dpi
log = logging.getLogger("attention_lens.app")


def state(key: str, default):
    """What this session keeps under `key` (one of `lens_app.keys`), set to `default` once."""
    return st.session_state.setdefault(key, default)


def show_figure(build: Callable[[], Figure], name: str, key: str, view: View, errors) -> None:
    """Draw a figure as PNG, close it, and offer it as PNG/PDF/SVG (rendered on click)."""
    try:
        fig = build()
    except USER_ERRORS as exc:
        errors.error(viz.md_text(exc))
        return
    try:
        st.image(viz.figure_bytes(fig, "png", dpi=SCREEN_DPI))
    finally:
        fig.clear()
    for col, fmt in zip(st.columns(len(MIME)), MIME):
        file_name = f"{view.prefix}_{name}.{fmt}"
        col.download_button(
            fmt.upper(), file_name=file_name, mime=MIME[fmt], key=keys.figure_download(key, fmt),
            icon=":material/download:",
            **Downloads.of_session().on_click(lambda fmt=fmt: _render(build, fmt, view.settings.dpi), file_name),
        )  # fmt: skip


def _render(build: Callable[[], Figure], fmt: str, dpi: int) -> bytes:
    fig = build()
    try:
        return viz.figure_bytes(fig, fmt, dpi=dpi)
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
        found = st.session_state.get(keys.DOWNLOADS)
        if found is None:
            found = st.session_state[keys.DOWNLOADS] = Downloads()
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
            errors.error(viz.md_text(line, limit=300))


# a view's widgets keep their values while another view shows (Streamlit drops the state of a
# widget not drawn in a run, and only the chosen view is drawn)
KEEP = "page"
