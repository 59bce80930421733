"""Sequence rules per stream: gaps and partial streams (see "Streams, ordering and gaps" and
"Replay" in docs/protocol.md).

The front numbers the events it offers a plugin 0, 1, 2 ... per stream, counting only the kinds
the plugin subscribed to (a dropped event still uses its number), so on one socket every skipped
number is a gap, and a stream first seen at a number other than 0, or (with request starts
subscribed) at another event than ``RequestStart``, lost its start. A replayed event is judged
exactly like the live event it wraps. An ``AbortedFinal`` is numbered and judged like a
``Final`` (it is sent whatever the subscriptions, and is the stream's last event).
"""

from __future__ import annotations

from typing import Tuple

from .wire import RequestStart, Subscriptions


def starts_partial(subs: Subscriptions, seq: int, event: object) -> bool:
    """Whether a stream whose first event seen is ``event`` with number ``seq`` is missing its
    start."""
    return seq != 0 or (subs.request_start and not isinstance(event, RequestStart))


def next_seq(last: int, seq: int) -> Tuple[int, bool]:
    """Judges ``seq`` after ``last``: ``(gap, out_of_order)``. The gap is the count of numbers
    skipped; an out-of-order number (not after ``last``, never expected on one socket) has
    gap 0 and does not move the stream's position."""
    if seq <= last:
        return 0, True
    return seq - last - 1, False
