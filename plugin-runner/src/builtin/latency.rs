//! `latency`: TTFT and TPOT per request, computed only from the front's arrival stamps.
//!
//! TTFT = first body byte's arrival − request start. TPOT = (last token's arrival − first
//! token's arrival) / (tokens − 1), where tokens is the upstream's `usage.completion_tokens` when
//! reported and otherwise the count of token-carrying SSE events: an ext_proc chunk is not a
//! token, since Envoy merges and splits upstream writes freely. Metadata
//! `plugvisor.latency: {ttft_ms, tpot_ms, chunks, events, tokens, duration_ms}`; a value that
//! cannot be computed (no request start seen, fewer than two tokens) is left out.

use ipc_protocol::{Chunk, Final, Metadata, RequestStart, ResponseHeaders, Value};

use crate::plugin::{EventCtx, Plugin};
use crate::usage_formats::ResponseObserver;

/// The plugin's own metadata namespace.
pub const NAMESPACE: &str = "plugvisor.latency";

/// The `latency` plugin.
#[derive(Debug, Default)]
pub struct LatencyPlugin;

/// Per-stream state of [`LatencyPlugin`].
#[derive(Debug, Default)]
pub struct LatencyStream {
    start_ns: Option<u64>,
    first_event_ns: Option<u64>,
    body: ResponseObserver,
}

/// Milliseconds between two stamps.
fn ms(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}

/// The latency figures of one finished response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Time to first byte of the response body.
    pub ttft_ms: Option<f64>,
    /// Time per output token after the first.
    pub tpot_ms: Option<f64>,
    /// Request start (or first event seen) to the end.
    pub duration_ms: f64,
    /// Output tokens used for TPOT.
    pub tokens: u64,
}

impl Latency {
    /// Computes the figures from a request start stamp, the body observer and the end stamp.
    pub fn compute(start_ns: Option<u64>, body: &ResponseObserver, end_ns: u64) -> Latency {
        let ttft_ms = start_ns.zip(body.first_body_ns).map(|(s, b)| ms(s, b));
        let tokens = body.output_tokens();
        let tpot_ms = match (body.first_token_ns, body.last_token_ns) {
            (Some(first), Some(last)) if tokens >= 2 => Some(ms(first, last) / (tokens - 1) as f64),
            _ => None,
        };
        let duration_ms = start_ns
            .or(body.first_body_ns)
            .map_or(0.0, |s| ms(s, end_ns));
        Latency {
            ttft_ms,
            tpot_ms,
            duration_ms,
            tokens,
        }
    }
}

impl Plugin for LatencyPlugin {
    type Stream = LatencyStream;

    fn name(&self) -> &str {
        "latency"
    }

    fn configure(&mut self, config: &Value) -> Result<(), crate::ConfigError> {
        crate::ConfigMap::new(config)?.deny_unknown(&[])
    }

    fn on_request_start(&self, s: &mut LatencyStream, ctx: &EventCtx, _: &RequestStart) {
        s.start_ns = Some(ctx.stamp_ns);
        s.first_event_ns.get_or_insert(ctx.stamp_ns);
    }

    fn on_response_headers(&self, s: &mut LatencyStream, ctx: &EventCtx, e: &ResponseHeaders) {
        s.first_event_ns.get_or_insert(ctx.stamp_ns);
        if let Some(ct) = e.header("content-type") {
            s.body.set_content_type(ct);
        }
    }

    fn on_chunk(&self, s: &mut LatencyStream, ctx: &EventCtx, c: &Chunk) {
        s.first_event_ns.get_or_insert(ctx.stamp_ns);
        s.body.push(&c.bytes, c.len.into(), ctx.stamp_ns);
    }

    fn on_final(&self, s: &mut LatencyStream, ctx: &EventCtx, f: &Final) -> Metadata {
        s.body.push(&f.bytes, f.len.into(), ctx.stamp_ns);
        s.body.finish(ctx.stamp_ns);
        let start = s.start_ns.or(s.first_event_ns);
        let l = Latency::compute(s.start_ns, &s.body, ctx.stamp_ns);
        let mut map = std::collections::BTreeMap::new();
        if let Some(t) = l.ttft_ms {
            map.insert("ttft_ms".to_owned(), Value::Float(t));
        }
        if let Some(t) = l.tpot_ms {
            map.insert("tpot_ms".to_owned(), Value::Float(t));
        }
        map.insert("chunks".into(), Value::from(s.body.chunks));
        map.insert("events".into(), Value::from(s.body.events));
        map.insert("tokens".into(), Value::from(l.tokens));
        map.insert(
            "duration_ms".into(),
            Value::Float(start.map_or(0.0, |st| ms(st, ctx.stamp_ns))),
        );
        Metadata::from([(NAMESPACE.to_owned(), Value::Map(map))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testing::{play, Played, FIRST_CHUNK_NS, START_NS, STEP_NS};
    use crate::usage_formats::tests::{CHAT_JSON, CHAT_STREAM, ERROR_JSON, RESPONSES_STREAM};

    fn f(meta: &Metadata, key: &str) -> Option<f64> {
        meta[NAMESPACE].get(key).and_then(Value::as_f64)
    }

    #[test]
    fn ttft_and_tpot_come_from_the_stamps_and_the_reported_token_count() {
        // One SSE event per chunk: split the stream at its blank lines.
        let events: Vec<String> = CHAT_STREAM
            .split_inclusive("\n\n")
            .map(str::to_owned)
            .collect();
        let Played {
            meta,
            chunks,
            end_ns,
        } = crate::builtin::testing::play_chunks(&LatencyPlugin, &events, "text/event-stream");
        assert_eq!(chunks, 9);
        assert_eq!(f(&meta, "ttft_ms"), Some(ms(START_NS, FIRST_CHUNK_NS)));
        // Token events are chunks 0..=6; usage reports 7 completion tokens.
        let expected_tpot = ms(FIRST_CHUNK_NS, FIRST_CHUNK_NS + 6 * STEP_NS) / 6.0;
        assert_eq!(f(&meta, "tpot_ms"), Some(expected_tpot));
        assert_eq!(meta[NAMESPACE].get("tokens"), Some(&Value::Int(7)));
        assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(8)));
        assert_eq!(meta[NAMESPACE].get("chunks"), Some(&Value::Int(9)));
        assert_eq!(f(&meta, "duration_ms"), Some(ms(START_NS, end_ns)));
    }

    #[test]
    fn without_reported_usage_tokens_are_counted_from_events() {
        let stream: String = CHAT_STREAM
            .split_inclusive("\n\n")
            .filter(|e| !e.contains("\"usage\""))
            .collect();
        let meta = play(&LatencyPlugin, &stream, 10_000, "text/event-stream").meta;
        assert_eq!(meta[NAMESPACE].get("tokens"), Some(&Value::Int(7)));
        // Everything arrived in one chunk: zero time between tokens.
        assert_eq!(f(&meta, "tpot_ms"), Some(0.0));
    }

    #[test]
    fn responses_api_stream() {
        let meta = play(&LatencyPlugin, RESPONSES_STREAM, 200, "text/event-stream").meta;
        assert_eq!(meta[NAMESPACE].get("tokens"), Some(&Value::Int(3)));
        assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(11)));
        assert!(f(&meta, "tpot_ms").unwrap() > 0.0);
    }

    #[test]
    fn plain_json_and_error_bodies_have_ttft_but_no_tpot_from_one_arrival() {
        for body in [CHAT_JSON, ERROR_JSON] {
            let meta = play(&LatencyPlugin, body, 100_000, "application/json").meta;
            assert_eq!(f(&meta, "ttft_ms"), Some(ms(START_NS, FIRST_CHUNK_NS)));
            assert!(f(&meta, "tpot_ms").is_none());
            assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(0)));
        }
    }
}
