//! A test kit for plugins: build a stream's events without writing out every field, and play
//! them through your plugin exactly as the host would, without a front, a socket or a process.
//!
//! - [`Stream`] builds one ext_proc stream: request start, response headers, body chunks (given
//!   one by one, or a recorded body cut with a [`Split`]: every N bytes, at given offsets, one
//!   SSE event per chunk), then a final or an abort. Stamps advance by a fixed step unless set
//!   ([`Stream::at`], [`Stream::step`]). It can also replay its first events
//!   ([`Stream::replayed`], as after a plugin restart), lose events to a full queue
//!   ([`Stream::drop_seqs`], the gaps the front makes) or lose its start
//!   ([`Stream::lose_start`], a partial stream).
//! - [`Player`] runs your [`Plugin`] on the host's own lanes (the code `plugvisor` plugins run
//!   on in production): events are numbered and filtered by the plugin's
//!   [`Plugin::subscriptions`] as the front does, body bytes are left out unless it subscribed to
//!   them, hooks run in sequence order with `ctx.gap`, `ctx.partial` and
//!   [`crate::EventCtx::is_replayed`] set by the host, a panic fails the stream alone, and the final
//!   metadata comes back with what the host adds (`gaps`, `partial` in the plugin's namespace).
//!
//! ```
//! use plugin_runner::testing::{Player, Split, Stream};
//! use plugin_runner::{Chunk, EventCtx, Final, Metadata, Plugin, Value};
//!
//! /// Counts body bytes.
//! struct Bytes;
//!
//! impl Plugin for Bytes {
//!     type Stream = u64;
//!     fn name(&self) -> &str { "bytes" }
//!     fn on_chunk(&self, n: &mut u64, _: &EventCtx, c: &Chunk) { *n += u64::from(c.len) }
//!     fn on_final(&self, n: &mut u64, _: &EventCtx, f: &Final) -> Metadata {
//!         let total = Value::from(*n + u64::from(f.len));
//!         Metadata::from([("plugvisor.bytes".to_owned(), Value::map([("total", total)]))])
//!     }
//! }
//!
//! let player = Player::new(Bytes);
//! let body = "data: {\"a\":1}\n\ndata: [DONE]\n\n";
//! let stream = Stream::new(1)
//!     .request(&[(":path", "/v1/chat/completions")])
//!     .response(200, &[("content-type", "text/event-stream")])
//!     .body(body, Split::SseEvents)
//!     .final_(b"");
//! let played = player.play(&stream);
//! assert_eq!(played.own().get("total"), Some(&Value::from(29u64)));
//!
//! // The front dropped the second chunk (seq 3): the host reports the gap.
//! let played = player.play(&stream.clone().drop_seqs([3]));
//! assert_eq!(played.own().get("total"), Some(&Value::from(15u64)));
//! assert_eq!(played.own().get("gaps"), Some(&Value::from(1u64)));
//! ```
//!
//! What the player does not do: the `--as` renaming of the namespace and the cap on the encoded
//! metadata size (`metadata_max_bytes`) happen on the host's socket side, and overload drops are
//! only those you ask for with [`Stream::drop_seqs`] (the player's lanes never fill up).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipc_protocol::{
    Abort, AbortCause, AbortedFinal, Chunk, Final, FinalOutcome, FromPlugin, Header, Metadata,
    RequestStart, ResponseHeaders, Spans, StreamId, Subscriptions, ToPlugin, Value,
};

use crate::config::ConfigError;
use crate::credit::Credits;
use crate::lanes::{LaneConfig, Lanes, Outbox};
use crate::plugin::Plugin;

/// The stamp of a [`Stream`]'s first event unless [`Stream::at`] says otherwise: one second on
/// the monotonic clock.
pub const START_NS: u64 = 1_000_000_000;

/// How far apart a [`Stream`]'s events are stamped unless [`Stream::step`] says otherwise: 1 ms.
pub const STEP_NS: u64 = 1_000_000;

/// The longest [`Player::play`] waits for the plugin to finish a stream before it panics (a hook
/// that never returns).
pub const PLAY_TIMEOUT: Duration = Duration::from_secs(60);

/// How a recorded body is cut into chunks ([`Stream::body`]). Envoy cuts and merges the
/// upstream's writes freely, so a plugin must give the same answer for every split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// The whole body in one chunk (one chunk even when the body is empty).
    Whole,
    /// Chunks of `n` bytes, the last one shorter (no chunk for an empty body). `n` must be > 0.
    Every(usize),
    /// Cut at these byte offsets, given in increasing order and at most the body's length:
    /// `At(vec![3, 7])` makes `[0..3]`, `[3..7]`, `[7..]`. A cut at 0 or at the end makes an
    /// empty chunk there, as Envoy may send one.
    At(Vec<usize>),
    /// One server-sent event per chunk: a cut after each blank line (`\n\n`, `\r\n\r\n`); bytes
    /// after the last blank line are a last chunk.
    SseEvents,
}

impl Split {
    /// The chunks `body` is cut into.
    ///
    /// ```
    /// use plugin_runner::testing::Split;
    ///
    /// assert_eq!(Split::Every(4).apply(b"abcdefghij"), [&b"abcd"[..], b"efgh", b"ij"]);
    /// assert_eq!(Split::At(vec![0, 3]).apply(b"abcdef"), [&b""[..], b"abc", b"def"]);
    /// assert_eq!(
    ///     Split::SseEvents.apply(b"data: 1\n\nevent: e\r\ndata: 2\r\n\r\ndata: 3"),
    ///     [&b"data: 1\n\n"[..], b"event: e\r\ndata: 2\r\n\r\n", b"data: 3"]
    /// );
    /// ```
    ///
    /// # Panics
    /// On `Every(0)`, and on `At` offsets that decrease or pass the end of `body`.
    pub fn apply<'a>(&self, body: &'a [u8]) -> Vec<&'a [u8]> {
        match self {
            Split::Whole => vec![body],
            Split::Every(n) => {
                assert!(*n > 0, "Split::Every(0): a chunk size must be at least 1");
                body.chunks(*n).collect()
            }
            Split::At(offsets) => {
                let mut chunks = Vec::with_capacity(offsets.len() + 1);
                let mut from = 0;
                for &at in offsets {
                    assert!(
                        at >= from && at <= body.len(),
                        "Split::At({offsets:?}): offsets must increase and stay within the \
                         body's {} bytes",
                        body.len()
                    );
                    chunks.push(&body[from..at]);
                    from = at;
                }
                chunks.push(&body[from..]);
                chunks
            }
            Split::SseEvents => {
                let mut chunks = Vec::new();
                let (mut from, mut line_start) = (0, 0);
                for (i, &b) in body.iter().enumerate() {
                    if b != b'\n' {
                        continue;
                    }
                    let line = &body[line_start..i];
                    if line.is_empty() || line == b"\r" {
                        chunks.push(&body[from..=i]);
                        from = i + 1;
                    }
                    line_start = i + 1;
                }
                if from < body.len() {
                    chunks.push(&body[from..]);
                }
                chunks
            }
        }
    }
}

/// One event of a [`Stream`], before the front numbers it for a plugin.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    RequestStart {
        request_id: Option<String>,
        headers: Vec<Header>,
    },
    ResponseHeaders {
        status: u16,
        headers: Vec<Header>,
    },
    Chunk(Bytes),
    Final {
        bytes: Bytes,
        trailers: Vec<Header>,
    },
    Abort(AbortCause),
    AbortedFinal(AbortCause),
}

impl Event {
    fn sent_to(&self, subs: &Subscriptions) -> bool {
        match self {
            Event::RequestStart { .. } => subs.request_start,
            Event::ResponseHeaders { .. } => subs.response_headers,
            Event::Chunk(_) => subs.chunks,
            Event::Final { .. } | Event::AbortedFinal(_) => true,
            Event::Abort(_) => subs.abort,
        }
    }

    fn ends(&self) -> bool {
        matches!(
            self,
            Event::Final { .. } | Event::Abort(_) | Event::AbortedFinal(_)
        )
    }
}

fn headers(pairs: &[(&str, &str)]) -> Vec<Header> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
        .collect()
}

/// One ext_proc stream as the front sees it, built event by event; play it with [`Player::play`]
/// or turn it into the front's messages with [`Stream::messages`].
///
/// Events are stamped [`START_NS`], then [`STEP_NS`] apart, unless [`Stream::at`] and
/// [`Stream::step`] say otherwise. A stream ends with [`Stream::final_`] or [`Stream::abort`];
/// adding an event after its end panics.
///
/// ```
/// use plugin_runner::testing::{Split, Stream};
/// use plugin_runner::protocol::{Subscriptions, ToPlugin};
///
/// let stream = Stream::new(7)
///     .request(&[("x-request-id", "req-7")])
///     .response(200, &[("content-type", "application/json")])
///     .at(2_000_000_000) // the body starts a second later...
///     .step(10_000_000) // ...and comes in 10 ms apart
///     .body(r#"{"usage":{}}"#, Split::Every(5))
///     .final_(b"");
/// let messages = stream.messages(&Subscriptions::ALL);
/// assert_eq!(messages.len(), 2 + 3 + 1);
/// let ToPlugin::RequestStart(start) = &messages[0] else { panic!() };
/// assert_eq!(start.request_id.as_deref(), Some("req-7"));
/// let ToPlugin::Final(last) = &messages[5] else { panic!() };
/// assert_eq!((last.seq, last.stamp_ns, last.call_id), (5, 2_030_000_000, 7));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    id: StreamId,
    events: Vec<(u64, Event)>,
    next_ns: u64,
    step_ns: u64,
    replayed: usize,
    dropped: BTreeSet<u32>,
    lose_start: u32,
}

impl Stream {
    /// An empty stream with the front's id `id` (also the `call_id` of its final).
    pub fn new(id: StreamId) -> Stream {
        Stream {
            id,
            events: Vec::new(),
            next_ns: START_NS,
            step_ns: STEP_NS,
            replayed: 0,
            dropped: BTreeSet::new(),
            lose_start: 0,
        }
    }

    /// The stream's id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    fn push(mut self, event: Event) -> Stream {
        if let Some((_, last)) = self.events.last() {
            assert!(
                !last.ends(),
                "stream {}: no event can follow its final or abort",
                self.id
            );
        }
        self.events.push((self.next_ns, event));
        self.next_ns += self.step_ns;
        self
    }

    /// The request started with these headers (names are lowercased, as the front sends them);
    /// an `x-request-id` header also becomes [`RequestStart::request_id`].
    pub fn request(self, headers: &[(&str, &str)]) -> Stream {
        let headers = self::headers(headers);
        let request_id = ipc_protocol::find_header(&headers, "x-request-id").map(str::to_owned);
        self.push(Event::RequestStart {
            request_id,
            headers,
        })
    }

    /// The upstream answered with `status` and these headers.
    pub fn response(self, status: u16, headers: &[(&str, &str)]) -> Stream {
        self.push(Event::ResponseHeaders {
            status,
            headers: self::headers(headers),
        })
    }

    /// One body chunk.
    pub fn chunk(self, bytes: impl AsRef<[u8]>) -> Stream {
        self.push(Event::Chunk(Bytes::copy_from_slice(bytes.as_ref())))
    }

    /// Body chunks, one event each.
    pub fn chunks<I>(self, chunks: I) -> Stream
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        chunks.into_iter().fold(self, Stream::chunk)
    }

    /// A recorded body, cut into chunks by `split`.
    pub fn body(self, body: impl AsRef<[u8]>, split: Split) -> Stream {
        let body = body.as_ref();
        let chunks = split.apply(body);
        self.chunks(chunks)
    }

    /// A recorded body read from the file at `path` (an SSE capture, a JSON body), cut into
    /// chunks by `split`.
    ///
    /// # Panics
    /// When the file cannot be read; the message names it.
    pub fn body_file(self, path: impl AsRef<Path>, split: Split) -> Stream {
        let path = path.as_ref();
        let body = std::fs::read(path)
            .unwrap_or_else(|e| panic!("cannot read the body file {}: {e}", path.display()));
        self.body(body, split)
    }

    /// The response ended; `last` is the last body message (often empty), which the final
    /// carries.
    pub fn final_(self, last: impl AsRef<[u8]>) -> Stream {
        self.final_with_trailers(last, &[])
    }

    /// The response ended with trailers.
    pub fn final_with_trailers(self, last: impl AsRef<[u8]>, trailers: &[(&str, &str)]) -> Stream {
        self.push(Event::Final {
            bytes: Bytes::copy_from_slice(last.as_ref()),
            trailers: headers(trailers),
        })
    }

    /// The stream ended without a response end.
    pub fn abort(self, cause: AbortCause) -> Stream {
        self.push(Event::Abort(cause))
    }

    /// The stream ended without a response end, and the front asks for its final anyway
    /// (`AbortedFinal`, capability `aborted_final`): played, it answers with what the plugin
    /// knows ([`Plugin::on_aborted_final`](crate::Plugin::on_aborted_final)).
    pub fn aborted_final(self, cause: AbortCause) -> Stream {
        self.push(Event::AbortedFinal(cause))
    }

    /// Stamps the next event `stamp_ns`; the ones after it follow at the step.
    pub fn at(mut self, stamp_ns: u64) -> Stream {
        self.next_ns = stamp_ns;
        self
    }

    /// The time between the events added from now on.
    pub fn step(mut self, step_ns: u64) -> Stream {
        self.step_ns = step_ns;
        self
    }

    /// The first `n` events the plugin gets are replays: what the front resends to a restarted
    /// plugin (always from the stream's first event) before the live ones.
    pub fn replayed(mut self, n: usize) -> Stream {
        self.replayed = n;
        self
    }

    /// The front dropped the events numbered `seqs` for this plugin (its queue was full): they
    /// are not sent, and the next event sent carries the gap. Numbers count only the events the
    /// plugin subscribed to, as the front numbers them. The front never drops a final or abort.
    pub fn drop_seqs(mut self, seqs: impl IntoIterator<Item = u32>) -> Stream {
        self.dropped.extend(seqs);
        self
    }

    /// The plugin first hears of the stream at event number `seq` (it was restarted mid-stream
    /// and nothing was replayed): the events before are not sent, and the stream is partial.
    pub fn lose_start(mut self, seq: u32) -> Stream {
        self.lose_start = seq;
        self
    }

    /// The messages the front would send a plugin with subscriptions `subs` for this stream, in
    /// order: numbered over the subscribed kinds, body bytes left out without `body_bytes`,
    /// dropped and lost events left out (their numbers used up), the first
    /// [`Stream::replayed`] ones wrapped in [`ToPlugin::Replayed`].
    ///
    /// # Panics
    /// When a final or abort is to be dropped or lost: the front never drops those.
    pub fn messages(&self, subs: &Subscriptions) -> Vec<ToPlugin> {
        let (stream_id, mut seq, mut out) = (self.id, 0u32, Vec::new());
        let body = |b: &Bytes| {
            if subs.body_bytes {
                b.clone()
            } else {
                Bytes::new()
            }
        };
        for (stamp_ns, event) in &self.events {
            if !event.sent_to(subs) {
                continue;
            }
            let msg = match event {
                Event::RequestStart {
                    request_id,
                    headers,
                } => ToPlugin::RequestStart(RequestStart {
                    stream_id,
                    seq,
                    stamp_ns: *stamp_ns,
                    request_id: request_id.clone(),
                    headers: headers.clone(),
                }),
                Event::ResponseHeaders { status, headers } => {
                    ToPlugin::ResponseHeaders(ResponseHeaders {
                        stream_id,
                        seq,
                        stamp_ns: *stamp_ns,
                        status: *status,
                        headers: headers.clone(),
                    })
                }
                Event::Chunk(bytes) => ToPlugin::Chunk(Chunk {
                    stream_id,
                    seq,
                    stamp_ns: *stamp_ns,
                    len: len32(bytes),
                    bytes: body(bytes),
                    end_of_stream: false,
                    ack: false,
                }),
                Event::Final { bytes, trailers } => ToPlugin::Final(Final {
                    stream_id,
                    seq,
                    stamp_ns: *stamp_ns,
                    call_id: stream_id,
                    len: len32(bytes),
                    bytes: body(bytes),
                    trailers: trailers.clone(),
                }),
                Event::AbortedFinal(cause) => ToPlugin::AbortedFinal(AbortedFinal {
                    stream_id,
                    seq,
                    stamp_ns: *stamp_ns,
                    call_id: stream_id,
                    cause: *cause,
                    detail: String::new(),
                }),
                Event::Abort(cause) => ToPlugin::Abort(Abort {
                    stream_id,
                    seq,
                    stamp_ns: *stamp_ns,
                    cause: *cause,
                    detail: String::new(),
                }),
            };
            let this = seq;
            seq += 1;
            if this < self.lose_start || self.dropped.contains(&this) {
                assert!(
                    !event.ends(),
                    "stream {stream_id}: the front never drops a final or abort (seq {this})"
                );
                continue;
            }
            out.push(if out.len() < self.replayed {
                msg.replayed().expect("a per-stream event")
            } else {
                msg
            });
        }
        out
    }
}

fn len32(bytes: &Bytes) -> u32 {
    u32::try_from(bytes.len()).expect("a body chunk under 4 GiB")
}

/// Plays [`Stream`]s through a plugin on the host's own lanes, one stream at a time, and returns
/// what the host would send the front at each stream's end. See the [module docs](self).
///
/// The plugin runs on one worker thread, as with `--workers 1`; a hook's panic is caught and
/// logged by the host and fails that stream alone ([`Played::error`]).
pub struct Player<P: Plugin> {
    plugin: Arc<P>,
    lanes: Lanes<P>,
    subs: Subscriptions,
    replies: Mutex<mpsc::Receiver<FromPlugin>>,
}

impl<P: Plugin> Player<P> {
    /// A player for `plugin` (already configured, or configured with [`Player::configured`])
    /// under its own name, [`Plugin::name`]; its namespace is `plugvisor.<name>`.
    ///
    /// # Panics
    /// When the worker thread cannot be started.
    pub fn new(plugin: P) -> Player<P> {
        Player::shared(Arc::new(plugin))
    }

    /// [`Player::new`] for a plugin the test keeps a handle on.
    pub fn shared(plugin: Arc<P>) -> Player<P> {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let out: Outbox = Arc::new(move |msg| {
            let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(msg);
        });
        let name = plugin.name().to_owned();
        let cfg = LaneConfig {
            workers: 1,
            // Unbounded: the only drops are those the stream asks for.
            queue_events: usize::MAX,
            queue_bytes: usize::MAX,
            namespace: format!("plugvisor.{name}"),
            plugin: name,
            // As with a front that agreed on `trace`: `Played::spans` shows what was recorded.
            trace: true,
        };
        let credits = Credits::new(u64::MAX, out.clone(), false);
        let lanes = Lanes::start(Arc::clone(&plugin), cfg, out, credits)
            .expect("the player starts its worker thread");
        Player {
            subs: plugin.subscriptions(),
            plugin,
            lanes,
            replies: Mutex::new(rx),
        }
    }

    /// Configures `plugin` with `config` (as the front's `Welcome` would, a map or
    /// [`Value::Null`]), then [`Player::new`].
    pub fn configured(mut plugin: P, config: &Value) -> Result<Player<P>, ConfigError> {
        plugin.configure(config)?;
        Ok(Player::new(plugin))
    }

    /// The plugin, to look at what it keeps across streams.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }

    /// Plays `stream` and returns what the host answers at its end: the final reply's outcome,
    /// or nothing for an aborted stream. Runs each event the front would send this plugin
    /// ([`Stream::messages`]) through the host's lanes and waits until the stream is done.
    ///
    /// # Panics
    /// When `stream` has no final or abort, or the plugin takes longer than [`PLAY_TIMEOUT`].
    pub fn play(&self, stream: &Stream) -> Played {
        let ends_with_final = match stream.events.last() {
            Some((_, Event::Final { .. } | Event::AbortedFinal(_))) => true,
            Some((_, Event::Abort(_))) => false,
            _ => panic!(
                "stream {}: end it with .final_(..), .aborted_final(..) or .abort(..) before playing it",
                stream.id
            ),
        };
        // One stream at a time: the replies of one play are not taken by another.
        let replies = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        while replies.try_recv().is_ok() {}
        for msg in stream.messages(&self.subs) {
            let frame_len = ipc_protocol::codec::encoded_len(&msg).expect("an encodable event")
                + ipc_protocol::frame::PREFIX_LEN;
            let (msg, replayed) = msg.into_event().expect("a per-stream event");
            self.lanes.submit(msg, frame_len, replayed);
        }
        let namespace = format!("plugvisor.{}", self.plugin.name());
        let deadline = Instant::now() + PLAY_TIMEOUT;
        let mut spans = None;
        if ends_with_final {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match replies.recv_timeout(left) {
                    Ok(FromPlugin::Spans(s)) if s.stream_id == stream.id => spans = Some(s),
                    Ok(FromPlugin::FinalReply(r)) if r.stream_id == stream.id => {
                        return Played {
                            outcome: Some(r.outcome),
                            namespace,
                            spans,
                        }
                    }
                    Ok(_) => {}
                    Err(_) => panic!(
                        "stream {}: no final reply within {PLAY_TIMEOUT:?} (a hook that never \
                         returns?)",
                        stream.id
                    ),
                }
            }
        }
        while !self.lanes.is_idle() {
            assert!(
                Instant::now() < deadline,
                "stream {}: its events still run after {PLAY_TIMEOUT:?} (a hook that never \
                 returns?)",
                stream.id
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Not subscribed to aborts: the host would drop the state when the stream idles out.
        self.lanes.evict_idle(Duration::ZERO);
        Played {
            outcome: None,
            namespace,
            spans: None,
        }
    }
}

/// What the host answered at a played stream's end ([`Player::play`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Played {
    outcome: Option<FinalOutcome>,
    namespace: String,
    spans: Option<Spans>,
}

impl Played {
    /// The final reply's outcome as the host sends it; `None` for an aborted stream.
    pub fn outcome(&self) -> Option<&FinalOutcome> {
        self.outcome.as_ref()
    }

    /// The final metadata, with what the host adds.
    ///
    /// # Panics
    /// When the stream failed (the message is the host's error) or was aborted.
    pub fn metadata(&self) -> &Metadata {
        match &self.outcome {
            Some(FinalOutcome::Metadata(m)) => m,
            Some(FinalOutcome::Error(e)) => panic!("the stream failed: {e}"),
            None => panic!("the stream was aborted: it has no final metadata"),
        }
    }

    /// [`Played::metadata`], owned.
    ///
    /// # Panics
    /// As [`Played::metadata`].
    pub fn into_metadata(self) -> Metadata {
        self.metadata();
        match self.outcome {
            Some(FinalOutcome::Metadata(m)) => m,
            _ => unreachable!("checked by metadata()"),
        }
    }

    /// The plugin's own namespace in the metadata (`plugvisor.<name>`).
    ///
    /// # Panics
    /// As [`Played::metadata`], and when the namespace is missing.
    pub fn own(&self) -> &Value {
        let meta = self.metadata();
        meta.get(&self.namespace)
            .unwrap_or_else(|| panic!("no `{}` in the metadata: {meta:?}", self.namespace))
    }

    /// What the stream's hooks recorded for its trace ([`crate::trace`]): the `Spans` the host
    /// sends right before the final reply to a front that agreed on `trace`; `None` when
    /// nothing was recorded or the stream had no final.
    pub fn spans(&self) -> Option<&Spans> {
        self.spans.as_ref()
    }

    /// The host's error when the stream failed (a panic in plugin code): its final reply is
    /// [`FinalOutcome::Error`] with this message.
    pub fn error(&self) -> Option<&str> {
        match &self.outcome {
            Some(FinalOutcome::Error(e)) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
