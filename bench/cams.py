"""Score-CAM and Ablation-CAM against pytorch-grad-cam (and TorchCAM's Score-CAM), side by side.

    python -m bench.cams            # writes bench/results_cams.md
    python -m bench.cams --quick    # smoke run: one repetition, no file

The embedded ResNet-18 + CBAM on a bundled photo (trained weights: realistic activations), its
layer4, 224 px, batch 1, explaining the top-1 class. Cases run interleaved (A B C A B C ...);
the table gives medians, the peer's time over ours, and the largest difference between the two
maps as the peer returns them (min-max scaled at 224 px), so speed is compared at equal maps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.__main__ import write_results

ROOT = Path(__file__).resolve().parents[1]


def _scaled(m: torch.Tensor) -> torch.Tensor:
    m = m - m.amin((-2, -1), keepdim=True)
    return m / (1e-7 + m.amax((-2, -1), keepdim=True))


def _as_peer(m: torch.Tensor, size: int) -> np.ndarray:
    """Our layer-resolution map as pytorch-grad-cam returns its own: scaled, resized, scaled."""
    up = F.interpolate(_scaled(m.float())[:, None], (size, size), mode="bilinear")[:, 0]
    return _scaled(torch.relu(up)).numpy()


def _cases(model, x, target: int):
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from viz.engine.cam import analyze

    size, targets = x.shape[-1], [ClassifierOutputTarget(target)]

    def ours(method: str):
        return lambda: analyze(model, x, target, ["layer4"], method=method).cams["layer4"]

    def peer(cls):
        def run():
            with cls(model=model, target_layers=[model.layer4]) as cam:
                return cam(input_tensor=x, targets=targets)

        return run

    def torchcam_scorecam():
        from torchcam.methods import ScoreCAM as TorchCamScoreCAM

        with TorchCamScoreCAM(model, "layer4") as extractor:
            with torch.no_grad():
                scores = model(x)
            return extractor(target, scores)[0]

    return {
        "Score-CAM": (ours("scorecam"), peer(ScoreCAM), torchcam_scorecam),
        "Ablation-CAM": (ours("ablationcam"), peer(AblationCAM), None),
    }, size


def measure(reps: int) -> list[tuple]:
    from models import load_checkpoint
    from models.images import load_image

    ckpt = load_checkpoint(ROOT / "checkpoints" / "resnet18_cbam_imagenette.safetensors")
    model = ckpt.model.eval()
    image = load_image((ROOT / "samples" / "tench_12881.jpg").read_bytes())
    x = ckpt.preprocess.batch([image])
    with torch.no_grad():
        target = int(model(x).argmax(1))
    cases, size = _cases(model, x, target)
    rows = []
    for method, (ours, peer, second) in cases.items():
        runs = {"Attention Lens": ours, "pytorch-grad-cam 1.5": peer}
        if second is not None:
            runs["TorchCAM 0.5"] = second
        times: dict[str, list[float]] = {name: [] for name in runs}
        outputs = {}
        for _ in range(reps):
            for name, run in runs.items():
                start = time.perf_counter()
                outputs[name] = run()
                times[name].append(time.perf_counter() - start)
        mine = float(np.median(times["Attention Lens"]))
        diff = np.abs(_as_peer(outputs["Attention Lens"], size)
                      - outputs["pytorch-grad-cam 1.5"]).max()  # fmt: skip
        for name, spent in times.items():
            med = float(np.median(spent))
            note = f"max map difference {diff:.1e}" if name == "pytorch-grad-cam 1.5" else ""
            rows.append((method, name, med, med / mine, note))
    return rows


def format_table(rows: list[tuple]) -> str:
    lines = ["| method | implementation | median | time / ours | |", "|---|---|---:|---:|---|"]
    for method, name, med, ratio, note in rows:
        lines.append(f"| {method} | {name} | {med:.2f} s | {ratio:.2f}x | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cams", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one repetition, no file written")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results_cams.md"))
    args = p.parse_args(argv)
    rows = measure(1 if args.quick else args.reps)
    table = format_table(rows)
    print(table)
    if not args.quick:
        write_results(
            args.out,
            "CAM methods with extra passes",
            "python -m bench.cams",
            "Embedded ResNet-18 + "
            f"CBAM, layer4, 224 px, batch 1; medians of {args.reps} interleaved repetitions; "
            "'time / ours' is each implementation's median over Attention Lens's.",
            table,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
