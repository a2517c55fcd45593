"""Measure CAMs and attention over a data set: accuracy, deletion/insertion, agreement,
localisation and the sanity check, per image and summarised, as CSV, figures and a page.

(`python -m viz report`: the command around `viz.commands.report.run_report` and
`viz.commands.report_page`.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.distributed import RankFailure
from viz.commands.report import DELETION_CHOICES, ReportOptions, inputs_for, run_report

__all__ = ["add_report_parser", "report_command"]


def add_report_parser(commands) -> argparse.ArgumentParser:
    """The `report` subcommand's options."""
    from viz.commands.inputs import add_method_options, int_in
    from viz.engine.cam import SMOOTHINGS
    from viz.measures.metrics import BASELINES

    report = commands.add_parser(
        "report",
        help="data-set report: accuracy, deletion/insertion, agreement, localisation, sanity",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    report.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help="checkpoint file; repeat for several models (paired comparison)")  # fmt: skip
    report.add_argument("--images", required=True, metavar="DIR",
                        help="an ImageFolder (one subfolder per class: labels from folder "
                             "names) or any folder of images with --labels, or neither")  # fmt: skip
    report.add_argument("--out", required=True, metavar="DIR", help="output folder")
    report.add_argument("--labels", metavar="CSV", help="CSV with columns file,label")
    report.add_argument("--target", metavar="TARGET",
                        help="explain, instead of each image's class: segment:K (a segmentation "
                             "network's category K over its predicted pixels; images without "
                             "any are left out, said per image) or similar-to:IMAGE (an "
                             "embedding network: cosine similarity to IMAGE's embedding)")  # fmt: skip
    report.add_argument("--boxes", metavar="PATH",
                        help="bounding boxes: Pascal VOC XML folder, COCO JSON, or CSV "
                             "file,x0,y0,x1,y1[,label] (original image pixels)")  # fmt: skip
    add_method_options(report)
    report.add_argument("--smooth", nargs="+", default=[], choices=SMOOTHINGS, metavar="KIND",
                        help="smooth the CAMs: aug (6x the passes), eigen; default none")  # fmt: skip
    report.add_argument("--deletion", default="default", choices=DELETION_CHOICES,
                        help="maps scored by deletion/insertion: default (the last stage's CAM "
                             "and the random map), all (every CAM and attention map: 13 maps "
                             "for a ResNet + CBAM), off. Cost: 2*steps+3 forward passes per "
                             "map and image (35 at --steps 16; default: default)")  # fmt: skip
    report.add_argument("--steps", type=int_in("--steps", 1, 1024), default=16,
                        help="deletion/insertion steps (default: 16)")  # fmt: skip
    report.add_argument("--baseline", default="blur", choices=BASELINES,
                        help="what deleted pixels become (default: blur)")  # fmt: skip
    report.add_argument("--batch-size", type=int_in("--batch-size", 1, 4096), default=16,
                        help="images per chunk and batch (default: 16)")  # fmt: skip
    report.add_argument("--sanity", type=int_in("--sanity", 0, 10**9), metavar="N",
                        help="images for the randomisation check, the first N (default: 32; 2 "
                             "for the methods with extra passes). Cost: the method once per "
                             "image and randomisation step (ResNet-18: 11 steps; gradcam: about "
                             "33 forward passes per image, scorecam about 5,600); 0: off")  # fmt: skip
    report.add_argument("--seed", type=int, default=0, help="seed of random maps and steps")
    report.add_argument("--workers", type=int_in("--workers", 0, 64),
                        default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                        help="decoding worker processes per rank (default: half the cores, "
                             "1 to 4)")  # fmt: skip
    report.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu (gloo between ranks) or cuda (nccl; one GPU per rank)")  # fmt: skip
    report.add_argument("--overwrite", action="store_true",
                        help="discard earlier results in OUT and start again")  # fmt: skip
    report.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="your own code registering architectures and attention probes")  # fmt: skip
    return report


_EPILOG = """\
outputs (OUT):
  per_image.csv   one row per image x checkpoint: target, prob, correct, deletion/insertion
                  AUC of the last stage's CAM, error
  per_map.csv     one row per image x checkpoint x map (and the CAM's method): deletion/insertion
                  AUC, agreement with the same stage's CAM, pointing game, energy pointing
                  game, box IoU
  sanity.csv      cascading randomisation: Spearman and SSIM per step, image and map
  summary.csv     means with 95% bootstrap intervals; paired differences between checkpoints
  report.md, report.html (self-contained), manifest.json, parts/ (finished chunks, for reruns)

scale out:  torchrun --nproc-per-node 2 -m viz report ...   (same numbers, shared by ranks)
"""


def _report_target_spec(value: str | None) -> str | None:
    """--target as the report takes it: a segment or a concept holds for every image; a box
    belongs to one image and a class is each image's own (its label, else the top-1)."""
    from viz.commands.inputs import UsageError
    from viz.commands.report import REPORT_TARGETS
    from viz.commands.targets import parse_output_target

    if value is None:
        return None
    wanted = parse_output_target(value)
    if wanted is None or wanted.kind not in REPORT_TARGETS:
        raise UsageError(
            f"report --target takes segment:K or similar-to:IMAGE, not {value!r} (classes come "
            "from the labels or the top-1; a box belongs to one image: export --target box:...)"
        )
    return wanted.text


def _check_target(spec: str, loaded) -> None:
    """The target made once per checkpoint before any image: a category outside a model's
    classes, a missing concept image or a network without an embedding is one line."""
    from viz.commands.inputs import MAX_IMAGE_FILE_BYTES, UsageError
    from viz.commands.targets import parse_output_target

    wanted = parse_output_target(spec)
    for raw, _, ckpt in loaded:
        wanted.check(ckpt)
        try:
            wanted.build(ckpt, None, MAX_IMAGE_FILE_BYTES)
            if wanted.kind == "segment":
                _check_segments(ckpt)
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"--target {spec} on {raw}: {exc}") from None


def _check_segments(ckpt) -> None:
    """A segment needs a segmentation output (N, K, H, W): seen on one grey image."""
    import torch
    from PIL import Image

    from viz.engine.model_state import model_lock, preserve_model_state
    from viz.targets import main_tensor

    grey = ckpt.preprocess.batch([Image.new("RGB", (224, 224), (128, 128, 128))])
    with model_lock(ckpt.model), preserve_model_state(ckpt.model), torch.inference_mode():
        shape = tuple(main_tensor(ckpt.model(grey)).shape)
    if len(shape) != 4:
        raise ValueError(f"the network returns {shape}, not a segmentation map (N, K, H, W)")


def report_command(args: argparse.Namespace) -> int:
    """`python -m viz report`: returns the exit status (0 ok, 1 some images or a rank failed)."""
    from tqdm import tqdm

    from models.distributed import start_distributed, stop_distributed
    from viz.commands.inputs import (
        UsageError,
        check_layers,
        layer_list,
        load_checkpoints,
        methods_by_checkpoint,
        unread_attention_lines,
    )
    from viz.commands.report_page import write_report

    layers = layer_list(args.layers)
    try:  # before the checkpoints are read: a setting that cannot apply is one line, at once
        options = ReportOptions(
            method=args.method, smoothing=tuple(args.smooth), layers=layers,
            num_samples=args.num_samples, deletion=args.deletion, steps=args.steps,
            baseline=args.baseline, batch_size=args.batch_size, sanity=args.sanity,
            seed=args.seed, target=_report_target_spec(args.target),
        )  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    loaded = load_checkpoints(args.checkpoint)
    if options.target:
        _check_target(options.target, loaded)
    _, fallback = methods_by_checkpoint(args.method, loaded)  # refuses what cannot apply
    if os.environ.get("RANK", "0") == "0":  # once, not by every rank of torchrun
        if fallback:
            print(f"note: {fallback}", file=sys.stderr)
        for line in unread_attention_lines(loaded):
            print(f"warning: {line}", file=sys.stderr)
    if layers:
        check_layers(loaded, layers, args.method)
    checkpoints = [(name, raw, ckpt) for raw, name, ckpt in loaded]
    inputs = inputs_for(checkpoints, args.images, labels=args.labels, boxes=args.boxes)
    ranks = start_distributed(args.device)
    # images done, fractional inside a chunk, so the bar and the time left move per image
    bar = tqdm(total=len(inputs.images), disable=ranks.rank != 0, desc="report", file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} images "
                          "[{elapsed}<{remaining}]")  # fmt: skip

    def progress(done: float, total: int) -> None:
        # tenths of an image while a chunk runs, whole images when done ("4/4", not "4.0/4")
        bar.total, bar.n = total, round(done, 1) if done % 1 else int(done)
        bar.refresh()

    try:
        rows = run_report(
            inputs, args.out, options, overwrite=args.overwrite, workers=args.workers,
            device=args.device, progress=progress, ranks=ranks,
        )  # fmt: skip
    except RankFailure as exc:
        if ranks.rank == 0:
            print(f"error: {exc}; no report written", file=sys.stderr)
        return 1
    finally:
        bar.close()
        stop_distributed()
    if rows is None:
        return 0
    failed = write_report(Path(args.out), rows, inputs, options, world=ranks.world)
    print(f"wrote the report to {args.out} (report.html, report.md, CSVs, figures/)",
          file=sys.stderr)  # fmt: skip
    if failed:
        print(f"error: {failed} image(s) could not be read; see per_image.csv", file=sys.stderr)
        return 1
    return 0
