"""The benchmark's quick mode runs end to end (it measures, it asserts nothing about speed)."""

from bench.__main__ import HISTORY, _kept_history, format_table, main


def test_quick_benchmark_runs(capsys):
    assert main(["--quick", "--no-app"]) == 0
    out = capsys.readouterr().out
    assert "analyze: all maps + Grad-CAM x4" in out
    assert "Captum LayerGradCam x4 + forward" in out
    assert "TorchCAM GradCAM x4 (one extractor)" in out


def test_table_reports_ratios():
    table = format_table(
        [("cfg", "unit", 0.5, 1.0), ("cfg", "overhead", None, 0.02), ("app", "upload", 0.9, None)]
    )
    assert "500.0 ms | 1.00x" in table and "+2.0%" in table
    assert "| app | upload | 900.0 ms | |" in table


def test_profiling_history_survives_a_new_run(tmp_path):
    results = tmp_path / "results.md"
    assert _kept_history(results) == ""
    results.write_text(f"# old table\n\n{HISTORY}\n\nbefore: 9%, after: 2%\n")
    assert _kept_history(results) == f"\n{HISTORY}\n\nbefore: 9%, after: 2%\n"


def test_quick_transformer_benchmark_runs(capsys):
    from bench.transformers import main as transformers_main

    assert transformers_main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "recording all 12 blocks' attention" in out and "analyze(method='gae')" in out


def test_quick_targets_benchmark_runs(capsys):
    from bench.targets import main as targets_main

    assert targets_main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "SegmentationScore" in out and "BoxScore" in out and "noise floor" in out
