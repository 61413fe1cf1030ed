"""retain_freed_memory: which glibc options it sets, and when it refuses or does nothing.

Whether it removes the page faults of a repeated forward (memory behaviour, machine-specific) is
measured by benchmarks/bench_cpu_allocator.py, not asserted here.
"""

import ctypes
import platform
import subprocess
import sys

import pytest

from softvq.cpu_allocator import retain_freed_memory

# glibc's <malloc.h>, typed here independently of the module under test
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


class FakeLibc:
    """Stands in for ``ctypes.CDLL(None)``: records every ``mallopt(param, value)``."""

    def __init__(self, result=1):
        self.calls, self.result = [], result
        libc = self

        def mallopt(param, value):
            libc.calls.append((param, value))
            return libc.result

        self.mallopt = mallopt


@pytest.fixture
def fake_glibc(monkeypatch):
    libc, opened = FakeLibc(), []

    def cdll(name, *args, **kwargs):
        opened.append(name)
        return libc

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))
    libc.opened = opened
    return libc


def test_it_switches_mmap_off_and_keeps_the_freed_heap(fake_glibc):
    assert retain_freed_memory() is True
    assert fake_glibc.opened == [None]  # the process's own C library
    assert fake_glibc.calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 512 * 2**20)]
    assert fake_glibc.mallopt.argtypes == (ctypes.c_int, ctypes.c_int)
    assert fake_glibc.mallopt.restype is ctypes.c_int


def test_keep_bytes_is_passed_on_and_clamped_to_a_c_int(fake_glibc):
    assert retain_freed_memory(0) is True
    assert retain_freed_memory(2**40) is True
    assert fake_glibc.calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 0),
                                (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)]


def test_calling_it_again_sets_the_same_options(fake_glibc):
    assert retain_freed_memory(1 << 20) is True
    first = list(fake_glibc.calls)
    assert retain_freed_memory(1 << 20) is True
    assert fake_glibc.calls == first + first


def test_a_rejected_option_is_reported_as_false(fake_glibc):
    fake_glibc.result = 0  # glibc's mallopt returns 0 on error
    assert retain_freed_memory() is False


@pytest.mark.parametrize("system, libc", [("Linux", ("musl", "")), ("Darwin", ("", "")), ("Windows", ("", ""))])
def test_other_c_libraries_are_left_alone(fake_glibc, monkeypatch, system, libc):
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: libc)
    assert retain_freed_memory() is False
    assert fake_glibc.calls == [] and fake_glibc.opened == []


def test_a_missing_mallopt_is_reported_as_false(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: object())  # no mallopt attribute
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))
    assert retain_freed_memory() is False


def test_negative_keep_is_refused_before_anything_is_set(fake_glibc):
    with pytest.raises(ValueError, match="keep_bytes must be non-negative, got -1"):
        retain_freed_memory(-1)
    assert fake_glibc.calls == []


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_real_glibc_accepts_both_options_twice():
    # in a child process: the setting is process-wide, and the test process must keep glibc's default
    code = "from softvq.cpu_allocator import retain_freed_memory as r; print(r(), r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
