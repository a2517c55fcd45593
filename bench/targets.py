"""Explaining other outputs: Grad-CAM with a target callable against one forward + backward.

    python -m bench.targets            # writes bench/results_targets.md
    python -m bench.targets --quick    # a smoke run (few pairs, no file written)

`analyze(model, x, target, [layer])` with `SegmentationScore` on torchvision FCN-ResNet50 and
with `BoxScore` on torchvision Faster R-CNN (MobileNetV3-FPN, 320 px), random weights, batch 1,
against the least any Grad-CAM must do: one forward with the layer's output kept and one
backward of the same score to that output (`torch.autograd.grad`, no parameter gradients).
Paired ratios (`bench.__main__.paired_ratio`) beside the forward-vs-itself noise floor; the
goal is a ratio of at most 1.05 (issue 40).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.__main__ import paired_ratio, write_results
from viz.engine.cam import analyze
from viz.targets import BoxScore, SegmentationScore


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():  # as analyze runs it: no parameter gradients
        p.requires_grad_(False)
    return model.eval()


def _fcn(side: int = 224) -> tuple[nn.Module, torch.Tensor, Callable, str]:
    from torchvision.models.segmentation import fcn_resnet50

    torch.manual_seed(0)
    model = _frozen(fcn_resnet50(weights=None, weights_backbone=None, num_classes=21))
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask = (model(x)["out"].argmax(1)[0] == 0).float()
    return model, x, SegmentationScore(0, mask), "backbone.layer4"


def _faster_rcnn(side: int = 320) -> tuple[nn.Module, torch.Tensor, Callable, str]:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = _frozen(
        fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.0
        )
    )
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        found = model(x)[0]
    return model, x, BoxScore(found["boxes"][:1], found["labels"][:1]), "backbone.body.16"


def _baseline(model: nn.Module, x: torch.Tensor, target: Callable, layer: str):
    """One forward keeping the layer's output, one backward of the score to it."""
    module = model.get_submodule(layer)

    def run() -> None:
        kept = []

        def keep(_m, _i, out):
            out = out.detach().requires_grad_()
            kept.append(out)
            return out

        handle = module.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                output = model(x)
        finally:
            handle.remove()
        torch.autograd.grad(target(output).sum(), kept[:1])

    return run


def _analysis(model: nn.Module, x: torch.Tensor, target: Callable, layer: str):
    def run() -> None:
        analyze(model, x, target, [layer])

    return run


def _forward(model: nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


CASES = {
    "FCN-ResNet50, SegmentationScore": _fcn,
    "Faster R-CNN MobileNetV3-FPN, BoxScore": _faster_rcnn,
}


def rows(pairs: int, quick: bool = False) -> list[tuple[str, str, float]]:
    """The table's rows; `quick`: small images (a smoke run: the numbers mean nothing)."""
    out = []
    for (label, build), side in zip(CASES.items(), (64, 160) if quick else (224, 320)):
        model, x, target, layer = build(side)
        forward = _forward(model, x)
        out.append((label, "noise floor: forward vs itself", paired_ratio(forward, forward, pairs)))
        ours = _analysis(model, x, target, layer)
        baseline = _baseline(model, x, target, layer)
        out.append((label, f"Grad-CAM at {layer} vs forward + backward of the score",
                    paired_ratio(ours, baseline, pairs)))  # fmt: skip
    return out


def format_table(found: list[tuple[str, str, float]]) -> str:
    lines = ["| network, target | comparison | ratio |", "|---|---|---:|"]
    lines += [f"| {net} | {what} | {ratio:.3f} |" for net, what, ratio in found]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.targets", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="few pairs, no file written")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results_targets.md"))
    args = p.parse_args(argv)
    table = format_table(rows(2 if args.quick else args.pairs, quick=args.quick))
    print(table)
    if not args.quick:
        write_results(
            args.out,
            "Explaining other outputs",
            "python -m bench.targets",
            "Medians of paired ratios (see `bench/__main__.py`); the goal is at most 1.05.",
            table,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
