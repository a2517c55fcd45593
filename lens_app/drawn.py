"""Figures drawn before, per session: a figure's screen PNG and download PNGs kept by a small
key (what it shows and how it is drawn, never its tensors), so that a setting, class, model or
view shown again answers without drawing; and the screen PNG made fast (`screen_png`)."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import streamlit as st
from matplotlib.figure import Figure
from PIL import Image

import viz
from viz import figures

from . import keys

SCREEN_DPI = 150  # on screen; downloads use figure_bytes at the sidebar's dpi


def screen_png(fig: Figure) -> bytes:
    """The figure on screen: the pixels of `viz.figure_bytes(fig, "png", dpi=SCREEN_DPI)`, made
    about three times faster (3 channels, its face is white, and zlib's fastest level: the PNG
    goes to the browser once, over the app's own connection, not into a paper)."""
    buf = io.BytesIO()
    with figures.STYLE_LOCK:  # as figure_bytes: no other thread's rcParams while it draws
        fig.savefig(buf, format="rgba", dpi=SCREEN_DPI, facecolor="white")
    raw = buf.getvalue()
    # the size matplotlib's renderer takes: int() of the figure's inches times the dpi
    width, height = (int(v * SCREEN_DPI) for v in fig.get_size_inches())
    if len(raw) != width * height * 4:  # not the plain layout expected: the library's file
        return viz.figure_bytes(fig, "png", dpi=SCREEN_DPI)
    rgba = np.frombuffer(raw, np.uint8).reshape(height, width, 4)
    if rgba[..., 3].min() < 255:  # something see-through: kept as it is
        return viz.figure_bytes(fig, "png", dpi=SCREEN_DPI)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()


class Drawn:
    """A session's figures drawn before: bytes by (figure key, what), the least recently used
    dropped beyond `LIMIT` bytes. Thread-safe: the background PNG maker puts into it too."""

    LIMIT = 32 * 2**20  # about 15 to 30 figures with their PNG at 300 dpi

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._kept: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0

    @staticmethod
    def of_session() -> Drawn:
        found = st.session_state.get(keys.DRAWN)
        if found is None:
            found = st.session_state[keys.DRAWN] = Drawn()
        return found

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            data = self._kept.get(key)
            if data is not None:
                self._kept.move_to_end(key)
            return data

    def put(self, key: Hashable, data: bytes) -> None:
        with self._lock:
            old = self._kept.pop(key, None)
            self._size -= len(old) if old is not None else 0
            if len(data) > self.limit:
                return
            self._kept[key] = data
            self._size += len(data)
            while self._size > self.limit:
                _, dropped = self._kept.popitem(last=False)
                self._size -= len(dropped)

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)
