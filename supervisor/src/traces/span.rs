//! One request's trace as its stream gathers it ([`RequestTrace`]), and the spans it becomes:
//! the request span (`plugvisor.request`) with its events, and a child per plugin's final call
//! (`plugvisor.final <plugin>`).
//!
//! The stream records [`Instant`]s it has anyway (each message's arrival) and only turns them
//! into wall-clock times here, against the one wall-clock reading taken when the trace began,
//! so that a traced stream reads the clock no more often than an untraced one, but for that
//! reading, the end of each final call and the stream's end.

use std::time::{Instant, SystemTime};

use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::{status, Span, Status};

use crate::otlp::{int, kv, nanos, string};

/// A stream's move to another connection of a plugin, as its trace shows it (the data path
/// records it for a traced stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// When.
    pub at: Instant,
    /// The old connection was being replaced (a planned restart, a reload), not gone.
    pub handover: bool,
}

/// The request span's name.
pub const REQUEST_SPAN: &str = "plugvisor.request";
/// The prefix of a final call's span name (`plugvisor.final usage`).
pub const FINAL_SPAN: &str = "plugvisor.final";

/// OTLP `Span.flags`: the W3C trace flags' `sampled` bit.
const SAMPLED: u32 = 0x01;
/// OTLP `Span.flags`: whether the parent is remote is known ...
const HAS_IS_REMOTE: u32 = 0x100;
/// ... and it is.
const IS_REMOTE: u32 = 0x200;

/// How a plugin's final call ended, as its span's `plugvisor.outcome` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalOutcome {
    /// Answered; its metadata is in.
    Ok,
    /// Answered, after the stream moved to a replacement process (replayed).
    Replayed,
    /// No answer within `final_timeout_ms`.
    Timeout,
    /// No answer for another reason (`plugvisor.reason`: `down`, `failed`, `stuck`, `stopped`,
    /// `gave_up`, `not_connected`, `backoff`).
    Missing(&'static str),
    /// Answered, but the metadata was left out (`plugvisor.reason`: `too_large`, `too_deep`,
    /// `stream_full`).
    Refused(&'static str),
    /// Answered; namespaces it was not granted were left out, the rest is in.
    Denied,
    /// Not called: the stream ended without a response end and the plugin does not answer for
    /// such streams (it got `Abort`).
    NotAsked,
}

impl FinalOutcome {
    /// The attribute's value.
    pub fn as_str(self) -> &'static str {
        match self {
            FinalOutcome::Ok => "ok",
            FinalOutcome::Replayed => "replayed",
            FinalOutcome::Timeout => "timeout",
            FinalOutcome::Missing(_) => "missing",
            FinalOutcome::Refused(_) => "refused",
            FinalOutcome::Denied => "denied",
            FinalOutcome::NotAsked => "not_asked",
        }
    }

    fn reason(self) -> Option<&'static str> {
        match self {
            FinalOutcome::Missing(r) | FinalOutcome::Refused(r) => Some(r),
            FinalOutcome::Timeout => Some("timeout"),
            _ => None,
        }
    }

    /// The plugin's metadata is not (all) in.
    fn is_error(self) -> bool {
        matches!(
            self,
            FinalOutcome::Timeout | FinalOutcome::Missing(_) | FinalOutcome::Refused(_)
        )
    }
}

/// One plugin's final call.
#[derive(Debug)]
pub struct FinalCall {
    /// The plugin.
    pub plugin: String,
    /// `Final` (the response ended) or `AbortedFinal` (the stream ended without it).
    pub aborted: bool,
    /// When the call started (the last message's arrival).
    pub start: Instant,
    /// When its outcome was known.
    pub end: Instant,
    /// How it ended.
    pub outcome: FinalOutcome,
    /// Events of the stream the answering process never got.
    pub lost: u32,
    /// Times the stream was replayed to a replacement process.
    pub replays: u32,
    /// What the plugin added (capability `trace`): attributes for this call's span and spans
    /// of its own.
    pub spans: Option<Box<ipc_protocol::Spans>>,
}

#[derive(Debug)]
struct SpanEvent {
    name: &'static str,
    at: Instant,
    attributes: Vec<KeyValue>,
}

/// What a traced stream gathers for its spans.
#[derive(Debug)]
pub struct RequestTrace {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The caller's span, when the request carried a valid `traceparent`.
    parent: Option<[u8; 8]>,
    tracestate: String,
    /// The request headers' arrival, and the wall clock then.
    start: Instant,
    start_wall: SystemTime,
    events: Vec<SpanEvent>,
    finals: Vec<FinalCall>,
    /// The usage record's attributes (status and cause included), once it was submitted.
    attributes: Vec<KeyValue>,
    /// The record's status is `error`.
    failed: bool,
    first_byte: bool,
    /// `CLOCK_MONOTONIC` to wall clock, in nanoseconds: read once, when the first plugin's
    /// spans came.
    monotonic_to_wall: Option<i128>,
}

impl RequestTrace {
    /// A trace whose request span begins at `start` (the request headers' arrival), in trace
    /// `trace_id`, a child of `parent` if the request named one.
    pub fn new(
        trace_id: [u8; 16],
        parent: Option<[u8; 8]>,
        tracestate: String,
        start: Instant,
    ) -> RequestTrace {
        let start_wall = SystemTime::now()
            .checked_sub(start.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        RequestTrace {
            trace_id,
            span_id: super::context::new_span_id(),
            parent,
            tracestate,
            start,
            start_wall,
            events: Vec::new(),
            finals: Vec::new(),
            attributes: Vec::new(),
            failed: false,
            first_byte: false,
            monotonic_to_wall: None,
        }
    }

    /// The W3C `traceparent` naming the request span (sampled), for plugins with `trace`.
    pub fn traceparent(&self) -> String {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        format!("00-{}-{}-01", hex(&self.trace_id), hex(&self.span_id))
    }

    /// The trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The request span's id.
    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// A response body chunk with content arrived at `at`: the first one is an event.
    pub fn content(&mut self, at: Instant) {
        if !self.first_byte {
            self.first_byte = true;
            self.event("plugvisor.first_byte", at, Vec::new());
        }
    }

    /// A plugin's final call ended; its replays, handovers and gaps become events of the
    /// request span.
    pub fn final_call(&mut self, call: FinalCall, moves: &[Move]) {
        for m in moves {
            let name = if m.handover {
                "plugvisor.handover"
            } else {
                "plugvisor.replay"
            };
            self.event(
                name,
                m.at,
                vec![kv("plugvisor.plugin", string(&call.plugin))],
            );
        }
        if call.spans.is_some() && self.monotonic_to_wall.is_none() {
            self.monotonic_to_wall = Some(super::plugin::monotonic_to_wall());
        }
        if call.lost > 0 {
            self.event(
                "plugvisor.gap",
                call.end,
                vec![
                    kv("plugvisor.plugin", string(&call.plugin)),
                    kv("plugvisor.lost_events", int(call.lost.into())),
                ],
            );
        }
        self.finals.push(call);
    }

    /// The usage record's attributes, and whether its status is `error`.
    pub fn record(&mut self, attributes: Vec<KeyValue>, failed: bool) {
        self.attributes = attributes;
        self.failed = failed;
    }

    fn event(&mut self, name: &'static str, at: Instant, attributes: Vec<KeyValue>) {
        self.events.push(SpanEvent {
            name,
            at,
            attributes,
        });
    }

    /// Spans the trace becomes: the request's, one per final call and the plugins' own.
    pub fn span_count(&self) -> usize {
        let plugins: usize = self
            .finals
            .iter()
            .filter_map(|c| c.spans.as_ref())
            .map(|s| s.spans.len())
            .sum();
        1 + self.finals.len() + plugins
    }

    fn wall(&self, at: Instant) -> u64 {
        let offset = at.saturating_duration_since(self.start);
        nanos(self.start_wall + offset)
    }

    /// The spans, the request's ending at `end` (the stream's end).
    pub fn into_spans(self, end: Instant) -> Vec<Span> {
        let mut spans = Vec::with_capacity(self.span_count());
        let ok_status = |error: Option<String>| {
            Some(match error {
                Some(message) => Status {
                    code: status::StatusCode::Error as i32,
                    message,
                },
                None => Status::default(),
            })
        };
        for call in &self.finals {
            let mut attributes = vec![
                kv("plugvisor.plugin", string(&call.plugin)),
                kv(
                    "plugvisor.final",
                    string(if call.aborted {
                        "aborted_final"
                    } else {
                        "final"
                    }),
                ),
                kv("plugvisor.outcome", string(call.outcome.as_str())),
            ];
            if let Some(reason) = call.outcome.reason() {
                attributes.push(kv("plugvisor.reason", string(reason)));
            }
            if call.replays > 0 {
                attributes.push(kv("plugvisor.replays", int(call.replays.into())));
            }
            if call.lost > 0 {
                attributes.push(kv("plugvisor.lost_events", int(call.lost.into())));
            }
            let error = call.outcome.is_error().then(|| {
                format!(
                    "metadata of {} {}",
                    call.plugin,
                    match call.outcome.reason() {
                        Some(r) => format!("missing: {r}"),
                        None => "missing".to_owned(),
                    }
                )
            });
            let offset = self.monotonic_to_wall.unwrap_or_default();
            if let Some(added) = &call.spans {
                // After the front's own; the plugin's `plugvisor.*` keys are left out.
                attributes.extend(super::plugin::attributes(&added.attributes));
                for s in &added.spans {
                    let (start, end, attributes) =
                        super::plugin::span_parts(&call.plugin, s, offset);
                    spans.push(Span {
                        trace_id: self.trace_id.to_vec(),
                        span_id: super::context::new_span_id().to_vec(),
                        trace_state: self.tracestate.clone(),
                        parent_span_id: self.span_id.to_vec(),
                        flags: SAMPLED | HAS_IS_REMOTE,
                        name: s.name.clone(),
                        kind: SpanKind::Internal as i32,
                        start_time_unix_nano: start,
                        end_time_unix_nano: end,
                        attributes,
                        ..Default::default()
                    });
                }
            }
            spans.push(Span {
                trace_id: self.trace_id.to_vec(),
                span_id: super::context::new_span_id().to_vec(),
                trace_state: self.tracestate.clone(),
                parent_span_id: self.span_id.to_vec(),
                flags: SAMPLED | HAS_IS_REMOTE,
                name: format!("{FINAL_SPAN} {}", call.plugin),
                kind: SpanKind::Internal as i32,
                start_time_unix_nano: self.wall(call.start),
                end_time_unix_nano: self.wall(call.end.max(call.start)),
                attributes,
                status: ok_status(error),
                ..Default::default()
            });
        }
        let events = self
            .events
            .iter()
            .map(|e| Event {
                time_unix_nano: self.wall(e.at),
                name: e.name.to_owned(),
                attributes: e.attributes.clone(),
                ..Default::default()
            })
            .collect();
        let flags = match self.parent {
            Some(_) => SAMPLED | HAS_IS_REMOTE | IS_REMOTE,
            None => SAMPLED | HAS_IS_REMOTE,
        };
        let end = self.wall(end.max(self.start));
        let start = self.wall(self.start);
        spans.insert(
            0,
            Span {
                trace_id: self.trace_id.to_vec(),
                span_id: self.span_id.to_vec(),
                trace_state: self.tracestate,
                parent_span_id: self.parent.map(|p| p.to_vec()).unwrap_or_default(),
                flags,
                name: REQUEST_SPAN.to_owned(),
                kind: SpanKind::Internal as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                attributes: self.attributes,
                events,
                status: ok_status(
                    self.failed
                        .then(|| "the front failed the stream".to_owned()),
                ),
                ..Default::default()
            },
        );
        spans
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(start: Instant, ms: u64) -> Instant {
        start + std::time::Duration::from_millis(ms)
    }

    fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a KeyValue> {
        s.attributes.iter().find(|a| a.key == key)
    }

    #[test]
    fn a_trace_becomes_a_request_span_with_events_and_a_child_per_final_call() {
        let t0 = Instant::now();
        let parent = [7u8; 8];
        let mut t = RequestTrace::new([1; 16], Some(parent), "k=v".into(), t0);
        t.content(after(t0, 10));
        t.content(after(t0, 20));
        t.final_call(
            FinalCall {
                plugin: "usage".into(),
                aborted: false,
                start: after(t0, 30),
                end: after(t0, 35),
                outcome: FinalOutcome::Replayed,
                lost: 2,
                replays: 1,
                spans: None,
            },
            &[Move {
                at: after(t0, 25),
                handover: false,
            }],
        );
        t.final_call(
            FinalCall {
                plugin: "latency".into(),
                aborted: false,
                start: after(t0, 30),
                end: after(t0, 80),
                outcome: FinalOutcome::Timeout,
                lost: 0,
                replays: 0,
                spans: None,
            },
            &[],
        );
        t.record(vec![kv("plugvisor.status", string("partial"))], false);
        let request_id = t.span_id();
        let spans = t.into_spans(after(t0, 100));
        assert_eq!(spans.len(), 3);
        let r = &spans[0];
        assert_eq!(r.name, REQUEST_SPAN);
        assert_eq!(r.parent_span_id, parent.to_vec());
        assert_eq!(r.span_id, request_id.to_vec());
        assert_eq!(r.trace_state, "k=v");
        assert_eq!(r.kind, SpanKind::Internal as i32);
        assert_eq!(r.flags, 0x301);
        assert_eq!(r.end_time_unix_nano - r.start_time_unix_nano, 100_000_000);
        let names: Vec<&str> = r.events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["plugvisor.first_byte", "plugvisor.replay", "plugvisor.gap"]
        );
        assert_eq!(
            r.events[0].time_unix_nano - r.start_time_unix_nano,
            10_000_000
        );
        assert!(attr(r, "plugvisor.status").is_some());
        for child in &spans[1..] {
            assert_eq!(child.trace_id, vec![1; 16]);
            assert_eq!(child.parent_span_id, request_id.to_vec());
            assert_eq!(child.flags, 0x101);
            assert_ne!(child.span_id, request_id.to_vec());
        }
        assert_eq!(spans[1].name, "plugvisor.final usage");
        assert_eq!(
            attr(&spans[1], "plugvisor.outcome").unwrap().value,
            Some(string("replayed"))
        );
        assert_eq!(spans[1].status.as_ref().unwrap().code, 0);
        assert_eq!(
            spans[2].end_time_unix_nano - spans[2].start_time_unix_nano,
            50_000_000
        );
        assert_eq!(
            attr(&spans[2], "plugvisor.reason").unwrap().value,
            Some(string("timeout"))
        );
        assert_eq!(
            spans[2].status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
    }

    #[test]
    fn a_new_trace_has_no_parent_and_a_handover_is_its_own_event() {
        let t0 = Instant::now();
        let mut t = RequestTrace::new([2; 16], None, String::new(), t0);
        t.final_call(
            FinalCall {
                plugin: "p".into(),
                aborted: true,
                start: t0,
                end: t0,
                outcome: FinalOutcome::NotAsked,
                lost: 0,
                replays: 0,
                spans: None,
            },
            &[Move {
                at: t0,
                handover: true,
            }],
        );
        t.record(Vec::new(), true);
        let spans = t.into_spans(t0);
        assert!(spans[0].parent_span_id.is_empty());
        assert_eq!(spans[0].flags, 0x101);
        assert_eq!(spans[0].events[0].name, "plugvisor.handover");
        assert_eq!(
            spans[0].status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
        assert_eq!(
            attr(&spans[1], "plugvisor.final").unwrap().value,
            Some(string("aborted_final"))
        );
        assert_eq!(
            attr(&spans[1], "plugvisor.outcome").unwrap().value,
            Some(string("not_asked"))
        );
    }

    #[test]
    fn a_plugins_spans_are_children_of_the_request_and_its_attributes_follow_the_fronts() {
        use ipc_protocol::{PluginSpan, Spans, Value};
        let t0 = Instant::now();
        let mut t = RequestTrace::new([3; 16], None, "k=v".into(), t0);
        let tp = t.traceparent();
        assert_eq!(tp.len(), 55);
        assert_eq!(
            super::super::context::traceparent_fields(&tp),
            Some(([3; 16], t.span_id(), 1))
        );
        let now = ipc_protocol::stamp::monotonic_now_ns();
        t.final_call(
            FinalCall {
                plugin: "usage".into(),
                aborted: false,
                start: t0,
                end: after(t0, 5),
                outcome: FinalOutcome::Ok,
                lost: 0,
                replays: 0,
                spans: Some(Box::new(Spans {
                    stream_id: 1,
                    attributes: vec![
                        ("plugvisor.outcome".into(), Value::String("forged".into())),
                        ("usage.parser".into(), Value::String("sse".into())),
                    ],
                    spans: vec![PluginSpan {
                        name: "parse".into(),
                        start_ns: now,
                        end_ns: now + 2_000_000,
                        attributes: vec![("chunks".into(), Value::Int(6))],
                    }],
                })),
            },
            &[],
        );
        assert_eq!(t.span_count(), 3);
        let request = t.span_id();
        let spans = t.into_spans(after(t0, 10));
        assert_eq!(spans.len(), 3);
        let child = spans.iter().find(|s| s.name == "parse").unwrap();
        assert_eq!(child.parent_span_id, request.to_vec());
        assert_eq!(child.trace_id, vec![3; 16]);
        assert_eq!(child.trace_state, "k=v");
        assert_eq!(
            child.end_time_unix_nano - child.start_time_unix_nano,
            2_000_000
        );
        // Its wall-clock start is the request's start, give or take the test's own time.
        assert!(
            child
                .start_time_unix_nano
                .abs_diff(spans[0].start_time_unix_nano)
                < 50_000_000
        );
        assert_eq!(
            attr(child, "plugvisor.plugin").unwrap().value,
            Some(string("usage"))
        );
        assert_eq!(attr(child, "chunks").unwrap().value, Some(int(6)));
        let fin = spans
            .iter()
            .find(|s| s.name == "plugvisor.final usage")
            .unwrap();
        let keys: Vec<&str> = fin.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "plugvisor.plugin",
                "plugvisor.final",
                "plugvisor.outcome",
                "usage.parser"
            ]
        );
        assert_eq!(
            attr(fin, "plugvisor.outcome").unwrap().value,
            Some(string("ok"))
        );
    }
}
