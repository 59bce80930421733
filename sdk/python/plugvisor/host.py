"""The host: the connections to the front, from handshake to exit.

:func:`serve` connects to the plugin's socket, says ``Hello`` (protocol version 3, capabilities
``replayed``, ``aborted_final``, ``reconnect`` and ``trace``), applies the config from
``Welcome`` (or returns :attr:`Exit.CONFIG` after a ``Refuse`` or a rejected config), then reads
frames on its own thread:
per-stream events go to their lanes (:mod:`plugvisor.lanes`), a ``Replayed`` one unwrapped and
marked replayed, an ``AbortedFinal`` run and answered like a ``Final``; ``Ping``
is answered right here, never behind queued work, with the lanes' active and stuck streams;
``Shutdown`` stops taking new streams and lets the in-flight work finish within its grace (the
reader keeps answering pings meanwhile). Every event's whole frame length is credited back once
the lanes are done with it (:mod:`plugvisor.credit`). A final reply whose metadata encodes
larger than ``Welcome.metadata_max_bytes`` becomes an error reply here. End of file on the
socket means the front is gone: return :attr:`Exit.CLEAN` at once.

``Reconnect`` (capability ``reconnect``) opens one more connection to the same path, on a thread
of its own so the reader goes on: a new plugin instance (:meth:`Plugin.new_instance`, configured
from the new ``Welcome``) with its own lanes, window and credit serves it, while the old
connection goes on with its instance until the front closes it. End of file then ends only that
connection; the process ends with its last one, with status 78 if a reconnection was refused
since the last welcome. A second ``Reconnect`` while one is under way is ignored. ``Shutdown`` on
any connection, SIGTERM or SIGINT drain every connection. What hooks record in ``ctx.trace``
goes out as one ``Spans`` before the stream's final reply when the front agreed on ``trace``
(one larger than ``metadata_max_bytes`` is dropped with a warning).
"""

from __future__ import annotations

import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from . import log
from .connection import FrameReader, FrameWriter
from .credit import Credits
from .lanes import Lanes, check_metadata
from .plugin import Plugin
from .wire import (CAPABILITIES, EVENT_TYPES, PROTOCOL_VERSION, EncodeError, FinalReply, Hello,
                   Ping, Pong, ProtocolError, Reconnect, Refuse, Replayed, Shutdown, Spans,
                   Welcome, decode_to_plugin, encoded_metadata_len, frame)

_log = log.get("plugvisor.host")

#: How long the host waits for the front's answer to ``Hello``.
HANDSHAKE_TIMEOUT = 30.0
#: How long a connection told to stop must stay idle, with nothing more read, before it ends
#: within its grace (events of streams in flight may follow a ``Shutdown``), as the Rust SDK.
QUIET_AFTER_SHUTDOWN = 0.05


class Exit:
    """Exit statuses (sysexits), as the Rust plugins use them."""

    #: ``Shutdown`` handled, SIGTERM/SIGINT handled, or the front closed the socket.
    CLEAN = 0
    #: Anything else: socket unreachable, no answer to ``Hello``, protocol error.
    FAILED = 1
    #: Bad command line (``EX_USAGE``).
    USAGE = 64
    #: The front refused the handshake, or the plugin rejected its config (``EX_CONFIG``).
    CONFIG = 78


@dataclass
class HostOptions:
    """Everything :func:`serve` needs besides the plugin (the command line's values)."""

    #: The configured name, sent in ``Hello``.
    plugin: str
    #: The front's socket for this plugin.
    connect: Optional[str] = None
    #: The plugin's own name when it runs under another configured name (``--as``): its
    #: namespace ``plugvisor.<runs>`` is reported as ``plugvisor.<plugin>``.
    runs: Optional[str] = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: Seconds after which a stream without Final/Abort and no event is forgotten.
    idle_timeout: float = 300.0
    #: Seconds one event may run before its lane is reported stuck in ``Pong``.
    stuck_after: float = 5.0
    lane_queue_events: int = 4096
    lane_queue_bytes: int = 16 * 1024 * 1024
    #: Seconds SIGTERM/SIGINT let queued events finish.
    term_grace: float = 5.0
    #: Seconds to keep retrying while the front's socket is missing or refuses.
    connect_wait: float = 0.0
    log_format: str = "auto"


def _connect(path: str, wait: float) -> socket.socket:
    deadline = time.monotonic() + wait
    said = False
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            if not said:
                _log.info("front not listening yet; waiting for it", socket=path,
                          wait_ms=int(wait * 1000))
                said = True
            time.sleep(0.1)
        except OSError:
            sock.close()
            raise


def _rename_namespace(md: Dict[str, Any], src: str, dst: str) -> None:
    """Moves namespace ``src`` to ``dst`` (``--as``); two maps merge, ``src``'s keys winning."""
    if src not in md:
        return
    value = md.pop(src)
    existing = md.get(dst)
    if isinstance(existing, dict) and isinstance(value, dict):
        existing.update(value)
    else:
        md[dst] = value


def serve(plugin: Plugin, opts: HostOptions, sock: Optional[socket.socket] = None,
          wakeup: Optional[socket.socket] = None, signals: Optional[list] = None) -> int:
    """Serves ``plugin`` on a connection (``sock``, or a new one to ``opts.connect``), and on
    one more after each ``Reconnect`` (to ``opts.connect``; without a path the host does not
    announce ``reconnect``), until the front shuts it down or closes its last connection, and
    returns the exit status (:class:`Exit`). ``plugin`` serves the first connection; later ones
    get :meth:`Plugin.new_instance` of a copy taken before it was configured.

    ``wakeup`` is a socket whose readability interrupts the wait for frames (the signal
    wake-up of :func:`plugvisor.run`); each number appended to ``signals`` (SIGTERM, SIGINT)
    is then treated as a request to drain for ``opts.term_grace`` and return 0.
    """
    try:
        if sock is None:
            if not opts.connect:
                _log.error("no socket to connect to (give --connect or PLUGVISOR_CONNECT)")
                return Exit.USAGE
            try:
                sock = _connect(opts.connect, opts.connect_wait)
            except OSError as e:
                _log.error("cannot connect to the front's socket; is plugvisor running and is "
                           "this the plugin's socket?", socket=opts.connect, error=str(e))
                return Exit.FAILED
        host = _Host(plugin, opts, wakeup, signals if signals is not None else [])
        try:
            return host.run(sock)
        finally:
            host.close()
    except ProtocolError as e:
        _log.error("protocol error on the front's connection", error=str(e))
        return Exit.FAILED
    except OSError as e:
        _log.error("plugin host failed", error=str(e))
        return Exit.FAILED


class _Conn:
    """One welcomed connection: its plugin instance, lanes, window and credit, and its reader."""

    def __init__(self, cid: int, plugin: Plugin, opts: HostOptions, sock: socket.socket,
                 reader: FrameReader, writer: FrameWriter, welcome: Welcome) -> None:
        self.cid = cid
        self.opts = opts
        self.sock = sock
        self.reader = reader
        self.writer = writer
        #: The grace of a ``Shutdown`` read on this connection, until the host takes it.
        self.shutdown: Optional[float] = None
        #: The reason of a ``Reconnect`` read on this connection, until the host takes it.
        self.reconnect: Optional[str] = None
        #: When this connection stops waiting for its lanes (it was told to stop).
        self.stop_at: Optional[float] = None
        #: When it last read a frame (or was told to stop): it ends after a quiet moment.
        self.last_frame = 0.0
        own = opts.runs or opts.plugin
        own_namespace = "plugvisor." + own
        rename = (own_namespace, "plugvisor." + opts.plugin) if opts.runs else None
        md_max = welcome.metadata_max_bytes
        name = opts.plugin

        def send(msg: Any) -> None:
            t = type(msg)
            if t is FinalReply and msg.metadata is not None:
                if rename is not None:
                    _rename_namespace(msg.metadata, *rename)
                check_metadata(msg, md_max, name, encoded_metadata_len)
            elif t is Spans and not _spans_fit(msg, md_max):
                return
            writer.send(msg)

        self.credits = Credits(welcome.budget_bytes, send)
        self.lanes = Lanes(plugin, workers=opts.workers, queue_events=opts.lane_queue_events,
                           queue_bytes=opts.lane_queue_bytes, plugin_name=name,
                           namespace=own_namespace, send=send, credits=self.credits,
                           trace="trace" in welcome.capabilities)

    def handle(self, payload: bytes, frame_len: int) -> None:
        msg = decode_to_plugin(payload)
        t = type(msg)
        lanes = self.lanes
        if t in EVENT_TYPES:  # AbortedFinal included; never inside a Replayed (decode refuses)
            lanes.submit(msg, frame_len, False)
        elif t is Replayed:
            # Counts its whole Replayed frame, like a live event.
            lanes.submit(msg.event, frame_len, True)
        elif t is Ping:
            pong = Pong(msg.nonce, lanes.active_streams(), lanes.stuck(self.opts.stuck_after))
            if pong.stuck:
                _log.warn("lanes stuck in one event",
                          stuck=",".join(f"{s}:{ms}ms" for s, ms in pong.stuck))
            self.writer.send(pong)
        elif t is Shutdown:
            if self.shutdown is None:
                self.shutdown = msg.grace_ms / 1000.0
        elif t is Reconnect:
            if self.stop_at is None:
                self.reconnect = msg.reason
        else:
            _log.warn("unexpected handshake message after Welcome; ignored", kind=t.__name__)

    def begin_stop(self, grace_s: float) -> None:
        """Takes no new stream and lets the in-flight ones finish within ``grace_s``."""
        if self.stop_at is None:
            self.lanes.accepting_new = False
            self.last_frame = time.monotonic()
            self.stop_at = self.last_frame + grace_s

    def finish(self) -> None:
        self.lanes.stop()
        s = self.lanes.stats
        _log.info("connection done", conn=self.cid, dropped=s.dropped, evicted=s.evicted,
                  errors=s.errors, replayed=s.replayed, consumed_bytes=self.credits.consumed)
        try:
            self.sock.close()
        except OSError:
            pass


def _spans_fit(spans: Spans, max_bytes: int) -> bool:
    """Whether ``spans`` fits ``max_bytes`` (the front drops a larger one). Measured as its
    whole frame (length prefix and message index included), the largest reading of "its
    encoding", so that no front drops what this SDK sends."""
    try:
        n = len(frame(spans))
    except (EncodeError, RecursionError) as e:
        _log.warn("trace spans not encodable; not sent", stream_id=spans.stream_id, error=str(e))
        return False
    if n > max_bytes:
        _log.warn("trace spans over metadata_max_bytes; not sent", stream_id=spans.stream_id,
                  len=n, max=max_bytes)
        return False
    return True


class _Host:
    def __init__(self, plugin: Plugin, opts: HostOptions, wakeup: Optional[socket.socket],
                 signals: list) -> None:
        self.plugin = plugin
        self.opts = opts
        self.wakeup = wakeup
        self.signals = signals
        # Later connections' instances come from a copy taken before the first configure.
        self.pristine: Optional[Plugin] = None
        if opts.connect:
            try:
                self.pristine = plugin.new_instance()
            except Exception as e:
                _log.warn("cannot make plugin instances for later connections; not announcing "
                          "reconnect", error=f"{type(e).__name__}: {e}")
        self.capabilities = [c for c in CAPABILITIES
                             if c != "reconnect" or self.pristine is not None]
        self.conns: List[_Conn] = []
        self.next_id = 1
        #: The id of the connection whose handshake is under way on a thread.
        self.pending: Optional[int] = None
        self.results: "queue.Queue[Tuple[int, Union[_Conn, int]]]" = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Set once the host is done: a handshake that ends later closes its own connection.
        self._closed = False
        self._closing = threading.Lock()
        #: A reconnection was refused and none was welcomed since: exit 78 at the end.
        self.refused = False
        self.stopping: Optional[float] = None
        self.last = Exit.CLEAN
        self.sel = selectors.DefaultSelector()

    def close(self) -> None:
        with self._closing:
            self._closed = True
        while True:
            try:
                _, result = self.results.get_nowait()
            except queue.Empty:
                break
            if isinstance(result, _Conn):
                result.finish()
        for conn in self.conns:
            conn.finish()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def open(self, cid: int, sock: socket.socket, plugin: Plugin) -> Optional[_Conn]:
        """Says ``Hello`` on ``sock`` and configures ``plugin`` from the ``Welcome``; ``None``
        when refused or the config is rejected (logged)."""
        reader, writer = FrameReader(sock), FrameWriter(sock)
        subs = plugin.subscriptions
        writer.send(Hello(PROTOCOL_VERSION, self.opts.plugin, os.getpid() & 0xFFFFFFFF, subs,
                          list(self.capabilities)))
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            got = reader.read()
        except socket.timeout:
            raise ProtocolError(f"handshake failed: no answer to Hello within "
                                f"{HANDSHAKE_TIMEOUT:.0f}s") from None
        finally:
            sock.settimeout(None)
        if got is None:
            raise ProtocolError("handshake failed: the front closed the connection before "
                                "answering Hello")
        answer = decode_to_plugin(got[0])
        if isinstance(answer, Refuse):
            _log.error(f"the front refused plugin `{self.opts.plugin}`: {answer.reason}",
                       code=answer.code_name)
            return None
        if not isinstance(answer, Welcome):
            raise ProtocolError(f"handshake failed: expected Welcome or Refuse, got "
                                f"{type(answer).__name__}")
        config = answer.config
        try:
            if config is None:
                config = {}
            if not isinstance(config, dict):
                raise ValueError(f"config must be a table, got {type(config).__name__}")
            plugin.configure(config)
        except Exception as e:
            _log.error(f"invalid config for plugin `{self.opts.plugin}`: {e}")
            return None
        _log.info("connected to the front", version=answer.protocol_version,
                  subscriptions=",".join(subs.names()), workers=self.opts.workers,
                  budget_bytes=answer.budget_bytes,
                  metadata_max_bytes=answer.metadata_max_bytes,
                  capabilities=",".join(answer.capabilities))
        return _Conn(cid, plugin, self.opts, sock, reader, writer, answer)

    def run(self, sock: socket.socket) -> int:
        first = self.open(self.next_id, sock, self.plugin)
        self.next_id += 1
        if first is None:
            return Exit.CONFIG
        self._add(first)
        if self.wakeup is not None:
            self.sel.register(self.wakeup, selectors.EVENT_READ)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
        return self._loop()

    # -- connections --------------------------------------------------------------------------

    def _add(self, conn: _Conn) -> None:
        self.conns.append(conn)
        self.sel.register(conn.sock, selectors.EVENT_READ, conn)
        if self.stopping is not None:
            conn.begin_stop(self.stopping)

    def _end(self, conn: _Conn, code: int) -> None:
        self.sel.unregister(conn.sock)
        self.conns.remove(conn)
        conn.finish()
        self.last = code
        if self.conns or self.pending is not None:
            _log.info("connection ended; the process goes on", conn=conn.cid,
                      live=len(self.conns))

    def _reconnect(self, cid: int) -> None:
        """On its own thread: the new connection's handshake, handed to the loop when done."""
        result: Union[_Conn, int] = Exit.FAILED
        try:
            assert self.pristine is not None and self.opts.connect
            sock = _connect(self.opts.connect, self.opts.connect_wait)
            try:
                conn = self.open(cid, sock, self.pristine.new_instance())
            except BaseException:
                sock.close()
                raise
            if conn is None:
                sock.close()
            result = conn if conn is not None else Exit.CONFIG
        except Exception as e:
            _log.error("the new connection failed; the old one goes on", conn=cid,
                       error=f"{type(e).__name__}: {e}")
        with self._closing:
            if not self._closed:
                self.results.put((cid, result))
                try:
                    self._wake_w.send(b"r")
                except OSError:
                    pass
                return
        # The host stopped while this handshake ran (it does not wait for one): let it go.
        if isinstance(result, _Conn):
            result.finish()

    def _on_reconnect(self, conn: _Conn, reason: str) -> None:
        if self.stopping is not None:
            _log.info("Reconnect while stopping; ignored", conn=conn.cid, reason=reason)
        elif self.pending is not None:
            _log.info("Reconnect while a reconnection is under way; ignored", conn=conn.cid,
                      pending=self.pending, reason=reason)
        elif self.pristine is None:
            _log.error("Reconnect, but this host cannot open another connection; ignored",
                       conn=conn.cid, reason=reason)
        else:
            cid, self.next_id = self.next_id, self.next_id + 1
            self.pending = cid
            _log.info("the front asks for a new connection; opening it", conn=conn.cid,
                      reason=reason)
            threading.Thread(target=self._reconnect, args=(cid,), name=f"pv-reconnect-{cid}",
                             daemon=True).start()

    def _collect(self) -> None:
        while True:
            try:
                cid, result = self.results.get_nowait()
            except queue.Empty:
                return
            if self.pending == cid:
                self.pending = None
            if isinstance(result, _Conn):
                self.refused = False
                _log.info("reconnected: a new plugin instance serves the new connection",
                          conn=cid)
                self._add(result)
            else:
                if result == Exit.CONFIG:
                    self.refused = True
                    _log.warn("the new connection was refused; the old one goes on, and the "
                              "process exits 78 when it ends", conn=cid)
                self.last = result

    def _stop(self, grace_s: float, why: str) -> None:
        if self.stopping is not None:
            return
        _log.info(why, grace_ms=int(grace_s * 1000))
        self.stopping = grace_s
        for conn in self.conns:
            conn.begin_stop(grace_s)

    def _exit(self) -> int:
        return Exit.CONFIG if self.last == Exit.CLEAN and self.refused else self.last

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> int:
        sweep = min(max(self.opts.idle_timeout / 4, 0.01), 10.0)
        next_sweep = time.monotonic() + sweep
        while True:
            for conn in list(self.conns):
                try:
                    while True:
                        got = conn.reader.next_frame()
                        if got is None:
                            break
                        conn.handle(*got)
                        conn.last_frame = time.monotonic()
                        # At once, before the next frame: a stream that starts after Shutdown
                        # is refused.
                        if conn.shutdown is not None:
                            grace, conn.shutdown = conn.shutdown, None
                            self._stop(grace, "shutdown requested")
                        if conn.reconnect is not None:
                            reason, conn.reconnect = conn.reconnect, None
                            self._on_reconnect(conn, reason)
                except ProtocolError as e:
                    _log.error("protocol error on the front's connection", conn=conn.cid,
                               error=str(e))
                    self._end(conn, Exit.FAILED)
            now = time.monotonic()
            for conn in list(self.conns):
                if conn.stop_at is None:
                    continue
                if conn.lanes.is_idle() and now - conn.last_frame >= QUIET_AFTER_SHUTDOWN:
                    self._end(conn, Exit.CLEAN)
                elif now >= conn.stop_at:
                    _log.warn("grace period over with events still queued or running; "
                              "exiting anyway", active_streams=conn.lanes.active_streams())
                    self._end(conn, Exit.CLEAN)
            if not self.conns and (self.pending is None or self.stopping is not None):
                return self._exit()
            if any(c.stop_at is not None for c in self.conns):
                timeout = min([0.002] + [max(c.stop_at - now, 0.0)
                                         for c in self.conns if c.stop_at is not None])
            else:
                timeout = max(next_sweep - now, 0.0)
            for key, _ in self.sel.select(timeout):
                if key.fileobj is self.wakeup:
                    try:
                        self.wakeup.recv(64)
                    except BlockingIOError:
                        pass
                elif key.fileobj is self._wake_r:
                    try:
                        self._wake_r.recv(64)
                    except BlockingIOError:
                        pass
                    self._collect()
                else:
                    conn = key.data
                    try:
                        more = conn.reader.fill()
                    except ConnectionResetError:
                        # A Unix socket closed with data unread in it (a Credit, a Pong the
                        # front had not read yet) fails the peer's next read with ECONNRESET
                        # instead of end-of-file: the front is gone all the same.
                        _log.info("the front closed the connection (before reading all we sent)",
                                  conn=conn.cid)
                        self._end(conn, Exit.CLEAN)
                        continue
                    except ProtocolError as e:
                        _log.error("protocol error on the front's connection", conn=conn.cid,
                                   error=str(e))
                        self._end(conn, Exit.FAILED)
                        continue
                    except OSError as e:
                        _log.error("cannot read from the front", conn=conn.cid, error=str(e))
                        self._end(conn, Exit.FAILED)
                        continue
                    if not more:
                        _log.info("the front closed the connection", conn=conn.cid)
                        self._end(conn, Exit.CLEAN)
            while self.signals and self.stopping is None:
                signum = self.signals.pop()
                what = "SIGTERM" if signum == 15 else "SIGINT" if signum == 2 else f"signal {signum}"
                self._stop(self.opts.term_grace, f"{what}; draining lanes")
            if time.monotonic() >= next_sweep:
                for conn in self.conns:
                    conn.lanes.evict_idle(self.opts.idle_timeout)
                    conn.lanes.flush_credit_if_idle()
                next_sweep = time.monotonic() + sweep
