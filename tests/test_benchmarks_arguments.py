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
    ("bench_pretokenize.py", ["--workers", "2", "2"], "--workers"),  # was a FileExistsError after the JPEGs
    ("bench_train_step.py", ["--profile", "softvq-tiny", "--dtype", "bf16"], "--profile"),  # was ignored
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


@pytest.mark.parametrize("script, argv, said", [
    ("bench_breakdown.py", ["--plot", "{tmp}"], "--plot {tmp} is a folder; name the PNG to write"),
    ("bench_breakdown.py", ["--plot", "{tmp}/missing/x.png"], "cannot write {tmp}/missing/x.png"),
])
def test_a_plot_path_that_cannot_be_written_is_refused_before_the_profile(script, argv, said, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [script, *(a.format(tmp=tmp_path) for a in argv)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert stop.value.code == 2 and said.format(tmp=tmp_path) in capsys.readouterr().err


def test_emulated_bf16_is_refused_instead_of_running_for_hours(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})  # no AMX, no AVX512-BF16
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["bench_tokenizer.py", "--presets", "softvq-tiny", "--dtype", "bf16"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCHMARKS / "bench_tokenizer.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "this CPU has no bf16 matrix instructions" in err and "--slow-bf16" in err


def test_quartiles_of_a_few_calls_stay_within_them(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_tokenizer

    class Peak:  # a matmul peak that stays put: the per-call fractions are then the calls' own
        def __call__(self):
            return 1.0

    times = iter([10.0, 0.5])
    monkeypatch.setattr(bench_tokenizer, "timed", lambda fn, device, n, warmup=0: next(times))
    _, median, (q1, q3) = bench_tokenizer.paired(lambda: None, 1e9, Peak(), None, repeats=2, warmup=0)
    assert 0.1 <= q1 <= median <= q3 <= 2.0  # the default "exclusive" quartiles gave q1 < 0 here


def test_benchmarks_time_only_devices_they_synchronise_and_measure(monkeypatch):
    """mps passed: its timings would be of queued work, its ru_maxrss in other units."""
    import argparse

    from softvq.cli import common

    monkeypatch.setattr(common, "resolve_device", lambda name: __import__("torch").device(name))
    assert common.timing_device_argument("cuda:1") == "cuda:1" and common.timing_device_argument("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="measured on cpu or cuda devices, not mps"):
        common.timing_device_argument("mps")
