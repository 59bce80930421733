//! A protocol-speaking fake plugin that connects to the front's socket like an external plugin
//! (`spawn = false`) and misbehaves on cue: slow chunks, a final that never answers, a refused
//! second connection. It keeps `test-order` bookkeeping (events, out-of-order, gaps, body sha256)
//! and returns it under `plugvisor.test-order`, and records aborts for assertions. Like the SDK,
//! it returns flow-control credit for every event it has handled, at a quarter of its window and
//! whenever it has nothing more buffered. A replayed event (`ToPlugin::Replayed`, resent after a
//! restart) is unwrapped and handled like a live one, and counted in [`Record::replayed`].
//! It keeps the `traceparent` each stream's `RequestStart` brought, and, asked to, adds to the
//! stream's trace before its final answer (capability `trace`): an attribute for its final span
//! and a span of its own ([`Behaviour::trace_spans`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc_protocol::{
    Ack, Credit, FinalOutcome, FinalReply, FrameReader, FrameWriter, FromPlugin, Hello, Pong,
    Subscriptions, ToPlugin, Value, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};
use tokio::net::UnixStream;

/// How the fake behaves.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Sleep this long on every chunk.
    pub chunk_delay: Duration,
    /// Never answer finals.
    pub hang_finals: bool,
    /// Namespaces added to every final answer, beside `plugvisor.test-order`.
    pub final_metadata: Option<ipc_protocol::Metadata>,
    /// Answer each final first with a reply naming another stream (the stream id plus 1000),
    /// then with the right one.
    pub wrong_stream_first: bool,
    /// Never send `Credit` (a plugin that stops reading its window, while still answering
    /// pings).
    pub no_credit: bool,
    /// Never answer `Ping`.
    pub no_pong: bool,
    /// Record `Shutdown` and go on serving, as if it had not come.
    pub ignore_shutdown: bool,
    /// Speak protocol version 2 (no capabilities, so the front must not send it `Replayed`)
    /// instead of the current one with every capability but `reconnect`.
    pub protocol_2: bool,
    /// Announce only these capabilities (`None`: every one the protocol knows).
    pub capabilities: Option<Vec<&'static str>>,
    /// Before each final answer, send `Spans`: the attributes [`FAKE_ATTRIBUTE`] and a
    /// `plugvisor.outcome` of its own (which the front must not take), and one span
    /// [`FAKE_SPAN`] from the stream's `RequestStart` to the final call.
    pub trace_spans: bool,
}

/// The attribute a fake with [`Behaviour::trace_spans`] puts on its final span, and its value.
pub const FAKE_ATTRIBUTE: (&str, &str) = ("fake.note", "added by the fake plugin");
/// The name of the span a fake with [`Behaviour::trace_spans`] records for each stream.
pub const FAKE_SPAN: &str = "fake.work";

/// What the fake saw.
#[derive(Debug, Default)]
pub struct Record {
    /// The config from `Welcome`.
    pub config: Option<Value>,
    /// `budget_bytes` and `metadata_max_bytes` from `Welcome`.
    pub limits: Option<(u64, u64)>,
    /// Streams that got an `Abort`, with the cause.
    pub aborted: Vec<(u64, ipc_protocol::AbortCause)>,
    /// Streams that got a `Final`.
    pub finished: Vec<u64>,
    /// Streams with state held (started, not yet final or abort): a leak if it stays non-empty.
    pub open: usize,
    /// Chunks acknowledged (inline dispatch).
    pub acked: usize,
    /// Replayed events received (`ToPlugin::Replayed`), each handled like the live event inside.
    pub replayed: usize,
    /// The protocol version and capabilities from `Welcome`.
    pub agreed: Option<(u32, Vec<String>)>,
    /// Aborted streams whose final was asked for (`AbortedFinal`, answered), a subset of
    /// `aborted`.
    pub aborted_finals: usize,
    /// The grace of the `Shutdown` received, in milliseconds.
    pub shutdown: Option<u64>,
    /// Each stream's `traceparent` header in its `RequestStart`, if it had one.
    pub traceparents: Vec<(u64, Option<String>)>,
}

#[derive(Default)]
struct Lane {
    events: u64,
    last: Option<u32>,
    out_of_order: u64,
    gaps: u64,
    sha: Sha256,
    /// The `RequestStart`'s stamp (`CLOCK_MONOTONIC` ns).
    started_ns: u64,
}

/// A connected fake plugin.
pub struct FakePlugin {
    /// What it saw.
    pub record: Arc<Mutex<Record>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePlugin {
    /// Waits until the fake stops serving: `Shutdown`, end-of-file, or an error.
    pub async fn finished(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for FakePlugin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The outcome of a handshake attempt.
pub enum Handshake {
    /// Welcomed; serving.
    Welcome(FakePlugin),
    /// Refused with this code and reason.
    Refused(ipc_protocol::RefuseCode, String),
}

impl FakePlugin {
    /// Connects to `socket` as `name`, retrying until the socket exists (up to 5 s).
    pub async fn connect(socket: &Path, name: &str, behaviour: Behaviour) -> Handshake {
        let what = format!("the fake plugin's connection to {}", socket.display());
        let stream = crate::eventually_async(&what, Duration::from_secs(5), async || {
            UnixStream::connect(socket).await
        })
        .await;
        let (r, w) = stream.into_split();
        let mut reader = FrameReader::new(r);
        let mut writer = FrameWriter::new(w);
        writer
            .send(&FromPlugin::Hello(Hello {
                protocol_version: if behaviour.protocol_2 {
                    2
                } else {
                    PROTOCOL_VERSION
                },
                plugin: name.to_owned(),
                pid: std::process::id(),
                subscriptions: Subscriptions::ALL,
                // Every capability asked for but `reconnect`: it never opens a second
                // connection, and the conformance kit holds a plugin to what it announces.
                capabilities: behaviour
                    .capabilities
                    .clone()
                    .unwrap_or_else(|| ipc_protocol::handshake::capability::KNOWN.to_vec())
                    .iter()
                    .filter(|c| **c != ipc_protocol::handshake::capability::RECONNECT)
                    .map(|c| (*c).to_owned())
                    .collect(),
            }))
            .await
            .expect("send hello");
        let record = Arc::new(Mutex::new(Record::default()));
        let budget = match reader.read::<ToPlugin>().await.expect("read welcome") {
            Some(ToPlugin::Welcome(w)) => {
                let mut r = record.lock().unwrap();
                r.config = Some(w.config);
                r.limits = Some((w.budget_bytes, w.metadata_max_bytes));
                r.agreed = Some((w.protocol_version, w.capabilities));
                w.budget_bytes
            }
            Some(ToPlugin::Refuse(r)) => return Handshake::Refused(r.code, r.reason),
            other => panic!("unexpected handshake answer {other:?}"),
        };
        let rec = record.clone();
        let task = tokio::spawn(async move {
            let _ = serve(reader, writer, rec, behaviour, budget).await;
        });
        Handshake::Welcome(FakePlugin { record, task })
    }

    /// Connects and expects a welcome.
    pub async fn welcome(socket: &Path, name: &str, behaviour: Behaviour) -> FakePlugin {
        match FakePlugin::connect(socket, name, behaviour).await {
            Handshake::Welcome(p) => p,
            Handshake::Refused(code, reason) => panic!("refused: {code:?} {reason}"),
        }
    }
}

/// What a fake with [`Behaviour::trace_spans`] adds to a stream's trace.
fn spans_for(stream_id: u64, started_ns: u64) -> FromPlugin {
    FromPlugin::Spans(ipc_protocol::Spans {
        stream_id,
        attributes: vec![
            (FAKE_ATTRIBUTE.0.to_owned(), Value::from(FAKE_ATTRIBUTE.1)),
            ("plugvisor.outcome".to_owned(), Value::from("forged")),
        ],
        spans: vec![ipc_protocol::PluginSpan {
            name: FAKE_SPAN.to_owned(),
            start_ns: started_ns,
            end_ns: ipc_protocol::stamp::monotonic_now_ns(),
            attributes: vec![("fake.stream".to_owned(), Value::from(stream_id))],
        }],
    })
}

async fn serve(
    mut reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    mut writer: FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    record: Arc<Mutex<Record>>,
    behaviour: Behaviour,
    budget: u64,
) -> Result<(), ipc_protocol::ProtocolError> {
    let mut lanes: HashMap<u64, Lane> = HashMap::new();
    let (mut consumed, mut reported) = (0u64, 0u64);
    while let Some(msg) = reader.read::<ToPlugin>().await? {
        // Handled in this loop iteration, so consumed once it is done; a replayed event counts
        // its whole `Replayed` frame.
        consumed += msg.flow_bytes(reader.last_frame_len());
        let (msg, replayed) = msg.into_event()?;
        if replayed {
            record.lock().unwrap().replayed += 1;
        }
        if let Some((stream, seq)) = msg.stream_seq() {
            let fresh = !lanes.contains_key(&stream);
            let lane = lanes.entry(stream).or_default();
            if fresh {
                record.lock().unwrap().open += 1;
            }
            lane.events += 1;
            match lane.last {
                Some(last) if seq <= last => lane.out_of_order += 1,
                Some(last) if seq > last + 1 => lane.gaps += u64::from(seq - last - 1),
                None if seq > 0 => lane.gaps += u64::from(seq),
                _ => {}
            }
            lane.last = Some(seq);
        }
        match msg {
            ToPlugin::RequestStart(start) => {
                let traceparent = start
                    .headers
                    .iter()
                    .find(|(k, _)| k == "traceparent")
                    .map(|(_, v)| v.clone());
                if let Some(lane) = lanes.get_mut(&start.stream_id) {
                    lane.started_ns = start.stamp_ns;
                }
                record
                    .lock()
                    .unwrap()
                    .traceparents
                    .push((start.stream_id, traceparent));
            }
            ToPlugin::Chunk(c) => {
                if !behaviour.chunk_delay.is_zero() {
                    tokio::time::sleep(behaviour.chunk_delay).await;
                }
                if let Some(lane) = lanes.get_mut(&c.stream_id) {
                    lane.sha.update(&c.bytes);
                }
                if c.ack {
                    record.lock().unwrap().acked += 1;
                    writer
                        .send(&FromPlugin::Ack(Ack {
                            stream_id: c.stream_id,
                            seq: c.seq,
                        }))
                        .await?;
                }
            }
            ToPlugin::Final(f) => {
                let lane = lanes.remove(&f.stream_id).unwrap_or_default();
                {
                    let mut r = record.lock().unwrap();
                    r.open -= 1;
                    r.finished.push(f.stream_id);
                }
                if behaviour.hang_finals {
                    continue;
                }
                if behaviour.trace_spans {
                    writer
                        .send(&spans_for(f.stream_id, lane.started_ns))
                        .await?;
                }
                let mut sha = lane.sha;
                sha.update(&f.bytes);
                let mut md = BTreeMap::from([(
                    "plugvisor.test-order".to_owned(),
                    Value::map([
                        ("events", Value::from(lane.events)),
                        ("out_of_order", Value::from(lane.out_of_order)),
                        ("gaps", Value::from(lane.gaps)),
                        ("sha256", Value::from(hex::encode(sha.finalize()))),
                    ]),
                )]);
                if let Some(extra) = &behaviour.final_metadata {
                    md.extend(extra.clone());
                }
                if behaviour.wrong_stream_first {
                    let mut lie = ipc_protocol::Metadata::new();
                    lie.insert(
                        "plugvisor.test-order".into(),
                        Value::Map([("lie".to_owned(), Value::Bool(true))].into()),
                    );
                    writer
                        .send(&FromPlugin::FinalReply(FinalReply {
                            call_id: f.call_id,
                            stream_id: f.stream_id + 1000,
                            outcome: FinalOutcome::Metadata(lie),
                        }))
                        .await?;
                }
                writer
                    .send(&FromPlugin::FinalReply(FinalReply {
                        call_id: f.call_id,
                        stream_id: f.stream_id,
                        outcome: FinalOutcome::Metadata(md),
                    }))
                    .await?;
            }
            ToPlugin::Abort(a) => {
                lanes.remove(&a.stream_id);
                let mut r = record.lock().unwrap();
                r.open -= 1;
                r.aborted.push((a.stream_id, a.cause));
            }
            ToPlugin::AbortedFinal(a) => {
                let lane = lanes.remove(&a.stream_id).unwrap_or_default();
                {
                    let mut r = record.lock().unwrap();
                    r.open -= 1;
                    r.aborted.push((a.stream_id, a.cause));
                    r.aborted_finals += 1;
                }
                let md = BTreeMap::from([(
                    "plugvisor.test-order".to_owned(),
                    Value::map([
                        ("events", Value::from(lane.events)),
                        ("gaps", Value::from(lane.gaps)),
                        ("aborted", Value::from(a.cause.as_str())),
                    ]),
                )]);
                writer
                    .send(&FromPlugin::FinalReply(FinalReply {
                        call_id: a.call_id,
                        stream_id: a.stream_id,
                        outcome: FinalOutcome::Metadata(md),
                    }))
                    .await?;
            }
            ToPlugin::Ping(_) if behaviour.no_pong => {}
            ToPlugin::Ping(p) => {
                writer
                    .send(&FromPlugin::Pong(Pong {
                        nonce: p.nonce,
                        active_streams: lanes.len() as u32,
                        stuck: Vec::new(),
                    }))
                    .await?;
            }
            ToPlugin::Shutdown(s) => {
                record.lock().unwrap().shutdown = Some(s.grace_ms);
                if !behaviour.ignore_shutdown {
                    return Ok(());
                }
            }
            _ => {}
        }
        if !behaviour.no_credit
            && consumed > reported
            && (consumed - reported >= budget / 4 || !reader.has_buffered_frame())
        {
            reported = consumed;
            writer
                .send(&FromPlugin::Credit(Credit { consumed }))
                .await?;
        }
    }
    Ok(())
}
