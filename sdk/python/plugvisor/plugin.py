"""What a plugin implements (:class:`Plugin`) and what every hook receives (:class:`EventCtx`).

A plugin is one object shared by every worker thread, plus one *stream state* per ext_proc
stream: made by :meth:`Plugin.new_stream` at the stream's first event and forgotten after its
final, aborted-final or abort hook ran (or when it is evicted as idle). The host calls one stream's hooks one at
a time in sequence order, so the state needs no locks; different streams run in parallel.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any, Dict, Optional

from .trace import NOT_RECORDING, StreamTrace
from .wire import (Abort, AbortedFinal, Chunk, Final, Metadata, RequestStart, ResponseHeaders,
                   Subscriptions)


class ConfigError(Exception):
    """The plugin's config is invalid; raise it from :meth:`Plugin.configure` with a message
    naming the key and what to change. The host logs it and exits with status 78."""


class EventCtx:
    """Where an event sits in its stream, as the host saw it."""

    __slots__ = ("stream_id", "seq", "stamp_ns", "gap", "partial", "is_replayed", "trace")

    def __init__(self, stream_id: int, seq: int, stamp_ns: int, gap: int = 0,
                 partial: bool = False, is_replayed: bool = False,
                 trace: Optional[StreamTrace] = None) -> None:
        #: The front's id of the ext_proc stream.
        self.stream_id = stream_id
        #: The event's sequence number within the stream.
        self.seq = seq
        #: Arrival of the event at the front, ``CLOCK_MONOTONIC`` nanoseconds. Compute
        #: latencies from these stamps, never from when the hook happens to run.
        self.stamp_ns = stamp_ns
        #: Events of this stream missing right before this one (dropped by the front under
        #: overload, or lost to a restart); 0 when nothing is missing.
        self.gap = gap
        #: The host never saw this stream's start (e.g. after a restart mid-stream): totals
        #: computed from it are partial.
        self.partial = partial
        #: The front resent this event after a process of this plugin crashed (same stream id,
        #: seq and stamp). Compute from it exactly as from a live event; skip only side effects
        #: outside the process that the crashed one may already have made.
        self.is_replayed = is_replayed
        #: The stream's trace record (:class:`plugvisor.trace.StreamTrace`): attributes for the
        #: plugin's final-call span, spans of its own, the request's ``traceparent``. Records
        #: nothing unless the front agreed on the capability ``trace``.
        self.trace = trace if trace is not None else NOT_RECORDING

    def __repr__(self) -> str:
        return ("EventCtx(stream_id={0.stream_id}, seq={0.seq}, stamp_ns={0.stamp_ns}, "
                "gap={0.gap}, partial={0.partial}, is_replayed={0.is_replayed})").format(self)


class Plugin:
    """A plugin: per-stream hooks called in sequence order, different streams in parallel.

    Set :attr:`name` (the default name in ``Hello``) and override the hooks you need; only
    :meth:`on_final` and :meth:`on_aborted_final` produce anything. An exception raised by any hook (or by
    :meth:`new_stream`) fails that stream only: it is logged, the stream's later hooks are
    skipped, and its final answers with an error carrying the exception's text.
    """

    #: The plugin's name when the command line names none.
    name: str = "plugin"
    #: What the plugin receives; sent in ``Hello``. Default: every event, with body bytes.
    subscriptions: Subscriptions = Subscriptions()

    @property
    def namespace(self) -> str:
        """The plugin's own metadata namespace, ``plugvisor.<name>``: where the host adds
        ``gaps`` and ``partial``."""
        return "plugvisor." + self.name

    def new_instance(self) -> "Plugin":
        """An unconfigured plugin for one more connection to the front. After ``Reconnect``
        (capability ``reconnect``: a reload changed the config, or the front was upgraded) the
        host serves the new connection with an instance of its own, configured from that
        connection's ``Welcome``, while the old connection finishes with the old one.

        The host calls it once at start, before the first :meth:`configure`, to keep a pristine
        copy, and then on that copy for each new connection. The default is
        ``copy.deepcopy(self)``; override it to share something between the instances of one
        process (a metrics registry, a client pool) or when the plugin holds what cannot be
        copied (a lock, a socket). A plugin whose copy fails at start does not announce
        ``reconnect``."""
        return copy.deepcopy(self)

    def configure(self, config: Dict[str, Any]) -> None:
        """Applies the plugin's ``config`` table from the front's configuration (an empty dict
        when there is none), once, before any event. Raise :class:`ConfigError` (or any
        exception) to refuse it: the process exits with status 78."""

    def new_stream(self) -> Any:
        """The state of a new stream, made at its first event. Default: an empty
        ``types.SimpleNamespace`` to set attributes on."""
        return SimpleNamespace()

    def on_request_start(self, stream: Any, ctx: EventCtx, event: RequestStart) -> None:
        """A request's headers reached the front."""

    def on_response_headers(self, stream: Any, ctx: EventCtx, event: ResponseHeaders) -> None:
        """The upstream's response headers arrived."""

    def on_chunk(self, stream: Any, ctx: EventCtx, chunk: Chunk) -> None:
        """A response body chunk arrived (``chunk.bytes`` is empty unless subscribed with
        ``body_bytes``; ``chunk.len`` is always its size)."""

    def on_final(self, stream: Any, ctx: EventCtx, event: Final) -> Metadata:
        """The response ended and every earlier event of the stream has run. Return the
        metadata, namespace -> value (normally ``{self.namespace: {...}}``), which goes into
        Envoy's ``dynamic_metadata``. The final's own last body bytes are in ``event.bytes``."""
        return {}

    def on_abort(self, stream: Any, ctx: EventCtx, event: Abort) -> None:
        """The stream ended without a response end; its state is forgotten right after. Only
        with the ``abort`` subscription, and only from a front that does not send
        :class:`AbortedFinal` instead (see :meth:`on_aborted_final`)."""

    def on_aborted_final(self, stream: Any, ctx: EventCtx, event: AbortedFinal) -> Metadata:
        """The final call of a stream that ended without a response end (the client left, the
        upstream reset, the front stopped: ``event.cause``, named by ``event.cause_str``), once
        every earlier event of the stream has run. Return what the plugin knows, like
        :meth:`on_final` (the host adds ``gaps`` and ``partial`` the same way), marked as
        partial or estimated where it is; it goes into the request's usage record. The
        stream's state is forgotten right after.

        A front that agreed on the capability ``aborted_final`` (this SDK announces it) sends
        this instead of :class:`Abort`, whatever the ``abort`` subscription. The default runs
        :meth:`on_abort` with ``event.as_abort()`` and answers with no metadata of its own
        (``{}``), so a plugin that does not override it behaves as with an ``Abort``."""
        self.on_abort(stream, ctx, event.as_abort())
        return {}
