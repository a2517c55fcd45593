"""Side-by-side benchmark: Attention Lens analysis against TorchCAM, Captum and pytorch-grad-cam.

    python -m bench            # full table, writes bench/results.md
    python -m bench --quick    # a smoke run for CI (< 1 minute); asserts nothing about speed

Every case runs in one process, interleaved (A B C A B C ...), after warm-up; the table reports
medians and the ratio to one plain forward + backward with parameter gradients (the unit).
Overheads of a few percent are below this machine's drift between runs, so they are measured
apart: the two cases back to back in alternating order, many times, on the same model object,
and the median of the per-pair ratios (`paired_ratio`), beside the same measurement of a
forward against itself (the noise floor).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models import build_model
from viz.engine.cam import analyze, stage_layers
from viz.engine.trace import attention_hooks, record_attention

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "ResNet-18+CBAM": lambda: build_model(18, "cbam", num_classes=1000),
    "ResNet-50+CBAM": lambda: build_model(50, "cbam", num_classes=1000),
    "timm seresnet50": lambda: _timm("seresnet50"),
    "torchvision efficientnet_b0": lambda: _torchvision("efficientnet_b0"),
}


def _timm(name: str) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def _torchvision(name: str) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _unit(model, x) -> Callable[[], None]:
    """Plain forward + backward with parameter gradients: the reference unit."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()

    return run


def _forward(model, x) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def _traced_forward(model, x, feature_means: bool = False) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), record_attention(model, feature_means=feature_means):
            model(x)

    return run


def _analyze(model, x, stages) -> Callable[[], None]:
    return lambda: analyze(model, x, cam_layers=stages)


def _torchcam(model, x, stages) -> Callable[[], None] | None:
    """The strongest peer: TorchCAM's GradCAM on the four stage layers in one extractor.

    Like `analyze`, one forward and one backward give all four CAMs; unlike it, no attention map.
    """
    try:
        from torchcam.methods import GradCAM
    except ImportError:
        return None
    layers = dict(model.named_modules())

    def run() -> None:
        with GradCAM(model, target_layer=[layers[n] for n in stages]) as extractor:
            logits = model(x)
            extractor(logits.argmax(1).tolist(), logits)

    return run


def _captum_loop(model, x, stages) -> Callable[[], None]:
    """The same outputs with Captum: LayerGradCam layer by layer plus a forward for the maps."""
    from captum.attr import LayerGradCam

    layers = dict(model.named_modules())

    def run() -> None:
        with torch.no_grad(), record_attention(model):
            target = model(x).argmax(1).tolist()
        for name in stages:
            LayerGradCam(model, layers[name]).attribute(x, target=target, relu_attributions=True)

    return run


def _pytorch_grad_cam(model, x, stages) -> Callable[[], None] | None:
    """The same Grad-CAMs with pytorch-grad-cam, one GradCAM per layer as its README shows."""
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        return None
    layers = dict(model.named_modules())

    def run() -> None:
        for name in stages:
            with GradCAM(model=model, target_layers=[layers[name]]) as cam:
                cam(input_tensor=x, targets=None)

    return run


def _figure_cases(model, x) -> dict[str, Callable[[], None]]:
    """Render the standard overview figure, and export it."""
    from PIL import Image

    from viz.commands.export import figure_bytes
    from viz.figures import spatial_overview

    with torch.no_grad(), record_attention(model) as trace:
        model(x[:1])
    image = Image.new("RGB", (x.shape[-1], x.shape[-2]), (120, 110, 100))

    def render() -> None:
        spatial_overview(image, trace)

    fig = spatial_overview(image, trace)

    def export() -> None:
        for fmt in ("png", "pdf", "svg"):
            figure_bytes(fig, fmt, dpi=300)

    return {"overview figure render": render, "overview export png+pdf+svg": export}


APP_UPLOAD = "church_29612.jpg"  # not the first view's image, so its analysis is not cached


def measure_app_upload(reps: int) -> float | None:
    """Median wall time (s) of an upload until every figure is rendered, through `AppTest`.

    Each repetition opens the app (its worked example), clears the analysis cache, then times
    the upload of a sample image; the model stays loaded, as it does for a user.
    """
    root = Path(__file__).resolve().parents[1]
    if not list((root / "checkpoints").glob("*cbam*.safetensors")):
        return None
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    image = (root / "samples" / APP_UPLOAD).read_bytes()
    times = []
    for _ in range(reps + 1):  # the first run loads the model
        at = AppTest.from_file(str(root / "app.py"), default_timeout=120).run()
        st.cache_data.clear()
        uploader = at.sidebar.file_uploader(key="images")
        t0 = time.perf_counter()
        uploader.set_value([(APP_UPLOAD, image, "image/jpeg")]).run()
        times.append(time.perf_counter() - t0)
        if at.exception:
            raise RuntimeError(f"app raised: {at.exception[0].message}")
    return statistics.median(times[1:])


def measure_recognition(reps: int) -> list[tuple]:
    """Seconds to recognise and load a ~120 MB torchvision efficientnet_b5 state dict.

    The first load also builds the candidate architectures on the meta device (cached after).
    """
    import io

    import torchvision

    from models import load_checkpoint
    from models.checkpoints.architectures import forget_signatures

    model = torchvision.models.efficientnet_b5(weights=None)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    data = buf.getvalue()
    forget_signatures()
    t0 = time.perf_counter()
    load_checkpoint(data)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(reps):
        t0 = time.perf_counter()
        load_checkpoint(data)
        warm.append(time.perf_counter() - t0)
    config = f"load_checkpoint, efficientnet_b5 state dict ({len(data) / 2**20:.0f} MiB)"
    return [
        (config, "first load in the process (candidates built on meta)", cold, None),
        (config, "later loads", statistics.median(warm), None),
    ]


def measure_parallel_export(n_images: int = 100) -> list[tuple]:
    """Wall time of `python -m viz export` over `n_images` x 2 figures, --jobs 1 against all cores.

    The same command, the same inputs, run one after the other in this process (workers are
    spawned processes); the outputs are checked to be byte-identical.
    """
    import os
    import tempfile

    import numpy as np
    from PIL import Image

    from viz.commands.cli import main as cli

    root = Path(__file__).resolve().parents[1]
    ckpt = root / "checkpoints" / "resnet18_cbam_imagenette.safetensors"
    if not ckpt.is_file():
        return []
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n_images):
            Image.fromarray((rng.random((224, 224, 3)) * 255).astype(np.uint8)).save(
                images / f"{i:03d}.png"
            )
        seconds, outputs = {}, {}
        for jobs in (1, cores):
            out = Path(tmp) / f"out{jobs}"
            argv = ["export", "--checkpoint", str(ckpt), "--images", str(images), "--out",
                    str(out), "--figure", "overview", "gradcam", "--jobs", str(jobs)]  # fmt: skip
            t0 = time.perf_counter()
            if cli(argv) != 0:
                raise RuntimeError("export failed")
            seconds[jobs] = time.perf_counter() - t0
            outputs[jobs] = {
                p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()
            }
        same = outputs[1] == outputs[cores]
        config = f"python -m viz export, {n_images} images x 2 figures, embedded CBAM"
        rows.append((config, "--jobs 1", seconds[1], None))
        rows.append((config, f"--jobs {cores} (identical bytes: {same})", seconds[cores], None))
        rows.append((config, f"speed-up with {cores} jobs", None, seconds[1] / seconds[cores] - 1))
    return rows


def _report_images(folder: Path, n: int, size: tuple[int, int] = (320, 240)) -> None:
    """`n` JPEG photos-to-be (noise) of `size`, the decoding cost of a real data set."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def measure_report(n_images: int = 512, batch: int = 16, reps: int = 3) -> list[tuple]:
    """`python -m viz report` throughput against its floor, and over two processes.

    Floor and report run `reps` times, interleaved; medians are reported.

    Floor: one `analyze` (forward + backward, every map) per batch of already decoded images,
    the same batch size, in this process. The report, also in this process with the model
    loaded: decoding (in one DataLoader worker, overlapped), agreement, the random map, the
    saved parts and the final files (tables, bootstrap, figures); deletion/insertion and the
    sanity check are off (separate, much larger costs). The two-process case runs the whole
    command, `torchrun --nproc-per-node 2` with one thread each, against the whole command in
    one process with all threads: start-up and checkpoint loading included on both sides.
    """
    import tempfile

    from models import load_checkpoint
    from models.images import load_image
    from viz.commands.report import ReportOptions, inputs_for, run_report
    from viz.commands.report_page import write_report

    root = Path(__file__).resolve().parents[1]
    ckpt_path = root / "checkpoints" / "resnet18_cbam_imagenette.safetensors"
    if not ckpt_path.is_file():
        return []
    ckpt = load_checkpoint(ckpt_path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        _report_images(images, n_images)
        files = sorted(images.iterdir())
        decoded = [ckpt.preprocess(load_image(f))[0] for f in files]
        analyze(ckpt.model, torch.stack(decoded[:batch]))  # warm-up
        options = ReportOptions(deletion="off", sanity=0, batch_size=batch)
        inputs = inputs_for([("cbam", str(ckpt_path), ckpt)], images)
        floors, reports, steadies = [], [], []
        for rep in range(reps):  # interleaved: floor, report, floor, report, ...
            t0 = time.perf_counter()
            for start in range(0, n_images, batch):
                analyze(ckpt.model, torch.stack(decoded[start : start + batch]))
            floors.append(time.perf_counter() - t0)
            ticks: list[tuple[float, int]] = []  # (time, images done) after each chunk
            out = Path(tmp) / f"in_process_{rep}"
            t0 = time.perf_counter()
            rows_done = run_report(inputs, out, options, workers=1,
                                   progress=lambda done, _, ticks=ticks: ticks.append(
                                       (time.perf_counter(), done)))  # fmt: skip
            write_report(out, rows_done, inputs, options)
            reports.append(time.perf_counter() - t0)
            # steady state: from the first finished chunk to the last (worker start-up and the
            # final files left out), scaled to all images
            (t_first, first), (t_last, last) = ticks[1], ticks[-1]
            steadies.append((t_last - t_first) / (last - first) * n_images)
        del decoded
        floor, report = statistics.median(floors), statistics.median(reports)
        steady = statistics.median(steadies)
        config = f"viz report, {n_images} JPEGs 320x240, embedded ResNet-18+CBAM at 224, b{batch}"
        rows.append((config, "floor: analyze per batch, decoded images", floor, None))
        rows.append((config, "report in process, all of it (decoding, parts, files)", report, None))
        rows.append((config, "report, steady state per image x images", steady, None))
        rows.append((config, "throughput vs floor, steady state (goal >= 0.8x: >= -20%)", None,
                     floor / steady - 1))  # fmt: skip
        rows.append((config, "throughput vs floor, all of it", None, floor / report - 1))
        rows += _report_processes(config, ckpt_path, images, batch, Path(tmp))
    return rows


def _report_processes(config: str, ckpt_path: Path, images: Path, batch: int, tmp: Path) -> list:
    """The whole report command in one process (all threads) against torchrun with two."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    common = ["report", "--checkpoint", str(ckpt_path), "--images", str(images),
              "--deletion", "off", "--sanity", "0", "--batch-size", str(batch)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(root))
    seconds = {}
    for name, launcher, threads in (
        ("1 process", [sys.executable, "-m", "viz"], str(torch.get_num_threads())),
        ("torchrun 2 processes", [sys.executable, "-m", "torch.distributed.run",
                                  "--standalone", "--nproc-per-node", "2", "-m", "viz"], "1"),
    ):  # fmt: skip
        t0 = time.perf_counter()
        run = subprocess.run(
            [*launcher, *common, "--out", str(tmp / name.replace(" ", "_")), "--workers", "1"],
            env=env | {"OMP_NUM_THREADS": threads}, capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"report failed: {run.stderr[-500:]}")
        seconds[name] = time.perf_counter() - t0
    return [
        (config, "whole command, 1 process", seconds["1 process"], None),
        (config, "whole command, torchrun 2 processes", seconds["torchrun 2 processes"], None),
        (config, "speed-up of 2 processes", None,
         seconds["1 process"] / seconds["torchrun 2 processes"] - 1),
    ]  # fmt: skip


def _resident_mib() -> float:
    """This process's resident set size now (Linux), MiB; nan elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure_report_memory_clean(n_images: int = 10_000) -> list[tuple]:
    """`measure_report_memory` in a fresh interpreter, so earlier cases do not count."""
    import json
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = (
        f"import json, bench.__main__ as b; print(json.dumps(b.measure_report_memory({n_images})))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"memory case failed: {run.stderr[-500:]}")
    return [tuple(row) for row in json.loads(run.stdout.strip().splitlines()[-1])]


def measure_report_memory(n_images: int = 10_000) -> list[tuple]:
    """Resident memory of a report run at 1,000 images and at `n_images` (tiny network, 32 px)."""
    import tempfile

    from models import Preprocess, load_checkpoint, save_checkpoint
    from viz.commands.report import ReportInputs, ReportOptions, run_report

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        _report_images(images, 100, (40, 40))
        files = sorted(images.iterdir())
        model = build_model(18, "cbam", num_classes=10).eval()
        path = Path(tmp) / "tiny.safetensors"
        save_checkpoint(path, model, preprocess=Preprocess(resize=36, crop=32))
        ckpt = load_checkpoint(path)
        # the same 100 files many times over: memory, not decoding, is measured here
        listed = [(files[i % 100], f"{i:05d}", None) for i in range(n_images)]
        inputs = ReportInputs([("tiny", str(path), ckpt)], listed)
        marks: dict[int, float] = {}

        def progress(done: int, total: int) -> None:
            for mark in (1000, n_images):
                if done >= mark and mark not in marks:
                    marks[mark] = _resident_mib()

        options = ReportOptions(deletion="off", sanity=0, batch_size=50)
        t0 = time.perf_counter()
        run_report(inputs, Path(tmp) / "out", options, progress=progress)
        seconds = time.perf_counter() - t0
    config = f"viz report memory, {n_images} images (tiny ResNet-18+CBAM, 32 px)"
    growth = marks[n_images] - marks[1000]
    return [
        (config, f"resident memory after 1,000 images: {marks[1000]:.0f} MiB", None, None),
        (config, f"resident memory after {n_images:,} images: {marks[n_images]:.0f} MiB "
                 f"(+{growth:.0f} MiB; {seconds:.0f} s)", None, None),
    ]  # fmt: skip


def write_results(out: Path, title: str, command: str, note: str, table: str) -> None:
    """A results file: its title, the command and machine it was measured on, a note, the table."""
    machine = (
        f"{dt.date.today().isoformat()}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    out.write_text(f"# {title}\n\n`{command}` on {machine}. {note}\n\n{table}\n")
    print(f"wrote {out}", file=sys.stderr)


def paired_ratio(a: Callable[[], object], b: Callable[[], object], pairs: int) -> float:
    """time(a) / time(b) from `pairs` back-to-back runs, alternating which goes first.

    A case that returns a float has timed itself (to leave its set-up out).
    """

    def timed(case: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        own = case()
        elapsed = time.perf_counter() - t0
        return own if isinstance(own, float) else elapsed

    timed(a), timed(b)
    a_first, b_first = [], []  # the second of two runs may be systematically faster or slower
    for i in range(pairs):
        if i % 2:
            ta, tb = timed(a), timed(b)
            a_first.append(ta / tb)
        else:
            tb, ta = timed(b), timed(a)
            b_first.append(ta / tb)
    # each order's median, then their geometric mean: the order effect cancels
    return (statistics.median(a_first) * statistics.median(b_first)) ** 0.5


def _kept(model, run: Callable[[], object], feature_means: bool = False) -> Callable[[], float]:
    """`run` with the taps kept on `model` (`attention_hooks`), timing the run alone.

    The taps go on before and come off after each run, untimed, so the plain forward it is
    compared with runs on the same model object without any tap (a copy of the model would
    differ by its memory layout: by up to 3% here). The run is the first after the taps went
    on, so this errs on the high side of a loop's steady state.
    """

    def case() -> float:
        with attention_hooks(model, feature_means=feature_means):
            t0 = time.perf_counter()
            run()
            return time.perf_counter() - t0

    return case


def overhead_rows(label: str, model, x, stages, pairs: int) -> list[tuple]:
    """Tracing and analysis overheads as paired ratios (see the module docstring)."""
    forward, traced = _forward(model, x), _traced_forward(model, x)
    rows = [
        (label, "noise floor: forward vs itself", None, paired_ratio(forward, forward, pairs) - 1),
        (label, "tracing overhead vs forward (taps per trace)", None,
         paired_ratio(traced, forward, pairs) - 1),
        (label, "tracing overhead vs forward (taps kept: attention_hooks)", None,
         paired_ratio(_kept(model, traced), forward, pairs) - 1),
    ]  # fmt: skip
    peer = _torchcam(model, x, stages)
    if peer is not None:
        analysis = _analyze(model, x, stages)
        rows += [
            (label, "analyze / TorchCAM (taps per call, lower is better)", None,
             paired_ratio(analysis, peer, pairs) - 1),
            (label, "analyze with taps kept / TorchCAM", None,
             paired_ratio(_kept(model, analysis, feature_means=True), peer, pairs) - 1),
        ]  # fmt: skip
    return rows


def measure(cases: dict[str, Callable[[], None]], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per case; cases interleaved in each repetition."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def run_config(
    label: str, batch: int, size: int, device: str, reps: int, warmup: int
) -> list[tuple]:
    torch.manual_seed(0)
    model = MODELS[label]().eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    stages = stage_layers(model)
    cases: dict[str, Callable[[], None]] = {
        "forward + backward (unit)": _unit(model, x),
        "forward": _forward(model, x),
        "forward under record_attention": _traced_forward(model, x),
        "forward under record_attention(feature_means=True)": _traced_forward(model, x, True),
        "analyze: all maps + Grad-CAM x4": _analyze(model, x, stages),
    }
    peer = _torchcam(model, x, stages)
    if peer is not None:
        cases["TorchCAM GradCAM x4 (one extractor)"] = peer
    cases["Captum LayerGradCam x4 + forward"] = _captum_loop(model, x, stages)
    pgc = _pytorch_grad_cam(model, x, stages)
    if pgc is not None:
        cases["pytorch-grad-cam GradCAM x4"] = pgc
    if device == "cpu" and batch == 1 and label == "ResNet-18+CBAM":
        cases.update(_figure_cases(model, x))
    medians = measure(cases, reps, warmup)
    unit = medians["forward + backward (unit)"]
    config = f"{label} b{batch}"
    rows = [(config, name, med, med / unit) for name, med in medians.items()]
    pairs = 2 if reps == 1 else (160 if batch == 1 else 20)
    return rows + overhead_rows(config, model, x, stages, pairs)


def format_table(rows: list[tuple]) -> str:
    lines = ["| config | case | median | ratio to unit |", "|---|---|---:|---:|"]
    for config, name, med, ratio in rows:
        if med is None and ratio is None:
            lines.append(f"| {config} | {name} | | |")
        elif med is None:
            lines.append(f"| {config} | {name} | | {ratio * 100:+.1f}% |")
        elif ratio is None:
            lines.append(f"| {config} | {name} | {med * 1000:.1f} ms | |")
        else:
            lines.append(f"| {config} | {name} | {med * 1000:.1f} ms | {ratio:.2f}x |")
    return "\n".join(lines)


HISTORY = "## Profiling history"


def _kept_history(path: Path) -> str:
    """The hand-written before/after section of an existing results file, kept across runs."""
    text = path.read_text() if path.is_file() else ""
    return "\n" + text[text.index(HISTORY) :] if HISTORY in text else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke run (CI): ResNet-18, batch 1, 64 px"
    )
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    p.add_argument("--no-app", action="store_true", help="skip the AppTest wall-time case")
    args = p.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.quick:
        configs, reps, warmup = [("ResNet-18+CBAM", 1, 64)], 1, 0
    else:
        configs, reps, warmup = (
            [
                ("ResNet-18+CBAM", 1, 224),
                ("ResNet-18+CBAM", 8, 224),
                ("ResNet-50+CBAM", 1, 224),
                ("ResNet-50+CBAM", 8, 224),
                ("timm seresnet50", 1, 224),
                ("torchvision efficientnet_b0", 1, 224),
            ],
            args.reps,
            args.warmup,
        )
    rows: list[tuple] = []
    for device in devices:
        for label, batch, size in configs:
            print(f"measuring {label} batch {batch} at {size}px on {device} ...", file=sys.stderr)
            rows += [
                (f"{c} {device}", *rest)
                for c, *rest in run_config(label, batch, size, device, reps, warmup)
            ]
    if not args.quick:
        print("measuring checkpoint recognition ...", file=sys.stderr)
        rows += measure_recognition(reps=3)
        print("measuring parallel export ...", file=sys.stderr)
        rows += measure_parallel_export()
        print("measuring the data-set report ...", file=sys.stderr)
        rows += measure_report()
        rows += measure_report_memory_clean()
    if not args.quick and not args.no_app:
        upload = measure_app_upload(reps=5)
        if upload is not None:
            rows.append(
                ("app, embedded ResNet-18 CBAM", "upload -> all figures (AppTest)", upload, None)
            )
    table = format_table(rows)
    print(table)
    if not args.quick:
        header = (
            f"# Benchmark results\n\n`python -m bench` on {dt.date.today().isoformat()}: "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}.\n"
            "Medians of interleaved repetitions; ratios are to one plain forward + backward with "
            "parameter gradients of the same model and batch.\n\n"
        )
        args.out.write_text(header + table + "\n" + _kept_history(args.out))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
