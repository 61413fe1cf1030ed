"""Ctrl-C / SIGTERM as a stop request: the first only sets the flag, a later Ctrl-C stops at once
(a relayed copy of the first does not), and the previous handlers come back."""

import os
import signal

import pytest

from softvq.training.stopping import REPEAT_AFTER_SECONDS, StopRequests


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_and_a_later_ctrl_c_stops_at_once(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    heard, now = [], [100.0]
    with StopRequests(heard.append, clock=lambda: now[0]) as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)  # delivered before the next bytecode: no exception, only the flag
        assert stop.requested and heard == [signal.Signals(sig).name]
        now[0] += REPEAT_AFTER_SECONDS
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            # the handler runs at the next bytecode; this line makes sure one follows
            heard.append("not reached")
    assert heard == [signal.Signals(sig).name]
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_relayed_signal_is_the_same_request_not_a_stop_at_once():
    """Slurm signals every process and torchrun relays its own SIGTERM (or the terminal's Ctrl-C)
    to its workers: each worker hears one request twice, and stopping at once with several
    processes writes no checkpoint (the steps since the last one lost)."""
    now = [0.0]
    with StopRequests(clock=lambda: now[0]) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C, relayed 0 s later
        now[0] = 60.0
        for _ in range(3):  # a scheduler repeating SIGTERM never stops at once (SIGKILL is its escalation)
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.count == 5
