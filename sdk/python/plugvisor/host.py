"""The host: one connection to the front, from handshake to exit.

:func:`serve` connects to the plugin's socket, says ``Hello`` (protocol version 3, capabilities
``replayed`` and ``aborted_final``), applies the config from ``Welcome`` (or returns
:attr:`Exit.CONFIG` after a ``Refuse`` or a rejected config), then reads frames on its own thread:
per-stream events go to their lanes (:mod:`plugvisor.lanes`), a ``Replayed`` one unwrapped and
marked replayed, an ``AbortedFinal`` run and answered like a ``Final``; ``Ping``
is answered right here, never behind queued work, with the lanes' active and stuck streams;
``Shutdown`` stops taking new streams and lets the in-flight work finish within its grace (the
reader keeps answering pings meanwhile). Every event's whole frame length is credited back once
the lanes are done with it (:mod:`plugvisor.credit`). A final reply whose metadata encodes
larger than ``Welcome.metadata_max_bytes`` becomes an error reply here. End of file on the
socket means the front is gone: return :attr:`Exit.CLEAN` at once.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from . import log
from .connection import FrameReader, FrameWriter
from .credit import Credits
from .lanes import Lanes, check_metadata
from .plugin import Plugin
from .wire import (CAPABILITIES, EVENT_TYPES, PROTOCOL_VERSION, FinalReply, Hello, Ping, Pong,
                   ProtocolError, Refuse, Replayed, Shutdown, Welcome, decode_to_plugin,
                   encoded_metadata_len)

_log = log.get("plugvisor.host")

#: How long the host waits for the front's answer to ``Hello``.
HANDSHAKE_TIMEOUT = 30.0


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
    """Serves ``plugin`` on one connection (``sock``, or a new one to ``opts.connect``) until
    the front shuts it down or goes away, and returns the exit status (:class:`Exit`).

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
        return _Host(plugin, opts, sock, wakeup, signals if signals is not None else []).run()
    except ProtocolError as e:
        _log.error("protocol error on the front's connection", error=str(e))
        return Exit.FAILED
    except OSError as e:
        _log.error("plugin host failed", error=str(e))
        return Exit.FAILED


class _Host:
    def __init__(self, plugin: Plugin, opts: HostOptions, sock: socket.socket,
                 wakeup: Optional[socket.socket], signals: list) -> None:
        self.plugin = plugin
        self.opts = opts
        self.sock = sock
        self.wakeup = wakeup
        self.signals = signals
        self.reader = FrameReader(sock)
        self.writer = FrameWriter(sock)

    def handshake(self) -> Optional[Welcome]:
        subs = self.plugin.subscriptions
        self.writer.send(Hello(PROTOCOL_VERSION, self.opts.plugin, os.getpid() & 0xFFFFFFFF, subs,
                               list(CAPABILITIES)))
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            got = self.reader.read()
        except socket.timeout:
            raise ProtocolError(f"handshake failed: no answer to Hello within "
                                f"{HANDSHAKE_TIMEOUT:.0f}s") from None
        finally:
            self.sock.settimeout(None)
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
        return answer

    def run(self) -> int:
        welcome = self.handshake()
        if welcome is None:
            return Exit.CONFIG
        config = welcome.config
        try:
            if config is None:
                config = {}
            if not isinstance(config, dict):
                raise ValueError(f"config must be a table, got {type(config).__name__}")
            self.plugin.configure(config)
        except Exception as e:
            _log.error(f"invalid config for plugin `{self.opts.plugin}`: {e}")
            return Exit.CONFIG
        subs = self.plugin.subscriptions
        _log.info("connected to the front", version=welcome.protocol_version,
                  subscriptions=",".join(subs.names()), workers=self.opts.workers,
                  budget_bytes=welcome.budget_bytes,
                  metadata_max_bytes=welcome.metadata_max_bytes,
                  capabilities=",".join(welcome.capabilities))

        own = self.opts.runs or self.opts.plugin
        own_namespace = "plugvisor." + own
        rename = ((own_namespace, "plugvisor." + self.opts.plugin)
                  if self.opts.runs else None)
        md_max = welcome.metadata_max_bytes
        name = self.opts.plugin
        writer = self.writer

        def send(msg: Any) -> None:
            if type(msg) is FinalReply and msg.metadata is not None:
                if rename is not None:
                    _rename_namespace(msg.metadata, *rename)
                check_metadata(msg, md_max, name, encoded_metadata_len)
            writer.send(msg)

        credits = Credits(welcome.budget_bytes, send)
        lanes = Lanes(self.plugin, workers=self.opts.workers,
                      queue_events=self.opts.lane_queue_events,
                      queue_bytes=self.opts.lane_queue_bytes, plugin_name=name,
                      namespace=own_namespace, send=send, credits=credits)
        try:
            exit_code = self._loop(lanes)
        finally:
            lanes.stop()
        s = lanes.stats
        _log.info("plugin exiting", dropped=s.dropped, evicted=s.evicted, errors=s.errors,
                  replayed=s.replayed, consumed_bytes=credits.consumed)
        return exit_code

    def _loop(self, lanes: Lanes) -> int:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        if self.wakeup is not None:
            sel.register(self.wakeup, selectors.EVENT_READ)
        sweep = min(max(self.opts.idle_timeout / 4, 0.01), 10.0)
        next_sweep = time.monotonic() + sweep
        stop_at: Optional[float] = None
        try:
            while True:
                got = self.reader.next_frame()
                if got is not None:
                    self._handle(lanes, *got)
                    if stop_at is None and self._shutdown is not None:
                        stop_at = self._begin_stop(lanes, self._shutdown, "shutdown requested")
                    continue
                now = time.monotonic()
                if stop_at is not None:
                    if lanes.is_idle():
                        return Exit.CLEAN
                    if now >= stop_at:
                        _log.warn("grace period over with events still queued or running; "
                                  "exiting anyway", active_streams=lanes.active_streams())
                        return Exit.CLEAN
                    timeout = min(0.002, stop_at - now)
                else:
                    timeout = max(next_sweep - now, 0.0)
                for key, _ in sel.select(timeout):
                    if key.fileobj is self.wakeup:
                        try:
                            self.wakeup.recv(64)
                        except BlockingIOError:
                            pass
                    elif not self.reader.fill():
                        _log.info("the front closed the connection; exiting")
                        return Exit.CLEAN
                while self.signals and stop_at is None:
                    signum = self.signals.pop()
                    what = "SIGTERM" if signum == 15 else "SIGINT" if signum == 2 else f"signal {signum}"
                    stop_at = self._begin_stop(lanes, self.opts.term_grace, f"{what}; draining lanes")
                if time.monotonic() >= next_sweep:
                    lanes.evict_idle(self.opts.idle_timeout)
                    lanes.flush_credit_if_idle()
                    next_sweep = time.monotonic() + sweep
        finally:
            sel.close()

    _shutdown: Optional[float] = None

    def _begin_stop(self, lanes: Lanes, grace_s: float, why: str) -> float:
        _log.info(why, grace_ms=int(grace_s * 1000))
        lanes.accepting_new = False
        return time.monotonic() + grace_s

    def _handle(self, lanes: Lanes, payload: bytes, frame_len: int) -> None:
        msg = decode_to_plugin(payload)
        t = type(msg)
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
            if self._shutdown is None:
                self._shutdown = msg.grace_ms / 1000.0
        else:
            _log.warn("unexpected handshake message after Welcome; ignored", kind=t.__name__)
