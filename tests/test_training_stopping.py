"""Ctrl-C / SIGTERM as a stop request: the first only sets the flag, a second stops at once, and
the previous handlers come back."""

import os
import signal

import pytest

from softvq.training.stopping import StopRequests


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_and_a_second_stops_at_once(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    heard = []
    with StopRequests(heard.append) as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)  # delivered before the next bytecode: no exception, only the flag
        assert stop.requested and heard == [signal.Signals(sig).name]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
            # the handler runs at the next bytecode; this line makes sure one follows
            heard.append("not reached")
    assert heard == [signal.Signals(sig).name]
    assert {s: signal.getsignal(s) for s in before} == before
