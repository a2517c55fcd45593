"""`attention-lens`: the one command `pip install .` puts on the PATH.

    attention-lens app [streamlit options]   the browser app (Streamlit) on this machine
    attention-lens export ...                figures, raw maps and a manifest (= python -m viz export)
    attention-lens report ...                numbers over a data set (= python -m viz report)
    attention-lens train ...                 train a ResNet or a timm network (= python -m models.train)
    attention-lens train-hybrid ...          train the hybrid CNN + ViT (= python -m models.train_hybrid)
    attention-lens bench ...                 the side-by-side benchmark (= python -m bench; needs [dev])

Each subcommand takes `--help`. A checkpoint may be given by path or by the name of an embedded
one (`--checkpoint resnet18_cbam_imagenette`), from any folder.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "app_script"]

_USAGE = __doc__.split("\n\n")[1]


def app_script() -> Path:
    """The Streamlit script of the app: `app.py` beside the installed packages."""
    return Path(__file__).resolve().parents[2] / "app.py"


def _app(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: attention-lens app [streamlit run options, e.g. --server.port 8502]")
        return 0
    script = app_script()
    if not script.is_file():
        print(f"error: the app's script is missing ({script})", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "streamlit", "run", str(script), *argv])


def _export(argv: list[str]) -> int:
    from viz.commands.cli import main as viz_main

    return viz_main(["export", *argv])


def _report(argv: list[str]) -> int:
    from viz.commands.cli import main as viz_main

    return viz_main(["report", *argv])


def _train(argv: list[str]) -> int:
    from models.training.cli import main as train_main

    return train_main(argv)


def _train_hybrid(argv: list[str]) -> int:
    from models.training.hybrid import main as hybrid_main

    return hybrid_main(argv)


def _bench(argv: list[str]) -> int:
    try:
        from bench.__main__ import main as bench_main
    except ImportError as exc:
        print(
            f"error: the benchmark needs the dev extras ({exc}): pip install '.[dev]'",
            file=sys.stderr,
        )
        return 2
    return bench_main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "app": _app,
    "export": _export,
    "report": _report,
    "train": _train,
    "train-hybrid": _train_hybrid,
    "bench": _bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run `attention-lens SUBCOMMAND ...`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: attention-lens SUBCOMMAND [options]\n\n{_USAGE}")
        return 0 if args else 2
    command = SUBCOMMANDS.get(args[0])
    if command is None:
        print(
            f"error: unknown subcommand {args[0][:40]!r}; one of {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return 2
    return int(command(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
