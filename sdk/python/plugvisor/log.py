"""Logging in the forms the front and the operator already read from the Rust plugins.

- **Spawned by the front** (``PLUGVISOR_SUPERVISED=1``): compact lines on stderr,
  ``LEVEL target: message key=value ...`` with neither timestamp nor prefix. The front parses
  them (``parse_supervised``/``split_record`` in plugin-runner's logging.rs) into records of
  that level, with the plugin's target and fields as fields of their own.
- **By hand**: human-readable lines on stderr, each starting with ``plugin=<name> pid=<pid>``,
  or one JSON object per line (``--log-format json``).
- **Under systemd** (``JOURNAL_STREAM`` set, or ``--log-format journald``): records go to
  journald's native socket with ``PLUGVISOR_PLUGIN=<name>``, so ``journalctl _PID=<pid>`` and
  ``journalctl PLUGVISOR_PLUGIN=<name>`` find them; stderr if the journal cannot be reached.

The level filter comes from ``RUST_LOG`` like the Rust plugins (a bare level such as ``debug``;
default ``info``). Plugins may log with the standard :mod:`logging` module (records get the
logger's name as target) or with :func:`get`, whose methods take fields as keyword arguments.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import struct
import sys
import threading
import traceback
from typing import Any, Dict, Optional

#: Set to ``1`` by the front for every plugin it spawns.
SUPERVISED_ENV = "PLUGVISOR_SUPERVISED"
#: The journal field naming the plugin.
JOURNAL_PLUGIN_FIELD = "PLUGVISOR_PLUGIN"
#: Formats ``--log-format`` and ``PLUGVISOR_LOG_FORMAT`` take.
FORMATS = ("auto", "journald", "human", "json")

_FIELDS = "pv_fields"
TRACE = 5
logging.addLevelName(TRACE, "TRACE")


def level_word(levelno: int) -> str:
    """The level as the Rust plugins write it: ERROR, WARN, INFO, DEBUG or TRACE."""
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    if levelno >= logging.INFO:
        return "INFO"
    if levelno >= logging.DEBUG:
        return "DEBUG"
    return "TRACE"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def format_fields(fields: Dict[str, Any]) -> str:
    """``key=value`` words: strings quoted (with ``\\`` and ``"`` escaped), other values as
    written, ``None`` left out; keys limited to letters, digits, ``_`` and ``.`` so the front
    reads them back as fields."""
    words = []
    for key, value in fields.items():
        if value is None:
            continue
        key = "".join(c if c.isascii() and (c.isalnum() or c in "_.") else "_" for c in key)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = _quote(str(value))
        words.append(f"{key}={text}")
    return " ".join(words)


def _record_parts(record: logging.LogRecord) -> "tuple[str, str, Dict[str, Any]]":
    message = record.getMessage().replace("\r", "").replace("\n", "\\n")
    fields = dict(getattr(record, _FIELDS, None) or {})
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        fields["error"] = f"{type(exc).__name__}: {exc}"
        tb = traceback.extract_tb(exc.__traceback__)
        if tb:
            fields["location"] = f"{tb[-1].filename}:{tb[-1].lineno}"
    target = record.name if record.name != "root" else "plugin"
    return target, message, fields


class CompactFormatter(logging.Formatter):
    """``LEVEL target: message fields``: what the front parses from a spawned plugin."""

    def format(self, record: logging.LogRecord) -> str:
        target, message, fields = _record_parts(record)
        line = f"{level_word(record.levelno)} {target}: {message}"
        extra = format_fields(fields)
        return f"{line} {extra}" if extra else line


def _timestamp(created: float) -> str:
    t = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HumanFormatter(logging.Formatter):
    """``plugin=<name> pid=<pid> <time> LEVEL <thread> target: message fields``."""

    def __init__(self, plugin: str) -> None:
        super().__init__()
        self.prefix = f"plugin={plugin} pid={os.getpid()}"

    def format(self, record: logging.LogRecord) -> str:
        target, message, fields = _record_parts(record)
        line = (f"{self.prefix} {_timestamp(record.created)} {level_word(record.levelno):>5} "
                f"{record.threadName} {target}: {message}")
        extra = format_fields(fields)
        return f"{line} {extra}" if extra else line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, ``plugin`` and ``pid`` first."""

    def __init__(self, plugin: str) -> None:
        super().__init__()
        self.plugin = plugin

    def format(self, record: logging.LogRecord) -> str:
        target, message, fields = _record_parts(record)
        body: Dict[str, Any] = {"message": message}
        body.update({k: v if isinstance(v, (int, float, bool)) else str(v)
                     for k, v in fields.items() if v is not None})
        return json.dumps({"plugin": self.plugin, "pid": os.getpid(),
                           "timestamp": _timestamp(record.created),
                           "level": level_word(record.levelno), "fields": body,
                           "target": target, "threadName": record.threadName})


_PRIORITY = {"ERROR": 3, "WARN": 4, "INFO": 6, "DEBUG": 7, "TRACE": 7}


class JournaldHandler(logging.Handler):
    """Writes records to journald's native socket (``/run/systemd/journal/socket``)."""

    def __init__(self, plugin: str, path: str = "/run/systemd/journal/socket") -> None:
        super().__init__()
        self.plugin = plugin
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.connect(path)

    @staticmethod
    def _field(out: bytearray, key: str, value: str) -> None:
        raw = value.encode("utf-8", "replace")
        if b"\n" in raw:
            out += key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += key.encode() + b"=" + raw + b"\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            target, _, fields = _record_parts(record)
            out = bytearray()
            self._field(out, "MESSAGE", record.getMessage())
            self._field(out, "PRIORITY", str(_PRIORITY[level_word(record.levelno)]))
            self._field(out, "SYSLOG_IDENTIFIER", "plugvisor-plugin")
            self._field(out, JOURNAL_PLUGIN_FIELD, self.plugin)
            self._field(out, "TARGET", target)
            for key, value in fields.items():
                if value is None:
                    continue
                name = "".join(c if c.isalnum() else "_" for c in key.upper())
                self._field(out, "PLUGVISOR_" + name, str(value))
            self.sock.send(bytes(out))
        except Exception:
            self.handleError(record)


def filter_level(spec: Optional[str]) -> int:
    """The level of a ``RUST_LOG``-style filter: its bare level directive (``debug``,
    ``warn``, ...), ``info`` when it has none."""
    words = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
             "debug": logging.DEBUG, "trace": TRACE, "off": logging.CRITICAL + 10}
    level = logging.INFO
    for directive in (spec or "").split(","):
        directive = directive.strip().lower()
        if directive in words:
            level = words[directive]
    return level


def supervised() -> bool:
    """Whether the front spawned this process (its stderr is the front's pipe)."""
    return os.environ.get(SUPERVISED_ENV) == "1"


def under_journal() -> bool:
    """Whether the service manager connected this process (or its front) to the journal."""
    return bool(os.environ.get("JOURNAL_STREAM"))


_installed = threading.Lock()
_done = False


def init(plugin: str, fmt: str = "auto") -> None:
    """Installs the handler for ``plugin`` in format ``fmt`` (see :data:`FORMATS`) on the root
    logger. Only the first call does anything."""
    global _done
    with _installed:
        if _done:
            return
        _done = True
    root = logging.getLogger()
    root.setLevel(filter_level(os.environ.get("RUST_LOG")))
    handler: Optional[logging.Handler] = None
    journal_error = None
    if fmt == "journald" or (fmt == "auto" and under_journal()):
        try:
            handler = JournaldHandler(plugin)
        except OSError as e:
            journal_error = e
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        if supervised():
            handler.setFormatter(CompactFormatter())
        elif fmt == "json":
            handler.setFormatter(JsonFormatter(plugin))
        else:
            handler.setFormatter(HumanFormatter(plugin))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if journal_error is not None:
        get("plugvisor.log").warn("cannot reach journald; logging to stderr", error=str(journal_error))


class FieldLogger:
    """A logger whose methods take the record's fields as keyword arguments:
    ``log.get("myplugin").warn("slow upstream", stream_id=5, ms=812)``."""

    def __init__(self, target: str) -> None:
        self.logger = logging.getLogger(target)

    def _log(self, level: int, message: str, fields: Dict[str, Any]) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, message, extra={_FIELDS: fields})

    def error(self, message: str, **fields: Any) -> None:
        """An ERROR record."""
        self._log(logging.ERROR, message, fields)

    def warn(self, message: str, **fields: Any) -> None:
        """A WARN record."""
        self._log(logging.WARNING, message, fields)

    def info(self, message: str, **fields: Any) -> None:
        """An INFO record."""
        self._log(logging.INFO, message, fields)

    def debug(self, message: str, **fields: Any) -> None:
        """A DEBUG record."""
        self._log(logging.DEBUG, message, fields)


def get(target: str) -> FieldLogger:
    """A :class:`FieldLogger` for ``target`` (the record's target, e.g. ``wordcount``)."""
    return FieldLogger(target)
