"""The plugvisor plugin SDK for Python (standard library only).

A plugin is a process the plugvisor front feeds over one Unix socket: request starts, response
headers, body chunks, and a synchronous final call whose answer (the plugin's metadata) ends up
in Envoy's ``dynamic_metadata``. This package does everything but the plugin's own logic: the
handshake, per-stream lanes that run each stream's events in sequence order while different
streams run in parallel on a bounded thread pool, gap and partial-stream detection, replays,
flow-control credit, exceptions isolated per stream, heartbeats, graceful shutdown and logging.
Subclass :class:`Plugin` and call :func:`run` as your whole main::

    import plugvisor

    class ByteCounter(plugvisor.Plugin):
        name = "byte-counter"
        subscriptions = plugvisor.Subscriptions(body_bytes=False)

        def new_stream(self):
            return {"bytes": 0}

        def on_chunk(self, stream, ctx, chunk):
            stream["bytes"] += chunk.len

        def on_final(self, stream, ctx, final):
            return {self.namespace: {"bytes": stream["bytes"] + final.len}}

    if __name__ == "__main__":
        plugvisor.run(ByteCounter())

:mod:`plugvisor.testing` plays the front, so a plugin's tests need no front and no Envoy.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import List, NoReturn, Optional

from . import cli, log
from .host import Exit, HostOptions, serve
from .plugin import ConfigError, EventCtx, Plugin
from .wire import (ABORT_CAUSE_STRS, ABORT_CAUSES, PROTOCOL_VERSION, Abort, AbortedFinal, Chunk,
                   Final, Metadata, RequestStart, ResponseHeaders, Subscriptions)

__version__ = "0.1.0"

__all__ = [
    "ABORT_CAUSE_STRS", "ABORT_CAUSES", "Abort", "AbortedFinal", "Chunk", "ConfigError", "EventCtx", "Exit", "Final", "HostOptions",
    "Metadata", "PROTOCOL_VERSION", "Plugin", "RequestStart", "ResponseHeaders", "Subscriptions",
    "log", "run", "serve",
]


def _set_comm(name: str) -> None:
    """Sets the kernel's ``comm`` name to ``pv:<name>`` like the Rust plugins (best effort)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ("pv:" + name).encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass


def run(plugin: Plugin, argv: Optional[List[str]] = None) -> NoReturn:
    """The whole main of a plugin program: parses ``[<name>] --connect <socket>`` and the
    tuning flags (``argv``, default ``sys.argv[1:]``; see ``--help``), sets up logging and the
    process name, serves the front until it shuts the plugin down or goes away, and exits with
    the status of :class:`Exit`. SIGTERM and SIGINT drain like ``Shutdown`` for
    ``--term-grace``. The name defaults to ``plugin.name``."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else None
    opts = cli.parse(sys.argv[1:] if argv is None else argv, plugin.name, prog)
    # The plugin's own name: what `plugin.namespace` says. Under `--as` the host renames it.
    plugin.name = opts.runs or opts.plugin
    log.init(opts.plugin, opts.log_format)
    _set_comm(opts.plugin)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signals: List[int] = []
    signal.set_wakeup_fd(wake_w.fileno())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda n, _frame: signals.append(n))
    code = serve(plugin, opts, wakeup=wake_r, signals=signals)
    sys.stdout.flush()
    sys.stderr.flush()
    # Worker threads may still be inside a hook (a hung plugin): exiting the process ends them.
    os._exit(code)
