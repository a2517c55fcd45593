"""The old name of `viz.interactive`, the same module object (tests/test_app.py patches
`viz.session.analyze`); remove once those tests import `viz.interactive`."""

import sys

from viz import interactive

sys.modules[__name__] = interactive
