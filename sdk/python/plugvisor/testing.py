"""A test kit that plays the front, so a plugin's tests need neither plugvisor nor Envoy.

:class:`FakeFront` speaks the real protocol over a real socket: it runs the plugin's host
(:func:`plugvisor.serve`) on a thread at one end of a socket pair, or accepts a plugin process
on a Unix socket path (:meth:`FakeFront.listen`), answers its ``Hello``, and then sends events
and reads what the plugin answers. It checks what a front checks: every ``Credit`` increases and
never exceeds the event bytes written. ::

    from plugvisor.testing import FakeFront

    with FakeFront.start(MyPlugin()) as front:
        front.request_start(1)
        front.chunk(1, 1, b'data: {"x": 1}\\n\\n')
        reply = front.final(1, 2)
        assert reply.metadata == {"plugvisor.my": {...}}
        front.request_start(2)
        reply = front.aborted_final(2, 1, cause=0)   # the client left: on_aborted_final answers
"""

from __future__ import annotations

import os
import queue
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .connection import FrameReader
from .host import HostOptions, serve
from .plugin import Plugin
from .wire import (Abort, AbortedFinal, Ack, Chunk, Credit, Final, FinalReply, Header, Hello, Ping,
                   Pong, Reconnect, Refuse, Replayed, RequestStart, ResponseHeaders, Shutdown,
                   Spans, Welcome, counts_for_credit, decode_from_plugin, frame)

_CLOSED = object()

#: What the fake front offers by default: every capability a front of protocol version 3 knows.
#: The ``Welcome`` lists those of them the plugin's ``Hello`` announced.
FRONT_CAPABILITIES: Tuple[str, ...] = ("replayed", "aborted_final", "reconnect", "trace")


class FakeFront:
    """The front's side of one plugin connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = FrameReader(sock)
        self._inbox: "queue.Queue[Any]" = queue.Queue()
        self._stash: List[Any] = []
        self._lock = threading.Lock()
        #: Event bytes written (whole frames of per-stream events and ``Replayed``).
        self.written = 0
        #: Every ``Credit.consumed`` received, in order.
        self.credits: List[int] = []
        #: Problems a real front would refuse the connection for (credit going backwards or
        #: past what was written); tests assert it stays empty.
        self.violations: List[str] = []
        self.hello: Optional[Hello] = None
        self.welcome: Optional[Welcome] = None
        self.thread: Optional[threading.Thread] = None
        #: The host's exit status once it returned (in-thread plugins only).
        self.exit_code: Optional[int] = None
        self._next_call = 1
        self._recv_thread: Optional[threading.Thread] = None
        #: Everything the plugin sent after the ``Welcome`` but ``Credit``, in arrival order
        #: (to check that a ``Spans`` came right before its ``FinalReply``).
        self.received: List[Any] = []
        #: The socket path the plugin connects to (:meth:`start_listening`), for its next
        #: connections (:meth:`accept_next`).
        self.listener: Optional[socket.socket] = None

    # -- setting up -------------------------------------------------------------------------

    @classmethod
    def start(cls, plugin: Plugin, *, name: Optional[str] = None,
              config: Optional[Dict[str, Any]] = None, budget_bytes: int = 8 << 20,
              metadata_max_bytes: int = 16384, capabilities: Sequence[str] = FRONT_CAPABILITIES,
              version: int = 3, refuse: Optional[Refuse] = None,
              options: Optional[HostOptions] = None, handshake: bool = True) -> "FakeFront":
        """Runs ``plugin``'s host on a thread, connected to a new fake front, and answers its
        ``Hello`` with a ``Welcome`` (or ``refuse``)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        opts = options or HostOptions(plugin=name or plugin.name, workers=2)
        front = cls(ours)

        def host() -> None:
            try:
                front.exit_code = serve(plugin, opts, sock=theirs)
            finally:
                theirs.close()

        front.thread = threading.Thread(target=host, name="plugin-host", daemon=True)
        front.thread.start()
        if handshake:
            front.handshake(config=config, budget_bytes=budget_bytes,
                            metadata_max_bytes=metadata_max_bytes, capabilities=capabilities,
                            version=version, refuse=refuse)
        return front

    @classmethod
    def start_listening(cls, plugin: Plugin, *, name: Optional[str] = None,
                        options: Optional[HostOptions] = None, handshake: bool = True,
                        **handshake_kw: Any) -> "FakeFront":
        """Like :meth:`start`, but the host connects to a socket path this fake front listens
        on, as a real plugin does, so that it can open more connections after ``Reconnect``
        (:meth:`reconnect`, :meth:`accept_next`). The other keywords go to :meth:`handshake`.
        The host's exit status is the first front's (:meth:`wait_exit`)."""
        listener, path = cls.listen()
        listener.listen(4)
        opts = options or HostOptions(plugin=name or plugin.name, workers=2)
        opts.connect = path
        fronts: List[FakeFront] = []
        accepted = threading.Event()

        def host() -> None:
            code = serve(plugin, opts)
            accepted.wait(10)
            if fronts:
                fronts[0].exit_code = code

        thread = threading.Thread(target=host, name="plugin-host", daemon=True)
        thread.start()
        front = cls.accept(listener)
        front.listener = listener
        front.thread = thread
        fronts.append(front)
        accepted.set()
        if handshake:
            front.handshake(**handshake_kw)
        return front

    def accept_next(self, timeout: float = 10.0) -> "FakeFront":
        """The plugin's next connection on the same socket path (after ``Reconnect``); call
        :meth:`handshake` on it next. Raises ``socket.timeout`` if none comes in time."""
        if self.listener is None:
            raise AssertionError("only a front made by start_listening accepts more connections")
        front = FakeFront.accept(self.listener, timeout)
        front.listener = self.listener
        return front

    def reconnect(self, reason: str = "the fake front asks for a new connection") -> None:
        """Sends ``Reconnect`` (capability ``reconnect``)."""
        self.send(Reconnect(reason))

    @classmethod
    def listen(cls, path: Optional[str] = None) -> Tuple[socket.socket, str]:
        """A listening Unix socket for a plugin process (``--connect <path>``): returns the
        listener and its path (a new temporary one if ``path`` is ``None``)."""
        if path is None:
            path = os.path.join(tempfile.mkdtemp(prefix="pv-front-"), "plugin.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        return listener, path

    @classmethod
    def accept(cls, listener: socket.socket, timeout: float = 10.0) -> "FakeFront":
        """Accepts one plugin process on ``listener`` (call :meth:`handshake` next)."""
        listener.settimeout(timeout)
        sock, _ = listener.accept()
        sock.settimeout(None)
        return cls(sock)

    def handshake(self, *, config: Optional[Dict[str, Any]] = None, budget_bytes: int = 8 << 20,
                  metadata_max_bytes: int = 16384, capabilities: Sequence[str] = FRONT_CAPABILITIES,
                  version: int = 3, refuse: Optional[Refuse] = None,
                  timeout: float = 10.0) -> Hello:
        """Reads the plugin's ``Hello`` and answers it; returns the ``Hello``."""
        self.sock.settimeout(timeout)
        got = self._reader.read()
        self.sock.settimeout(None)
        if got is None:
            raise AssertionError("the plugin closed the connection before its Hello")
        hello = decode_from_plugin(got[0])
        if not isinstance(hello, Hello):
            raise AssertionError(f"first frame is {type(hello).__name__}, not Hello")
        self.hello = hello
        if refuse is not None:
            self.sock.sendall(frame(refuse))
            return hello
        agreed = [c for c in capabilities if c in hello.capabilities]
        self.welcome = Welcome(version, config if config is not None else {}, budget_bytes,
                               metadata_max_bytes, agreed if version >= 3 else [])
        self.sock.sendall(frame(self.welcome))
        self._recv_thread = threading.Thread(target=self._receive, name="fake-front-reader",
                                             daemon=True)
        self._recv_thread.start()
        return hello

    def _receive(self) -> None:
        try:
            while True:
                got = self._reader.read()
                if got is None:
                    break
                msg = decode_from_plugin(got[0])
                if isinstance(msg, Credit):
                    with self._lock:
                        last = self.credits[-1] if self.credits else 0
                        if msg.consumed <= last:
                            self.violations.append(f"Credit {msg.consumed} after {last}")
                        if msg.consumed > self.written:
                            self.violations.append(
                                f"Credit {msg.consumed} is more than the {self.written} written")
                        self.credits.append(msg.consumed)
                else:
                    with self._lock:
                        self.received.append(msg)
                self._inbox.put(msg)
        except OSError:
            pass
        finally:
            self._inbox.put(_CLOSED)

    # -- sending ----------------------------------------------------------------------------

    def send(self, msg: Any) -> int:
        """Writes one message; returns its whole frame length."""
        data = frame(msg)
        with self._lock:
            if counts_for_credit(msg):
                self.written += len(data)
        self.sock.sendall(data)
        return len(data)

    def _event(self, event: Any, replayed: bool) -> int:
        return self.send(Replayed(event) if replayed else event)

    def request_start(self, stream_id: int, seq: int = 0, headers: Sequence[Header] = (),
                      request_id: Optional[str] = None, stamp_ns: Optional[int] = None,
                      replayed: bool = False) -> int:
        """Sends ``RequestStart`` (or ``Replayed`` around it)."""
        return self._event(RequestStart(stream_id, seq, _stamp(stamp_ns), request_id,
                                        list(headers)), replayed)

    def response_headers(self, stream_id: int, seq: int, status: int = 200,
                         headers: Sequence[Header] = (), stamp_ns: Optional[int] = None,
                         replayed: bool = False) -> int:
        """Sends ``ResponseHeaders``."""
        return self._event(ResponseHeaders(stream_id, seq, _stamp(stamp_ns), status,
                                           list(headers)), replayed)

    def chunk(self, stream_id: int, seq: int, body: bytes = b"", *, len: Optional[int] = None,
              ack: bool = False, stamp_ns: Optional[int] = None, replayed: bool = False) -> int:
        """Sends ``Chunk`` with ``body`` (``len`` defaults to its size)."""
        n = len if len is not None else _len(body)
        return self._event(Chunk(stream_id, seq, _stamp(stamp_ns), n, body, False, ack), replayed)

    def abort(self, stream_id: int, seq: int, cause: int = 0, detail: str = "",
              stamp_ns: Optional[int] = None, replayed: bool = False) -> int:
        """Sends ``Abort``."""
        return self._event(Abort(stream_id, seq, _stamp(stamp_ns), cause, detail), replayed)

    def send_final(self, stream_id: int, seq: int, body: bytes = b"", *,
                   call_id: Optional[int] = None, len: Optional[int] = None,
                   trailers: Sequence[Header] = (), stamp_ns: Optional[int] = None,
                   replayed: bool = False) -> int:
        """Sends ``Final`` without waiting; returns its call id."""
        if call_id is None:
            call_id = self._next_call
            self._next_call += 1
        n = len if len is not None else _len(body)
        self._event(Final(stream_id, seq, _stamp(stamp_ns), call_id, n, body, list(trailers)),
                    replayed)
        return call_id

    def final(self, stream_id: int, seq: int, body: bytes = b"", timeout: float = 10.0,
              **kw: Any) -> FinalReply:
        """Sends ``Final`` and waits for its ``FinalReply`` (matched by call id)."""
        call_id = self.send_final(stream_id, seq, body, **kw)
        return self.final_reply(call_id, timeout)

    def send_aborted_final(self, stream_id: int, seq: int, cause: int = 0, detail: str = "", *,
                           call_id: Optional[int] = None,
                           stamp_ns: Optional[int] = None) -> int:
        """Sends ``AbortedFinal`` (``cause`` indexes :data:`plugvisor.wire.ABORT_CAUSES`: 0
        client disconnect, 1 upstream error, 2 timeout, 3 shutdown) without waiting; returns its
        call id. Like a real front, only to a plugin whose ``Welcome`` agreed on
        ``aborted_final`` (send the message with :meth:`send` to break that rule on purpose).
        It is never replayed."""
        if self.welcome is not None and "aborted_final" not in self.welcome.capabilities:
            raise AssertionError("the Welcome did not agree on the capability `aborted_final`: "
                                 "a front sends Abort instead of AbortedFinal to this plugin")
        if call_id is None:
            call_id = self._next_call
            self._next_call += 1
        self.send(AbortedFinal(stream_id, seq, _stamp(stamp_ns), call_id, cause, detail))
        return call_id

    def aborted_final(self, stream_id: int, seq: int, cause: int = 0, detail: str = "",
                      timeout: float = 10.0, **kw: Any) -> FinalReply:
        """Sends ``AbortedFinal`` and waits for its ``FinalReply`` (matched by call id)."""
        call_id = self.send_aborted_final(stream_id, seq, cause, detail, **kw)
        return self.final_reply(call_id, timeout)

    def final_reply(self, call_id: int, timeout: float = 10.0) -> FinalReply:
        """Waits for the ``FinalReply`` of ``call_id``."""
        return self.expect(lambda m: isinstance(m, FinalReply) and m.call_id == call_id,
                           f"FinalReply for call {call_id}", timeout)

    def spans(self, stream_id: int, timeout: float = 10.0) -> Spans:
        """Waits for the ``Spans`` of ``stream_id`` (capability ``trace``) and checks that it
        came before the stream's ``FinalReply``."""
        spans = self.expect(lambda m: isinstance(m, Spans) and m.stream_id == stream_id,
                            f"Spans for stream {stream_id}", timeout)
        with self._lock:
            at = next(i for i, m in enumerate(self.received) if m is spans)
            before = [m for m in self.received[:at]
                      if isinstance(m, FinalReply) and m.stream_id == stream_id]
        if before:
            raise AssertionError(f"the Spans of stream {stream_id} came after its FinalReply")
        return spans

    def ping(self, nonce: int, timeout: float = 10.0) -> Pong:
        """Sends ``Ping`` and waits for its ``Pong``."""
        self.send(Ping(nonce))
        return self.expect(lambda m: isinstance(m, Pong) and m.nonce == nonce,
                           f"Pong {nonce}", timeout)

    def ack(self, stream_id: int, seq: int, timeout: float = 10.0) -> Ack:
        """Waits for ``Ack{stream_id, seq}`` of an inline chunk."""
        return self.expect(lambda m: isinstance(m, Ack) and (m.stream_id, m.seq) == (stream_id, seq),
                           f"Ack {stream_id}/{seq}", timeout)

    def shutdown(self, grace_ms: int) -> None:
        """Sends ``Shutdown``."""
        self.send(Shutdown(grace_ms))

    def close(self) -> None:
        """Closes the front's end (the plugin sees end of file)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # -- receiving --------------------------------------------------------------------------

    def expect(self, pred: Callable[[Any], bool], what: str, timeout: float = 10.0) -> Any:
        """The first message (``Credit`` excluded) matching ``pred``; others are kept for later
        calls. Raises ``AssertionError`` after ``timeout`` seconds or when the plugin closed."""
        for i, m in enumerate(self._stash):
            if pred(m):
                return self._stash.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout}s; got {self._stash}")
            try:
                m = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            if m is _CLOSED:
                self._inbox.put(_CLOSED)
                raise AssertionError(f"the plugin closed the connection before {what}; "
                                     f"got {self._stash}")
            if isinstance(m, Credit):
                continue
            if pred(m):
                return m
            self._stash.append(m)

    def closed(self, timeout: float = 10.0) -> bool:
        """Waits for the plugin to close its end; whether it did within ``timeout``."""
        if self._recv_thread is None:
            return False
        self._recv_thread.join(timeout)
        return not self._recv_thread.is_alive()

    def wait_exit(self, timeout: float = 10.0) -> Optional[int]:
        """Waits for an in-thread host to return; its exit status (``None`` if still running)."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.exit_code

    def wait_credit(self, consumed: int, timeout: float = 10.0) -> None:
        """Waits until a ``Credit`` of at least ``consumed`` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.credits and self.credits[-1] >= consumed:
                    return
            time.sleep(0.002)
        raise AssertionError(f"no Credit of {consumed} within {timeout}s; got {self.credits}")

    def __enter__(self) -> "FakeFront":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        if self.thread is not None:
            self.thread.join(10)


_len = len


def _stamp(stamp_ns: Optional[int]) -> int:
    return time.monotonic_ns() if stamp_ns is None else stamp_ns
