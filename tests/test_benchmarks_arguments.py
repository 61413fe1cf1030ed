"""The benchmark scripts refuse bad arguments as usage errors (exit 2, one line) before any work."""

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, argv, flag", [
    ("bench_tokenizer.py", ["--presets"], "--presets"),
    ("bench_tokenizer.py", ["--presets", "softvq-nope"], "--presets"),
    ("bench_tokenizer.py", ["--repeats", "0"], "--repeats"),
    ("bench_tokenizer.py", ["--batch", "0"], "--batch"),
    ("bench_breakdown.py", ["--preset", "nope"], "--preset"),
    ("bench_breakdown.py", ["--passes", "0"], "--passes"),
    ("bench_softvq_memory.py", ["--rounds", "0"], "--rounds"),
    ("bench_train_step.py", ["--presets", "bogus", "--batch", "1", "--steps", "1"], "--presets"),
    ("bench_pretokenize.py", ["--images", "0"], "--images"),
    ("bench_peer_vit.py", ["--repeats", "0"], "--repeats"),
    ("bench_cpu_allocator.py", ["--processes", "0"], "--processes"),
    ("bench_cpu_allocator.py", ["--workloads", "nope"], "--workloads"),
    ("bench_lfq_memory.py", ["--dims", "0"], "--dims"),
    ("bench_lfq_memory.py", ["--device", "tpu"], "--device"),
])
def test_bad_arguments_are_one_line_usage_errors(script, argv, flag, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import bench_tokenizer from their folder
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as stop:  # argparse stops while parsing: nothing is built or timed
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert err.strip().splitlines()[-1].startswith(f"{script}: error: argument {flag}")
