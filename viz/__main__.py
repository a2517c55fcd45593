"""`python -m viz export ...`: see `viz.commands.cli`."""

from viz.commands.cli import main

if __name__ == "__main__":  # not when a worker process imports this module
    raise SystemExit(main())
