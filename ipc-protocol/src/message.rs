//! The messages of the protocol, one struct per message, and the two enums that are put on the
//! wire: [`ToPlugin`] (front → plugin) and [`FromPlugin`] (plugin → front).
//!
//! Every per-stream event carries the stream id the front gave the ext_proc stream (`u64`, never
//! reused while the front runs), its sequence number within that stream (`u32`, 0-based, one per
//! event in arrival order: request start, response headers, each chunk, final or abort) and the
//! `CLOCK_MONOTONIC` nanosecond stamp of its arrival at the front (see [`crate::stamp`]).
//!
//! The order of variants and fields is part of the wire format (see `docs/protocol.md`): add new
//! variants at the end, never reorder, and bump [`crate::PROTOCOL_VERSION`] for anything else.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::value::{Metadata, Value};

/// A header as it travels on the wire: lowercase name, value (not necessarily UTF-8 in HTTP, but
/// Envoy hands them to ext_proc as strings or raw bytes; the front converts lossily).
pub type Header = (String, String);

/// The id of one ext_proc stream (one HTTP request through Envoy).
pub type StreamId = u64;

/// Everything the front sends to a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToPlugin {
    /// Handshake accepted; carries the plugin's config.
    Welcome(Welcome),
    /// Handshake refused; the plugin should exit.
    Refuse(Refuse),
    /// A request started (its headers reached the front).
    RequestStart(RequestStart),
    /// The upstream's response headers arrived.
    ResponseHeaders(ResponseHeaders),
    /// A response body chunk arrived.
    Chunk(Chunk),
    /// The response ended; the plugin must answer with [`FromPlugin::FinalReply`].
    Final(Final),
    /// The stream ended without a response end (client gone, upstream error, ...).
    Abort(Abort),
    /// Liveness probe; the plugin answers with [`FromPlugin::Pong`].
    Ping(Ping),
    /// The front is stopping; finish in-flight work within the grace period and exit.
    Shutdown(Shutdown),
    /// A per-stream event (RequestStart, ResponseHeaders, Chunk, Final or Abort) the front
    /// already sent to a process of this plugin that crashed, sent again, unchanged (same stream
    /// id, seq and stamp), so the replacement can rebuild the stream's state. Wrapping anything
    /// else, or another `Replayed`, is a protocol error ([`ToPlugin::into_event`]). Protocol
    /// version 2, appended at the end.
    #[serde(deserialize_with = "deserialize_replayed")]
    Replayed(Box<ToPlugin>),
    /// The stream ended without a response end (the client left, the upstream reset, the front
    /// stopped): the final call of an aborted stream, answered like a [`Final`] with what the
    /// plugin knows. Sent instead of [`Abort`], and only to a plugin that agreed on the
    /// capability `aborted_final` (protocol version 3). Never wrapped in `Replayed`.
    AbortedFinal(AbortedFinal),
    /// Open a new connection to the same socket and say `Hello` again; keep serving this one
    /// (its streams' events, finals and pings) until the front closes it. Sent only to a plugin
    /// that agreed on the capability `reconnect`. Never wrapped in `Replayed`.
    Reconnect(Reconnect),
}

/// `ToPlugin` without `Replayed`, variant for variant: what a `Replayed` may wrap on the wire.
/// Decoding through it rejects a nested `Replayed` as undecodable, so a frame of nested
/// `Replayed` tags cannot recurse the decoder into a stack overflow.
#[derive(Deserialize)]
#[serde(rename = "ToPlugin")]
enum Unreplayed {
    Welcome(Welcome),
    Refuse(Refuse),
    RequestStart(RequestStart),
    ResponseHeaders(ResponseHeaders),
    Chunk(Chunk),
    Final(Final),
    Abort(Abort),
    Ping(Ping),
    Shutdown(Shutdown),
}

fn deserialize_replayed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<ToPlugin>, D::Error> {
    Ok(Box::new(match Unreplayed::deserialize(d)? {
        Unreplayed::Welcome(m) => ToPlugin::Welcome(m),
        Unreplayed::Refuse(m) => ToPlugin::Refuse(m),
        Unreplayed::RequestStart(m) => ToPlugin::RequestStart(m),
        Unreplayed::ResponseHeaders(m) => ToPlugin::ResponseHeaders(m),
        Unreplayed::Chunk(m) => ToPlugin::Chunk(m),
        Unreplayed::Final(m) => ToPlugin::Final(m),
        Unreplayed::Abort(m) => ToPlugin::Abort(m),
        Unreplayed::Ping(m) => ToPlugin::Ping(m),
        Unreplayed::Shutdown(m) => ToPlugin::Shutdown(m),
    }))
}

/// Everything a plugin sends to the front.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromPlugin {
    /// First message on a connection: who the plugin is and what it wants to receive.
    Hello(Hello),
    /// The answer to a [`Final`].
    FinalReply(FinalReply),
    /// The answer to a [`Ping`].
    Pong(Pong),
    /// Acknowledges an event sent with `ack = true` (inline dispatch) after it has run.
    Ack(Ack),
    /// Flow control: event bytes the plugin has finished with, so the front may send more
    /// (protocol version 2).
    Credit(Credit),
    /// What the plugin adds to a stream's trace, sent just before the stream's `FinalReply`
    /// (capability `trace`).
    Spans(Spans),
}

/// Which events a plugin wants. `Final` is always sent; the rest are opt-in so that a plugin that
/// only needs the request start does not pay for every chunk on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscriptions {
    /// Receive [`RequestStart`].
    pub request_start: bool,
    /// Receive [`ResponseHeaders`].
    pub response_headers: bool,
    /// Receive a [`Chunk`] per response body message.
    pub chunks: bool,
    /// Chunks (and the final) carry the body bytes; without it they carry only their length.
    pub body_bytes: bool,
    /// Receive [`Abort`] when a stream ends without a response end.
    pub abort: bool,
}

impl Subscriptions {
    /// Every event, with body bytes.
    pub const ALL: Subscriptions = Subscriptions {
        request_start: true,
        response_headers: true,
        chunks: true,
        body_bytes: true,
        abort: true,
    };
}

/// Plugin → front, first frame on a connection.
///
/// On the wire its last field, `capabilities`, exists only when `protocol_version` is 3 or more:
/// a version 2 `Hello` ends after `subscriptions` (see [`crate::handshake`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    /// The protocol version the plugin speaks ([`crate::PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// The configured plugin name this process serves (e.g. `usage`).
    pub plugin: String,
    /// The plugin's process id as it sees it (checked against `SO_PEERCRED`).
    pub pid: u32,
    /// What the plugin wants to receive.
    pub subscriptions: Subscriptions,
    /// The optional parts of the protocol the plugin understands (version 3 on; empty for a
    /// version 2 plugin): names from [`crate::handshake::capability`], unknown ones ignored.
    pub capabilities: Vec<String>,
}

/// Front → plugin: the handshake is accepted.
///
/// On the wire its last field, `capabilities`, exists only when `protocol_version` is 3 or more.
#[derive(Debug, Clone, PartialEq)]
pub struct Welcome {
    /// The protocol version both sides will speak.
    pub protocol_version: u32,
    /// The plugin's `config` table from the front's configuration, as a [`Value::Map`].
    pub config: Value,
    /// The plugin's flow-control window: the front never has more than this many event bytes
    /// sent and not yet credited back (one event is always allowed when none is in flight).
    pub budget_bytes: u64,
    /// The largest encoded metadata one final reply may carry; a larger one is replaced by an
    /// error reply in the plugin.
    pub metadata_max_bytes: u64,
    /// The capabilities the front will use with this plugin: those of the `Hello`'s that this
    /// front knows (version 3 on; empty at version 2). The front never sends what a capability
    /// it did not list here would allow.
    pub capabilities: Vec<String>,
}

/// The first version whose `Hello` and `Welcome` end with `capabilities`.
const CAPABILITIES_SINCE: u32 = 3;

/// Serializes a handshake message: `head` fields, then `capabilities` only from
/// [`CAPABILITIES_SINCE`] on. bincode writes a struct as its fields one after another, so the
/// version-2 layout is the version-3 one without its last field.
macro_rules! versioned_serde {
    ($ty:ident, $name:literal, [$($field:ident),+]) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeTuple;
                let with_caps = self.protocol_version >= CAPABILITIES_SINCE;
                let fields = [$(stringify!($field)),+].len() + usize::from(with_caps);
                let mut t = s.serialize_tuple(fields)?;
                $(t.serialize_element(&self.$field)?;)+
                if with_caps {
                    t.serialize_element(&self.capabilities)?;
                }
                t.end()
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str($name)
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<$ty, A::Error> {
                        let mut field = 0;
                        $(
                            let $field = seq
                                .next_element()?
                                .ok_or_else(|| serde::de::Error::invalid_length(field, &self))?;
                            field += 1;
                        )+
                        let mut value = $ty { $($field,)+ capabilities: Vec::new() };
                        if value.protocol_version >= CAPABILITIES_SINCE {
                            value.capabilities = seq
                                .next_element()?
                                .ok_or_else(|| serde::de::Error::invalid_length(field, &self))?;
                        }
                        Ok(value)
                    }
                }
                // The length is the longest layout's; bincode reads only the elements asked for.
                d.deserialize_tuple([$(stringify!($field)),+].len() + 1, V)
            }
        }
    };
}

versioned_serde!(
    Hello,
    "a Hello",
    [protocol_version, plugin, pid, subscriptions]
);
versioned_serde!(
    Welcome,
    "a Welcome",
    [protocol_version, config, budget_bytes, metadata_max_bytes]
);

/// Why the front refused a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    /// The plugin's protocol version is not supported.
    UnsupportedVersion,
    /// No plugin of that name is configured on this socket.
    UnknownPlugin,
    /// Another process already serves this plugin.
    AlreadyConnected,
    /// The plugin's config is invalid (refused by the plugin's own validation).
    BadConfig,
    /// The peer is not allowed (wrong uid, or not the process the front spawned).
    NotAllowed,
    /// The handshake itself was malformed (first frame not a `Hello`, ...).
    BadHandshake,
}

/// Front → plugin: the handshake is refused. The connection is closed after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refuse {
    /// The machine-readable reason.
    pub code: RefuseCode,
    /// The human-readable reason, naming what to change.
    pub reason: String,
}

/// A request's headers reached the front: the first event of every stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestStart {
    /// The stream this event belongs to.
    pub stream_id: StreamId,
    /// Sequence number within the stream (0 for a stream's first event).
    pub seq: u32,
    /// Arrival at the front, `CLOCK_MONOTONIC` nanoseconds.
    pub stamp_ns: u64,
    /// The `x-request-id` header, if any. An attribute, never a key: it may repeat across streams.
    pub request_id: Option<String>,
    /// Selected request headers (pseudo-headers such as `:path` included).
    pub headers: Vec<Header>,
}

/// The response headers arrived from the upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseHeaders {
    /// The stream this event belongs to.
    pub stream_id: StreamId,
    /// Sequence number within the stream.
    pub seq: u32,
    /// Arrival at the front, `CLOCK_MONOTONIC` nanoseconds.
    pub stamp_ns: u64,
    /// HTTP status code (0 if Envoy sent none).
    pub status: u16,
    /// Selected response headers.
    pub headers: Vec<Header>,
}

/// A response body chunk (one ext_proc body message; not necessarily one token or SSE event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The stream this event belongs to.
    pub stream_id: StreamId,
    /// Sequence number within the stream.
    pub seq: u32,
    /// Arrival at the front, `CLOCK_MONOTONIC` nanoseconds.
    pub stamp_ns: u64,
    /// Length of the chunk as it passed through Envoy, whether or not `bytes` carries it.
    pub len: u32,
    /// The chunk's bytes, empty unless the plugin subscribed to body bytes.
    #[serde(with = "crate::codec::shared_body")]
    pub bytes: Bytes,
    /// Whether Envoy marked this chunk as the end of the body.
    pub end_of_stream: bool,
    /// Inline dispatch: the front waits for an [`Ack`] before it answers Envoy.
    pub ack: bool,
}

/// The response ended: answer with a [`FinalReply`] carrying the same `call_id`, after every
/// earlier event of the stream has run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Final {
    /// The stream this event belongs to.
    pub stream_id: StreamId,
    /// Sequence number within the stream.
    pub seq: u32,
    /// Arrival at the front, `CLOCK_MONOTONIC` nanoseconds.
    pub stamp_ns: u64,
    /// Identifies this call; echoed in the reply.
    pub call_id: u64,
    /// Length of the last body message (often 0: HTTP/1.1 upstreams end with an empty message).
    pub len: u32,
    /// The last body bytes, empty unless the plugin subscribed to body bytes.
    #[serde(with = "crate::codec::shared_body")]
    pub bytes: Bytes,
    /// Response trailers, when the end came as trailers.
    pub trailers: Vec<Header>,
}

/// Why a stream ended without a response end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortCause {
    /// The client (or Envoy on its behalf) reset the stream.
    ClientDisconnect,
    /// The upstream failed (reset, connect error, ...).
    UpstreamError,
    /// The stream outlived a deadline.
    Timeout,
    /// The front is shutting down.
    Shutdown,
}

/// The stream ended without a response end; free its state and report what is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Abort {
    /// The stream this event belongs to.
    pub stream_id: StreamId,
    /// Sequence number within the stream.
    pub seq: u32,
    /// When the front noticed the end, `CLOCK_MONOTONIC` nanoseconds.
    pub stamp_ns: u64,
    /// The cause.
    pub cause: AbortCause,
    /// Free-form detail (the gRPC status, ...), for logs.
    pub detail: String,
}

/// The final call of a stream that ended without a response end: answer with a [`FinalReply`]
/// carrying the same `call_id`, after every earlier event of the stream has run, with what the
/// plugin knows (partial or estimated figures, said so).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbortedFinal {
    /// The stream this event belongs to.
    pub stream_id: StreamId,
    /// Sequence number within the stream.
    pub seq: u32,
    /// When the front noticed the end, `CLOCK_MONOTONIC` nanoseconds.
    pub stamp_ns: u64,
    /// Identifies this call; echoed in the reply.
    pub call_id: u64,
    /// Why the stream ended.
    pub cause: AbortCause,
    /// Free-form detail (the gRPC status, ...), for logs.
    pub detail: String,
}

impl AbortedFinal {
    /// The same end as an [`Abort`], for a plugin that handles both alike.
    pub fn as_abort(&self) -> Abort {
        Abort {
            stream_id: self.stream_id,
            seq: self.seq,
            stamp_ns: self.stamp_ns,
            cause: self.cause,
            detail: self.detail.clone(),
        }
    }
}

impl AbortCause {
    /// The cause's name in metadata and records: `client_disconnect`, `upstream_error`,
    /// `timeout`, `shutdown`.
    pub fn as_str(self) -> &'static str {
        match self {
            AbortCause::ClientDisconnect => "client_disconnect",
            AbortCause::UpstreamError => "upstream_error",
            AbortCause::Timeout => "timeout",
            AbortCause::Shutdown => "shutdown",
        }
    }
}

/// Liveness probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Echoed in the [`Pong`].
    pub nonce: u64,
}

/// Stop: finish in-flight streams for up to `grace_ms`, then exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    /// How long the plugin may take to finish in-flight streams, in milliseconds.
    pub grace_ms: u64,
}

/// Front → plugin: open a second connection (capability `reconnect`).
///
/// The plugin connects to the socket it is connected to now (by its path: after a front upgrade
/// the path belongs to the new front), says `Hello` as it did at start, and serves the new
/// connection with the config of its `Welcome` (a plugin instance of its own; the old
/// connection's streams stay with the old one). The old connection takes no new stream once the
/// new one is welcomed; its end-of-file then ends only that connection, not the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconnect {
    /// Why, for the plugin's log: `config changed`, `front upgrade to pid 4242`, ...
    pub reason: String,
}

/// The result of a final call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FinalOutcome {
    /// The plugin's metadata for the stream.
    Metadata(Metadata),
    /// The plugin failed on this stream (a panic in a hook, ...); the message says why.
    Error(String),
}

/// Plugin → front: the answer to a [`Final`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalReply {
    /// The `call_id` of the [`Final`] this answers.
    pub call_id: u64,
    /// The stream the call was about.
    pub stream_id: StreamId,
    /// Metadata or an error.
    pub outcome: FinalOutcome,
}

/// Plugin → front: what a plugin adds to one stream's trace (capability `trace`).
///
/// Sent at most once per stream, just before its `FinalReply` on the same connection. The
/// front puts `attributes` on the plugin's span for the final call and exports `spans` as
/// children of the stream's request span (whose context the `traceparent` header of the
/// stream's `RequestStart` carries); sent for a stream with no final call waiting, or with the
/// front's tracing off, it is dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spans {
    /// The stream the spans belong to.
    pub stream_id: StreamId,
    /// Attributes for the plugin's final-call span, in order (a later key replaces an earlier).
    pub attributes: Vec<(String, Value)>,
    /// Spans the plugin recorded while it handled the stream.
    pub spans: Vec<PluginSpan>,
}

/// One span a plugin recorded (see [`Spans`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginSpan {
    /// The span's name.
    pub name: String,
    /// Its start, `CLOCK_MONOTONIC` nanoseconds (the clock of the events' `stamp_ns`).
    pub start_ns: u64,
    /// Its end, `CLOCK_MONOTONIC` nanoseconds, not before `start_ns`.
    pub end_ns: u64,
    /// Its attributes, in order.
    pub attributes: Vec<(String, Value)>,
}

/// A stream whose lane has been running one event for longer than the plugin's stuck limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StuckLane {
    /// The stream.
    pub stream_id: StreamId,
    /// How long its current event has been running, in milliseconds.
    pub running_ms: u64,
}

/// Plugin → front: the answer to a [`Ping`], sent by the plugin's reader (not by a lane), so a
/// busy plugin still answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The nonce of the [`Ping`].
    pub nonce: u64,
    /// Streams the plugin currently holds state for.
    pub active_streams: u32,
    /// Lanes stuck in one event for longer than the plugin's limit.
    pub stuck: Vec<StuckLane>,
}

/// Plugin → front: an event sent with `ack = true` has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The stream of the acknowledged event.
    pub stream_id: StreamId,
    /// Its sequence number.
    pub seq: u32,
}

/// Plugin → front: flow-control credit.
///
/// `consumed` is the cumulative count, since the connection's `Welcome`, of the bytes of
/// per-stream events (RequestStart, ResponseHeaders, Chunk, Final, Abort) the plugin has finished
/// with: run, dropped, or thrown away with an evicted stream. An event's bytes are its whole
/// frame, length prefix included ([`ToPlugin::flow_bytes`]). The front keeps
/// `written - consumed` at or below the `Welcome`'s `budget_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// Event bytes finished with since the handshake (never decreases).
    pub consumed: u64,
}

/// The value of the first header called `name` (compared ignoring ASCII case).
pub fn find_header<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl ResponseHeaders {
    /// The value of the response header `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

impl ToPlugin {
    /// The stream id and sequence number of a per-stream event (replayed or live), `None` for
    /// connection messages and for an invalid `Replayed`.
    pub fn stream_seq(&self) -> Option<(StreamId, u32)> {
        match self {
            ToPlugin::RequestStart(e) => Some((e.stream_id, e.seq)),
            ToPlugin::ResponseHeaders(e) => Some((e.stream_id, e.seq)),
            ToPlugin::Chunk(e) => Some((e.stream_id, e.seq)),
            ToPlugin::Final(e) => Some((e.stream_id, e.seq)),
            ToPlugin::Abort(e) => Some((e.stream_id, e.seq)),
            ToPlugin::AbortedFinal(e) => Some((e.stream_id, e.seq)),
            ToPlugin::Replayed(inner) if inner.is_live_event() => inner.stream_seq(),
            ToPlugin::Welcome(_)
            | ToPlugin::Refuse(_)
            | ToPlugin::Ping(_)
            | ToPlugin::Shutdown(_)
            | ToPlugin::Reconnect(_)
            | ToPlugin::Replayed(_) => None,
        }
    }

    /// The call id and stream of a final call (`Final` or `AbortedFinal`), replayed or not.
    pub fn final_call(&self) -> Option<(u64, StreamId)> {
        match self {
            ToPlugin::Final(f) => Some((f.call_id, f.stream_id)),
            ToPlugin::AbortedFinal(f) => Some((f.call_id, f.stream_id)),
            ToPlugin::Replayed(inner) => inner.final_call(),
            _ => None,
        }
    }

    /// Whether this is a per-stream event that `Replayed` may wrap, sent live (`AbortedFinal`,
    /// never replayed, is not one).
    pub fn is_live_event(&self) -> bool {
        matches!(
            self,
            ToPlugin::RequestStart(_)
                | ToPlugin::ResponseHeaders(_)
                | ToPlugin::Chunk(_)
                | ToPlugin::Final(_)
                | ToPlugin::Abort(_)
        )
    }

    /// Wraps a per-stream event for replay; anything else is returned unchanged in `Err`.
    pub fn replayed(self) -> Result<ToPlugin, ToPlugin> {
        if self.is_live_event() {
            Ok(ToPlugin::Replayed(Box::new(self)))
        } else {
            Err(self)
        }
    }

    /// Unwraps a `Replayed`: the per-stream event inside and `true`; any other message comes back
    /// as it is with `false`. A `Replayed` around a connection message or another `Replayed` is
    /// [`ProtocolError::BadReplay`], an error for the connection.
    pub fn into_event(self) -> Result<(ToPlugin, bool), ProtocolError> {
        match self {
            ToPlugin::Replayed(inner) if inner.is_live_event() => Ok((*inner, true)),
            ToPlugin::Replayed(inner) => Err(ProtocolError::BadReplay {
                inner: inner.kind(),
            }),
            other => Ok((other, false)),
        }
    }

    /// Whether this message counts against the flow-control window: the per-stream events do,
    /// replayed ones included (by their whole `Replayed` frame); connection messages (Welcome,
    /// Refuse, Ping, Shutdown) never do.
    pub fn counts_for_credit(&self) -> bool {
        self.stream_seq().is_some()
    }

    /// The bytes this message counts against the window when its frame is `frame_len` bytes long
    /// (prefix included): `frame_len` for per-stream events, 0 for connection messages.
    pub fn flow_bytes(&self, frame_len: usize) -> u64 {
        if self.counts_for_credit() {
            frame_len as u64
        } else {
            0
        }
    }

    /// The message's name as the docs and logs use it.
    pub fn kind(&self) -> &'static str {
        match self {
            ToPlugin::Welcome(_) => "Welcome",
            ToPlugin::Refuse(_) => "Refuse",
            ToPlugin::RequestStart(_) => "RequestStart",
            ToPlugin::ResponseHeaders(_) => "ResponseHeaders",
            ToPlugin::Chunk(_) => "Chunk",
            ToPlugin::Final(_) => "Final",
            ToPlugin::Abort(_) => "Abort",
            ToPlugin::Ping(_) => "Ping",
            ToPlugin::Shutdown(_) => "Shutdown",
            ToPlugin::Replayed(_) => "Replayed",
            ToPlugin::AbortedFinal(_) => "AbortedFinal",
            ToPlugin::Reconnect(_) => "Reconnect",
        }
    }
}

impl FromPlugin {
    /// The message's name as the docs and logs use it.
    pub fn kind(&self) -> &'static str {
        match self {
            FromPlugin::Hello(_) => "Hello",
            FromPlugin::FinalReply(_) => "FinalReply",
            FromPlugin::Pong(_) => "Pong",
            FromPlugin::Ack(_) => "Ack",
            FromPlugin::Credit(_) => "Credit",
            FromPlugin::Spans(_) => "Spans",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_found_ignoring_ascii_case() {
        let e = ResponseHeaders {
            stream_id: 1,
            seq: 1,
            stamp_ns: 0,
            status: 200,
            headers: vec![
                ("Content-Type".into(), "text/event-stream".into()),
                ("content-type".into(), "ignored: not the first".into()),
            ],
        };
        assert_eq!(e.header("content-type"), Some("text/event-stream"));
        assert_eq!(e.header("CONTENT-TYPE"), Some("text/event-stream"));
        assert_eq!(e.header("x-missing"), None);
    }

    fn chunk() -> ToPlugin {
        ToPlugin::Chunk(Chunk {
            stream_id: 9,
            seq: 3,
            stamp_ns: 77,
            len: 2,
            bytes: Bytes::from_static(b"hi"),
            end_of_stream: false,
            ack: false,
        })
    }

    #[test]
    fn a_replayed_event_keeps_its_stream_seq_and_counts_for_credit() {
        let replayed = chunk().replayed().unwrap();
        assert_eq!(replayed.kind(), "Replayed");
        assert_eq!(replayed.stream_seq(), Some((9, 3)));
        assert!(replayed.counts_for_credit());
        assert_eq!(replayed.flow_bytes(40), 40);
        assert_eq!(replayed.into_event().unwrap(), (chunk(), true));
        assert_eq!(chunk().into_event().unwrap(), (chunk(), false));
    }

    #[test]
    fn a_replayed_connection_message_or_nested_replay_is_a_protocol_error() {
        let ping = ToPlugin::Ping(Ping { nonce: 1 });
        assert!(ping.clone().replayed().is_err());
        let bad = [
            ToPlugin::Replayed(Box::new(ping)),
            ToPlugin::Replayed(Box::new(chunk().replayed().unwrap())),
            ToPlugin::Replayed(Box::new(ToPlugin::Shutdown(Shutdown { grace_ms: 1 }))),
        ];
        for msg in bad {
            assert_eq!(msg.stream_seq(), None);
            assert!(!msg.counts_for_credit());
            match msg.into_event() {
                Err(ProtocolError::BadReplay { .. }) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn nested_replayed_tags_do_not_decode() {
        let nested = ToPlugin::Replayed(Box::new(chunk().replayed().unwrap()));
        let bytes = crate::codec::encode(&nested).unwrap();
        assert!(crate::codec::decode::<ToPlugin>(&bytes).is_err());
        // A frame full of Replayed tags is refused at the second one, not by a stack overflow.
        assert!(crate::codec::decode::<ToPlugin>(&[9u8; 1 << 20]).is_err());
        let once = crate::codec::encode(&chunk().replayed().unwrap()).unwrap();
        assert_eq!(
            crate::codec::decode::<ToPlugin>(&once).unwrap(),
            chunk().replayed().unwrap()
        );
    }
}
