"""The wire format of docs/protocol.md: every message in both directions, and its codec.

A frame is a ``u32`` little-endian payload length followed by the payload, one message encoded
as bincode 2 with its *standard* configuration (varints, zigzag ``i64``, ``f64`` little endian,
strings and byte buffers with a varint length, ``Option`` as ``0``/``1`` + value, sequences with
a varint count, maps with keys in ascending byte order, enums as a varint variant index).

Both directions are here (``ToPlugin`` is decoded by a plugin and encoded by a front, ``FromPlugin``
the other way round), so the SDK's test kit (:mod:`plugvisor.testing`) speaks exactly the bytes a
plugin does. Decoding is strict like the Rust codec: a payload must be used to its last byte,
varints may not use a marker wider than their type, bools and option tags are 0 or 1, strings are
UTF-8, and values nest at most :data:`MAX_VALUE_DEPTH` levels.

Values are plain Python objects: ``None``, ``bool``, ``int`` (a signed 64-bit integer),
``float``, ``str``, ``list`` (a ``tuple`` encodes as a list too) and ``dict`` with ``str`` keys.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

#: The protocol version this SDK speaks.
PROTOCOL_VERSION = 3
#: The capabilities this SDK announces in ``Hello`` (protocol version 3 and later): it decodes
#: ``Replayed`` (``replayed``), answers ``AbortedFinal`` like a ``Final`` (``aborted_final``),
#: follows ``Reconnect`` with a second connection (``reconnect``) and sends what hooks record
#: for a stream's trace as ``Spans`` (``trace``).
CAPABILITIES: Tuple[str, ...] = ("replayed", "aborted_final", "reconnect", "trace")
#: Bytes of the length prefix in front of every payload.
PREFIX_LEN = 4
#: The largest payload a plugin accepts: the protocol's ceiling, 64 MiB, as the Rust host (the
#: front's ``max_message_bytes`` keeps every event frame below it).
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
#: How many ``Value`` levels may nest (every value counts, scalars included, as in the Rust
#: decoder): a list holding a list holding ``None`` is three levels.
MAX_VALUE_DEPTH = 64

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF

_F64 = struct.Struct("<d")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

#: A header or trailer: (name, value).
Header = Tuple[str, str]
#: Plugin metadata: namespace (``plugvisor.<name>``, ``envoy.lb`` ...) to a value, normally a map.
Metadata = Dict[str, Any]


class ProtocolError(Exception):
    """Bytes that do not form a valid frame or message: an error for the whole connection."""


class EncodeError(ValueError):
    """A Python value that has no wire encoding (wrong type, integer out of range, too deep)."""


# ---------------------------------------------------------------------------------------------
# Messages, front -> plugin (ToPlugin)


@dataclass
class Welcome:
    """The front accepted the plugin (``ToPlugin`` 0)."""

    protocol_version: int
    config: Any
    budget_bytes: int
    metadata_max_bytes: int
    #: What the front will use with this plugin; present on the wire from version 3 on.
    capabilities: List[str] = field(default_factory=list)
    INDEX = 0


#: ``RefuseCode`` variants, by index.
REFUSE_CODES = (
    "UnsupportedVersion",
    "UnknownPlugin",
    "AlreadyConnected",
    "BadConfig",
    "NotAllowed",
    "BadHandshake",
)


@dataclass
class Refuse:
    """The front refused the plugin (``ToPlugin`` 1); ``code`` indexes :data:`REFUSE_CODES`."""

    code: int
    reason: str
    INDEX = 1

    @property
    def code_name(self) -> str:
        """The refusal code's name, e.g. ``UnknownPlugin``."""
        return REFUSE_CODES[self.code]


def find_header(headers: Sequence[Header], name: str) -> Optional[str]:
    """The value of the first header called ``name`` (ASCII case-insensitive), or ``None``."""
    lower = name.lower()
    for key, value in headers:
        if key.lower() == lower:
            return value
    return None


@dataclass
class RequestStart:
    """A request's headers reached the front (``ToPlugin`` 2)."""

    stream_id: int
    seq: int
    stamp_ns: int
    request_id: Optional[str]
    headers: List[Header]
    INDEX = 2

    def header(self, name: str) -> Optional[str]:
        """The request header ``name`` (case-insensitive), or ``None``."""
        return find_header(self.headers, name)


@dataclass
class ResponseHeaders:
    """The upstream's response headers arrived (``ToPlugin`` 3)."""

    stream_id: int
    seq: int
    stamp_ns: int
    status: int
    headers: List[Header]
    INDEX = 3

    def header(self, name: str) -> Optional[str]:
        """The response header ``name`` (case-insensitive), or ``None``."""
        return find_header(self.headers, name)


@dataclass
class Chunk:
    """A response body chunk (``ToPlugin`` 4). ``bytes`` is empty unless subscribed to body bytes;
    ``len`` is always the chunk's size as it passed through Envoy."""

    stream_id: int
    seq: int
    stamp_ns: int
    len: int
    bytes: bytes
    end_of_stream: bool = False
    ack: bool = False
    INDEX = 4


@dataclass
class Final:
    """The response ended (``ToPlugin`` 5): a call the plugin answers with its metadata."""

    stream_id: int
    seq: int
    stamp_ns: int
    call_id: int
    len: int
    bytes: bytes
    trailers: List[Header]
    INDEX = 5

    def trailer(self, name: str) -> Optional[str]:
        """The response trailer ``name`` (case-insensitive), or ``None``."""
        return find_header(self.trailers, name)


#: ``AbortCause`` variants, by index.
ABORT_CAUSES = ("ClientDisconnect", "UpstreamError", "Timeout", "Shutdown")
#: The same causes by index, as the Rust SDK's ``AbortCause::as_str()`` names them in metadata
#: and records: ``client_disconnect``, ``upstream_error``, ``timeout``, ``shutdown``.
ABORT_CAUSE_STRS = ("client_disconnect", "upstream_error", "timeout", "shutdown")


@dataclass
class Abort:
    """The stream ended without a response end (``ToPlugin`` 6); ``cause`` indexes
    :data:`ABORT_CAUSES`."""

    stream_id: int
    seq: int
    stamp_ns: int
    cause: int
    detail: str
    INDEX = 6

    @property
    def cause_name(self) -> str:
        """The cause's variant name, e.g. ``ClientDisconnect``."""
        return ABORT_CAUSES[self.cause]

    @property
    def cause_str(self) -> str:
        """The cause's name for metadata, e.g. ``client_disconnect`` (the Rust SDK's
        ``AbortCause::as_str()``)."""
        return ABORT_CAUSE_STRS[self.cause]


@dataclass
class AbortedFinal:
    """The final call of a stream that ended without a response end (``ToPlugin`` 10): the client
    left, the upstream reset, or the front stopped; ``cause`` indexes :data:`ABORT_CAUSES`. Sent
    instead of :class:`Abort` to a plugin that agreed on the capability ``aborted_final``, whatever
    its ``abort`` subscription; answered like a :class:`Final`, with what the plugin knows. It is
    the stream's last event and is never wrapped in :class:`Replayed`."""

    stream_id: int
    seq: int
    stamp_ns: int
    call_id: int
    cause: int
    detail: str
    INDEX = 10

    @property
    def cause_name(self) -> str:
        """The cause's variant name, e.g. ``ClientDisconnect``."""
        return ABORT_CAUSES[self.cause]

    @property
    def cause_str(self) -> str:
        """The cause's name for metadata, e.g. ``client_disconnect`` (the Rust SDK's
        ``AbortCause::as_str()``)."""
        return ABORT_CAUSE_STRS[self.cause]

    def as_abort(self) -> Abort:
        """The same end as an :class:`Abort` event (for a plugin that handles both alike)."""
        return Abort(self.stream_id, self.seq, self.stamp_ns, self.cause, self.detail)


@dataclass
class Ping:
    """A heartbeat (``ToPlugin`` 7), answered with :class:`Pong` from the reading loop."""

    nonce: int
    INDEX = 7


@dataclass
class Shutdown:
    """Finish in-flight work within ``grace_ms`` and exit 0 (``ToPlugin`` 8)."""

    grace_ms: int
    INDEX = 8


@dataclass
class Replayed:
    """A per-stream event resent after a plugin restart (``ToPlugin`` 9); never an
    :class:`AbortedFinal`."""

    event: "ReplayableEvent"
    INDEX = 9


@dataclass
class Reconnect:
    """Open a second connection to the same socket and serve both until the front closes this
    one (``ToPlugin`` 11, capability ``reconnect``)."""

    reason: str
    INDEX = 11


#: The per-stream events ``Replayed`` may wrap (``ToPlugin`` 2-6).
ReplayableEvent = Union[RequestStart, ResponseHeaders, Chunk, Final, Abort]
REPLAYABLE_EVENT_TYPES = (RequestStart, ResponseHeaders, Chunk, Final, Abort)
#: The per-stream events: they carry a stream id and a seq, run on the stream's lane and count
#: against the flow-control window.
Event = Union[RequestStart, ResponseHeaders, Chunk, Final, Abort, AbortedFinal]
EVENT_TYPES = REPLAYABLE_EVENT_TYPES + (AbortedFinal,)
#: The final calls, answered with a :class:`FinalReply`.
FINAL_TYPES = (Final, AbortedFinal)
ToPlugin = Union[Welcome, Refuse, RequestStart, ResponseHeaders, Chunk, Final, Abort, Ping,
                 Shutdown, Replayed, AbortedFinal, Reconnect]

# ---------------------------------------------------------------------------------------------
# Messages, plugin -> front (FromPlugin)


@dataclass
class Subscriptions:
    """What the plugin wants to receive (five bools on the wire, in this order)."""

    request_start: bool = True
    response_headers: bool = True
    chunks: bool = True
    body_bytes: bool = True
    abort: bool = True

    def names(self) -> List[str]:
        """The names of the subscribed kinds, in wire order."""
        return [n for n in ("request_start", "response_headers", "chunks", "body_bytes", "abort")
                if getattr(self, n)]


@dataclass
class Hello:
    """The plugin's first frame (``FromPlugin`` 0). ``capabilities`` is on the wire only when
    ``protocol_version`` is 3 or more."""

    protocol_version: int
    plugin: str
    pid: int
    subscriptions: Subscriptions
    capabilities: List[str] = field(default_factory=list)
    INDEX = 0


@dataclass
class FinalReply:
    """The answer to a :class:`Final` (``FromPlugin`` 1): metadata, or an error text
    (``error`` set and ``metadata`` ``None``)."""

    call_id: int
    stream_id: int
    metadata: Optional[Metadata] = None
    error: Optional[str] = None
    INDEX = 1


@dataclass
class Pong:
    """The answer to a :class:`Ping` (``FromPlugin`` 2); ``stuck`` is ``(stream_id, running_ms)``
    for each lane running one event past the plugin's limit."""

    nonce: int
    active_streams: int
    stuck: List[Tuple[int, int]] = field(default_factory=list)
    INDEX = 2


@dataclass
class Ack:
    """An inline chunk has run (``FromPlugin`` 3)."""

    stream_id: int
    seq: int
    INDEX = 3


@dataclass
class Credit:
    """Cumulative event bytes the plugin has finished with (``FromPlugin`` 4)."""

    consumed: int
    INDEX = 4


@dataclass
class PluginSpan:
    """One span a plugin recorded: ``CLOCK_MONOTONIC`` nanoseconds, attributes in order."""

    name: str
    start_ns: int
    end_ns: int
    attributes: List[Tuple[str, Any]] = field(default_factory=list)


@dataclass
class Spans:
    """What a plugin adds to one stream's trace (``FromPlugin`` 5, capability ``trace``), sent
    right before the stream's :class:`FinalReply`."""

    stream_id: int
    attributes: List[Tuple[str, Any]] = field(default_factory=list)
    spans: List[PluginSpan] = field(default_factory=list)
    INDEX = 5


FromPlugin = Union[Hello, FinalReply, Pong, Ack, Credit, Spans]

# ---------------------------------------------------------------------------------------------
# Encoding


def _varint(out: bytearray, n: int, limit: int = _U64_MAX) -> None:
    if n < 0 or n > limit:
        raise EncodeError(f"integer {n} out of range 0..={limit}")
    if n < 251:
        out.append(n)
    elif n <= _U16_MAX:
        out.append(251)
        out += _U16.pack(n)
    elif n <= _U32_MAX:
        out.append(252)
        out += _U32.pack(n)
    else:
        out.append(253)
        out += _U64.pack(n)


def _string(out: bytearray, s: str) -> None:
    if not isinstance(s, str):
        raise EncodeError(f"expected a string, got {type(s).__name__}")
    b = s.encode("utf-8")
    _varint(out, len(b))
    out += b


def _bytes(out: bytearray, b: bytes) -> None:
    _varint(out, len(b))
    out += b


def _bool(out: bytearray, b: bool) -> None:
    out.append(1 if b else 0)


def _headers(out: bytearray, headers: Sequence[Header]) -> None:
    _varint(out, len(headers))
    for name, value in headers:
        _string(out, name)
        _string(out, value)


def _strings(out: bytearray, items: Sequence[str]) -> None:
    _varint(out, len(items))
    for s in items:
        _string(out, s)


def encode_value(out: bytearray, value: Any, depth: int = 1) -> None:
    """Appends ``value`` as a wire ``Value``; raises :class:`EncodeError` for what has none."""
    if depth > MAX_VALUE_DEPTH:
        raise EncodeError(f"value nested deeper than {MAX_VALUE_DEPTH} levels")
    if value is None:
        out.append(0)
    elif value is True or value is False:
        out.append(1)
        out.append(1 if value else 0)
    elif isinstance(value, int):
        if not _I64_MIN <= value <= _I64_MAX:
            raise EncodeError(f"integer {value} does not fit a signed 64-bit Int")
        out.append(2)
        _varint(out, ((value << 1) ^ (value >> 63)) & _U64_MAX)
    elif isinstance(value, float):
        out.append(3)
        out += _F64.pack(value)
    elif isinstance(value, str):
        out.append(4)
        _string(out, value)
    elif isinstance(value, (list, tuple)):
        out.append(5)
        _varint(out, len(value))
        for item in value:
            encode_value(out, item, depth + 1)
    elif isinstance(value, dict):
        out.append(6)
        encode_map(out, value, depth + 1)
    else:
        raise EncodeError(f"a {type(value).__name__} is not a metadata value "
                          "(use None, bool, int, float, str, list or dict)")


def _attributes(out: bytearray, attributes: Sequence[Tuple[str, Any]]) -> None:
    _varint(out, len(attributes))
    for key, value in attributes:
        _string(out, key)
        encode_value(out, value)


def encode_map(out: bytearray, mapping: Dict[str, Any], depth: int = 1) -> None:
    """Appends a string-keyed map, keys in ascending byte order, values at ``depth``."""
    for key in mapping:
        if not isinstance(key, str):
            raise EncodeError(f"map key {key!r} is not a string")
    # UTF-8 byte order is code point order, which is how Python compares strings.
    keys = sorted(mapping)
    _varint(out, len(keys))
    for key in keys:
        _string(out, key)
        encode_value(out, mapping[key], depth)


def encoded_metadata_len(metadata: Metadata) -> int:
    """The encoded size of a metadata map (what ``metadata_max_bytes`` limits)."""
    out = bytearray()
    encode_map(out, metadata)
    return len(out)


def _encode_event_fields(out: bytearray, msg: Any) -> None:
    _varint(out, msg.stream_id)
    _varint(out, msg.seq, _U32_MAX)
    _varint(out, msg.stamp_ns)


def encode(msg: Any) -> bytes:
    """The payload of one message of either direction."""
    out = bytearray()
    _varint(out, msg.INDEX, _U32_MAX)
    t = type(msg)
    if t is Hello:
        _varint(out, msg.protocol_version, _U32_MAX)
        _string(out, msg.plugin)
        _varint(out, msg.pid, _U32_MAX)
        s = msg.subscriptions
        for b in (s.request_start, s.response_headers, s.chunks, s.body_bytes, s.abort):
            _bool(out, b)
        if msg.protocol_version >= 3:
            _strings(out, msg.capabilities)
    elif t is FinalReply:
        _varint(out, msg.call_id)
        _varint(out, msg.stream_id)
        if msg.error is None:
            out.append(0)
            encode_map(out, msg.metadata if msg.metadata is not None else {})
        else:
            out.append(1)
            _string(out, msg.error)
    elif t is Pong:
        _varint(out, msg.nonce)
        _varint(out, msg.active_streams, _U32_MAX)
        _varint(out, len(msg.stuck))
        for stream_id, running_ms in msg.stuck:
            _varint(out, stream_id)
            _varint(out, running_ms)
    elif t is Ack:
        _varint(out, msg.stream_id)
        _varint(out, msg.seq, _U32_MAX)
    elif t is Credit:
        _varint(out, msg.consumed)
    elif t is Spans:
        _varint(out, msg.stream_id)
        _attributes(out, msg.attributes)
        _varint(out, len(msg.spans))
        for span in msg.spans:
            _string(out, span.name)
            _varint(out, span.start_ns)
            _varint(out, span.end_ns)
            _attributes(out, span.attributes)
    elif t is Reconnect:
        _string(out, msg.reason)
    elif t is Welcome:
        _varint(out, msg.protocol_version, _U32_MAX)
        encode_value(out, msg.config)
        _varint(out, msg.budget_bytes)
        _varint(out, msg.metadata_max_bytes)
        if msg.protocol_version >= 3:
            _strings(out, msg.capabilities)
    elif t is Refuse:
        _varint(out, msg.code, _U32_MAX)
        _string(out, msg.reason)
    elif t is RequestStart:
        _encode_event_fields(out, msg)
        if msg.request_id is None:
            out.append(0)
        else:
            out.append(1)
            _string(out, msg.request_id)
        _headers(out, msg.headers)
    elif t is ResponseHeaders:
        _encode_event_fields(out, msg)
        _varint(out, msg.status, _U16_MAX)
        _headers(out, msg.headers)
    elif t is Chunk:
        _encode_event_fields(out, msg)
        _varint(out, msg.len, _U32_MAX)
        _bytes(out, msg.bytes)
        _bool(out, msg.end_of_stream)
        _bool(out, msg.ack)
    elif t is Final:
        _encode_event_fields(out, msg)
        _varint(out, msg.call_id)
        _varint(out, msg.len, _U32_MAX)
        _bytes(out, msg.bytes)
        _headers(out, msg.trailers)
    elif t is Abort:
        _encode_event_fields(out, msg)
        _varint(out, msg.cause, _U32_MAX)
        _string(out, msg.detail)
    elif t is AbortedFinal:
        _encode_event_fields(out, msg)
        _varint(out, msg.call_id)
        _varint(out, msg.cause, _U32_MAX)
        _string(out, msg.detail)
    elif t is Ping:
        _varint(out, msg.nonce)
    elif t is Shutdown:
        _varint(out, msg.grace_ms)
    elif t is Replayed:
        if not isinstance(msg.event, REPLAYABLE_EVENT_TYPES):
            raise EncodeError("Replayed wraps exactly one per-stream event, never an "
                              "AbortedFinal")
        out += encode(msg.event)
    else:
        raise EncodeError(f"not a protocol message: {t.__name__}")
    return bytes(out)


def frame(msg: Any) -> bytes:
    """One whole frame: the length prefix and the payload of ``msg``."""
    payload = encode(msg)
    return _U32.pack(len(payload)) + payload


# ---------------------------------------------------------------------------------------------
# Decoding


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolError(f"message truncated: wanted {n} more bytes at offset {self.pos}")
        b = self.data[self.pos:end]
        self.pos = end
        return bytes(b)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise ProtocolError(f"message truncated at offset {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self, limit: int = _U64_MAX) -> int:
        b = self.u8()
        if b < 251:
            return b
        if b == 251:
            return _U16.unpack(self.take(2))[0]
        if b == 252 and limit >= _U32_MAX:
            return _U32.unpack(self.take(4))[0]
        if b == 253 and limit >= _U64_MAX:
            return _U64.unpack(self.take(8))[0]
        raise ProtocolError(f"invalid varint marker {b:#04x} for an integer up to {limit}")

    def boolean(self) -> bool:
        b = self.u8()
        if b > 1:
            raise ProtocolError(f"invalid bool byte {b:#04x}")
        return b == 1

    def length(self) -> int:
        n = self.varint()
        if n > len(self.data) - self.pos:
            raise ProtocolError(f"length {n} runs past the end of the message")
        return n

    def string(self) -> str:
        raw = self.take(self.length())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"string is not UTF-8: {e}") from e

    def raw_bytes(self) -> bytes:
        return self.take(self.length())

    def option_string(self) -> Optional[str]:
        tag = self.u8()
        if tag == 0:
            return None
        if tag == 1:
            return self.string()
        raise ProtocolError(f"invalid Option tag {tag:#04x}")

    def headers(self) -> List[Header]:
        n = self.length()
        return [(self.string(), self.string()) for _ in range(n)]

    def strings(self) -> List[str]:
        n = self.length()
        return [self.string() for _ in range(n)]

    def value(self, depth: int = 1) -> Any:
        if depth > MAX_VALUE_DEPTH:
            raise ProtocolError(f"value nested deeper than {MAX_VALUE_DEPTH} levels")
        tag = self.varint(_U32_MAX)
        if tag == 0:
            return None
        if tag == 1:
            return self.boolean()
        if tag == 2:
            z = self.varint()
            return (z >> 1) ^ -(z & 1)
        if tag == 3:
            return _F64.unpack(self.take(8))[0]
        if tag == 4:
            return self.string()
        if tag == 5:
            n = self.length()
            return [self.value(depth + 1) for _ in range(n)]
        if tag == 6:
            return self.map(depth + 1)
        raise ProtocolError(f"unknown Value variant {tag}")

    def map(self, depth: int = 1) -> Dict[str, Any]:
        n = self.length()
        out: Dict[str, Any] = {}
        for _ in range(n):
            key = self.string()
            out[key] = self.value(depth)
        return out

    def attributes(self) -> List[Tuple[str, Any]]:
        n = self.length()
        return [(self.string(), self.value()) for _ in range(n)]

    def event_head(self) -> Tuple[int, int, int]:
        return self.varint(), self.varint(_U32_MAX), self.varint()

    def finish(self, msg: Any) -> Any:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} unexpected bytes after the message")
        return msg


def _abort_cause(r: _Reader) -> int:
    cause = r.varint(_U32_MAX)
    if cause >= len(ABORT_CAUSES):
        raise ProtocolError(f"unknown AbortCause variant {cause}")
    return cause


def _decode_event(r: _Reader, index: int) -> Event:
    if index == 2:
        sid, seq, stamp = r.event_head()
        return RequestStart(sid, seq, stamp, r.option_string(), r.headers())
    if index == 3:
        sid, seq, stamp = r.event_head()
        return ResponseHeaders(sid, seq, stamp, r.varint(_U16_MAX), r.headers())
    if index == 4:
        sid, seq, stamp = r.event_head()
        return Chunk(sid, seq, stamp, r.varint(_U32_MAX), r.raw_bytes(), r.boolean(), r.boolean())
    if index == 5:
        sid, seq, stamp = r.event_head()
        return Final(sid, seq, stamp, r.varint(), r.varint(_U32_MAX), r.raw_bytes(), r.headers())
    if index == 6:
        sid, seq, stamp = r.event_head()
        return Abort(sid, seq, stamp, _abort_cause(r), r.string())
    if index == 10:
        sid, seq, stamp = r.event_head()
        call_id = r.varint()
        return AbortedFinal(sid, seq, stamp, call_id, _abort_cause(r), r.string())
    raise ProtocolError(f"unknown ToPlugin variant {index}")


def decode_to_plugin(payload: bytes) -> ToPlugin:
    """Decodes one front-to-plugin payload. A ``Replayed`` must wrap one per-stream event other
    than ``AbortedFinal``."""
    r = _Reader(payload)
    index = r.varint(_U32_MAX)
    if 2 <= index <= 6 or index == AbortedFinal.INDEX:
        return r.finish(_decode_event(r, index))
    if index == 0:
        version = r.varint(_U32_MAX)
        config = r.value()
        budget = r.varint()
        md_max = r.varint()
        caps = r.strings() if version >= 3 else []
        return r.finish(Welcome(version, config, budget, md_max, caps))
    if index == 1:
        code = r.varint(_U32_MAX)
        if code >= len(REFUSE_CODES):
            raise ProtocolError(f"unknown RefuseCode variant {code}")
        return r.finish(Refuse(code, r.string()))
    if index == 7:
        return r.finish(Ping(r.varint()))
    if index == 8:
        return r.finish(Shutdown(r.varint()))
    if index == Reconnect.INDEX:
        return r.finish(Reconnect(r.string()))
    if index == 9:
        inner = r.varint(_U32_MAX)
        if inner == AbortedFinal.INDEX:
            raise ProtocolError("Replayed wraps an AbortedFinal (ToPlugin variant 10), which is "
                                "never replayed")
        if not 2 <= inner <= 6:
            raise ProtocolError(f"Replayed wraps ToPlugin variant {inner}, not a per-stream event")
        return r.finish(Replayed(_decode_event(r, inner)))
    raise ProtocolError(f"unknown ToPlugin variant {index}")


def decode_from_plugin(payload: bytes) -> FromPlugin:
    """Decodes one plugin-to-front payload (what a front, or this SDK's test kit, reads)."""
    r = _Reader(payload)
    index = r.varint(_U32_MAX)
    if index == 0:
        version = r.varint(_U32_MAX)
        name = r.string()
        pid = r.varint(_U32_MAX)
        subs = Subscriptions(*(r.boolean() for _ in range(5)))
        caps = r.strings() if version >= 3 else []
        return r.finish(Hello(version, name, pid, subs, caps))
    if index == 1:
        call_id, stream_id = r.varint(), r.varint()
        tag = r.varint(_U32_MAX)
        if tag == 0:
            return r.finish(FinalReply(call_id, stream_id, metadata=r.map()))
        if tag == 1:
            return r.finish(FinalReply(call_id, stream_id, error=r.string()))
        raise ProtocolError(f"unknown FinalOutcome variant {tag}")
    if index == 2:
        nonce, active = r.varint(), r.varint(_U32_MAX)
        n = r.length()
        stuck = [(r.varint(), r.varint()) for _ in range(n)]
        return r.finish(Pong(nonce, active, stuck))
    if index == 3:
        return r.finish(Ack(r.varint(), r.varint(_U32_MAX)))
    if index == 4:
        return r.finish(Credit(r.varint()))
    if index == Spans.INDEX:
        stream_id = r.varint()
        attributes = r.attributes()
        n = r.length()
        spans = [PluginSpan(r.string(), r.varint(), r.varint(), r.attributes()) for _ in range(n)]
        return r.finish(Spans(stream_id, attributes, spans))
    raise ProtocolError(f"unknown FromPlugin variant {index}")


def counts_for_credit(msg: Any) -> bool:
    """Whether a front-to-plugin message counts against the flow-control window (per-stream
    events, ``AbortedFinal`` included, and ``Replayed`` around one)."""
    return isinstance(msg, EVENT_TYPES) or isinstance(msg, Replayed)
