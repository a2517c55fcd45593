"""The loaders' error type and message helpers (no imports from the rest of `models`)."""

from __future__ import annotations

__all__ = ["CheckpointError", "first_keys", "one_line"]


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line a user can act on."""


def first_keys(keys, n: int = 3) -> str:
    """The first `n` keys, comma-separated, and how many more: "a, b, c (+4 more)"."""
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def one_line(value: object, limit: int = 120) -> str:
    """Text (from a file, an exception) as one line: whitespace runs collapsed to one space,
    cut to `limit` characters with an ellipsis."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
