"""`python -m viz export ...`: see `viz.cli`."""

from .cli import main

raise SystemExit(main())
