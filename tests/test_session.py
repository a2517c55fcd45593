"""The old home of `autolinks` (tests/test_app.py imports it from here; it lives in conftest)."""

from tests.conftest import autolinks

__all__ = ["autolinks"]
