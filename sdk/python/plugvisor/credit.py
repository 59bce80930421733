"""Flow-control credit: telling the front which event bytes the plugin has finished with.

The front keeps ``written - consumed <= budget_bytes`` ("Flow control" in docs/protocol.md).
Every per-stream event (and ``Replayed`` around one) counts its whole frame, ``4 + length``.
Once the lanes are done with an event (run, dropped at a full lane, thrown away with an ended
or evicted stream) its bytes are added here; :class:`Credits` sends the cumulative count as
``Credit`` when the unreported amount reaches a quarter of the budget, and :meth:`Credits.flush`
sends it whenever nothing is queued or running, so the front never waits for credit it is owed.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from .wire import Credit


def report_threshold(budget_bytes: int) -> int:
    """When to report: a quarter of the window, at least one byte."""
    return max(budget_bytes // 4, 1)


class Credits:
    """The consumed-bytes counter of one connection and when to report it."""

    def __init__(self, budget_bytes: int, send: Callable[[Any], None]) -> None:
        self.threshold = report_threshold(budget_bytes)
        self._send = send
        # One lock for the count and the report, so reports leave in increasing order.
        self._lock = threading.Lock()
        self.consumed = 0
        self.reported = 0

    def add(self, nbytes: int) -> None:
        """``nbytes`` of events are finished with; report if a quarter of the budget is due."""
        if nbytes <= 0:
            return
        with self._lock:
            self.consumed += nbytes
            self._report(self.threshold)

    def flush(self) -> None:
        """Reports everything consumed and not yet reported (the lanes went idle)."""
        with self._lock:
            self._report(1)

    def _report(self, min_unreported: int) -> None:
        if self.consumed - self.reported >= min_unreported:
            self.reported = self.consumed
            self._send(Credit(self.consumed))
