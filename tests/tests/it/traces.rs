//! Traces of the front's own work against a real OTLP collector (`tests/otlp_receiver.py`, the
//! official protos), with the real front behind real Envoy: a request that carries a
//! `traceparent` gets one `plugvisor.request` span in that trace, a child of the caller's span,
//! with one `plugvisor.final <plugin>` child per plugin and the usage numbers Envoy's access log
//! has; a request without one starts a new trace; a plugin killed mid-stream shows as a replay;
//! `always_off` exports nothing. Over both OTLP protocols. Each test stops the front (SIGTERM,
//! by pid), which sends what is queued, before it reads the collector.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tests::client::chat_with;
use tests::front::FrontProcess;
use tests::otlp::{Collector, Protocol};
use tests::stack::Stack;
use tests::upstream::Params;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE}-{PARENT}-01")
}

const PLUGINS: &str = r#"
[plugins.usage]
final_timeout_ms = 5000
[plugins.test-order]
final_timeout_ms = 5000
"#;

/// The stack with `[traces]` (and `extra` tables) pointing at `collector`.
async fn stack(collector: &Collector, traces: &str, extra: &str) -> Stack {
    let toml = format!(
        "{PLUGINS}\n[traces]\n{}{traces}\n{extra}",
        collector.traces_config()
    );
    Stack::with_front("FULL_DUPLEX_STREAMED", |dir| {
        FrontProcess::start(dir, &toml, &["usage", "test-order"])
    })
    .await
}

/// Stops the front by pid and waits for it: its exporter has sent what it had.
fn stop_front(stack: &mut Stack) {
    kill(Pid::from_raw(stack.front.pid() as i32), Signal::SIGTERM).unwrap();
    let exited = tokio::task::block_in_place(|| stack.front.wait_exit(Duration::from_secs(20)));
    assert!(
        exited.is_some_and(|s| s.success()),
        "{exited:?}\n{}",
        stack.front.log()
    );
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

fn children<'a>(spans: &'a [Value], parent: &Value) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["parent_span_id"] == parent["span_id"] && s["trace_id"] == parent["trace_id"])
        .collect()
}

/// The request span whose `x-request-id` is `id`.
fn request_span<'a>(spans: &'a [Value], id: &str) -> &'a Value {
    let found: Vec<&Value> = spans
        .iter()
        .filter(|s| s["name"] == "plugvisor.request")
        .filter(|s| attr(s, "http.request.header.x-request-id")[0] == id)
        .collect();
    assert_eq!(found.len(), 1, "request spans of {id}: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_children_of_their_traceparent_with_a_span_per_plugin_final() {
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let cdir = tempfile::tempdir().unwrap();
        let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), protocol));
        let mut stack = stack(&collector, "", "").await;
        let params = Params {
            chunks: 6,
            ..Params::default()
        };
        let tp = traceparent();
        let traced: Vec<String> = (0..3).map(|i| format!("traced-{protocol:?}-{i}")).collect();
        for id in &traced {
            let got = chat_with(
                stack.envoy.port,
                &params,
                id,
                id,
                &[("traceparent", &tp), ("tracestate", "congo=t61rcWkgMzE")],
            )
            .await;
            assert_eq!((got.status, &got.error), (200, &None));
        }
        let root_id = format!("root-{protocol:?}");
        let got = chat_with(stack.envoy.port, &params, &root_id, &root_id, &[]).await;
        assert_eq!(got.status, 200);
        let lines: Vec<Value> = traced.iter().map(|id| stack.log_for(id)).collect();
        stop_front(&mut stack);

        let spans = collector.spans();
        let in_trace: Vec<&Value> = spans
            .iter()
            .filter(|s| s["trace_id"] == TRACE && s["name"] == "plugvisor.request")
            .collect();
        assert_eq!(in_trace.len(), 3, "{protocol:?}: {spans:#?}");
        for (id, line) in traced.iter().zip(&lines) {
            let r = request_span(&spans, id);
            assert_eq!(r["trace_id"], TRACE);
            assert_eq!(r["parent_span_id"], PARENT, "{protocol:?}");
            assert_eq!(r["trace_state"], "congo=t61rcWkgMzE");
            assert_eq!(r["kind"], 1, "SPAN_KIND_INTERNAL");
            assert_eq!(r["resource"]["service.name"], "plugvisor");
            assert!(r["end_time_unix_nano"].as_u64() > r["start_time_unix_nano"].as_u64());
            assert_eq!(attr(r, "http.request.method"), "POST");
            assert_eq!(attr(r, "url.path"), "/v1/chat/completions");
            assert_eq!(attr(r, "http.response.status_code"), 200);
            assert_eq!(attr(r, "plugvisor.status"), "complete");
            // The usage numbers are what Envoy's access log has for the request.
            let usage = &line["usage"];
            for (key, field) in [
                ("gen_ai.usage.input_tokens", "input_tokens"),
                ("gen_ai.usage.output_tokens", "output_tokens"),
            ] {
                assert_eq!(
                    attr(r, key).as_f64(),
                    usage[field].as_f64(),
                    "{key}: {line}"
                );
                assert!(attr(r, key).as_i64().is_some(), "{key}: {r}");
            }
            assert_eq!(attr(r, "gen_ai.usage.output_tokens"), params.chunks as i64);
            assert_eq!(attr(r, "gen_ai.response.model"), &usage["model"], "{line}");
            let events: Vec<&str> = r["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap())
                .collect();
            assert_eq!(events, ["plugvisor.first_byte"], "{r}");
            let kids = children(&spans, r);
            let mut names: Vec<&str> = kids.iter().map(|k| k["name"].as_str().unwrap()).collect();
            names.sort();
            assert_eq!(
                names,
                ["plugvisor.final test-order", "plugvisor.final usage"],
                "{protocol:?}"
            );
            for k in kids {
                assert_eq!(attr(k, "plugvisor.outcome"), "ok", "{k}");
                assert_eq!(attr(k, "plugvisor.final"), "final");
                assert!(k["start_time_unix_nano"].as_u64() >= r["start_time_unix_nano"].as_u64());
                assert!(k["end_time_unix_nano"].as_u64() <= r["end_time_unix_nano"].as_u64());
            }
        }
        // Without a traceparent: a trace of its own, with no parent.
        let root = request_span(&spans, &root_id);
        assert_ne!(root["trace_id"], TRACE);
        assert_eq!(root["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(root["span_id"].as_str().unwrap().len(), 16);
        assert_eq!(root["parent_span_id"], "");
        assert_eq!(children(&spans, root).len(), 2);
        // Nothing else: 4 requests, 3 spans each.
        assert_eq!(spans.len(), 12, "{protocol:?}");
        let metrics_seen = collector.record_ids().len();
        assert_eq!(metrics_seen, 0, "no records were configured to go there");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_killed_mid_stream_shows_a_replay_event() {
    let cdir = tempfile::tempdir().unwrap();
    let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), Protocol::Http));
    let mut stack = stack(&collector, "", "").await;
    let usage = stack.plugin_pid("usage").await;
    let params = Params {
        chunks: 30,
        delay: Duration::from_millis(20),
        ..Params::default()
    };
    let (port, tp) = (stack.envoy.port, traceparent());
    let request = tokio::spawn(async move {
        chat_with(port, &params, "killed", "killed", &[("traceparent", &tp)]).await
    });
    // Mid-stream: about a third of the chunks are through.
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill(Pid::from_raw(usage as i32), Signal::SIGKILL).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("the request within 20 s")
        .unwrap();
    assert_eq!((got.status, &got.error), (200, &None));
    stop_front(&mut stack);

    let spans = collector.spans();
    let r = request_span(&spans, "killed");
    let replays: Vec<&Value> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "plugvisor.replay")
        .collect();
    assert_eq!(replays.len(), 1, "{r}");
    assert_eq!(replays[0]["attributes"]["plugvisor.plugin"], "usage");
    let t = replays[0]["time_unix_nano"].as_u64().unwrap();
    assert!(t >= r["start_time_unix_nano"].as_u64().unwrap());
    assert!(t <= r["end_time_unix_nano"].as_u64().unwrap());
    let usage_final = children(&spans, r)
        .into_iter()
        .find(|k| k["name"] == "plugvisor.final usage")
        .expect("usage's final span");
    assert_eq!(
        attr(usage_final, "plugvisor.outcome"),
        "replayed",
        "{usage_final}"
    );
    assert_eq!(attr(usage_final, "plugvisor.replays"), 1);
    // The stream lost nothing: the record is complete, and the span says so.
    assert_eq!(attr(r, "plugvisor.status"), "complete", "{r}");
    assert_eq!(attr(r, "gen_ai.usage.output_tokens"), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampler_always_off_exports_nothing() {
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let cdir = tempfile::tempdir().unwrap();
        let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), protocol));
        // The usage records go to the same collector: proof that it takes what is sent.
        let mut stack = stack(
            &collector,
            "sampler = \"always_off\"\n",
            &format!("[records.otlp]\n{}", collector.config()),
        )
        .await;
        let tp = traceparent();
        for i in 0..3 {
            let id = format!("off-{protocol:?}-{i}");
            let got = chat_with(
                stack.envoy.port,
                &Params::default(),
                &id,
                &id,
                &[("traceparent", &tp)],
            )
            .await;
            assert_eq!(got.status, 200);
        }
        // `status` says tracing is on, where the spans go and with which sampler.
        let answer = supervisor::shell::control::request(
            &stack.front.control_socket(),
            &supervisor::shell::control::Request::Status,
        )
        .await
        .expect("control socket answers");
        let traces = answer.traces.expect("status says how tracing stands");
        assert_eq!(traces.sampler.as_deref(), Some("always_off"), "{traces:?}");
        assert!(
            traces
                .endpoint
                .as_deref()
                .is_some_and(|e| e.contains(&collector.port.to_string())),
            "{traces:?}"
        );
        assert!(
            traces.line().starts_with("traces: OTLP "),
            "{}",
            traces.line()
        );
        stop_front(&mut stack);
        assert_eq!(collector.record_ids().len(), 3, "{protocol:?}");
        assert_eq!(collector.spans(), Vec::<Value>::new(), "{protocol:?}");
        let log = stack.front.log();
        assert!(
            log.contains("sampler=always_off") || log.contains("always_off"),
            "{log}"
        );
    }
}
