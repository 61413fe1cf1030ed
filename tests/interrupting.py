"""Ctrl-C in the middle of a long command, at a chosen point, as the tests make it happen."""

from __future__ import annotations

from typing import Any


def interrupt_at_call(monkeypatch: Any, owner: type, name: str, n: int) -> None:
    """Make the method ``owner.name`` raise KeyboardInterrupt (Ctrl-C) on its ``n``-th call; the
    calls before it run as they were (``monkeypatch.undo()`` puts the method back)."""
    real, calls = getattr(owner, name), []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
