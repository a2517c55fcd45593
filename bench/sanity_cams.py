"""Which CAM methods pass the sanity check on the embedded models? (README table)

    python -m bench.sanity_cams                 # writes bench/sanity_cams.md
    python -m bench.sanity_cams --images 2 --models cbam --methods scorecam

Cascading randomisation (Adebayo et al. 2018, `viz.measures.sanity`): the weights are redrawn
from the logits down, one group at a time (`fc`, `layer4`, `layer3`, `layer2`, `layer1`, the
stem), and each method's layer4 map of the same images and class is compared with the trained
network's by Spearman rank correlation. A method passes when its map has changed once the
weights it explains are noise: mean rank correlation below 0.5 after `fc` and `layer4` are
randomised. Samples: the first images of `samples/` (Imagenette photos), each model's top-1.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("plain", "se", "bam", "cbam")
# BAM modules sit between the stages (no-ops for the other models)
STEPS = ["fc", "layer4", "bam3", "layer3", "bam2", "layer2", "bam1", "layer1", "conv1", "bn1"]
PASS_BELOW = 0.5
# the methods with C extra passes per map are checked on fewer images, models and steps: the map
# after fc and layer4 are randomised is all the verdict needs
SLOW = ("scorecam", "sscam", "iscam")
SLOW_STEPS = ["fc", "layer4"]
SLOW_MODELS = ("plain", "cbam")
# the methods whose passes scale with num_samples run with fewer samples here (said in the table)
OPTIONS = {"sscam": {"num_samples": 2}, "iscam": {"num_samples": 2}}


def run(methods: list[str], models: list[str], n_images: int, slow_images: int) -> list[dict]:
    from models import load_checkpoint
    from models.images import load_image
    from viz.engine.cam import analyze
    from viz.measures.sanity import cascading_randomisation

    files = sorted((ROOT / "samples").glob("*.jpg"))[:n_images]
    rows = []
    for kind in models:
        ckpt = load_checkpoint(ROOT / "checkpoints" / f"resnet18_{kind}_imagenette.safetensors")
        model = ckpt.model.eval()
        x = ckpt.preprocess.batch([load_image(f.read_bytes()) for f in files])
        with torch.no_grad():
            target = model(x).argmax(1)
        for method in methods:
            slow = method in SLOW
            if slow and kind not in SLOW_MODELS:
                continue
            start = time.perf_counter()
            pick = slice(0, slow_images if slow else n_images)

            def maps_of(net, images, tgt, method=method):
                found = analyze(net, images, tgt, ["layer4"], method=method,
                                options=OPTIONS.get(method))  # fmt: skip
                return {"cam": next(iter(found.cams.values()))}

            steps = cascading_randomisation(model, x[pick], target[pick], maps_of,
                                            steps=SLOW_STEPS if slow else STEPS)  # fmt: skip
            by_group = {}
            for s in steps:
                by_group.setdefault(s.randomised, []).append(s.spearman)
            rows.append({
                "model": kind, "method": method, "images": len(x[pick]),
                "after_fc": _mean(by_group["fc"]),
                "after_layer4": _mean(by_group["layer4"]),
                "after_all": _mean(by_group[STEPS[-1]]) if not slow else None,
                "seconds": time.perf_counter() - start,
            })  # fmt: skip
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    return "flat" if math.isnan(value) else f"{value:+.2f}"


def _verdict(flags: list[bool]) -> str:
    return "yes" if all(flags) else "no" if not any(flags) else "on some models"


def format_table(rows: list[dict]) -> str:
    from viz.engine.cam import CAM_METHODS

    models = list(dict.fromkeys(r["model"] for r in rows))
    head = "| method | " + " | ".join(f"R-18 {m.upper() if m != 'plain' else 'plain'}"
                                      for m in models) + " | passes / class-sensitive |"  # fmt: skip
    lines = [head, "|---|" + "---:|" * len(models) + "---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells, verdicts, classwise = [], [], []
        for m in models:
            found = [r for r in rows if r["method"] == method and r["model"] == m]
            if not found:
                cells.append("")
                continue
            r = found[0]
            cells.append(
                " / ".join(_number(r[k]) for k in ("after_fc", "after_layer4", "after_all"))
            )
            # a map that went flat (no rank correlation) has changed too
            verdicts.append(not r["after_layer4"] >= PASS_BELOW)
            classwise.append(not r["after_fc"] >= PASS_BELOW)
        verdict = _verdict(verdicts) + " / " + _verdict(classwise)
        label = CAM_METHODS[method].label
        if method in OPTIONS:
            label += f" ({OPTIONS[method]['num_samples']} samples)"
        if method in SLOW:
            label += f" ({found[0]['images']} images)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from viz.engine.cam import CAM_METHODS

    p = argparse.ArgumentParser(
        prog="python -m bench.sanity_cams", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--methods", nargs="+", default=[m for m in CAM_METHODS if m != "fullgrad"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--slow-images", type=int, default=2, help=f"images for {', '.join(SLOW)}")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("sanity_cams.md"))
    args = p.parse_args(argv)
    rows = run(args.methods, args.models, args.images, args.slow_images)
    table = format_table(rows)
    print(table)
    header = (
        "# Sanity check of every layer4 CAM on the embedded models\n\n"
        f"`python -m bench.sanity_cams` ({args.images} sample images, torch {torch.__version__}): mean "
        "Spearman rank correlation with the trained network's map after `fc` is randomised / "
        "after `fc` and `layer4` are / after every layer is (flat: the map became constant, e.g. all zero after the "
        f"ReLU, for every image). Passes: below {PASS_BELOW} after layer4 (the map depends on the "
        f"learned weights); class-sensitive: below {PASS_BELOW} after `fc` alone (the map depends "
        "on the classifier, i.e. on the class explained). "
        f"{', '.join(SLOW)}: {args.slow_images} images, the ResNet-18 and ResNet-18 + CBAM only, "
        "`fc` and `layer4` randomised only (each map costs C = 512 passes per image).\n\n"
    )
    args.out.write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
