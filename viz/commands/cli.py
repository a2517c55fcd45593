"""Command line: `python -m viz export` writes paper figures, raw maps and a manifest in batch.

Exit status: 0 everything exported; 1 some inputs failed (the rest exported, each failure named
on stderr and in the manifest); 2 usage error (bad option, unreadable checkpoint, missing path,
output folder not empty without --overwrite).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from viz.commands.export import ExportError
from viz.commands.export_run import GRID_COLUMNS, OutputError, export_command
from viz.commands.inputs import UsageError, add_method_options, error_line, int_in
from viz.engine.cam import SMOOTHINGS
from viz.engine.maps import DEFAULT_CMAP
from viz.engine.unread import UnreadAttentionWarning

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
Export paper-ready figures of what the attention of checkpoints does on a set of images (SE,
BAM and CBAM gates, other registered gates, a vision transformer's self-attention) and their
CAMs, with the raw maps and a manifest, reproducibly (same inputs, same bytes).
"""

_EPILOG = """\
figures (--figure, repeatable; default: overview):
%(figures)s
  model-grid: all checkpoints together, at most %(cols)d images per figure; each column is titled
  with the first checkpoint's target class (the image's own class with --labels, as in the
  paper), every row explains that class and prints its softmax score P under each map; with
  --target segment/box/similar-to every row explains that target (columns titled by image).
  --method rollout, gae or legrad with a CNN beside a vision transformer: the CNNs show
  Grad-CAM (said once on stderr, in the manifest's notes and each checkpoint's cam_method).
  dino-grid: the same layout, each row a checkpoint's last block's class-token attention with
  the patches holding 60%% of it (DINO's masks); n/a for a network without a class token.
  bam-hierarchy: BAM checkpoints only (others are skipped with a note). class-stats: needs
  --images folders in ImageFolder layout (one subfolder per class).

output layout (OUT):
  OUT/<checkpoint>/<image>/<figure>.<format>   per image and checkpoint
  OUT/<checkpoint>/<image>/maps.npz            raw attention maps, CAMs, logits, probs, target
  OUT/<checkpoint>/class-stats-<folder>.<format> and .npz
  OUT/model-grid[-NN].<format>, OUT/dino-grid[-NN].<format>
  OUT/manifest.json       checkpoints (path, sha256, arch, format), images (sha256), options,
                          package versions, results, failures, notes, sha256 of every file

exit status: 0 all exported; 1 some inputs failed (the others exported; failures on stderr and
in the manifest); 2 usage error (bad option, unreadable checkpoint, missing path, output folder
not empty without --overwrite).

example:
  python -m viz export --checkpoint checkpoints/resnet18_cbam_imagenette.safetensors \\
      --checkpoint checkpoints/resnet18_plain_imagenette.safetensors --images samples/ --out figures/ \\
      --figure overview --figure model-grid --format png,pdf --width double
"""


def _formats(text: str) -> list[str]:
    from viz.commands.export import FORMATS

    items = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"formats must be a comma list of {', '.join(FORMATS)}, got {text!r}"
        )
    return list(dict.fromkeys(items))


def _width(text: str) -> str | float:
    from viz.figures import figure_width

    value: str | float = text
    try:
        value = float(text)
    except ValueError:
        pass
    try:
        figure_width(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


_dpi = int_in("dpi", 10, 2400)
_jobs = int_in("jobs", 1, 64)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage itself is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _figure_lines() -> str:
    """The figure table (`viz.figures.registry.FIGURES`) as --help lines."""
    import textwrap

    from viz.figures.registry import FIGURES

    lines = []
    for name, spec in FIGURES.items():
        text = textwrap.wrap(spec.help, 78)
        lines.append(f"  {name:<14} {text[0]}")
        lines += [f"  {'':<14} {more}" for more in text[1:]]
    return "\n".join(lines).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    from viz.commands.export import FIGURES

    parser = _Parser(prog="python -m viz", description="Attention Lens command line.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    export = commands.add_parser(
        "export",
        help="export paper figures, raw maps and a manifest",
        description=_DESCRIPTION,
        epilog=_EPILOG % {"cols": GRID_COLUMNS, "figures": _figure_lines()},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help="checkpoint file (.safetensors, .pth, ...); repeat for several models")  # fmt: skip
    export.add_argument("--images", nargs="+", required=True, metavar="PATH",
                        help="image files or folders (searched recursively for image files)")  # fmt: skip
    export.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    export.add_argument("--figure", action="extend", nargs="+", choices=FIGURES, metavar="FIGURE",
                        help=f"figures to make: {', '.join(FIGURES)} (default: overview)")  # fmt: skip
    export.add_argument("--format", type=_formats, default=["png"], metavar="LIST",
                        help="comma list of png, pdf, svg (default: png)")  # fmt: skip
    export.add_argument("--dpi", type=_dpi, default=300, help="raster resolution (default: 300)")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--target", metavar="TARGET",
                       help="what to explain: a class by name or index (default: each model's "
                            "top-1), or segment:K, box:x0,y0,x1,y1[:label] (pixels of the image "
                            "as the network sees it), similar-to:IMAGE")  # fmt: skip
    which.add_argument("--labels", metavar="CSV",
                       help="explain each image's own class: a CSV with columns file,label "
                            "(file name or end of its path; class name or index)")  # fmt: skip
    export.add_argument("--width", type=_width, default="double", metavar="WIDTH",
                        help="figure width: single (3.3 in), double (6.9 in) or inches (default: double)")  # fmt: skip
    export.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder, replacing files of the same name")  # fmt: skip
    add_method_options(export)
    export.add_argument("--smooth", nargs="+", default=[], choices=SMOOTHINGS, metavar="KIND",
                        help="smooth the CAMs: aug (mean over mirrored and brightened copies, "
                             "6x the passes), eigen (first principal component); default none")  # fmt: skip
    export.add_argument("--cmap", default=DEFAULT_CMAP, metavar="NAME",
                        help=f"colour map of the maps (default: {DEFAULT_CMAP})")  # fmt: skip
    export.add_argument("--alpha", type=float, default=0.5,
                        help="opacity of the maps over the image, 0..1 (default: 0.5)")  # fmt: skip
    export.add_argument("--scale", choices=["shared", "per-map"], default="shared",
                        help="overview and class-stats: one colour scale with real values, or "
                             "each map's own min-max (default: shared). gradcam and model-grid "
                             "always scale each CAM to its own min-max; the manifest records "
                             "each figure's scale (scale_drawn)")  # fmt: skip
    export.add_argument("--render", choices=["smooth", "cells"], default="smooth",
                        help="maps enlarged smoothly (bilinear), or as cells with the grid drawn, "
                             "the resolution the network computed at (default: smooth)")  # fmt: skip
    export.add_argument("--jobs", type=_jobs, default=os.cpu_count() or 1, metavar="N",
                        help="worker processes for images (default: all cores; 1: no workers)")  # fmt: skip
    export.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="your own code registering architectures and attention probes "
                             "(a .py file or a module name; repeatable; trusted code)")  # fmt: skip
    from viz.commands.report_command import add_report_parser

    add_report_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from models.checkpoints.plugins import load_plugins, plugins_from_env

    failures = load_plugins(plugins_from_env() + list(getattr(args, "plugin", [])))
    if failures:
        for line in failures:
            print(f"error: {line}", file=sys.stderr)
        return 2
    try:
        # the commands say once, as a warning line, what the library would warn on every call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadAttentionWarning)
            if args.command == "report":
                from viz.commands.report_command import report_command

                return report_command(args)
            return export_command(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:
        print(f"error: {exc}; files written before are complete", file=sys.stderr)
        return 1
    except (OSError, ExportError) as exc:  # e.g. an input that vanished while we read it
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: files written so far are complete; no manifest was written",
            file=sys.stderr,
        )
        return 130
