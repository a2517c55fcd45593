"""Vision transformers: the cost of reading self-attention, GAE and LeGrad against their baselines.

    python -m bench.transformers            # writes bench/results_transformers.md
    python -m bench.transformers --quick    # a smoke run (few pairs, no file written)

timm ViT-S/16 (random weights) at 224 px, batch 1: recording every block's attention with the
taps kept (`attention_hooks`) against an untraced forward, building the records (their maps need
only the class token's row; the full matrices are computed when rollout, GAE or LeGrad read
them), the same for a Hugging Face ViT of the same sizes, and `analyze(method="gae")` against
one forward + a backward to the input without parameter gradients, both as paired ratios
(`bench.__main__.paired_ratio`, beside the forward-vs-itself noise floor). LeGrad on all blocks
of torchvision's ViT-B/16 against TorchCAM 0.5's `LeGrad` on the same blocks, interleaved
medians, with the largest difference of their maps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.__main__ import _forward, _kept, _traced_forward, paired_ratio, write_results
from viz.engine.cam import analyze
from viz.engine.trace import record_attention


def _vit_small() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    for p in model.parameters():  # as analyze runs it: no parameter gradients
        p.requires_grad_(False)
    return model


def _forward_input_backward(model, x):
    """The GAE baseline: one forward and a backward to the input, no parameter gradients."""

    def run() -> None:
        x_in = x.detach().requires_grad_()
        logits = model(x_in)
        torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), [x_in])

    return run


def _hf_vit_small() -> torch.nn.Module:
    """A Hugging Face ViT of ViT-S/16's sizes (random weights; nothing downloaded)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536, image_size=224, patch_size=16, num_labels=1000)  # fmt: skip
    model = ViTForImageClassification(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _traced_and_built(model, x, full: bool = False):
    """A traced forward and its records: the maps (the class token's row of each block's
    probabilities), or with `full` every block's whole (T, T) matrix too (what rollout reads)."""

    def run() -> None:
        with torch.no_grad(), record_attention(model) as trace:
            model(x)
        for rec in trace:  # the maps are computed here
            if full:
                assert rec.attention is not None

    return run


def reading_rows(model, label: str, pairs: int, gae: bool = True) -> list[tuple]:
    """What reading the attention of `model` costs over its forward (224 px, batch 1)."""
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    forward = _forward(model, x)

    def over_forward(run) -> float:
        return paired_ratio(_kept(model, run), forward, pairs) - 1

    rows = [
        (label, "noise floor: forward vs itself", paired_ratio(forward, forward, pairs) - 1),
        (label, "recording all 12 blocks' attention, taps kept (goal <= +10%)",
         over_forward(_traced_forward(model, x))),
        (label, "... and building the records (the maps: class-token rows only)",
         over_forward(_traced_and_built(model, x))),
        (label, "... and reading every block's full probabilities (as rollout does)",
         over_forward(_traced_and_built(model, x, full=True))),
    ]  # fmt: skip
    if gae:
        rows.append((label, "analyze(method='gae') vs forward + backward to the input "
                     "(goal <= +15%)", paired_ratio(lambda: analyze(model, x, method="gae"),
                     _forward_input_backward(model, x), pairs) - 1))  # fmt: skip
    return rows


def overhead_rows(pairs: int, hugging_face: bool = True) -> list[tuple]:
    rows = reading_rows(_vit_small(), "timm ViT-S/16, 224 px, batch 1", pairs)
    if hugging_face:
        label = "transformers ViT, ViT-S/16 sizes, 224 px, batch 1"
        rows += reading_rows(_hf_vit_small(), label, pairs, gae=False)
    return rows


def legrad_rows(reps: int) -> list[tuple]:
    import torchvision
    from torchcam.methods import LeGrad

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = int(model(x).argmax(1))
    blocks = list(model.encoder.layers)

    def ours():
        return analyze(model, x, target, method="legrad").cams["legrad"]

    def theirs():
        with LeGrad(model, blocks) as extractor:
            scores = model(x)
            return extractor(target, scores, normalized=False)[0]

    runs = {"Attention Lens": ours, "TorchCAM 0.5 LeGrad": theirs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    maps = {name: run() for name, run in runs.items()}  # warm-up
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            maps[name] = run()
            times[name].append(time.perf_counter() - start)
    mine = statistics.median(times["Attention Lens"])
    diff = float((maps["Attention Lens"] - maps["TorchCAM 0.5 LeGrad"]).abs().max())
    peak = float(maps["Attention Lens"].abs().max())
    label = "torchvision ViT-B/16, LeGrad on 12 blocks"
    return [
        (label, f"{name}: {statistics.median(t):.2f} s", statistics.median(t) / mine - 1,
         f"max map difference {diff:.1e} (maps up to {peak:.1e})" if name != "Attention Lens"
         else "")
        for name, t in times.items()
    ]  # fmt: skip


def format_table(rows: list[tuple]) -> str:
    lines = ["| configuration | measurement | ratio - 1 | |", "|---|---|---:|---|"]
    for row in rows:
        config, what, ratio = row[:3]
        note = row[3] if len(row) > 3 else ""
        lines.append(f"| {config} | {what} | {ratio:+.1%} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.transformers", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true",
                   help="few pairs, no Hugging Face ViT, no ViT-B, no file written")  # fmt: skip
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results_transformers.md"))
    args = p.parse_args(argv)
    pairs = 2 if args.quick else args.pairs
    rows = overhead_rows(pairs, hugging_face=not args.quick)  # the smoke run: timm's alone
    if not args.quick:
        rows += legrad_rows(args.reps)
    table = format_table(rows)
    print(table)
    if not args.quick:
        write_results(
            args.out,
            "Vision transformers",
            "python -m bench.transformers",
            "Overheads are "
            "medians of paired ratios (see `bench/__main__.py`); for LeGrad 'ratio - 1' is "
            "TorchCAM's median time over ours, minus one (positive: we are faster).",
            table,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
