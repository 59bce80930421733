"""What a plugin adds to a request's trace (capability ``trace``, see "Traces" in
docs/protocol.md): attributes for its final-call span and spans of its own.

Every hook's ``ctx.trace`` is the stream's :class:`StreamTrace`::

    def on_chunk(self, stream, ctx, chunk):
        with ctx.trace.span("parse") as span:          # ends when the block does
            span.attribute("bytes", chunk.len)
            ...

    def on_final(self, stream, ctx, final):
        ctx.trace.attribute("wordcount.words", stream["words"])   # on the final-call span
        return {self.namespace: {"words": stream["words"]}}

What a stream recorded goes to the front as one ``Spans`` right before its final reply, and only
when the front agreed on ``trace`` in its ``Welcome``; otherwise ``ctx.trace`` records nothing
(:attr:`StreamTrace.recording` is false) and costs next to nothing. An aborted or evicted
stream's record is dropped with it. Times are ``CLOCK_MONOTONIC`` nanoseconds
(``time.monotonic_ns()``, the clock of the events' ``stamp_ns``). Limits: at most
:data:`MAX_SPANS` spans per stream and :data:`MAX_ATTRIBUTES` attributes on the final-call span
and on each span; the rest is dropped, with one warning per process.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

from . import log
from .wire import Header, PluginSpan, Spans, find_header

#: Most spans one stream may send.
MAX_SPANS = 64
#: Most attributes on the final-call span, and on each span.
MAX_ATTRIBUTES = 64

_log = log.get("plugvisor.trace")
_warned = threading.Event()


def _over_limit(what: str) -> None:
    if not _warned.is_set():
        _warned.set()
        _log.warn(f"trace limit reached ({what}); the extra ones are dropped (warned once)",
                  max_spans=MAX_SPANS, max_attributes=MAX_ATTRIBUTES)


def _put(attributes: List[Tuple[str, Any]], key: str, value: Any) -> None:
    for i, (k, _) in enumerate(attributes):
        if k == key:
            attributes[i] = (key, value)
            return
    if len(attributes) < MAX_ATTRIBUTES:
        attributes.append((key, value))
    else:
        _over_limit("attributes")


class TraceParent(NamedTuple):
    """The W3C trace context of a stream's request span, from the ``traceparent`` header the
    front adds to ``RequestStart.headers`` (``00-<trace id>-<span id>-<flags>``)."""

    #: 32 lowercase hex digits.
    trace_id: str
    #: 16 lowercase hex digits: the request span's id.
    span_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        """Flags bit 0: the front drops an unsampled request's spans."""
        return bool(self.flags & 1)

    @classmethod
    def parse(cls, value: str) -> Optional["TraceParent"]:
        """A version-00 ``traceparent`` value, or ``None`` when it is not one."""
        parts = value.strip().split("-")
        if len(parts) != 4 or parts[0] != "00":
            return None
        _, trace_id, span_id, flags = parts
        hexdigits = set("0123456789abcdef")
        if (len(trace_id), len(span_id), len(flags)) != (32, 16, 2):
            return None
        if not set(trace_id + span_id + flags) <= hexdigits:
            return None
        if set(trace_id) == {"0"} or set(span_id) == {"0"}:
            return None
        return cls(trace_id, span_id, int(flags, 16))

    @classmethod
    def from_headers(cls, headers: Sequence[Header]) -> Optional["TraceParent"]:
        """The first ``traceparent`` header of ``headers``, parsed."""
        value = find_header(headers, "traceparent")
        return None if value is None else cls.parse(value)

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


class Span:
    """An open span (:meth:`StreamTrace.span`); recorded when its ``with`` block ends."""

    __slots__ = ("_trace", "name", "start_ns", "attributes")

    def __init__(self, trace: "StreamTrace", name: str) -> None:
        self._trace = trace
        self.name = name
        self.start_ns = time.monotonic_ns()
        self.attributes: List[Tuple[str, Any]] = []

    def attribute(self, key: str, value: Any) -> None:
        """Sets an attribute of this span (a later value for a key replaces the earlier)."""
        if self._trace.recording:
            _put(self.attributes, key, value)

    def end(self) -> None:
        """Ends the span now (the ``with`` block does it)."""
        self._trace.record_span(self.name, self.start_ns, time.monotonic_ns(), self.attributes)

    def __enter__(self) -> "Span":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()


class StreamTrace:
    """One stream's trace record (``ctx.trace``). With ``recording`` false (the front did not
    agree on ``trace``) every method does nothing."""

    __slots__ = ("stream_id", "recording", "traceparent", "attributes", "spans")

    def __init__(self, stream_id: int, recording: bool = True) -> None:
        self.stream_id = stream_id
        #: Whether what is recorded goes anywhere.
        self.recording = recording
        #: The request span's context from the stream's ``RequestStart`` (:class:`TraceParent`),
        #: or ``None`` (no ``trace``, or the front's tracing is off).
        self.traceparent: Optional[TraceParent] = None
        self.attributes: List[Tuple[str, Any]] = []
        self.spans: List[PluginSpan] = []

    def attribute(self, key: str, value: Any) -> None:
        """Sets ``key`` on the plugin's span for this stream's final call. Keys the front sets
        itself (``plugvisor.*``) are not replaced: name yours after your plugin."""
        if self.recording:
            _put(self.attributes, key, value)

    def span(self, name: str) -> Span:
        """A span starting now, ended by its ``with`` block (or :meth:`Span.end`)."""
        return Span(self, name)

    def record_span(self, name: str, start_ns: int, end_ns: int,
                    attributes: Sequence[Tuple[str, Any]] = ()) -> None:
        """Records a finished span with explicit times (an ``end_ns`` before ``start_ns`` is
        raised to it), e.g. between two events' ``stamp_ns``."""
        if not self.recording:
            return
        if len(self.spans) >= MAX_SPANS:
            _over_limit("spans")
            return
        attrs: List[Tuple[str, Any]] = []
        for k, v in attributes:
            _put(attrs, k, v)
        self.spans.append(PluginSpan(name, start_ns, max(end_ns, start_ns), attrs))

    def to_spans(self) -> Optional[Spans]:
        """The ``Spans`` message, or ``None`` when nothing was recorded."""
        if not self.recording or (not self.attributes and not self.spans):
            return None
        return Spans(self.stream_id, list(self.attributes), list(self.spans))


#: What ``ctx.trace`` is without the capability: records nothing.
NOT_RECORDING = StreamTrace(0, recording=False)
