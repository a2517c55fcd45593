"""Text from files made safe: literal Markdown (`md_text`) and plain file names (`safe_name`)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

__all__ = ["md_text", "safe_name", "safe_stem"]

_MARKUP = re.compile(r"([\\`*_{}\[\]()#+\-!|<>$~:&])")
_LIST_START = re.compile(r"^(\d+)\.")
# GFM turns bare addresses into links after escapes are undone ("http\\://x" is still one),
# so the text itself is broken with a zero-width space where an autolink would start
_AUTOLINK_START = re.compile(r"(?i)(https?|ftp|mailto|xmpp|www)(?=[:.])|(@)")
_ZERO_WIDTH_SPACE = "\u200b"


def md_text(value: object, limit: int | None = 200) -> str:
    """`value` as one line of literal text inside Markdown (Streamlit's markdown, labels, captions).

    Strings from files (class names, labels, file names, metadata, error messages quoting a
    file) must never become links, images, HTML, LaTeX or emoji on the page: every character
    Markdown gives a meaning is backslash-escaped, a zero-width space keeps bare addresses
    (`https://…`, `www.…`, `a@b.c`) from being autolinked, whitespace runs become one space,
    and the text is cut to `limit` characters (None: never).
    """
    text = " ".join(str(value).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    text = _AUTOLINK_START.sub(lambda m: m.group(0) + _ZERO_WIDTH_SPACE, text)
    return _LIST_START.sub(r"\1\\.", _MARKUP.sub(r"\\\1", text))


_WINDOWS_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(10)),
    *(f"LPT{i}" for i in range(10)),
}


def safe_name(text: str, *, default: str = "unnamed", max_length: int = 100) -> str:
    """A plain file name from any text: no folders, no `..`, no hidden or reserved names.

    `../../x.png` -> `x.png`, `a/b c.jpg` -> `a_b_c.jpg`, `café.png` -> `cafe.png`,
    `..` -> `unnamed`. Only ASCII letters, digits, `.`, `_` and `-` remain.
    """
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    parts = [p for p in re.split(r"[\\/]+", ascii_text) if p not in ("", ".", "..")]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts))
    name = re.sub(r"\.{2,}", ".", name).strip("._-")
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = f"_{name}"
    if len(name) > max_length:
        stem, dot, suffix = name.rpartition(".")
        keep = f".{suffix}" if dot and 0 < len(suffix) <= 8 else ""
        name = name[: max_length - len(keep)].rstrip("._-") + keep
    return name or default


def safe_stem(name: str, default: str = "image") -> str:
    """A file-name stem safe for downloads: `My photo (1).JPG` -> `My_photo_1` (`safe_name` of
    the stem, at most 80 characters)."""
    return safe_name(Path(name).stem if name else "", default=default, max_length=80)
