//! `latency`: TTFT, TPOT and time to first byte per request, computed only from the front's
//! arrival stamps.
//!
//! TTFT = arrival of the first *content-bearing* event − request start, where content-bearing is
//! decided per format by [`crate::usage_formats::content`] (generated text, reasoning, tool-call
//! arguments; not pings, role-only deltas, Anthropic `message_start`/`ping`, empty Gemini parts).
//! A plain JSON body brings all its content with its last byte, so its TTFT is that arrival; an
//! error response (status >= 400 or an error in the body) has none. TTFB = first body byte −
//! request start. TPOT = (last content event − first content event) / (tokens − 1), where tokens
//! is the upstream's reported output tokens when there are any and otherwise the number of
//! content-bearing events: an ext_proc chunk is not a token, since Envoy merges and splits
//! upstream writes freely. A `Content-Encoding`d body is decoded first ([`crate::decode`]).
//! Metadata `plugvisor.latency: {ttft_ms, ttfb_ms, tpot_ms, chunks, events, content_events,
//! tokens, duration_ms}`; a value that cannot be computed (no request start seen, no content,
//! fewer than two tokens) is left out.

use ipc_protocol::{Chunk, Final, Metadata, RequestStart, ResponseHeaders, Value};

use crate::usage_formats::ResponseObserver;
use plugin_runner::{EventCtx, Plugin};

/// The plugin's own metadata namespace.
pub const NAMESPACE: &str = "plugvisor.latency";

/// The `latency` plugin.
#[derive(Debug, Default, Clone)]
pub struct LatencyPlugin;

/// Per-stream state of [`LatencyPlugin`].
#[derive(Debug, Default)]
pub struct LatencyStream {
    start_ns: Option<u64>,
    first_event_ns: Option<u64>,
    status: u16,
    timing: ResponseTiming,
}

/// The body reader of one response, as the `latency` and `metrics` plugins keep it: usage,
/// model, format and the content-bearing events' stamps, read in one pass by the
/// [`ResponseObserver`].
#[derive(Debug, Default)]
pub struct ResponseTiming {
    /// Usage, model, format and content timing.
    pub body: ResponseObserver,
}

impl ResponseTiming {
    /// Reads the request path (Bedrock names the model there only).
    pub fn request(&mut self, e: &RequestStart) {
        if let Some(path) = ipc_protocol::find_header(&e.headers, ":path") {
            self.body.set_request_path(path);
        }
    }

    /// Reads `content-type` and `content-encoding` from the response headers.
    pub fn headers(&mut self, e: &ResponseHeaders) {
        if let Some(ct) = e.header("content-type") {
            self.body.set_content_type(ct);
        }
        if let Some(enc) = e.header("content-encoding") {
            self.body.set_content_encoding(enc);
        }
    }

    /// A body message of `len` bytes (of which `bytes` are known) that arrived at `stamp_ns`.
    pub fn push(&mut self, bytes: &[u8], len: u64, stamp_ns: u64) {
        self.body.push(bytes, len, stamp_ns);
    }

    /// The body ended at `stamp_ns`.
    pub fn finish(&mut self, stamp_ns: u64) {
        self.body.finish(stamp_ns);
    }
}

/// Milliseconds between two stamps.
fn ms(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}

/// The latency figures of one finished response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Time to the first content-bearing event (see the module docs).
    pub ttft_ms: Option<f64>,
    /// Time to the first byte of the response body.
    pub ttfb_ms: Option<f64>,
    /// Time per output token after the first.
    pub tpot_ms: Option<f64>,
    /// Request start (or the first body byte) to the end.
    pub duration_ms: f64,
    /// Output tokens used for TPOT.
    pub tokens: u64,
    /// Whether the response is a success: status below 400 (or unknown) and no error in the body.
    pub ok: bool,
}

impl Latency {
    /// Computes the figures from a request start stamp, the HTTP status (0: unknown), the
    /// finished body readers and the end stamp.
    pub fn compute(start_ns: Option<u64>, status: u16, r: &ResponseTiming, end_ns: u64) -> Latency {
        let body = &r.body;
        let ok = status < 400 && body.upstream_error().is_none();
        let tokens = match body.usage {
            Some(u) if u.output_tokens > 0 => u.output_tokens as u64,
            _ => body.content_events,
        };
        let (first, last) = if body.is_sse() {
            (body.first_content_ns, body.last_content_ns)
        } else if ok && body.format().is_some() {
            (body.last_body_ns, body.last_body_ns)
        } else {
            (None, None)
        };
        let first = first.filter(|_| ok);
        let tpot_ms = match (first, last) {
            (Some(first), Some(last)) if tokens >= 2 && body.is_sse() => {
                Some(ms(first, last) / (tokens - 1) as f64)
            }
            _ => None,
        };
        Latency {
            ttft_ms: start_ns.zip(first).map(|(s, f)| ms(s, f)),
            ttfb_ms: start_ns.zip(body.first_body_ns).map(|(s, b)| ms(s, b)),
            tpot_ms,
            duration_ms: start_ns
                .or(body.first_body_ns)
                .map_or(0.0, |s| ms(s, end_ns)),
            tokens,
            ok,
        }
    }
}

impl Plugin for LatencyPlugin {
    type Stream = LatencyStream;

    fn name(&self) -> &str {
        "latency"
    }

    fn configure(&mut self, config: &Value) -> Result<(), plugin_runner::ConfigError> {
        plugin_runner::ConfigMap::new(config)?.deny_unknown(&[])
    }

    fn on_request_start(&self, s: &mut LatencyStream, ctx: &EventCtx, e: &RequestStart) {
        s.timing.request(e);
        s.start_ns = Some(ctx.stamp_ns);
        s.first_event_ns.get_or_insert(ctx.stamp_ns);
    }

    fn on_response_headers(&self, s: &mut LatencyStream, ctx: &EventCtx, e: &ResponseHeaders) {
        s.first_event_ns.get_or_insert(ctx.stamp_ns);
        s.status = e.status;
        s.timing.headers(e);
    }

    fn on_chunk(&self, s: &mut LatencyStream, ctx: &EventCtx, c: &Chunk) {
        s.first_event_ns.get_or_insert(ctx.stamp_ns);
        s.timing.push(&c.bytes, c.len.into(), ctx.stamp_ns);
    }

    fn quick_final(&self) -> bool {
        true
    }

    fn quick_events(&self) -> bool {
        true
    }

    fn on_final(&self, s: &mut LatencyStream, ctx: &EventCtx, f: &Final) -> Metadata {
        s.timing.push(&f.bytes, f.len.into(), ctx.stamp_ns);
        s.timing.finish(ctx.stamp_ns);
        let start = s.start_ns.or(s.first_event_ns);
        let l = Latency::compute(s.start_ns, s.status, &s.timing, ctx.stamp_ns);
        let mut map = std::collections::BTreeMap::new();
        for (key, value) in [
            ("ttft_ms", l.ttft_ms),
            ("ttfb_ms", l.ttfb_ms),
            ("tpot_ms", l.tpot_ms),
        ] {
            if let Some(v) = value {
                map.insert(key.to_owned(), Value::Float(v));
            }
        }
        map.insert("chunks".into(), Value::from(s.timing.body.chunks));
        map.insert("events".into(), Value::from(s.timing.body.events));
        map.insert(
            "content_events".into(),
            Value::from(s.timing.body.content_events),
        );
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
    use crate::testing::{
        play, play_chunks, play_response, Played, FIRST_CHUNK_NS, START_NS, STEP_NS,
    };
    use crate::usage_formats::tests::{CHAT_JSON, CHAT_STREAM, ERROR_JSON, RESPONSES_STREAM};
    use plugin_runner::testing::Player;

    fn f(meta: &Metadata, key: &str) -> Option<f64> {
        meta[NAMESPACE].get(key).and_then(Value::as_f64)
    }

    /// The stamp of chunk `i` in [`play_chunks`].
    fn chunk_ns(i: u64) -> u64 {
        FIRST_CHUNK_NS + i * STEP_NS
    }

    /// One SSE event per chunk (CRLF bodies read as LF).
    fn events(body: &str) -> Vec<String> {
        body.replace("\r\n", "\n")
            .split_inclusive("\n\n")
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn ttft_waits_for_content_past_the_role_only_delta_and_tpot_uses_reported_tokens() {
        let Played {
            meta,
            chunks,
            end_ns,
        } = play_chunks(
            &Player::new(LatencyPlugin),
            &events(CHAT_STREAM),
            "text/event-stream",
        );
        assert_eq!(chunks, 9);
        // Chunk 0 is `"role":"assistant","content":""`: the first token is chunk 1.
        assert_eq!(f(&meta, "ttfb_ms"), Some(ms(START_NS, chunk_ns(0))));
        assert_eq!(f(&meta, "ttft_ms"), Some(ms(START_NS, chunk_ns(1))));
        // Content in chunks 1..=6; usage reports 7 completion tokens.
        assert_eq!(
            f(&meta, "tpot_ms"),
            Some(ms(chunk_ns(1), chunk_ns(6)) / 6.0)
        );
        assert_eq!(meta[NAMESPACE].get("tokens"), Some(&Value::Int(7)));
        assert_eq!(meta[NAMESPACE].get("content_events"), Some(&Value::Int(6)));
        assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(8)));
        assert_eq!(meta[NAMESPACE].get("chunks"), Some(&Value::Int(9)));
        assert_eq!(f(&meta, "duration_ms"), Some(ms(START_NS, end_ns)));
    }

    #[test]
    fn without_reported_usage_tokens_are_the_content_events() {
        let stream: String = CHAT_STREAM
            .split_inclusive("\n\n")
            .filter(|e| !e.contains("\"usage\""))
            .collect();
        let meta = play(
            &Player::new(LatencyPlugin),
            &stream,
            10_000,
            "text/event-stream",
        )
        .meta;
        assert_eq!(meta[NAMESPACE].get("tokens"), Some(&Value::Int(6)));
        // Everything arrived in one chunk: zero time between tokens.
        assert_eq!(f(&meta, "tpot_ms"), Some(0.0));
    }

    /// Per format: (fixture, index of the first content event, content events).
    const FORMATS: [(&str, &str, u64, u64); 5] = [
        (
            "openai chat",
            include_str!("../tests/fixtures/usage/openai_chat_stream.sse"),
            1,
            2,
        ),
        (
            "vllm completions",
            include_str!("../tests/fixtures/usage/vllm_completions_stream.sse"),
            0,
            3,
        ),
        (
            "openai responses",
            include_str!("../tests/fixtures/usage/openai_responses_stream.sse"),
            6,
            2,
        ),
        (
            "anthropic (message_start, content_block_start and ping first)",
            include_str!("../tests/fixtures/usage/anthropic_stream.sse"),
            3,
            2,
        ),
        (
            "gemini",
            include_str!("../tests/fixtures/usage/gemini_stream.sse"),
            0,
            3,
        ),
    ];

    #[test]
    fn ttft_is_the_first_content_bearing_event_of_every_format() {
        for (name, body, first, content) in FORMATS {
            let meta = play_chunks(
                &Player::new(LatencyPlugin),
                &events(body),
                "text/event-stream",
            )
            .meta;
            assert_eq!(
                f(&meta, "ttft_ms"),
                Some(ms(START_NS, chunk_ns(first))),
                "{name}: {meta:?}"
            );
            assert_eq!(
                meta[NAMESPACE].get("content_events"),
                Some(&Value::Int(content as i64)),
                "{name}"
            );
            assert!(f(&meta, "tpot_ms").is_some(), "{name}");
        }
    }

    #[test]
    fn a_compressed_stream_is_timed_like_the_plain_one() {
        use std::io::Write;
        let plain = play_chunks(
            &Player::new(LatencyPlugin),
            &events(CHAT_STREAM),
            "text/event-stream",
        )
        .meta;
        // One gzip stream flushed after every event: one compressed chunk per event.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut chunks = Vec::new();
        for e in events(CHAT_STREAM) {
            gz.write_all(e.as_bytes()).unwrap();
            gz.flush().unwrap();
            chunks.push(std::mem::take(gz.get_mut()));
        }
        chunks.last_mut().unwrap().extend(gz.finish().unwrap());
        let headers = [
            ("content-type", "text/event-stream"),
            ("content-encoding", "gzip"),
        ];
        let meta = play_response(&Player::new(LatencyPlugin), &chunks, 200, &headers).meta;
        assert_eq!(meta, plain);
    }

    #[test]
    fn responses_api_stream() {
        let meta = play(
            &Player::new(LatencyPlugin),
            RESPONSES_STREAM,
            200,
            "text/event-stream",
        )
        .meta;
        assert_eq!(meta[NAMESPACE].get("tokens"), Some(&Value::Int(3)));
        assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(11)));
        assert!(f(&meta, "tpot_ms").unwrap() > 0.0);
    }

    #[test]
    fn a_json_body_has_its_ttft_at_its_last_byte_and_an_error_body_has_none() {
        let meta = play(
            &Player::new(LatencyPlugin),
            CHAT_JSON,
            40,
            "application/json",
        )
        .meta;
        let last = chunk_ns(CHAT_JSON.len().div_ceil(40) as u64 - 1);
        assert_eq!(f(&meta, "ttft_ms"), Some(ms(START_NS, last)));
        assert_eq!(f(&meta, "ttfb_ms"), Some(ms(START_NS, FIRST_CHUNK_NS)));
        assert!(f(&meta, "tpot_ms").is_none());
        assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(0)));

        let meta = play(
            &Player::new(LatencyPlugin),
            ERROR_JSON,
            100_000,
            "application/json",
        )
        .meta;
        assert_eq!(f(&meta, "ttfb_ms"), Some(ms(START_NS, FIRST_CHUNK_NS)));
        assert!(f(&meta, "ttft_ms").is_none(), "{meta:?}");
        assert!(f(&meta, "tpot_ms").is_none());
    }
}
