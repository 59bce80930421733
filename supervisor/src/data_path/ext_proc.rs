//! The Envoy `ext_proc` service: one task per ext_proc stream (one HTTP request through Envoy).
//!
//! Every header and body message is answered at once; the event goes to each subscribed plugin's
//! bounded queue without waiting (inline plugins excepted: the front waits for their
//! acknowledgement, bounded by `inline_timeout`). The end of the response (a body message with
//! `end_of_stream`, the response trailers, or headers that end the stream) is the final RPC to
//! every plugin, concurrently, each bounded by its `final_timeout`; the merged metadata goes to
//! Envoy as `dynamic_metadata`, checked against Envoy's limits and the configured caps
//! ([`crate::data_path::metadata`]).
//!
//! In `FULL_DUPLEX_STREAMED` the front carries the body, so the last chunk must not wait for the
//! plugins either: its bytes are echoed at once (without `end_of_stream`), and the end of the body
//! follows in a second, empty response that carries the metadata. Envoy passes the first on to the
//! client immediately; only the end of the stream waits for the final RPC. In `STREAMED`,
//! `BUFFERED` and `BUFFERED_PARTIAL` Envoy holds each body message until its reply, so there the
//! last one waits for the final RPC (see docs/configuration.md).
//!
//! Past `max_streams` concurrent streams, new streams are echoed without plugins and say so in
//! their metadata. A message larger than `max_message_bytes` fails its stream with a gRPC error,
//! a warning and a count, never with an OK that would truncate the body. A stream that ends before
//! its end of response sends `Abort`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, BodyMutation, BodyResponse, CommonResponse, HeadersResponse, HttpBody,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse,
};
use envoy_types::pb::google::protobuf::Struct;
use futures_util::FutureExt as _;
use ipc_protocol::stamp::monotonic_now_ns;
use ipc_protocol::{
    Abort, AbortCause, AbortedFinal, Chunk, Final, Header, RequestStart, ResponseHeaders, StreamId,
    ToPlugin,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

use crate::config::{BodyMode, Config, Dispatch, Published};
use crate::data_path::metadata::FRONT_NAMESPACE;
use crate::data_path::metadata::{Excluded, Merge};
use crate::data_path::plugin_stream::PluginStream;
use crate::observe::metrics::{MessageLabel, Metrics};
use crate::plugin::link::{Missing, PluginLink};
use crate::records::RecordStatus;
use crate::traces::{FinalCall, FinalOutcome, RequestTrace, Traces};

/// How long an abort may wait for room in a full queue.
const ABORT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// The ext_proc service shared by every stream.
#[derive(Clone)]
pub struct Front {
    inner: Arc<Inner>,
}

struct Inner {
    /// The plugins new streams use, in config order, as the registry publishes them; a reload
    /// replaces the list, running streams keep theirs.
    links: watch::Receiver<Links>,
    /// The running configuration: each stream takes its limits from it when it starts.
    config: Published,
    metrics: Arc<Metrics>,
    next_stream: AtomicU64,
    /// Streams served with plugins right now (bounded by `max_streams`).
    with_plugins: Arc<AtomicUsize>,
    stop: watch::Receiver<bool>,
    /// Where each stream's usage record goes when it ends.
    records: crate::records::Records,
    /// Where a traced stream's spans go when it ends (empty when tracing is off).
    traces: Traces,
}

/// The plugins' links in config order, as the registry publishes them to the data path.
pub type Links = Arc<Vec<Arc<PluginLink>>>;

/// What bounds one stream: the top level of the configuration when the stream started.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Body mode when Envoy's first message carries no `protocol_config`.
    pub default_mode: BodyMode,
    /// Streams served with plugins at once; past it, streams are echoed without them.
    pub max_streams: usize,
    /// The most protobuf bytes of plugin metadata one stream sends to Envoy.
    pub stream_metadata_max_bytes: usize,
    /// A stream without a message for this long fails; `None`: never.
    pub idle_timeout: Option<std::time::Duration>,
}

impl StreamLimits {
    /// The limits a configuration sets.
    pub fn from_config(config: &Config) -> StreamLimits {
        StreamLimits {
            default_mode: config.default_response_body_mode,
            max_streams: config.max_streams,
            stream_metadata_max_bytes: config.stream_metadata_max_bytes,
            idle_timeout: config.idle_stream_timeout,
        }
    }
}

/// A stream's place among the `max_streams` served with plugins, given back when it ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place if fewer than `max` streams hold one.
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Front {
    /// A service over the plugins `links` publishes (in config order), bounded by the
    /// published `config` as it stands when each stream starts. Streams still open when `stop`
    /// turns true send `Abort { cause: Shutdown }` and end. Each stream's usage record goes to
    /// `records`, its spans (if traced) to `traces`, which from now on reports the sampler of
    /// `config` (the one streams use).
    pub fn new(
        links: watch::Receiver<Links>,
        config: Published,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
        records: crate::records::Records,
        traces: Traces,
    ) -> Front {
        traces.follow(config.clone());
        Front {
            inner: Arc::new(Inner {
                links,
                config,
                metrics,
                next_stream: AtomicU64::new(1),
                with_plugins: Arc::new(AtomicUsize::new(0)),
                stop,
                records,
                traces,
            }),
        }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for Front {
    type ProcessStream = ReplyStream;

    async fn process(
        &self,
        request: GrpcRequest<Streaming<ProcessingRequest>>,
    ) -> Result<GrpcResponse<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        // Two replies per message at most (the last chunk's echo, then the end with metadata).
        let (tx, rx) = mpsc::channel(2);
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let links = self.inner.links.borrow().clone();
        let limits = StreamLimits::from_config(&self.inner.config.current());
        let (links, slot, shed) = match Slot::take(&self.inner.with_plugins, limits.max_streams) {
            Some(slot) => (links, Some(slot), Vec::new()),
            None => {
                self.inner.metrics.streams_shed.inc();
                tracing::debug!(
                    stream = id,
                    max_streams = limits.max_streams,
                    "stream limit reached; echoing without plugins"
                );
                let names = links.iter().map(|l| l.name().to_owned()).collect();
                (Arc::new(Vec::new()), None, names)
            }
        };
        let stream = StreamTask {
            inner: self.inner.clone(),
            id,
            plugins: links
                .iter()
                .map(|l| PluginStream::new(l.clone(), id))
                .collect(),
            shed,
            limits,
            _slot: slot,
            modes: None,
            response_started: false,
            ended: false,
            unrecorded: None,
            trace: None,
            seen: Box::new(Seen {
                started_at: SystemTime::now(),
                request_id: None,
                method: None,
                path: None,
                authority: None,
                http_status: None,
                failed: None,
            }),
        };
        tokio::spawn(stream.run(inbound, tx));
        Ok(GrpcResponse::new(ReplyStream(ReceiverStream::new(rx))))
    }
}

#[derive(Clone, Copy)]
struct Modes {
    request_body: BodySendMode,
    response_body: BodySendMode,
}

struct StreamTask {
    inner: Arc<Inner>,
    id: StreamId,
    /// Per plugin this stream feeds (fixed when it starts, in config order): its sequence
    /// numbers, connection and replay journal.
    plugins: Vec<PluginStream>,
    /// The plugins this stream was not given because `max_streams` were active (else empty).
    shed: Vec<String>,
    /// The limits of the configuration the stream started under.
    limits: StreamLimits,
    /// Held while the stream runs with plugins.
    _slot: Option<Slot>,
    modes: Option<Modes>,
    /// The response headers came: from now on, in `FULL_DUPLEX_STREAMED`, Envoy hands this
    /// front each body chunk and waits for it to come back.
    response_started: bool,
    /// The final RPC ran (or an abort was sent): no more events for the plugins.
    ended: bool,
    /// The metadata the final RPC gave Envoy, for the usage record: written once the reply has
    /// gone, so building the record is not on the response's critical path.
    unrecorded: Option<Struct>,
    /// What the request's usage record says about it, gathered as the stream goes (boxed: an
    /// idle stream keeps it).
    seen: Box<Seen>,
    /// The request's trace, when tracing is on and the sampler kept it (`None` otherwise: an
    /// untraced stream does no tracing work).
    trace: Option<Box<RequestTrace>>,
}

/// What a stream's usage record says about the request, besides the plugins' answers.
#[derive(Debug)]
struct Seen {
    started_at: SystemTime,
    request_id: Option<String>,
    method: Option<String>,
    path: Option<String>,
    authority: Option<String>,
    http_status: Option<u16>,
    /// The front failed the stream itself (too large a message, an idle stream, a refused
    /// message): the record's status is `error`, with this cause.
    failed: Option<&'static str>,
}

/// One reply to Envoy, boxed: tokio's channel allocates its slots 32 at a time whatever its bound,
/// and an unboxed reply is about 300 bytes, which made the channel half an idle stream's memory.
type Reply = Box<Result<ProcessingResponse, Status>>;

/// The replies of one stream, as tonic sends them to Envoy.
pub struct ReplyStream(ReceiverStream<Reply>);

impl tokio_stream::Stream for ReplyStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|reply| reply.map(|r| *r))
    }
}

/// Why a message's handling ended the stream.
enum Stop {
    /// Envoy no longer reads the replies.
    Gone,
    /// The message cannot be served: the status goes to Envoy.
    Refused(Status),
}

/// The reply side of one stream: sends responses (none in observability mode) and records the
/// time from a message's arrival to its reply.
struct Out {
    tx: mpsc::Sender<Reply>,
    /// `plugvisor_response_overhead_seconds` by [`Message`], looked up once per stream rather
    /// than at every message.
    overhead: [prometheus_client::metrics::histogram::Histogram; 3],
}

/// What a reply answers, the `message` label of `plugvisor_response_overhead_seconds`.
#[derive(Debug, Clone, Copy)]
enum Message {
    Headers = 0,
    Chunk = 1,
    Final = 2,
}

impl Message {
    const ALL: [Message; 3] = [Message::Headers, Message::Chunk, Message::Final];

    fn as_str(self) -> &'static str {
        match self {
            Message::Headers => "headers",
            Message::Chunk => "chunk",
            Message::Final => "final",
        }
    }
}

impl Out {
    fn new(tx: mpsc::Sender<Reply>, metrics: &Metrics) -> Out {
        Out {
            tx,
            overhead: Message::ALL.map(|m| {
                metrics
                    .response_overhead
                    .get_or_create(&MessageLabel {
                        message: m.as_str().to_owned(),
                    })
                    .clone()
            }),
        }
    }

    async fn send(
        &self,
        observe: bool,
        message: Message,
        arrival: Instant,
        resp: ProcessingResponse,
    ) -> Result<(), Stop> {
        if !observe && self.tx.send(Box::new(Ok(resp))).await.is_err() {
            return Err(Stop::Gone);
        }
        self.overhead[message as usize].observe(arrival.elapsed().as_secs_f64());
        Ok(())
    }
}

/// The size tonic names in its "message length too large" status, if this is one.
fn too_large(status: &Status) -> Option<&str> {
    if status.code() != tonic::Code::OutOfRange {
        return None;
    }
    let rest = status.message().split("found ").nth(1)?;
    rest.split(' ').next()
}

impl StreamTask {
    async fn run(mut self, mut inbound: Streaming<ProcessingRequest>, tx: mpsc::Sender<Reply>) {
        let metrics = self.inner.metrics.clone();
        metrics.streams_active.inc();
        metrics.streams_total.inc();
        let replies = Out::new(tx, &metrics);
        let mut stop = self.inner.stop.clone();
        let idle_timeout = self.limits.idle_timeout;
        let ending = loop {
            let idle = async {
                match idle_timeout {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            let mut stopping = false;
            let next = tokio::select! {
                m = inbound.message() => Some(m),
                stopped = stop.wait_for(|s| *s) => {
                    drop(stopped);
                    stopping = true;
                    None
                }
                _ = idle => None,
            };
            if stopping {
                self.cut(&replies, "plugvisor_stopping", None).await;
                break (AbortCause::Shutdown, "front is stopping".into());
            }
            let Some(next) = next else {
                let limit = idle_timeout.unwrap_or_default();
                if let Some(held) = crate::observe::logging::limited::allow("idle stream") {
                    tracing::warn!(
                        stream = self.id,
                        idle_ms = limit.as_millis() as u64,
                        held_back = held,
                        "ext_proc stream idle past idle_stream_timeout_ms; failing it"
                    );
                }
                metrics.stream_errors.inc();
                self.seen.failed = Some("idle_stream_timeout");
                let status = Status::deadline_exceeded(format!(
                    "plugvisor: no ext_proc message for {} ms (idle_stream_timeout_ms)",
                    limit.as_millis()
                ));
                self.cut(&replies, "plugvisor_idle_stream_timeout", Some(status))
                    .await;
                break (AbortCause::Timeout, "idle_stream_timeout_ms passed".into());
            };
            let req = match next {
                Ok(Some(req)) => req,
                Ok(None) => {
                    break (
                        AbortCause::ClientDisconnect,
                        "ext_proc stream closed before the end of the response".into(),
                    )
                }
                Err(status) => {
                    if let Some(size) = too_large(&status) {
                        // Carrying on would lose this body: fail the stream where Envoy sees it.
                        let held = crate::observe::logging::limited::allow("message too large");
                        if let Some(held) = held {
                            tracing::warn!(
                            stream = self.id,
                            size_bytes = size,
                            held_back = held,
                            "ext_proc message larger than max_message_bytes; failing the stream (raise max_message_bytes, or lower Envoy's buffer limits)"
                        );
                        }
                        metrics.messages_too_large.inc();
                        metrics.stream_errors.inc();
                        self.seen.failed = Some("message_too_large");
                        let error =
                            Status::resource_exhausted(format!("plugvisor: {}", status.message()));
                        self.cut(&replies, "plugvisor_message_too_large", Some(error))
                            .await;
                        break (AbortCause::UpstreamError, status.message().to_owned());
                    }
                    // Envoy resets the stream right after the last reply: normal once ended.
                    break (
                        AbortCause::ClientDisconnect,
                        format!("ext_proc stream reset: {}", status.message()),
                    );
                }
            };
            let arrival = Instant::now();
            let stamp = monotonic_now_ns();
            if self.modes.is_none() {
                let modes = self.modes_from(&req);
                if modes.response_body == BodySendMode::None {
                    tracing::debug!(
                        stream = self.id,
                        "response_body_mode NONE: headers only, no body events; the final RPC \
                         runs only if the response ends in its headers or trailers"
                    );
                }
                self.modes = Some(modes);
            }
            // Boxed: the handling future (final RPC, inline waits) is large, and keeping it inline
            // made every idle stream's task carry it; allocated per message, it costs one malloc.
            let handled = Box::pin(self.handle(req, stamp, arrival, &replies)).await;
            if let Some(metadata) = self.unrecorded.take() {
                self.submit_record(&metadata, None);
            }
            match handled {
                Ok(()) => {}
                Err(Stop::Gone) => break (AbortCause::ClientDisconnect, "Envoy went away".into()),
                Err(Stop::Refused(status)) => {
                    tracing::warn!(stream = self.id, error = %status.message(), "ext_proc stream refused");
                    metrics.stream_errors.inc();
                    self.seen.failed = Some("refused");
                    let _ = replies.tx.send(Box::new(Err(status.clone()))).await;
                    break (AbortCause::UpstreamError, status.message().to_owned());
                }
            }
        };
        let (cause, detail): (AbortCause, String) = ending;
        if self.ended {
            tracing::trace!(stream = self.id, %detail, "stream closed after its end");
        } else {
            tracing::debug!(stream = self.id, ?cause, %detail, "stream ended without end of response");
            let merge = self.abort(cause, detail).await;
            self.submit_record(&merge.into_struct(self.id), Some(cause));
        }
        if let Some(trace) = self.trace.take() {
            self.inner.traces.finish(trace);
        }
        metrics.streams_active.dec();
    }

    /// Whether Envoy may have handed this front body bytes it has not echoed back yet: in
    /// `FULL_DUPLEX_STREAMED` Envoy passes each chunk over and forgets it, so if the ext_proc
    /// stream ends now, with `failure_mode_allow` Envoy would carry on without them and the
    /// client would get a body with a gap.
    fn carries_body(&self) -> bool {
        let Some(modes) = self.modes else {
            return false;
        };
        let response = self.response_started
            && !self.ended
            && modes.response_body == BodySendMode::FullDuplexStreamed;
        let request =
            !self.response_started && modes.request_body == BodySendMode::FullDuplexStreamed;
        response || request
    }

    /// Ends the stream before its end of response, whole or loud: where Envoy may hold none of
    /// the body's bytes (`carries_body` is false) the ext_proc stream just ends (with `error`,
    /// if any) and Envoy carries on with the bytes it has; where it may, the front answers with
    /// an `ImmediateResponse`, which makes Envoy fail the response to the client (a reset once
    /// its headers went out) instead of passing a body with chunks missing.
    async fn cut(&self, replies: &Out, details: &str, error: Option<Status>) {
        if self.carries_body() {
            self.inner.metrics.streams_cut.inc();
            if let Some(held) = crate::observe::logging::limited::allow("stream cut") {
                tracing::warn!(
                    stream = self.id,
                    reason = details,
                    held_back = held,
                    "stream cut while Envoy may hold none of its body bytes but this front's; \
                     failing the response to the client (ImmediateResponse) rather than letting \
                     Envoy pass it with a gap"
                );
            }
            let immediate = ImmediateResponse {
                status: Some(HttpStatus {
                    code: StatusCode::ServiceUnavailable as i32,
                }),
                details: details.to_owned(),
                body: b"plugvisor: the response was cut\n".to_vec(),
                ..Default::default()
            };
            let resp = ProcessingResponse {
                response: Some(Response::ImmediateResponse(immediate)),
                ..Default::default()
            };
            let _ = replies.tx.send(Box::new(Ok(resp))).await;
        } else if let Some(error) = error {
            let _ = replies.tx.send(Box::new(Err(error))).await;
        }
    }

    fn modes_from(&self, req: &ProcessingRequest) -> Modes {
        match &req.protocol_config {
            Some(pc) => Modes {
                request_body: BodySendMode::try_from(pc.request_body_mode)
                    .unwrap_or(BodySendMode::None),
                response_body: BodySendMode::try_from(pc.response_body_mode)
                    .unwrap_or(BodySendMode::None),
            },
            None => Modes {
                request_body: BodySendMode::None,
                response_body: match self.limits.default_mode {
                    BodyMode::Streamed => BodySendMode::Streamed,
                    BodyMode::FullDuplexStreamed => BodySendMode::FullDuplexStreamed,
                },
            },
        }
    }

    async fn handle(
        &mut self,
        req: ProcessingRequest,
        stamp: u64,
        arrival: Instant,
        replies: &Out,
    ) -> Result<(), Stop> {
        let modes = self.modes.expect("set on the first message");
        let observe = req.observability_mode;
        let Some(request) = req.request else {
            return Err(Stop::Refused(Status::invalid_argument(
                "ProcessingRequest without a request",
            )));
        };
        match request {
            Request::RequestHeaders(h) => {
                let headers = headers(h.headers.as_ref());
                let find = |name: &str| {
                    headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                };
                let request_id = find("x-request-id");
                // The sampler of the running configuration (a reload changes it for the streams
                // that start after it), read only when tracing is on: off, streams keep nothing
                // of it.
                let sampler = match (&self.trace, self.inner.traces.is_on()) {
                    (None, true) => self
                        .inner
                        .config
                        .current()
                        .traces
                        .as_ref()
                        .and_then(crate::config::TracesConfig::active_sampler),
                    _ => None,
                };
                if let Some(sampler) = sampler {
                    let names = headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                    self.trace = self.inner.traces.begin(names, arrival, &sampler);
                    if let Some(trace) = &self.trace {
                        let traceparent: Arc<str> = trace.traceparent().into();
                        for ps in &mut self.plugins {
                            ps.traced(traceparent.clone());
                        }
                    }
                }
                self.seen.request_id = request_id.clone();
                self.seen.method = find(":method");
                self.seen.path = find(":path");
                self.seen.authority = find(":authority");
                self.dispatch(
                    |seq, _| {
                        ToPlugin::RequestStart(RequestStart {
                            stream_id: 0,
                            seq,
                            stamp_ns: stamp,
                            request_id: request_id.clone(),
                            headers: headers.clone(),
                        })
                    },
                    |s| s.request_start,
                    true,
                );
                let resp = reply(Response::RequestHeaders(HeadersResponse::default()), None);
                replies.send(observe, Message::Headers, arrival, resp).await
            }
            Request::ResponseHeaders(h) => {
                self.response_started = true;
                let headers = headers(h.headers.as_ref());
                let status = headers
                    .iter()
                    .find(|(k, _)| k == ":status")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                self.seen.http_status = (status != 0).then_some(status);
                self.dispatch(
                    |seq, _| {
                        ToPlugin::ResponseHeaders(ResponseHeaders {
                            stream_id: 0,
                            seq,
                            stamp_ns: stamp,
                            status,
                            headers: headers.clone(),
                        })
                    },
                    |s| s.response_headers,
                    false,
                );
                let (label, metadata) = if h.end_of_stream && !self.ended {
                    let md = self
                        .final_rpc(stamp, arrival, Bytes::new(), Vec::new())
                        .await;
                    (Message::Final, Some(md))
                } else {
                    (Message::Headers, None)
                };
                let resp = reply(
                    Response::ResponseHeaders(HeadersResponse::default()),
                    metadata,
                );
                replies.send(observe, label, arrival, resp).await
            }
            Request::ResponseBody(body) => {
                let full_duplex = modes.response_body == BodySendMode::FullDuplexStreamed;
                let eos = body.end_of_stream;
                let bytes = Bytes::from(body.body);
                if let (Some(trace), false) = (&mut self.trace, bytes.is_empty()) {
                    trace.content(arrival);
                }
                if !eos || self.ended {
                    if !self.ended {
                        self.chunk(stamp, bytes.clone(), eos).await;
                    }
                    let resp = reply(
                        Response::ResponseBody(body_reply(full_duplex, bytes, eos)),
                        None,
                    );
                    return replies.send(observe, Message::Chunk, arrival, resp).await;
                }
                if full_duplex && !bytes.is_empty() {
                    // The last tokens go to the client now; the end of the body follows with the
                    // metadata.
                    let echo = reply(
                        Response::ResponseBody(body_reply(true, bytes.clone(), false)),
                        None,
                    );
                    replies.send(observe, Message::Chunk, arrival, echo).await?;
                }
                let metadata = self.final_rpc(stamp, arrival, bytes, Vec::new()).await;
                let end = reply(
                    Response::ResponseBody(body_reply(full_duplex, Bytes::new(), true)),
                    Some(metadata),
                );
                replies.send(observe, Message::Final, arrival, end).await
            }
            Request::ResponseTrailers(t) => {
                let trailers = headers(t.trailers.as_ref());
                let metadata = if self.ended {
                    None
                } else {
                    Some(self.final_rpc(stamp, arrival, Bytes::new(), trailers).await)
                };
                let resp = reply(
                    Response::ResponseTrailers(TrailersResponse::default()),
                    metadata,
                );
                replies.send(observe, Message::Final, arrival, resp).await
            }
            Request::RequestBody(HttpBody {
                body,
                end_of_stream,
                ..
            }) => {
                // Request bodies go to no plugin: echoed in full duplex, continued otherwise.
                let full_duplex = modes.request_body == BodySendMode::FullDuplexStreamed;
                let resp = reply(
                    Response::RequestBody(body_reply(
                        full_duplex,
                        Bytes::from(body),
                        end_of_stream,
                    )),
                    None,
                );
                replies.send(observe, Message::Chunk, arrival, resp).await
            }
            Request::RequestTrailers(_) => {
                let resp = reply(Response::RequestTrailers(TrailersResponse::default()), None);
                replies.send(observe, Message::Headers, arrival, resp).await
            }
        }
    }

    /// Queues one event per subscribed plugin; `make` builds it for a sequence number and
    /// whether the plugin takes body bytes. For the `RequestStart` (`start`), a traced stream's
    /// copy for a plugin with `trace` names the request span in its `traceparent`.
    fn dispatch(
        &mut self,
        make: impl Fn(u32, bool) -> ToPlugin,
        wants: impl Fn(&ipc_protocol::Subscriptions) -> bool,
        start: bool,
    ) {
        if self.ended {
            return;
        }
        for ps in &mut self.plugins {
            let subs = ps.subscriptions();
            if !wants(&subs) {
                continue;
            }
            let id = self.id;
            let make = |seq| {
                let mut msg = make(seq, subs.body_bytes);
                set_stream(&mut msg, id);
                msg
            };
            if start {
                ps.send_start(make);
            } else {
                ps.send(make);
            }
        }
    }

    /// A non-final body chunk: queued for async plugins, acknowledged by inline ones.
    async fn chunk(&mut self, stamp: u64, bytes: Bytes, eos: bool) {
        let len = bytes.len() as u32;
        let mut waits = Vec::new();
        for ps in &mut self.plugins {
            let subs = ps.subscriptions();
            if !subs.chunks {
                continue;
            }
            let inline = ps.link().config().dispatch == Dispatch::Inline;
            let payload = if subs.body_bytes {
                bytes.clone()
            } else {
                Bytes::new()
            };
            let id = self.id;
            let make = |seq| {
                ToPlugin::Chunk(Chunk {
                    stream_id: id,
                    seq,
                    stamp_ns: stamp,
                    len,
                    bytes: payload,
                    end_of_stream: eos,
                    ack: inline,
                })
            };
            if inline {
                let deadline = tokio::time::Instant::now() + ps.link().config().inline_timeout;
                if let Some((conn, seq, rx)) = ps.send_inline(id, make, deadline).await {
                    waits.push((ps.link().clone(), conn, seq, deadline, rx));
                }
            } else {
                ps.send(make);
            }
        }
        for (link, conn, seq, deadline, rx) in waits {
            if tokio::time::timeout_at(deadline, rx).await.is_err() {
                link.forget_ack(&conn, self.id, seq);
                if let Some(held) = crate::observe::logging::limited::allow("inline ack late") {
                    tracing::warn!(plugin = %link.name(), stream = self.id, seq, held_back = held, "inline chunk not acknowledged in time");
                }
            }
        }
    }

    /// The final RPC to every plugin, concurrently (each retried on a replacement process if its
    /// own goes away); returns the merged `dynamic_metadata`, and keeps a copy for the usage
    /// record, which `run` writes once the reply has gone.
    async fn final_rpc(
        &mut self,
        stamp: u64,
        arrival: Instant,
        bytes: Bytes,
        trailers: Vec<Header>,
    ) -> Struct {
        self.ended = true;
        let len = bytes.len() as u32;
        let id = self.id;
        let mut calls = Vec::with_capacity(self.plugins.len());
        for ps in std::mem::take(&mut self.plugins) {
            let payload = if ps.subscriptions().body_bytes {
                bytes.clone()
            } else {
                Bytes::new()
            };
            let trailers = trailers.clone();
            let make = move |seq, call_id| {
                ToPlugin::Final(Final {
                    stream_id: id,
                    seq,
                    stamp_ns: stamp,
                    call_id,
                    len,
                    bytes: payload.clone(),
                    trailers: trailers.clone(),
                })
            };
            calls.push(Call::start(ps, make, arrival, self.trace.is_some(), false));
        }
        let merge = self.collect(calls, Vec::new(), arrival).await;
        let metadata = merge.into_struct(id);
        self.unrecorded = Some(metadata.clone());
        metadata
    }

    /// The request's usage record, once: the plugins' answers as they went (or, for a stream
    /// that ended without a response end, would have gone) to Envoy, and how the stream ended:
    /// `complete`, `partial` (a plugin missing, partial or denied a namespace), `aborted` (no
    /// response end: `cause`) or `error` (the front failed the stream itself).
    fn submit_record(&mut self, metadata: &Struct, aborted: Option<AbortCause>) {
        let records = &self.inner.records;
        let mut record = records.new_record(self.id, self.seen.started_at);
        let seen = &*self.seen;
        record.request_id = seen.request_id.clone();
        record.method = seen.method.clone();
        record.path = seen.path.clone();
        record.authority = seen.authority.clone();
        record.http_status = seen.http_status;
        record.plugins = crate::data_path::metadata::to_json(metadata);
        let front = record.plugins.get(FRONT_NAMESPACE);
        record.missing = front
            .and_then(|f| f.get("missing"))
            .and_then(|m| m.as_array())
            .map(|m| {
                m.iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        record.reasons = front
            .and_then(|f| f.get("reasons"))
            .and_then(|r| r.as_object())
            .map(|r| {
                r.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let incomplete = !record.missing.is_empty()
            || front.is_some_and(|f| f.get("partial").is_some() || f.get("denied").is_some());
        (record.status, record.cause) = match (seen.failed, aborted) {
            (Some(failed), _) => (RecordStatus::Error, Some(failed.to_owned())),
            (None, Some(cause)) => (RecordStatus::Aborted, Some(cause.as_str().to_owned())),
            (None, None) if incomplete => (RecordStatus::Partial, None),
            (None, None) => (RecordStatus::Complete, None),
        };
        // The span says what the record says: the same status and cause, the same attributes.
        if let Some(trace) = &mut self.trace {
            trace.record(
                records.span_attributes(&record),
                record.status == RecordStatus::Error,
            );
        }
        records.submit(record);
    }

    /// Waits for the final calls and merges their answers, in config order; `not_asked` are the
    /// plugins that got no call (an aborted stream's plugins that do not answer for one), at
    /// `at`. A traced stream's trace gets each call's outcome.
    async fn collect(&mut self, calls: Vec<Call>, not_asked: Vec<String>, at: Instant) -> Merge {
        let id = self.id;
        let mut merge = Merge::new(self.limits.stream_metadata_max_bytes);
        for name in &self.shed {
            merge.missing(name, Excluded::Shed);
        }
        for name in not_asked {
            merge.missing(&name, Excluded::from(Missing::NotAsked));
            if let Some(trace) = &mut self.trace {
                trace.final_call(
                    FinalCall {
                        plugin: name,
                        aborted: true,
                        start: at,
                        end: at,
                        outcome: FinalOutcome::NotAsked,
                        lost: 0,
                        replays: 0,
                        spans: None,
                    },
                    &[],
                );
            }
        }
        let (calls, tasks): (Vec<_>, Vec<_>) = calls
            .into_iter()
            .map(|c| ((c.name, c.config, c.started, c.aborted), c.task))
            .unzip();
        let results = futures_util::future::join_all(tasks).await;
        for ((name, config, started, aborted), result) in calls.into_iter().zip(results) {
            let (cap, granted) = (config.process.metadata_max_bytes, &config.granted);
            let (outcome, ended) = match result {
                Ok(done) => done,
                Err(_) => {
                    merge.missing(&name, Excluded::Failed);
                    if let Some(trace) = &mut self.trace {
                        trace.final_call(
                            FinalCall {
                                plugin: name,
                                aborted,
                                start: started,
                                end: Instant::now(),
                                outcome: FinalOutcome::Missing(Excluded::Failed.as_str()),
                                lost: 0,
                                replays: 0,
                                spans: None,
                            },
                            &[],
                        );
                    }
                    continue;
                }
            };
            // What the trace will say of this call, settled below with the merge.
            let mut traced = FinalOutcome::Ok;
            if outcome.replays > 0 {
                tracing::debug!(plugin = %name, stream = id, replays = outcome.replays, "stream finished on a replacement process");
            }
            match outcome.result {
                Ok(metadata) => {
                    let added = merge.add(&name, metadata, cap, granted);
                    if outcome.replays > 0 {
                        traced = FinalOutcome::Replayed;
                    }
                    if let Some(denied) = merge.denied().get(&name) {
                        traced = FinalOutcome::Denied;
                        self.inner
                            .metrics
                            .namespaces_denied
                            .get_or_create(&Metrics::plugin(&name))
                            .inc_by(denied.len() as u64);
                        if let Some(held) =
                            crate::observe::logging::limited::allow("metadata namespace denied")
                        {
                            tracing::warn!(plugin = %name, stream = id, namespaces = ?denied, granted = ?granted, held_back = held, "plugin wrote metadata namespaces it was not granted; left out (grant them with plugins.<name>.namespaces)");
                        }
                    }
                    if let Err(why) = added {
                        traced = FinalOutcome::Refused(why.as_str());
                        if let Some(held) =
                            crate::observe::logging::limited::allow("metadata left out")
                        {
                            tracing::warn!(plugin = %name, stream = id, reason = why.as_str(), metadata_max_bytes = cap, stream_metadata_max_bytes = self.limits.stream_metadata_max_bytes, held_back = held, "plugin metadata left out of the stream's dynamic_metadata");
                        }
                        self.inner
                            .metrics
                            .finals_missing
                            .get_or_create(&Metrics::reason(&name, why.as_str()))
                            .inc();
                    } else if outcome.lost > 0 {
                        merge.partial(&name, outcome.lost);
                    }
                }
                Err(why) => {
                    traced = match why {
                        Missing::Timeout => FinalOutcome::Timeout,
                        Missing::NotAsked => FinalOutcome::NotAsked,
                        other => FinalOutcome::Missing(other.as_str()),
                    };
                    merge.missing(&name, why.into());
                }
            }
            if let Some(trace) = &mut self.trace {
                trace.final_call(
                    FinalCall {
                        plugin: name,
                        aborted,
                        start: started,
                        end: ended.unwrap_or(started),
                        outcome: traced,
                        lost: outcome.lost,
                        replays: outcome.replays,
                        spans: outcome.spans,
                    },
                    &outcome.moves,
                );
            }
        }
        let missing = merge.missing_names();
        if !missing.is_empty() {
            tracing::debug!(stream = id, ?missing, "final metadata incomplete");
        }
        merge
    }

    /// The stream ended without a response end: plugins that answer for such streams get their
    /// final call (`AbortedFinal`, marked with the cause), the others `Abort`; returns what
    /// they answered, merged, for the request's record (Envoy's stream is gone).
    async fn abort(&mut self, cause: AbortCause, detail: String) -> Merge {
        self.ended = true;
        let stamp = monotonic_now_ns();
        let arrival = Instant::now();
        let id = self.id;
        let mut calls = Vec::new();
        let mut not_asked = Vec::new();
        for mut ps in std::mem::take(&mut self.plugins) {
            if ps.answers_aborted() {
                let detail = detail.clone();
                let make = move |seq, call_id| {
                    ToPlugin::AbortedFinal(AbortedFinal {
                        stream_id: id,
                        seq,
                        stamp_ns: stamp,
                        call_id,
                        cause,
                        detail: detail.clone(),
                    })
                };
                calls.push(Call::start(ps, make, arrival, self.trace.is_some(), true));
            } else {
                not_asked.push(ps.link().name().to_owned());
                ps.abort(
                    |seq| {
                        ToPlugin::Abort(Abort {
                            stream_id: id,
                            seq,
                            stamp_ns: stamp,
                            cause,
                            detail: detail.clone(),
                        })
                    },
                    ABORT_PATIENCE,
                );
            }
        }
        self.collect(calls, not_asked, arrival).await
    }
}

/// One plugin's final call, running.
struct Call {
    name: String,
    /// The plugin's table when the call started: its `metadata_max_bytes` and the namespaces it
    /// may write (shared, not copied per call).
    config: Arc<crate::config::PluginConfig>,
    /// When it started.
    started: Instant,
    /// An `AbortedFinal`.
    aborted: bool,
    /// Its outcome, and (for a traced stream only) when it was known; a panic in it is this
    /// plugin's failure, not the stream's.
    task: futures_util::future::BoxFuture<'static, CallResult>,
}

type CallResult = std::thread::Result<(crate::data_path::plugin_stream::Outcome, Option<Instant>)>;

impl Call {
    /// Starts the final call of `ps`, its message built by `make(seq, call_id)`; `traced`: the
    /// time its outcome is known is kept for the stream's trace.
    fn start(
        ps: PluginStream,
        make: impl Fn(u32, u64) -> ToPlugin + Send + 'static,
        arrival: Instant,
        traced: bool,
        aborted: bool,
    ) -> Call {
        Call {
            name: ps.link().name().to_owned(),
            config: ps.link().config(),
            started: arrival,
            aborted,
            // Driven by the stream task itself, not spawned: its first poll queues the final
            // and writes it to the plugin's socket from the stream task (`PluginLink::write_now`),
            // every plugin's in one go, instead of waking a task per plugin, which the runtime
            // hands to another worker that must first be woken.
            task: std::panic::AssertUnwindSafe(async move {
                let outcome = ps.finish(make, arrival).await;
                (outcome, traced.then(Instant::now))
            })
            .catch_unwind()
            .boxed(),
        }
    }
}

fn set_stream(msg: &mut ToPlugin, id: StreamId) {
    match msg {
        ToPlugin::RequestStart(e) => e.stream_id = id,
        ToPlugin::ResponseHeaders(e) => e.stream_id = id,
        ToPlugin::Chunk(e) => e.stream_id = id,
        ToPlugin::Final(e) => e.stream_id = id,
        ToPlugin::Abort(e) => e.stream_id = id,
        _ => {}
    }
}

fn reply(response: Response, metadata: Option<Struct>) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        dynamic_metadata: metadata,
        ..Default::default()
    }
}

fn body_reply(full_duplex: bool, bytes: Bytes, eos: bool) -> BodyResponse {
    if !full_duplex {
        return BodyResponse::default();
    }
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body: bytes.to_vec(),
                        end_of_stream: eos,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    }
}

/// Envoy's header map as `(name, value)` pairs; `raw_value` is decoded lossily.
fn headers(map: Option<&HeaderMap>) -> Vec<Header> {
    map.map(|m| {
        m.headers
            .iter()
            .map(|h| {
                let value = if h.raw_value.is_empty() {
                    h.value.clone()
                } else {
                    String::from_utf8_lossy(&h.raw_value).into_owned()
                };
                (h.key.to_ascii_lowercase(), value)
            })
            .collect()
    })
    .unwrap_or_default()
}
