//! `conformance`: the reference plugin of the plugvisor conformance kit, built on the Rust SDK
//! (`cargo build -p plugin-runner --example conformance`). The kit drives a front and this plugin
//! (or its twin in another language) through a table of cases and compares what comes back; so
//! this plugin does nothing but report what it was given, and its behaviour is a contract:
//!
//! - it subscribes to request starts, response headers, chunks with body bytes, and aborts;
//! - every hook (request start, response headers, chunk, final) appends the event's `seq` to the
//!   stream's `seqs`, counts the events for which `ctx.is_replayed()` is true in `replayed`, and
//!   adds the `len` of chunks and of the final to `bytes`;
//! - request header `x-conformance-sleep-ms: N` (0 ≤ N ≤ 10000; other values are ignored): every
//!   hook of that stream, the abort hook included, sleeps N ms before doing its work;
//! - request header `x-conformance-fail: HOOK`, HOOK one of `request_start`, `response_headers`,
//!   `chunk`, `final`: that hook panics (after its sleep), so the SDK answers the stream's final
//!   with an error and other streams are unaffected;
//! - the final returns `{"plugvisor.<name>": {"seqs": [...], "replayed": n, "bytes": n}}`, where
//!   the SDK adds `gaps` and `partial` when they apply;
//! - the final of an aborted stream (`AbortedFinal`) appends its `seq` like a final and returns
//!   the same map plus `"aborted": "<cause>"` (`client_disconnect`, `upstream_error`, `timeout`,
//!   `shutdown`).
//!
//! - with the capability `trace` agreed, the final (and the aborted final) sets the attribute
//!   `conformance.events` (how many of the stream's events its hooks ran) on its final-call span
//!   and records one span, `conformance.final`, around its own work; when the SDK found a
//!   `traceparent` in the stream's `RequestStart`, it also sets `conformance.traceparent` to it
//!   (as text), so a test can see which request span the plugin was told of.
//!
//! Its name is `conformance` unless the command line gives another
//! (`conformance <name> --connect <socket>`); the namespace follows the name.
#![forbid(unsafe_code)]

use std::time::Duration;

use plugin_runner::{
    Abort, AbortedFinal, Chunk, EventCtx, Final, Metadata, Plugin, RequestStart, ResponseHeaders,
    Subscriptions, Value,
};

/// The name when the command line gives none.
const DEFAULT_NAME: &str = "conformance";
/// Request header: every hook of the stream sleeps this many milliseconds first.
const SLEEP_HEADER: &str = "x-conformance-sleep-ms";
/// Request header: the named hook panics.
const FAIL_HEADER: &str = "x-conformance-fail";
/// The longest sleep a request may ask for, in milliseconds.
const MAX_SLEEP_MS: u64 = 10_000;

/// The hooks a request may ask to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    RequestStart,
    ResponseHeaders,
    Chunk,
    Final,
}

impl Hook {
    fn parse(name: &str) -> Option<Hook> {
        Some(match name.trim() {
            "request_start" => Hook::RequestStart,
            "response_headers" => Hook::ResponseHeaders,
            "chunk" => Hook::Chunk,
            "final" => Hook::Final,
            _ => return None,
        })
    }
}

/// The plugin; its namespace is `plugvisor.<name>`.
#[derive(Clone)]
struct Conformance {
    namespace: String,
}

impl Conformance {
    fn new(name: &str) -> Conformance {
        Conformance {
            namespace: format!("plugvisor.{name}"),
        }
    }
}

/// What one stream has seen so far, and what its request asked for.
#[derive(Default)]
struct Stream {
    seqs: Vec<u32>,
    replayed: u64,
    bytes: u64,
    sleep: Option<Duration>,
    fail: Option<Hook>,
}

impl Stream {
    /// The work every hook does: sleep if asked, fail if asked, then record the event.
    fn hook(&mut self, hook: Option<Hook>, ctx: &EventCtx, len: u32) {
        if let Some(sleep) = self.sleep {
            std::thread::sleep(sleep);
        }
        if hook.is_some() && hook == self.fail {
            panic!("{FAIL_HEADER}: {hook:?} asked this hook to fail");
        }
        self.seqs.push(ctx.seq);
        if ctx.is_replayed() {
            self.replayed += 1;
        }
        self.bytes += u64::from(len);
    }
}

impl Conformance {
    /// The stream's map: what it saw, and the cause when it was aborted.
    fn report(&self, s: &Stream, aborted: Option<&str>) -> Metadata {
        let _span = plugin_runner::trace::span("conformance.final");
        plugin_runner::trace::attribute("conformance.events", s.seqs.len() as u64);
        if let Some(tp) = plugin_runner::trace::traceparent() {
            plugin_runner::trace::attribute("conformance.traceparent", tp.to_string());
        }
        let seqs = s.seqs.iter().map(|&q| Value::from(q)).collect();
        let mut own = vec![
            ("seqs", Value::List(seqs)),
            ("replayed", Value::from(s.replayed)),
            ("bytes", Value::from(s.bytes)),
        ];
        if let Some(cause) = aborted {
            own.push(("aborted", Value::from(cause)));
        }
        Metadata::from([(self.namespace.clone(), Value::map(own))])
    }
}

impl Plugin for Conformance {
    type Stream = Stream;

    fn name(&self) -> &str {
        self.namespace.trim_start_matches("plugvisor.")
    }

    fn subscriptions(&self) -> Subscriptions {
        Subscriptions::ALL
    }

    fn on_request_start(&self, s: &mut Stream, ctx: &EventCtx, e: &RequestStart) {
        let header = |name| plugin_runner::protocol::find_header(&e.headers, name);
        s.sleep = header(SLEEP_HEADER)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&ms| ms <= MAX_SLEEP_MS)
            .map(Duration::from_millis);
        s.fail = header(FAIL_HEADER).and_then(Hook::parse);
        s.hook(Some(Hook::RequestStart), ctx, 0);
    }

    fn on_response_headers(&self, s: &mut Stream, ctx: &EventCtx, _: &ResponseHeaders) {
        s.hook(Some(Hook::ResponseHeaders), ctx, 0);
    }

    fn on_chunk(&self, s: &mut Stream, ctx: &EventCtx, c: &Chunk) {
        s.hook(Some(Hook::Chunk), ctx, c.len);
    }

    fn on_final(&self, s: &mut Stream, ctx: &EventCtx, f: &Final) -> Metadata {
        s.hook(Some(Hook::Final), ctx, f.len);
        self.report(s, None)
    }

    fn on_aborted_final(&self, s: &mut Stream, ctx: &EventCtx, a: &AbortedFinal) -> Metadata {
        s.hook(Some(Hook::Final), ctx, 0);
        self.report(s, Some(a.cause.as_str()))
    }

    fn on_abort(&self, s: &mut Stream, _: &EventCtx, _: &Abort) {
        if let Some(sleep) = s.sleep {
            std::thread::sleep(sleep);
        }
    }
}

fn main() {
    // Parsed here rather than by `plugin_runner::run`, so the plugin knows the name it runs
    // under and writes the namespace the host adds `gaps` and `partial` to.
    let args = plugin_runner::cli::Args::parse_or_exit();
    let name = args.plugin.clone().unwrap_or_else(|| DEFAULT_NAME.into());
    if args.list {
        println!("{name}\tthe conformance kit's reference plugin");
        std::process::exit(0);
    }
    plugin_runner::launch(Conformance::new(&name), &args, &name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_runner::testing::{Player, Split, Stream as Events};
    use std::time::Instant;

    fn stream(id: u64, headers: &[(&str, &str)]) -> Events {
        Events::new(id)
            .request(headers)
            .response(200, &[("content-type", "text/event-stream")])
            .body("data: 1\n\ndata: 22\n\n", Split::SseEvents)
            .final_(b"xyz")
    }

    fn own(played: &plugin_runner::testing::Played) -> (Vec<i64>, i64, i64) {
        let own = played.own();
        let seqs = match own.get("seqs") {
            Some(Value::List(l)) => l.iter().map(|v| v.as_i64().unwrap()).collect(),
            other => panic!("{other:?}"),
        };
        let int = |k| own.get(k).and_then(Value::as_i64).unwrap();
        (seqs, int("replayed"), int("bytes"))
    }

    #[test]
    fn reports_every_seq_replayed_count_and_bytes() {
        let player = Player::new(Conformance::new(DEFAULT_NAME));
        let played = player.play(&stream(1, &[]));
        assert_eq!(own(&played), (vec![0, 1, 2, 3, 4], 0, 9 + 10 + 3));
        let meta = played.metadata();
        assert_eq!(meta.keys().collect::<Vec<_>>(), ["plugvisor.conformance"]);

        let played = player.play(&stream(2, &[]).replayed(2));
        assert_eq!(own(&played).1, 2);
    }

    #[test]
    fn the_final_traces_its_event_count_and_a_span() {
        let player = Player::new(Conformance::new(DEFAULT_NAME));
        let played = player.play(&stream(1, &[]));
        let spans = played.spans().expect("spans recorded");
        assert_eq!(spans.stream_id, 1);
        assert_eq!(
            spans.attributes,
            [("conformance.events".to_owned(), Value::from(5u64))]
        );
        assert_eq!(spans.spans.len(), 1);
        assert_eq!(spans.spans[0].name, "conformance.final");
        assert!(spans.spans[0].end_ns >= spans.spans[0].start_ns);

        // The request span it was told of, as its SDK parsed it from the RequestStart.
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let played = player.play(&stream(2, &[("traceparent", tp)]));
        let spans = played.spans().expect("spans recorded");
        assert_eq!(
            spans.attributes[1],
            ("conformance.traceparent".to_owned(), Value::from(tp))
        );
    }

    #[test]
    fn gaps_and_partial_streams_come_from_the_sdk() {
        let player = Player::new(Conformance::new("conf2"));
        let played = player.play(&stream(1, &[]).drop_seqs([2]));
        assert_eq!(own(&played).0, [0, 1, 3, 4]);
        assert_eq!(played.own().get("gaps"), Some(&Value::Int(1)));
        let played = player.play(&stream(2, &[]).lose_start(1));
        assert_eq!(own(&played).0, [1, 2, 3, 4]);
        assert_eq!(played.own().get("partial"), Some(&Value::Bool(true)));
    }

    #[test]
    fn the_named_hook_fails_its_stream_only() {
        let player = Player::new(Conformance::new(DEFAULT_NAME));
        for hook in ["request_start", "response_headers", "chunk", "final"] {
            let played = player.play(&stream(1, &[(FAIL_HEADER, hook)]));
            let err = played
                .error()
                .unwrap_or_else(|| panic!("{hook}: {played:?}"));
            let on = if hook == "final" {
                "on_final".to_owned()
            } else {
                format!("on_{hook}")
            };
            assert!(err.contains(&on), "{hook}: {err}");
        }
        let played = player.play(&stream(2, &[(FAIL_HEADER, "nothing")]));
        assert_eq!(own(&played).0.len(), 5);
    }

    #[test]
    fn the_sleep_header_delays_every_hook_and_is_bounded() {
        let player = Player::new(Conformance::new(DEFAULT_NAME));
        let started = Instant::now();
        player.play(&stream(1, &[(SLEEP_HEADER, "20")]));
        assert!(started.elapsed() >= Duration::from_millis(5 * 20));
        let started = Instant::now();
        let played = player.play(&stream(2, &[(SLEEP_HEADER, "10001")]));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(own(&played).0.len(), 5);
    }
}
