"""The app's tests (a package: its conftest must not stand in for tests/conftest.py)."""
