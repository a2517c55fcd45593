"""The old import path of `models.checkpoints.zoo` (tests/test_app.py and test_browser.py use it)."""

from models.checkpoints.zoo import CHECKPOINT_DIR_ENV

__all__ = ["CHECKPOINT_DIR_ENV"]
