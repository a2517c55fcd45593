"""Slow runs in a thread of their own, with progress, time left and one Stop button: the CAM
methods that take extra passes (`SlowRun`) and the data-set report (`lens_app.views.dataset`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import streamlit as st

import viz

from . import keys


class Cancelled(Exception):
    """Raised inside a slow run whose user pressed Stop or moved on."""


class SlowJob:
    """A slow run in a thread of its own: a rerun of the page (any widget changed) stops the
    script, not the run, and the next run waits on where it got to. A job nobody has watched
    for `UNWATCHED_SECONDS` (its page was closed or reloaded, Streamlit's own Stop, a rerun
    that wants other maps) cancels itself at its next report, so it neither runs on for
    nothing nor keeps the model's lock from other pages."""

    UNWATCHED_SECONDS = 4.0

    def __init__(self, run: Callable[[Callable[[float, int], None]], object]) -> None:
        self.done = self.total = 0
        self.first: tuple[float, float] | None = None  # (time, done) of the first report
        self.estimate: tuple[float, float] | None = None  # (time, seconds left) then
        self.first_estimate: float | None = None  # seconds the whole run takes, at that rate
        self.watched = time.monotonic()
        self.cancelled = False
        self.result = self.error = None
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True)
        self._thread.start()

    def _report(self, done: float, total: int) -> None:
        now = time.monotonic()
        if now - self.watched > self.UNWATCHED_SECONDS:
            self.cancelled = True
        if self.cancelled:
            raise Cancelled
        if self.first is None:  # the set-up before the first report is not work done
            self.first = (now, done)
        elif done > self.first[1]:
            start, then = self.first
            rate = (now - start) / (done - then)  # seconds per unit of work
            self.estimate = (now, rate * (total - done))
            if self.first_estimate is None:
                self.first_estimate = rate * (total - then)
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
        """Seconds left, from the rate at the last report, counting down between reports."""
        if self.estimate is None:
            return None
        then, left = self.estimate
        return max(0.0, left - (time.monotonic() - then))


# While a slow run goes, its Stop is the only one: the Stop of Streamlit's status widget, which
# would stop the page but not the run, is hidden (this style goes with the bar when it ends)
ONE_STOP = '<style>[data-testid="stStatusWidget"] button {display: none;}</style>'


class _PerRun(threading.local):
    """The running job's bar and Stop button, in `box`: per script run (each session runs its
    script in its own thread, so two users never share them)."""

    bar = None
    box = None


_RUN = _PerRun()


class SlowRun:
    """Progress with time left, and a Stop button, for slow runs.

    For the CAM methods, Stop cancels the job and switches the method back to Grad-CAM (and
    smoothing off) in its callback, so the rerun it starts does not start the slow one again.
    """

    POLL_SECONDS = 0.25

    @staticmethod
    def slow(method: str, smoothing: tuple) -> bool:
        return viz.CAM_METHODS[method].needs == "passes" or "aug" in smoothing

    @staticmethod
    def label(method: str, smoothing: tuple) -> str:
        """What runs, in words: the method, and the augmentation that makes it slow if so."""
        return viz.CAM_METHODS[method].label + (" with augmentation" if "aug" in smoothing else "")

    @classmethod
    def quick(cls, method: str, smoothing: tuple) -> tuple[str, tuple]:
        """What to run where only the predictions count: Grad-CAM instead of a slow method."""
        return ("gradcam", ()) if cls.slow(method, smoothing) else (method, smoothing)

    @classmethod
    def follow(
        cls, job: SlowJob, label: str, unit: str = "passes", on_stop=None,
        ask_after: float | None = None,
    ) -> tuple[int, float] | None:  # fmt: skip
        """Draw the job's progress until it ends (each redraw is where a rerun stops us).
        `on_stop(label)`: what Stop does (default: back to Grad-CAM). With `ask_after`
        (seconds): at the job's first estimate (after its first passes), a job that needs
        longer is cancelled and its cost returned, (passes, seconds in all), for the caller
        to ask before running it (`ask_to_run`); None when the job ended."""
        while job.running():
            job.watch()
            if ask_after is not None and job.first_estimate is not None:
                if job.first_estimate > ask_after:
                    job.cancelled = True
                    return job.total, job.first_estimate
                ask_after = None  # decided once: a slower stretch later does not stop it
            if _RUN.bar is None:
                if _RUN.box is None:
                    _RUN.box = st.empty()
                with _RUN.box.container():
                    st.markdown(ONE_STOP, unsafe_allow_html=True)
                    st.button("Stop", key=keys.stop_button(time.monotonic_ns()),
                              on_click=on_stop or stop_slow_method, args=(label,),
                              icon=":material/stop_circle:")  # fmt: skip
                    _RUN.bar = st.progress(0.0)
            done = f"{job.done:.1f}" if isinstance(job.done, float) else str(job.done)
            text, left = f"{label}: {done} of {job.total} {unit}", job.time_left()
            if not job.total:
                text = f"{label}: starting…"
            elif left is not None:
                text += f", about {left:.0f} s left"
            _RUN.bar.progress(min(1.0, job.done / max(job.total, 1)), text=text)
            time.sleep(cls.POLL_SECONDS)
        return None

    @staticmethod
    def ask_to_run(label: str, passes: int, seconds: float, on_run, args: tuple) -> None:
        """In the bar's place: what the method would cost, measured on its first passes,
        with a button that runs it (`on_run(*args)`) and one back to Grad-CAM; the page stops
        here (the views below wait for the answer)."""
        box = _RUN.box if _RUN.box is not None else st.empty()
        with box.container():  # the bar's place: the next run's bar replaces the question
            st.warning(
                f"{label} needs {passes:,} images through the network here: about "
                f"{_duration(seconds)} on this machine (measured on its first passes). It "
                "runs when you say so; the figures below wait for it.",
                icon=":material/hourglass_top:",
            )
            left, right = st.columns(2)
            left.button(f"Run {label}", key=keys.RUN_LONG, on_click=on_run, args=args,
                        type="primary", icon=":material/play_arrow:")  # fmt: skip
            right.button("Back to Grad-CAM", key=keys.BACK_TO_GRADCAM, on_click=back_to_gradcam)
        st.stop()

    @staticmethod
    def cancel(but: tuple | None = None) -> None:
        """Stop this session's slow CAM jobs (all, or all but the one with key `but`)."""
        for key, job in list(st.session_state.get(keys.SLOW_JOBS, {}).items()):
            if key != but:
                job.cancelled = True
                st.session_state[keys.SLOW_JOBS].pop(key, None)

    @classmethod
    def reserve(cls) -> None:
        """The bar's place, kept in every run, drawn or not: what is below keeps its place in
        the page while and after a slow method runs."""
        _RUN.box, _RUN.bar = st.empty(), None

    @classmethod
    def done(cls, keep_place: bool = False) -> None:
        """The run ended: its bar and Stop button go (a late Stop would undo finished work);
        `keep_place`: the empty place stays for what is drawn there next (`ask_to_run`)."""
        if _RUN.box is not None:
            _RUN.box.empty()
        _RUN.bar = None
        if not keep_place:
            _RUN.box = None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} minutes"


def back_to_gradcam() -> None:
    """Grad-CAM, smoothing off, and no method set aside to come back (a callback)."""
    SlowRun.cancel()
    st.session_state[keys.METHOD], st.session_state[keys.SMOOTHING] = "gradcam", []
    st.session_state.pop(keys.METHOD_SET_ASIDE, None)


def stop_slow_method(label: str) -> None:
    """Stop's callback for a slow CAM method: cancelled, and Grad-CAM put back."""
    back_to_gradcam()
    st.session_state[keys.STOPPED] = f"{label} stopped; back to Grad-CAM."
