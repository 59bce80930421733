//! Traces of the front's own work against a real OTLP collector (`tests/otlp_receiver.py`, the
//! official protos), with the real front behind real Envoy: a request that carries a
//! `traceparent` gets one `plugvisor.request` span in that trace, a child of the caller's span,
//! with one `plugvisor.final <plugin>` child per plugin and the usage numbers Envoy's access log
//! has; a request without one starts a new trace; a plugin killed mid-stream shows as a replay;
//! `always_off` exports nothing. Over both OTLP protocols. Each final span's outcome shows as it
//! happened (`timeout`, `missing`/`not_connected`, `not_asked`), a restart mid-stream as a
//! handover event, a full queue as a gap event; a plugin with the capability `trace` gets a
//! `traceparent` naming the request span, and its own attribute and span arrive in the trace;
//! so do those of the Python SDK's `wordcount.py` and the Rust SDK's `conformance` example,
//! spawned by the front as a plugin author ships them. Each test stops the front (SIGTERM, by
//! pid), which sends what is queued, before it reads the collector; fake plugins run in the test
//! and end with it, spawned ones with the front.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tests::client::{chat_and_disconnect, chat_with};
use tests::envoy::{Envoy, EnvoyOptions};
use tests::fake_plugin::{Behaviour, FakePlugin, FAKE_ATTRIBUTE, FAKE_SPAN};
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

/// The stack with `plugins` (some external: `spawn = false`) and `[traces]` pointing at
/// `collector`; waits for the spawned plugins in `expect` only.
async fn stack_with(collector: &Collector, plugins: &str, expect: &[&str]) -> Stack {
    let toml = format!("{plugins}\n[traces]\n{}", collector.traces_config());
    Stack::with_front("FULL_DUPLEX_STREAMED", |dir| {
        FrontProcess::start(dir, &toml, expect)
    })
    .await
}

/// Connects a fake plugin as `name` to the stack's front and waits until the front has it.
async fn fake(stack: &Stack, name: &str, behaviour: Behaviour) -> FakePlugin {
    let socket =
        FrontProcess::runtime_dir_in(stack.dir.path()).join(format!("plugins/{name}.sock"));
    let plugin = FakePlugin::welcome(&socket, name, behaviour).await;
    let series = format!("plugvisor_plugin_connected{{plugin=\"{name}\"}} 1");
    tests::eventually(&format!("{name} connected"), Duration::from_secs(5), || {
        stack.front.metrics().contains(&series)
    });
    plugin
}

/// The child span of `request` for `plugin`'s final call.
fn final_span<'a>(spans: &'a [Value], request: &Value, plugin: &str) -> &'a Value {
    let name = format!("plugvisor.final {plugin}");
    let found: Vec<&Value> = children(spans, request)
        .into_iter()
        .filter(|k| k["name"] == name.as_str())
        .collect();
    assert_eq!(found.len(), 1, "{name} of {request}: {spans:#?}");
    found[0]
}

fn events<'a>(request: &'a Value, name: &str) -> Vec<&'a Value> {
    request["events"]
        .as_array()
        .map(|e| e.iter().filter(|e| e["name"] == name).collect())
        .unwrap_or_default()
}

/// A plugin that never answers (`timeout`, its span as long as `final_timeout_ms`), an external
/// plugin that is not connected (`missing`, `not_connected`), and, on a stream the client left,
/// a plugin that does not answer aborted streams (`not_asked`, a zero-length span). The fake
/// that answers is `test-order`, the one plugin granted the namespace every fake writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_spans_say_timeout_not_connected_and_not_asked() {
    let cdir = tempfile::tempdir().unwrap();
    let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), Protocol::Http));
    let plugins = "[plugins.slow]\nspawn = false\nfinal_timeout_ms = 300\n\
                   [plugins.absent]\nspawn = false\n\
                   [plugins.test-order]\nspawn = false\nfinal_timeout_ms = 5000\n";
    let mut stack = stack_with(&collector, plugins, &[]).await;
    let hang = Behaviour {
        hang_finals: true,
        ..Behaviour::default()
    };
    let _slow = fake(&stack, "slow", hang).await;
    let no_aborted_final = Behaviour {
        capabilities: Some(vec!["replayed", "trace"]),
        ..Behaviour::default()
    };
    let quiet = fake(&stack, "test-order", no_aborted_final).await;
    let got = chat_with(
        stack.envoy.port,
        &Params::default(),
        "outcomes",
        "outcomes",
        &[("traceparent", &traceparent())],
    )
    .await;
    assert_eq!((got.status, &got.error), (200, &None));
    let slow_stream = Params {
        chunks: 40,
        delay: Duration::from_millis(20),
        ..Params::default()
    };
    chat_and_disconnect(stack.envoy.port, &slow_stream, "left", 3).await;
    tests::eventually_async(
        "the abandoned stream's Abort at test-order",
        Duration::from_secs(10),
        async || !quiet.record.lock().unwrap().aborted.is_empty(),
    )
    .await;
    stop_front(&mut stack);

    let spans = collector.spans();
    let r = request_span(&spans, "outcomes");
    let slow = final_span(&spans, r, "slow");
    assert_eq!(attr(slow, "plugvisor.outcome"), "timeout", "{slow}");
    assert_eq!(attr(slow, "plugvisor.reason"), "timeout");
    assert_eq!(slow["status"]["code"], 2, "STATUS_CODE_ERROR: {slow}");
    let waited = slow["end_time_unix_nano"].as_u64().unwrap()
        - slow["start_time_unix_nano"].as_u64().unwrap();
    assert!(
        (280_000_000..2_000_000_000).contains(&waited),
        "the span lasts final_timeout_ms: {waited} ns"
    );
    let absent = final_span(&spans, r, "absent");
    assert_eq!(attr(absent, "plugvisor.outcome"), "missing", "{absent}");
    assert_eq!(attr(absent, "plugvisor.reason"), "not_connected");
    assert_eq!(absent["status"]["code"], 2);
    assert_eq!(
        attr(final_span(&spans, r, "test-order"), "plugvisor.outcome"),
        "ok"
    );
    assert_eq!(attr(r, "plugvisor.status"), "partial", "{r}");

    let left = request_span(&spans, "left");
    assert_eq!(attr(left, "plugvisor.status"), "aborted", "{left}");
    assert_eq!(attr(left, "plugvisor.cause"), "client_disconnect");
    let q = final_span(&spans, left, "test-order");
    assert_eq!(attr(q, "plugvisor.outcome"), "not_asked", "{q}");
    assert_eq!(attr(q, "plugvisor.final"), "aborted_final");
    assert_eq!(q["start_time_unix_nano"], q["end_time_unix_nano"], "{q}");
    // A plugin never connected is not known to answer aborted streams: not asked either.
    assert_eq!(
        attr(final_span(&spans, left, "absent"), "plugvisor.outcome"),
        "not_asked"
    );
}

/// `plugvisor restart usage` while a stream runs, with a drain shorter than the stream: the
/// stream moves to the new process at the drain's end, and its request span has a handover
/// event (not a replay), timed within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_stream_shows_a_handover_event() {
    let cdir = tempfile::tempdir().unwrap();
    let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), Protocol::Http));
    let plugins = "[plugins.usage]\nfinal_timeout_ms = 5000\ndrain_grace_ms = 200\n";
    let mut stack = stack_with(&collector, plugins, &["usage"]).await;
    let before = stack.plugin_pid("usage").await;
    let params = Params {
        chunks: 40,
        delay: Duration::from_millis(25),
        ..Params::default()
    };
    let (port, tp) = (stack.envoy.port, traceparent());
    let expected = params.clone();
    let request = tokio::spawn(async move {
        chat_with(port, &expected, "handed", "handed", &[("traceparent", &tp)]).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = supervisor::shell::control::request(
        &stack.front.control_socket(),
        &supervisor::shell::control::Request::Restart {
            plugin: "usage".into(),
        },
    )
    .await
    .expect("control socket answers");
    assert!(answer.error.is_none(), "{answer:?}");
    let got = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("the request within 20 s")
        .unwrap();
    assert_eq!((got.status, &got.error), (200, &None));
    assert_ne!(
        stack.plugin_pid("usage").await,
        before,
        "a new process serves"
    );
    stop_front(&mut stack);

    let spans = collector.spans();
    let r = request_span(&spans, "handed");
    let handovers = events(r, "plugvisor.handover");
    assert_eq!(handovers.len(), 1, "{r}");
    assert_eq!(handovers[0]["attributes"]["plugvisor.plugin"], "usage");
    assert!(events(r, "plugvisor.replay").is_empty(), "{r}");
    let t = handovers[0]["time_unix_nano"].as_u64().unwrap();
    assert!(t > r["start_time_unix_nano"].as_u64().unwrap());
    assert!(t < r["end_time_unix_nano"].as_u64().unwrap());
    let usage = final_span(&spans, r, "usage");
    assert_eq!(attr(usage, "plugvisor.final"), "final", "{usage}");
    assert_eq!(
        attr(r, "gen_ai.usage.output_tokens"),
        params.chunks as i64,
        "{r}"
    );
}

/// A plugin too slow for its queue (one event, a 64 KiB window, 50 ms a chunk) loses events of
/// the stream: its final span counts them and the request span has a gap event at its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_shows_a_gap_event() {
    let cdir = tempfile::tempdir().unwrap();
    let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), Protocol::Http));
    let plugins = "[plugins.lagging]\nspawn = false\nfinal_timeout_ms = 10000\n\
                   queue_events = 1\nbudget_bytes = 65536\nreplay_bytes = 0\n";
    let mut stack = stack_with(&collector, plugins, &[]).await;
    let slow = Behaviour {
        chunk_delay: Duration::from_millis(50),
        ..Behaviour::default()
    };
    let _lagging = fake(&stack, "lagging", slow).await;
    let params = Params {
        chunks: 40,
        size: 8000,
        delay: Duration::from_millis(2),
        ..Params::default()
    };
    let got = chat_with(
        stack.envoy.port,
        &params,
        "gappy",
        "gappy",
        &[("traceparent", &traceparent())],
    )
    .await;
    assert_eq!((got.status, &got.error), (200, &None));
    assert_eq!(got.body(), params.body(), "the client's body is whole");
    stop_front(&mut stack);

    let spans = collector.spans();
    let r = request_span(&spans, "gappy");
    let lagging = final_span(&spans, r, "lagging");
    let lost = attr(lagging, "plugvisor.lost_events")
        .as_u64()
        .expect("lost events counted");
    assert!(lost > 0, "{lagging}");
    let gaps = events(r, "plugvisor.gap");
    assert_eq!(gaps.len(), 1, "{r}");
    assert_eq!(gaps[0]["attributes"]["plugvisor.plugin"], "lagging");
    assert_eq!(gaps[0]["attributes"]["plugvisor.lost_events"], lost);
    assert_eq!(gaps[0]["time_unix_nano"], lagging["end_time_unix_nano"]);
    assert_eq!(attr(r, "plugvisor.status"), "partial", "{r}");
}

/// Capability `trace` end to end: the plugin's `RequestStart` carries a `traceparent` naming the
/// request span (in the caller's trace), and what the plugin sends before its answer arrives at
/// the collector: its attribute on its final span (its `plugvisor.outcome` not taken), its span
/// a child of the request span with `plugvisor.plugin`, its monotonic times as wall-clock times
/// within the request's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_own_attribute_and_span_arrive_in_the_requests_trace() {
    let cdir = tempfile::tempdir().unwrap();
    let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), Protocol::Grpc));
    let plugins = "[plugins.test-order]\nspawn = false\nfinal_timeout_ms = 5000\n\
                   [plugins.plain]\nspawn = false\nfinal_timeout_ms = 5000\n";
    let mut stack = stack_with(&collector, plugins, &[]).await;
    let traced = fake(
        &stack,
        "test-order",
        Behaviour {
            trace_spans: true,
            ..Behaviour::default()
        },
    )
    .await;
    let plain = fake(
        &stack,
        "plain",
        Behaviour {
            capabilities: Some(vec!["replayed", "aborted_final"]),
            ..Behaviour::default()
        },
    )
    .await;
    let tp = traceparent();
    let params = Params {
        chunks: 4,
        delay: Duration::from_millis(10),
        ..Params::default()
    };
    let got = chat_with(
        stack.envoy.port,
        &params,
        "own",
        "own",
        &[("traceparent", &tp)],
    )
    .await;
    assert_eq!((got.status, &got.error), (200, &None));
    stop_front(&mut stack);

    let spans = collector.spans();
    let r = request_span(&spans, "own");
    assert_eq!(r["trace_id"], TRACE);
    let seen = traced.record.lock().unwrap().traceparents.clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].1.as_deref(),
        Some(format!("00-{TRACE}-{}-01", r["span_id"].as_str().unwrap()).as_str()),
        "the plugin's traceparent names the request span"
    );
    // Without `trace`, the headers as they came.
    let plain_seen = plain.record.lock().unwrap().traceparents.clone();
    assert_eq!(plain_seen[0].1.as_deref(), Some(tp.as_str()));

    let fin = final_span(&spans, r, "test-order");
    assert_eq!(attr(fin, FAKE_ATTRIBUTE.0), FAKE_ATTRIBUTE.1, "{fin}");
    assert_eq!(attr(fin, "plugvisor.outcome"), "ok", "{fin}");
    assert_eq!(
        attr(final_span(&spans, r, "plain"), FAKE_ATTRIBUTE.0),
        &Value::Null
    );
    let own: Vec<&Value> = children(&spans, r)
        .into_iter()
        .filter(|s| s["name"] == FAKE_SPAN)
        .collect();
    assert_eq!(own.len(), 1, "{spans:#?}");
    let own = own[0];
    assert_eq!(attr(own, "plugvisor.plugin"), "test-order");
    assert!(attr(own, "fake.stream").as_u64().is_some(), "{own}");
    let (start, end) = (
        own["start_time_unix_nano"].as_u64().unwrap(),
        own["end_time_unix_nano"].as_u64().unwrap(),
    );
    let (r_start, r_end) = (
        r["start_time_unix_nano"].as_u64().unwrap(),
        r["end_time_unix_nano"].as_u64().unwrap(),
    );
    // The clocks are converted, not copied: within the request's span, give or take 20 ms of
    // the two readings' distance.
    let slack = 20_000_000;
    assert!(
        start + slack >= r_start && end <= r_end + slack,
        "{own}\n{r}"
    );
    assert!(
        end >= start + 30_000_000,
        "the span covers the 4 chunks 10 ms apart: {own}"
    );
    // 1 request, 2 final spans and the plugin's own.
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let metrics_dropped = stack.front.log();
    assert!(
        !metrics_dropped.contains("protocol error"),
        "{metrics_dropped}"
    );
}

/// A reload (SIGHUP) that changes `sampler` applies to the streams that start after it, without
/// a restart: `always_off` exports nothing, then `always_on` traces the next request; the reload
/// says it applied the key, and `status` names the new sampler. The exporter is the one the
/// front started with (its endpoint did not change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_sampler_applies_to_new_streams() {
    let cdir = tempfile::tempdir().unwrap();
    let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), Protocol::Http));
    let plugins = "[plugins.usage]\nfinal_timeout_ms = 5000\n";
    let toml = |sampler: &str| {
        format!(
            "{plugins}\n[traces]\n{}sampler = \"{sampler}\"\n",
            collector.traces_config()
        )
    };
    let mut stack = Stack::with_front("FULL_DUPLEX_STREAMED", |dir| {
        FrontProcess::start(dir, &toml("always_off"), &["usage"])
    })
    .await;
    let tp = traceparent();
    let send = async |id: &str| {
        let got = chat_with(
            stack.envoy.port,
            &Params::default(),
            id,
            id,
            &[("traceparent", &tp)],
        )
        .await;
        assert_eq!((got.status, &got.error), (200, &None));
    };
    send("before-reload").await;
    tokio::task::block_in_place(|| {
        stack
            .front
            .reloaded(|| stack.front.reload(&toml("always_on")))
    });
    let log = stack.front.log();
    assert!(log.contains("applied traces.sampler"), "{log}");
    assert!(!log.contains("NOT applied: traces."), "{log}");
    let status = supervisor::shell::control::request(
        &stack.front.control_socket(),
        &supervisor::shell::control::Request::Status,
    )
    .await
    .expect("control socket answers")
    .traces
    .expect("status says how tracing stands");
    assert_eq!(status.sampler.as_deref(), Some("always_on"), "{status:?}");
    send("after-reload").await;
    stop_front(&mut stack);

    let spans = collector.spans();
    let requests: Vec<&Value> = spans
        .iter()
        .filter(|s| s["name"] == "plugvisor.request")
        .collect();
    assert_eq!(requests.len(), 1, "{spans:#?}");
    request_span(&spans, "after-reload");
}

/// `check-config` with the standard variables: `OTEL_TRACES_EXPORTER` naming an exporter
/// plugvisor has not is refused like a bad key (exit 78, the variable named); `OTEL_SDK_DISABLED`
/// and `OTEL_TRACES_EXPORTER=none` are accepted and said to turn the configured traces off; a
/// sampler variable plugvisor cannot use is accepted with a warning (it falls back).
#[test]
fn check_config_refuses_an_unknown_exporter_and_says_what_the_variables_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plugvisor.toml");
    std::fs::write(
        &path,
        "[plugins.usage]\n[traces]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\n",
    )
    .unwrap();
    let run = |vars: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(tests::bins::plugvisor());
        cmd.arg("check-config").arg(&path);
        for name in [
            "OTEL_SDK_DISABLED",
            "OTEL_TRACES_EXPORTER",
            "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER_ARG",
        ] {
            cmd.env_remove(name);
        }
        cmd.envs(vars.iter().copied());
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, stderr) = run(&[("OTEL_TRACES_EXPORTER", "zipkin")]);
    assert_eq!(code, Some(78), "EX_CONFIG, as for a bad key: {stderr}");
    assert!(stderr.contains("$OTEL_TRACES_EXPORTER"), "{stderr}");
    assert!(stderr.contains("zipkin"), "{stderr}");
    for (var, value) in [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_TRACES_EXPORTER", "none"),
    ] {
        let (code, stdout, stderr) = run(&[(var, value)]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stdout.contains(&format!("traces: off ({var}={value} in the environment")),
            "{stdout}"
        );
    }
    let (code, stdout, stderr) = run(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains("traces: off"), "{stdout}");
    assert!(
        stderr.contains("warning: OTEL_TRACES_SAMPLER ignored")
            && stderr.contains("parentbased_always_on"),
        "{stderr}"
    );
}

/// The plugins of [`sdk_stack`]: the configured name, and the key of its namespace in Envoy's
/// access log.
const SDK_PLUGINS: [(&str, &str); 3] = [
    ("wordcount", "wordcount"),
    ("conformance", "conformance"),
    ("py-conformance", "py_conformance"),
];

/// The stack of [`stack_with`] with the SDKs' plugins as an author ships them, spawned by the
/// front: `wordcount.py` and the conformance twin `conformance.py` (as `py-conformance`), run by
/// the interpreter of a venv the Python SDK was pip-installed into, and the Rust SDK's
/// `conformance` example binary. Envoy's access log shows each plugin's namespace, so the test
/// can compare what a plugin reported with what it traced.
async fn sdk_stack(collector: &Collector) -> Stack {
    tests::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = tests::upstream::Upstream::start().await;
    let (front, envoy) = tokio::task::block_in_place(|| {
        let python = tests::python::shared_venv();
        let examples = tests::python::repo().join("sdk/python/examples");
        let socket = |name: &str| {
            FrontProcess::runtime_dir_in(dir.path())
                .join(format!("plugins/{name}.sock"))
                .display()
                .to_string()
        };
        let plugin = |name: &str, command: &std::path::Path, args: &[&str]| {
            let args: Vec<String> = args
                .iter()
                .map(|a| format!("{a:?}"))
                .chain(["\"--connect\"".into(), format!("{:?}", socket(name))])
                .collect();
            format!(
                "[plugins.{name}]\ncommand = {:?}\nargs = [{}]\nfinal_timeout_ms = 5000\n",
                command.display().to_string(),
                args.join(", ")
            )
        };
        let wordcount = examples.join("wordcount.py").display().to_string();
        let py_conformance = examples.join("conformance.py").display().to_string();
        let toml = [
            plugin("wordcount", &python, &[&wordcount]),
            plugin(
                "conformance",
                &tests::bins::require("examples/conformance"),
                &["conformance"],
            ),
            plugin(
                "py-conformance",
                &python,
                &[&py_conformance, "--as", "py-conformance"],
            ),
            format!("[traces]\n{}", collector.traces_config()),
        ]
        .concat();
        let names = SDK_PLUGINS.map(|(name, _)| name);
        let front = FrontProcess::start(dir.path(), &toml, &names);
        let envoy = Envoy::start_edited(
            dir.path(),
            &EnvoyOptions {
                ext_proc: front.ext_proc.clone(),
                upstream_port: upstream.port,
                extra_namespaces: names.map(|n| format!("plugvisor.{n}")).to_vec(),
                ..EnvoyOptions::default()
            },
            |yaml| {
                let at =
                    "                  test_order: \"%DYNAMIC_METADATA(plugvisor.test-order)%\"\n";
                assert!(yaml.contains(at), "examples/envoy.yaml lost `{at}`");
                let logged: String = SDK_PLUGINS
                    .map(|(n, key)| {
                        format!("                  {key}: \"%DYNAMIC_METADATA(plugvisor.{n})%\"\n")
                    })
                    .concat();
                yaml.replace(at, &format!("{at}{logged}"))
            },
        );
        (front, envoy)
    });
    Stack {
        envoy,
        front,
        upstream,
        dir,
    }
}

/// Both SDKs as a plugin author uses them, through real Envoy to the real collector. For each
/// request sent with a `traceparent`:
/// - the Python SDK's `wordcount.py` puts `wordcount.words` (the words streamed, as in its
///   Envoy metadata) on its `plugvisor.final wordcount` span;
/// - each conformance twin (the Rust SDK's `conformance` example, the Python SDK's
///   `conformance.py`) puts `conformance.events` (as many as the `seqs` of its metadata) and
///   `conformance.traceparent` (the `traceparent` its SDK handed it: the request span's) on its
///   final span, and records `conformance.final`: a child of the request span with
///   `plugvisor.plugin` naming it, its monotonic times converted to wall-clock times within its
///   final call's.
///
/// No plugin takes the front's `plugvisor.outcome`, none gets another's attributes, no `Spans`
/// is dropped, and nothing else arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_rust_sdk_plugins_add_their_attributes_and_spans_to_the_requests_trace() {
    let cdir = tempfile::tempdir().unwrap();
    let collector = tokio::task::block_in_place(|| Collector::start(cdir.path(), Protocol::Http));
    let mut stack = sdk_stack(&collector).await;
    let tp = traceparent();
    // Two requests of different lengths: each trace carries its own counts, not the other's.
    let requests = [("sdk-short", 3), ("sdk-long", 12)].map(|(id, chunks)| {
        let params = Params {
            chunks,
            delay: Duration::from_millis(5),
            ..Params::default()
        };
        (id, params)
    });
    let mut lines = Vec::new();
    for (id, params) in &requests {
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            chat_with(stack.envoy.port, params, id, id, &[("traceparent", &tp)]),
        )
        .await
        .unwrap_or_else(|_| panic!("{id} within 30 s"));
        assert_eq!((got.status, &got.error), (200, &None), "{id}");
        assert_eq!(got.body(), params.body(), "{id}");
        lines.push(stack.log_for(id));
    }
    // Every `Spans` was taken: none dropped, for any reason.
    let metrics = stack.front.metrics();
    let dropped: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("plugvisor_plugin_spans_dropped_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(dropped.is_empty(), "{dropped:?}");
    stop_front(&mut stack);

    let spans = collector.spans();
    let time = |s: &Value, k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k}: {s}"));
    for ((id, params), line) in requests.iter().zip(&lines) {
        let r = request_span(&spans, id);
        assert_eq!(r["trace_id"], TRACE, "{r}");
        assert_eq!(r["parent_span_id"], PARENT, "{r}");
        for (plugin, _) in SDK_PLUGINS {
            let fin = final_span(&spans, r, plugin);
            assert_eq!(attr(fin, "plugvisor.outcome"), "ok", "{id}: {fin}");
        }

        // Python SDK, wordcount: the attribute its final set through `ctx.trace`, the count it
        // reported. It records no span, and has no traceparent to show: it does not subscribe
        // to request starts.
        let words = params.text().split_whitespace().count() as i64;
        assert_eq!(line["wordcount"]["words"], words as f64, "{line}");
        let wc = final_span(&spans, r, "wordcount");
        assert_eq!(attr(wc, "wordcount.words"), words, "{id}: {wc}");
        assert_eq!(attr(wc, "conformance.events"), &Value::Null, "{wc}");

        // Both conformance twins: the attributes on their own final span, their span beside it.
        let request_tp = format!("00-{TRACE}-{}-01", r["span_id"].as_str().unwrap());
        for (plugin, key) in &SDK_PLUGINS[1..] {
            let seqs = line[key]["seqs"]
                .as_array()
                .unwrap_or_else(|| panic!("{plugin}'s seqs in {line}"))
                .len();
            // A request start, response headers, a chunk or more, and the final.
            assert!(seqs >= 4, "{line}");
            let fin = final_span(&spans, r, plugin);
            assert_eq!(attr(fin, "conformance.events"), seqs as i64, "{id}: {fin}");
            assert_eq!(
                attr(fin, "conformance.traceparent"),
                request_tp.as_str(),
                "{plugin} was told of the request span, not the caller's: {fin}"
            );
            assert_eq!(attr(fin, "wordcount.words"), &Value::Null, "{fin}");

            let own: Vec<&Value> = children(&spans, r)
                .into_iter()
                .filter(|s| s["name"] == "conformance.final")
                .filter(|s| attr(s, "plugvisor.plugin") == *plugin)
                .collect();
            assert_eq!(own.len(), 1, "{id}, {plugin}: {spans:#?}");
            let own = own[0];
            assert_eq!(own["kind"], 1, "SPAN_KIND_INTERNAL: {own}");
            let (start, end) = (
                time(own, "start_time_unix_nano"),
                time(own, "end_time_unix_nano"),
            );
            assert!(end >= start, "{own}");
            // Converted from the plugin's monotonic clock: within its final call's span, give
            // or take 20 ms of the two clock readings' distance.
            let slack = 20_000_000;
            assert!(
                start + slack >= time(fin, "start_time_unix_nano")
                    && end <= time(fin, "end_time_unix_nano") + slack,
                "the plugin's span is within its final call: {own}\n{fin}"
            );
        }
        // The request's children: a final span per plugin, and the twins' own spans.
        let mut names: Vec<&str> = children(&spans, r)
            .iter()
            .map(|k| k["name"].as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "conformance.final",
                "conformance.final",
                "plugvisor.final conformance",
                "plugvisor.final py-conformance",
                "plugvisor.final wordcount"
            ],
            "{id}"
        );
    }
    // Two requests, six spans each: nothing else arrived.
    assert_eq!(spans.len(), 12, "{spans:#?}");
    let log = stack.front.log();
    assert!(!log.contains("protocol error"), "{log}");
}
