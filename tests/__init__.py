"""The tests, one folder per package; shared fixtures and builders in `conftest.py`."""
