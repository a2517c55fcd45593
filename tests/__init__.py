"""The tests, one folder per package; shared fixtures and builders in `conftest.py`."""

import sys

from tests import conftest

# the old home of `autolinks` (tests/test_app.py imports it from `tests.test_session`)
sys.modules.setdefault("tests.test_session", conftest)
