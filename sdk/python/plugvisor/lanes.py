"""Ordered per-stream lanes on a bounded pool of worker threads.

Each stream gets a lane: a FIFO of its events and the plugin's state for it. A lane is idle,
waiting in the ready queue, or running on exactly one worker, so one stream's events run one
after another in sequence order while different streams run in parallel on ``workers`` threads.
A worker runs one event, then puts the lane at the back of the ready queue, so a stream with a
long backlog gets its share of the pool and no more (the shape of plugin-runner's ``lanes.rs``).

Bounds: the front sends no more than ``budget_bytes`` of events not yet credited back, so all
lanes together hold at most that much. Within it a lane holds at most ``queue_events`` events and
``queue_bytes`` body bytes (one event alone in its lane gets in whatever its size); response headers and non-inline chunks arriving at a full lane are
dropped (credited) and the next event that gets in carries the gap. Request starts, finals
(``Final`` and ``AbortedFinal``), aborts and inline chunks are never dropped.

Every piece of plugin code (:meth:`Plugin.new_stream`, the hooks) runs under one guard: an
exception is logged with plugin, stream, seq and hook, the lane is marked failed (its later
hooks are skipped, its final answers with the error), and the worker goes on.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import log
from .credit import Credits
from .plugin import EventCtx, Plugin
from .sequence import next_seq, starts_partial
from .trace import NOT_RECORDING, StreamTrace, TraceParent
from .wire import (FINAL_TYPES, Abort, AbortedFinal, Ack, Chunk, EncodeError, Final, FinalReply,
                   Metadata, RequestStart, ResponseHeaders)

_log = log.get("plugvisor.lanes")


class _Job:
    __slots__ = ("event", "ctx", "body", "owed")

    def __init__(self, event: Any, ctx: EventCtx, body: int, owed: int) -> None:
        self.event = event
        self.ctx = ctx
        self.body = body
        # The event's counted frame bytes, credited once the job is finished with.
        self.owed = owed


class _Lane:
    __slots__ = ("state", "has_state", "queue", "queued_bytes", "scheduled", "last_seq", "gaps",
                 "partial", "failed", "last_active", "trace")

    def __init__(self, seq: int, partial: bool, now: float, trace: StreamTrace) -> None:
        self.state: Any = None
        self.has_state = False
        self.queue: Deque[_Job] = deque()
        self.queued_bytes = 0
        # In the ready queue or running: a worker will look at this lane again.
        self.scheduled = False
        self.last_seq = seq
        self.gaps = 0
        self.partial = partial
        self.failed: Optional[str] = None
        self.last_active = now
        # What the stream's hooks recorded for its trace, sent as Spans before its final reply;
        # dropped with the lane when the stream is aborted or evicted.
        self.trace = trace


class LaneStats:
    """What the lanes had to do besides running hooks."""

    def __init__(self) -> None:
        self.dropped = 0
        self.evicted = 0
        self.errors = 0
        self.out_of_order = 0
        self.replayed = 0


def annotate(meta: Metadata, namespace: str, gaps: int, partial: bool) -> None:
    """Adds the host's findings (``gaps``, ``partial``) to the plugin's own namespace map,
    creating it if the plugin wrote none; a namespace that is not a map is left alone."""
    if gaps == 0 and not partial:
        return
    entry = meta.setdefault(namespace, {})
    if not isinstance(entry, dict):
        _log.debug("plugin's own namespace is not a map; gaps not added", namespace=namespace)
        return
    if gaps > 0:
        entry["gaps"] = gaps
    if partial:
        entry["partial"] = True


def _body_len(event: Any) -> int:
    return len(event.bytes) if isinstance(event, (Chunk, Final)) else 0


def _droppable(event: Any) -> bool:
    return isinstance(event, ResponseHeaders) or (isinstance(event, Chunk) and not event.ack)


_HOOKS = {
    RequestStart: "on_request_start",
    ResponseHeaders: "on_response_headers",
    Chunk: "on_chunk",
    Final: "on_final",
    Abort: "on_abort",
    AbortedFinal: "on_aborted_final",
}


class Lanes:
    """The lanes of one connection and the worker threads that run them. Answers (final
    replies, acks) go to ``send``; every event's counted bytes are consumed in ``credits``."""

    def __init__(self, plugin: Plugin, *, workers: int, queue_events: int, queue_bytes: int,
                 plugin_name: str, namespace: str, send: Callable[[Any], None],
                 credits: Credits, trace: bool = False) -> None:
        self.plugin = plugin
        self.subs = plugin.subscriptions
        self.queue_events = max(queue_events, 1)
        self.queue_bytes = queue_bytes
        self.plugin_name = plugin_name
        self.namespace = namespace
        self.send = send
        self.credits = credits
        #: The connection agreed on ``trace``: each stream gets a recording ``ctx.trace``.
        self.trace = trace
        self.stats = LaneStats()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._lanes: Dict[int, _Lane] = {}
        self._ready: Deque[int] = deque()
        self._running: Dict[int, float] = {}
        #: Steps done running whose answers (a final reply, an ack) are still being handed
        #: out: the lanes are not idle until they are out.
        self._answering = 0
        self._stop = False
        self.accepting_new = True
        self._threads = []
        for i in range(max(workers, 1)):
            t = threading.Thread(target=self._worker, name=f"pv-lane-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    # -- what the reader calls --------------------------------------------------------------

    def submit(self, event: Any, frame_len: int, replayed: bool) -> None:
        """Queues a per-stream event on its stream's lane (a new stream gets a new lane);
        ``frame_len`` is what it counts against the window."""
        stream_id, seq = event.stream_id, event.seq
        body = _body_len(event)
        now = time.monotonic()
        refused = False
        with self._lock:
            lane = self._lanes.get(stream_id)
            if lane is not None:
                # An event alone in its lane always gets in, however large (the front's window
                # bounds it), so a single body message over queue_bytes is not a gap.
                if _droppable(event) and (len(lane.queue) >= self.queue_events
                                          or (lane.queue
                                              and lane.queued_bytes + body > self.queue_bytes)):
                    self.stats.dropped += 1
                    dropped = self.stats.dropped
                    _log.debug("lane queue full; event dropped", stream_id=stream_id, seq=seq,
                               dropped=dropped)
                    if dropped & (dropped - 1) == 0:
                        _log.warn("lane queues overflowing; events dropped (the streams report gaps)",
                                  dropped_total=dropped)
                else:
                    gap, out_of_order = next_seq(lane.last_seq, seq)
                    if out_of_order:
                        self.stats.out_of_order += 1
                        _log.warn("event arrived out of sequence order", stream_id=stream_id, seq=seq)
                    else:
                        lane.last_seq = seq
                    lane.gaps += gap
                    self._queue(lane, stream_id, event, seq, gap, body, frame_len, replayed, now)
                    return
            elif self.accepting_new:
                partial = starts_partial(self.subs, seq, event)
                if partial:
                    _log.debug("first event of an unknown stream; lane is partial",
                               stream_id=stream_id, seq=seq)
                lane = _Lane(seq, partial, now,
                             StreamTrace(stream_id) if self.trace else NOT_RECORDING)
                self._lanes[stream_id] = lane
                self._queue(lane, stream_id, event, seq, 0, body, frame_len, replayed, now)
                return
            else:
                refused = True
        # Not queued (dropped at a full lane, or a new stream while stopping): its bytes are
        # consumed now, and what the front waits for is still answered.
        if refused:
            self._answer_unrun(event, "plugin is shutting down and takes no new streams")
        self.credits.add(frame_len)
        self.flush_credit_if_idle()

    def _queue(self, lane: _Lane, stream_id: int, event: Any, seq: int, gap: int, body: int,
               frame_len: int, replayed: bool, now: float) -> None:
        ctx = EventCtx(stream_id, seq, event.stamp_ns, gap, lane.partial, replayed, lane.trace)
        lane.queue.append(_Job(event, ctx, body, frame_len))
        if replayed:
            self.stats.replayed += 1
        lane.queued_bytes += body
        lane.last_active = now
        if not lane.scheduled:
            lane.scheduled = True
            self._ready.append(stream_id)
            self._work.notify()

    def active_streams(self) -> int:
        """Streams the plugin holds state for."""
        with self._lock:
            return len(self._lanes)

    def stuck(self, limit_s: float) -> List[Tuple[int, int]]:
        """``(stream_id, running_ms)`` of lanes running one event for at least ``limit_s``."""
        now = time.monotonic()
        with self._lock:
            running = list(self._running.items())
        return sorted((sid, int((now - since) * 1000)) for sid, since in running
                      if now - since >= limit_s)

    def is_idle(self) -> bool:
        """Whether no event is queued, running or being answered."""
        with self._lock:
            return self._idle()

    def _idle(self) -> bool:
        return not self._ready and not self._running and not self._answering

    def evict_idle(self, idle_s: float) -> int:
        """Forgets streams with nothing queued or running and no event for ``idle_s``."""
        now = time.monotonic()
        with self._lock:
            victims = [sid for sid, lane in self._lanes.items()
                       if not lane.scheduled and now - lane.last_active >= idle_s]
            for sid in victims:
                del self._lanes[sid]
            self.stats.evicted += len(victims)
        if victims:
            _log.warn("evicted state of streams that never ended (no Final, AbortedFinal or Abort)",
                      evicted=len(victims), evicted_total=self.stats.evicted, idle_s=idle_s,
                      streams=",".join(map(str, victims)))
        return len(victims)

    def stop(self) -> None:
        """Ends the worker threads once they finish what they run."""
        with self._lock:
            self._stop = True
            self._work.notify_all()

    def flush_credit_if_idle(self) -> None:
        """Reports all consumed credit if nothing is queued, running or being answered."""
        if self.is_idle():
            self.credits.flush()

    # -- workers ----------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._ready and not self._stop:
                    self._work.wait()
                if self._stop:
                    return
                stream_id = self._ready.popleft()
                # Running from the moment it leaves the ready queue: between this lock and the
                # step's, the lane must not look idle (a drain would end too early).
                self._running[stream_id] = time.monotonic()
            try:
                self._step(stream_id)
            except BaseException as e:  # a bug here must not shrink the pool
                _log.error("bug: the plugin host failed outside plugin code; the worker goes on",
                           stream_id=stream_id, error=repr(e))
                with self._lock:
                    self._running.pop(stream_id, None)

    def _step(self, stream_id: int) -> None:
        with self._lock:
            lane = self._lanes.get(stream_id)
            if lane is None:
                self._running.pop(stream_id, None)
                return
            if not lane.queue:
                lane.scheduled = False
                self._running.pop(stream_id, None)
                return
            job = lane.queue.popleft()
            lane.queued_bytes -= job.body
            gaps, partial = lane.gaps, lane.partial
            self._running[stream_id] = time.monotonic()
        ended, reply = self._run(lane, job, gaps, partial)
        # Credited before the lane stops counting as running, so whichever thread finds the
        # lanes idle reports these bytes too.
        self.credits.add(job.owed)
        leftover: List[_Job] = []
        with self._lock:
            del self._running[stream_id]
            if ended:
                if self._lanes.get(stream_id) is lane:
                    del self._lanes[stream_id]
                leftover.extend(lane.queue)
                lane.queue.clear()
            else:
                lane.last_active = time.monotonic()
                if lane.queue:
                    self._ready.append(stream_id)
                    self._work.notify()
                else:
                    lane.scheduled = False
            # Counted from the lock that ends the step until its answers are out: a connection
            # told to shut down ends once the lanes are idle, and must not end with a final
            # reply unsent.
            answering = reply is not None or bool(leftover)
            self._answering += answering
        try:
            if reply is not None:
                if type(reply) is FinalReply:
                    # One Spans right before the stream's final reply, when something was
                    # recorded.
                    spans = lane.trace.to_spans()
                    if spans is not None:
                        self.send(spans)
                self.send(reply)
            for late in leftover:
                _log.warn("event after the stream's Final, AbortedFinal or Abort; not run",
                          stream_id=stream_id, seq=late.ctx.seq)
                self._answer_unrun(late.event, "stream had already ended")
                self.credits.add(late.owed)
        finally:
            if answering:
                with self._lock:
                    self._answering -= 1
        self.flush_credit_if_idle()

    def _answer_unrun(self, event: Any, why: str) -> None:
        if isinstance(event, Chunk) and event.ack:
            self.send(Ack(event.stream_id, event.seq))
        elif isinstance(event, FINAL_TYPES):
            self.send(FinalReply(event.call_id, event.stream_id, error=why))

    def _guarded(self, lane: _Lane, ctx: EventCtx, what: str, fn: Callable[[], Any]) -> Any:
        """Runs plugin code; an exception fails the lane (first error wins) and returns None."""
        try:
            return fn()
        except Exception as e:
            self.stats.errors += 1
            tb = traceback.extract_tb(e.__traceback__)
            location = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else ""
            text = f"{type(e).__name__}: {e}"
            _log.error("plugin raised; this stream's final reply carries the error, other streams go on",
                       plugin=self.plugin_name, stream_id=ctx.stream_id, seq=ctx.seq, hook=what,
                       error=text, location=location, errors_total=self.stats.errors)
            if lane.failed is None:
                lane.failed = f"plugin `{self.plugin_name}` raised in {what} (seq {ctx.seq}): {text}"
            return None

    def _run(self, lane: _Lane, job: _Job, gaps: int, partial: bool) -> Tuple[bool, Any]:
        """Runs one event's hook: returns whether the stream ended and the reply to send."""
        event, ctx = job.event, job.ctx
        if isinstance(event, RequestStart) and lane.trace.recording:
            lane.trace.traceparent = TraceParent.from_headers(event.headers)
        if not lane.has_state and lane.failed is None:
            lane.state = self._guarded(lane, ctx, "new_stream", self.plugin.new_stream)
            lane.has_state = lane.failed is None
        name = _HOOKS[type(event)]
        hook = getattr(self.plugin, name)
        result = None
        if lane.failed is None:
            result = self._guarded(lane, ctx, name, lambda: hook(lane.state, ctx, event))
        if isinstance(event, Chunk):
            return False, (Ack(event.stream_id, event.seq) if event.ack else None)
        if isinstance(event, FINAL_TYPES):
            # Final and AbortedFinal alike: the stream's last event, answered with its metadata.
            lane.state = None
            reply = FinalReply(event.call_id, event.stream_id)
            if lane.failed is not None:
                reply.error = lane.failed
            elif result is None:
                reply.error = (f"plugin `{self.plugin_name}`: {name} returned None "
                               f"(seq {ctx.seq}); return a dict of namespace -> map")
            elif not isinstance(result, dict):
                reply.error = (f"plugin `{self.plugin_name}`: {name} returned a "
                               f"{type(result).__name__}, not a dict of namespace -> map")
            else:
                annotate(result, self.namespace, gaps, partial)
                reply.metadata = result
            return True, reply
        if isinstance(event, Abort):
            lane.state = None
            return True, None
        return False, None


def check_metadata(reply: FinalReply, max_bytes: int, plugin: str,
                   encoded_len: Callable[[Metadata], int]) -> None:
    """Replaces metadata that does not encode, or encodes larger than ``max_bytes``, by an
    error reply (the front would refuse it anyway)."""
    if reply.metadata is None:
        return
    try:
        n = encoded_len(reply.metadata)
    except (EncodeError, RecursionError) as e:
        reply.metadata, reply.error = None, f"metadata not encodable: {e}"
        return
    if n <= max_bytes:
        return
    _log.warn("final metadata over metadata_max_bytes; replying with an error instead",
              stream_id=reply.stream_id, call_id=reply.call_id, len=n, max=max_bytes)
    reply.metadata = None
    reply.error = (f"metadata of {n} bytes is over metadata_max_bytes ({max_bytes}); plugin "
                   f"`{plugin}` must return less, or raise metadata_max_bytes in the front's config")
