//! Every request accounted for, through real Envoy and the real front: complete streams, clients
//! that leave at spread points, upstreams that reset mid-stream, and streams cut by a front stop
//! each get exactly one usage
//! record in the JSON Lines file. A complete one's numbers equal what Envoy logged; an aborted
//! one says so, with its cause and the output estimated from the content the front saw (at least
//! what the client received, at most what the upstream had). The same records reach a real OTLP
//! collector (`tests/otlp_receiver.py`), each once by `record_id`.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tests::client::{chat, chat_and_disconnect};
use tests::envoy::{Envoy, EnvoyOptions};
use tests::front::FrontProcess;
use tests::otlp::{Collector, Protocol};
use tests::upstream::{Params, Upstream};

const COMPLETE: usize = 8;
const LEAVING: usize = 8;
const RESET: usize = 4;
const CUT: usize = 4;

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_record_complete_aborted_or_cut() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let listen = format!("unix:{}", dir.path().join("ext_proc.sock").display());
    let collector = tokio::task::block_in_place(|| Collector::start(dir.path(), Protocol::Http));
    let (mut front, envoy) = tokio::task::block_in_place(|| {
        let front = FrontProcess::start_from(
            &tests::bins::plugvisor(),
            dir.path(),
            &listen,
            "shutdown_grace_ms = 300",
            &format!("[plugins.usage]\n[records.otlp]\n{}", collector.config()),
            &["usage"],
        );
        let envoy = Envoy::start(
            dir.path(),
            &EnvoyOptions {
                ext_proc: listen.clone(),
                upstream_port: upstream.port,
                failure_mode_allow: true,
                ..EnvoyOptions::default()
            },
        );
        (front, envoy)
    });
    let path = dir.path().join("state/records.jsonl");
    let port = envoy.port;

    // Complete ones.
    let whole = Params {
        chunks: 12,
        ..Params::default()
    };
    for i in 0..COMPLETE {
        let got = chat(port, &whole, &format!("whole-{i}")).await;
        assert_eq!((got.status, &got.error), (200, &None));
    }
    // Clients that leave after a number of chunks spread over the stream.
    let slow = Params {
        chunks: 40,
        delay: Duration::from_millis(10),
        ..Params::default()
    };
    let mut left = BTreeMap::new();
    for i in 0..LEAVING {
        // Spread over the stream: 2, 9, 16, 23, 30, 8, ... frames.
        let n = 2 + (i * 7) % 29;
        let id = format!("leaves-{i}");
        chat_and_disconnect(port, &slow, &id, n).await;
        left.insert(id, n);
    }
    // Upstreams that reset the connection after 6 body frames.
    let resetting = Params {
        chunks: 20,
        delay: Duration::from_millis(5),
        reset_after: Some(6),
        ..Params::default()
    };
    for i in 0..RESET {
        let got = chat(port, &resetting, &format!("reset-{i}")).await;
        assert!(
            got.error.is_some() || got.body() != resetting.body(),
            "a reset upstream cannot give the whole body"
        );
    }
    // Long streams the front's stop cuts.
    let long = Params {
        chunks: 80,
        delay: Duration::from_millis(50),
        ..Params::default()
    };
    let mut cut = Vec::new();
    for i in 0..CUT {
        let (p, id) = (long.clone(), format!("cut-{i}"));
        cut.push(tokio::spawn(async move { chat(port, &p, &id).await }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    kill(Pid::from_raw(front.pid() as i32), Signal::SIGTERM).unwrap();
    let exited = tokio::task::block_in_place(|| front.wait_exit(Duration::from_secs(20)));
    assert!(
        exited.is_some_and(|s| s.success()),
        "{exited:?}\n{}",
        front.log()
    );
    for task in cut {
        let _ = task.await;
    }

    let all = records(&path);
    let by_id = |id: &str| -> Vec<&serde_json::Value> {
        all.iter().filter(|r| r["request_id"] == id).collect()
    };
    for i in 0..COMPLETE {
        let id = format!("whole-{i}");
        let mine = by_id(&id);
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        let r = mine[0];
        assert_eq!(r["status"], "complete", "{r}");
        let logged = envoy.access_log_for(&id, Duration::from_secs(5));
        let usage = &r["plugins"]["plugvisor.usage"];
        assert_eq!(usage["completion_tokens"], 12, "{r}");
        assert_eq!(
            usage["completion_tokens"].as_f64(),
            logged["usage"]["completion_tokens"].as_f64(),
            "record and Envoy agree: {r}\n{logged}"
        );
        assert_eq!(
            usage["prompt_tokens"].as_f64(),
            logged["usage"]["prompt_tokens"].as_f64(),
            "{r}\n{logged}"
        );
        assert_eq!(
            r["path"].as_str().map(|p| p.contains("test-id=")),
            Some(true),
            "{r}"
        );
        assert_eq!(r["http_status"], 200, "{r}");
    }
    for (id, received) in &left {
        let mine = by_id(id);
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        let r = mine[0];
        assert_eq!(r["status"], "aborted", "{r}");
        assert_eq!(r["cause"], "client_disconnect", "{r}");
        let usage = &r["plugins"]["plugvisor.usage"];
        assert_eq!(usage["status"], "aborted", "{r}");
        assert_eq!(usage["estimated"], true, "{r}");
        let output = usage["output_tokens"].as_u64().expect("an output estimate");
        // Each body frame the client read carried (at most) one content delta; the front saw
        // at least those, and never more than the upstream sent.
        assert!(
            output as usize + 2 >= *received && output as usize <= slow.chunks,
            "{id}: client read {received} frames, estimate {output}: {r}"
        );
    }
    for i in 0..RESET {
        let id = format!("reset-{i}");
        let mine = by_id(&id);
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        let r = mine[0];
        assert_eq!(r["status"], "aborted", "{r}");
        let usage = &r["plugins"]["plugvisor.usage"];
        assert_eq!(usage["estimated"], true, "{r}");
        // 6 frames came: the content ones among them, never more.
        let output = usage["output_tokens"].as_u64().expect("an output estimate");
        assert!((1..=6).contains(&output), "{id}: {output}: {r}");
    }
    for i in 0..CUT {
        let id = format!("cut-{i}");
        let mine = by_id(&id);
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        let r = mine[0];
        assert_eq!(r["status"], "aborted", "{r}");
        assert!(
            r["cause"] == "shutdown" || r["cause"] == "client_disconnect",
            "{r}"
        );
    }
    // Nothing else, nothing twice.
    let ids: std::collections::BTreeSet<&str> =
        all.iter().filter_map(|r| r["record_id"].as_str()).collect();
    assert_eq!(ids.len(), all.len(), "a record_id twice");
    assert_eq!(all.len(), COMPLETE + LEAVING + RESET + CUT, "{all:#?}");
    // The collector got the same records, each once.
    let expected: std::collections::BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
    let delivered = tests::eventually(
        "every record at the collector",
        Duration::from_secs(10),
        || {
            let got = collector.record_ids();
            if got.len() >= expected.len() {
                Ok(got)
            } else {
                Err(format!("{} of {}", got.len(), expected.len()))
            }
        },
    );
    let once: std::collections::BTreeSet<String> = delivered.iter().cloned().collect();
    assert_eq!(once.len(), delivered.len(), "a record delivered twice");
    assert_eq!(once, expected);
}
