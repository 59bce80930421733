//! The real `plugvisor-plugin` binary against a fake front over a real Unix socket: ordering under
//! 1,000 interleaved streams, latency from stamps, panic isolation, pings, inline acks, and every
//! exit path (Refuse, bad config, Shutdown, EOF, crash, bad usage).

use crate::harness;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use harness::{spawn, WAIT};
use ipc_protocol::{
    Chunk, Final, FinalOutcome, FromPlugin, Metadata, Ping, Refuse, RefuseCode, RequestStart,
    ResponseHeaders, Shutdown, ToPlugin, Value,
};
use sha2::{Digest, Sha256};

/// A tiny deterministic PRNG (xorshift64*), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn start(stream_id: u64, stamp_ns: u64) -> ToPlugin {
    ToPlugin::RequestStart(RequestStart {
        stream_id,
        seq: 0,
        stamp_ns,
        request_id: Some("same-id-for-everyone".into()),
        headers: vec![(":path".into(), "/v1/chat/completions".into())],
    })
}

fn headers(stream_id: u64, stamp_ns: u64) -> ToPlugin {
    ToPlugin::ResponseHeaders(ResponseHeaders {
        stream_id,
        seq: 1,
        stamp_ns,
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
    })
}

fn chunk(stream_id: u64, seq: u32, stamp_ns: u64, bytes: Vec<u8>, ack: bool) -> ToPlugin {
    ToPlugin::Chunk(Chunk {
        stream_id,
        seq,
        stamp_ns,
        len: bytes.len() as u32,
        bytes: Bytes::from(bytes),
        end_of_stream: false,
        ack,
    })
}

fn fin(stream_id: u64, seq: u32, stamp_ns: u64, bytes: Vec<u8>) -> ToPlugin {
    ToPlugin::Final(Final {
        stream_id,
        seq,
        stamp_ns,
        call_id: stream_id + 1_000_000,
        len: bytes.len() as u32,
        bytes: Bytes::from(bytes),
        trailers: vec![],
    })
}

/// Collects `n` final replies, checking each echoes its call id.
async fn finals(front: &mut harness::Front, n: usize) -> HashMap<u64, FinalOutcome> {
    let mut got = HashMap::new();
    while got.len() < n {
        if let FromPlugin::FinalReply(r) = front.recv().await {
            assert_eq!(r.call_id, r.stream_id + 1_000_000);
            assert!(
                got.insert(r.stream_id, r.outcome).is_none(),
                "two replies for one stream"
            );
        }
    }
    got
}

fn meta(outcome: &FinalOutcome) -> &Metadata {
    match outcome {
        FinalOutcome::Metadata(m) => m,
        FinalOutcome::Error(e) => panic!("expected metadata, got error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_interleaved_streams_arrive_in_order_with_the_right_digest() {
    let mut front = spawn("test-order", &["--workers", "4"], Stdio::inherit()).await;
    assert_eq!(front.hello.plugin, "test-order");
    let pid = front.hello.pid;
    assert_eq!(pid, front.child().id().unwrap());
    assert!(front.hello.subscriptions.body_bytes);
    front.welcome(Value::Null).await;
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", front.hello.pid)).unwrap();
    assert_eq!(comm.trim_end(), "pv:test-order");

    const STREAMS: u64 = 1000;
    const CHUNKS: u32 = 10;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Per stream: the events still to send, in order, and the digest of its body.
    let mut pending: Vec<(u64, std::collections::VecDeque<ToPlugin>)> = Vec::new();
    let mut digests = HashMap::new();
    for id in 0..STREAMS {
        let mut events = std::collections::VecDeque::new();
        let mut sha = Sha256::new();
        events.push_back(start(id, 1));
        events.push_back(headers(id, 2));
        for seq in 2..2 + CHUNKS {
            let len = 1 + rng.below(300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            sha.update(&bytes);
            events.push_back(chunk(id, seq, 3, bytes, false));
        }
        let tail: Vec<u8> = format!("end of {id}").into_bytes();
        sha.update(&tail);
        events.push_back(fin(id, 2 + CHUNKS, 4, tail));
        digests.insert(id, hex::encode(sha.finalize()));
        pending.push((id, events));
    }
    // Interleave: always advance a random stream that still has events.
    let mut sent = 0;
    while !pending.is_empty() {
        let i = rng.below(pending.len());
        let ev = pending[i].1.pop_front().unwrap();
        front.feed(ev);
        if pending[i].1.is_empty() {
            pending.swap_remove(i);
        }
        sent += 1;
        if sent % 256 == 0 {
            front.flush().await;
        }
    }
    front.flush().await;

    let got = finals(&mut front, STREAMS as usize).await;
    for id in 0..STREAMS {
        let own = &meta(&got[&id])["plugvisor.test-order"];
        assert_eq!(own.get("out_of_order"), Some(&Value::Int(0)), "stream {id}");
        assert_eq!(own.get("gaps"), Some(&Value::Int(0)), "stream {id}");
        assert_eq!(
            own.get("events"),
            Some(&Value::Int(3 + CHUNKS as i64)),
            "stream {id}"
        );
        assert_eq!(
            own.get("sha256"),
            Some(&Value::String(digests[&id].clone())),
            "stream {id}"
        );
        assert_eq!(own.get("partial"), None);
    }

    // Every event's frame came back as credit, byte for byte, once the plugin went idle.
    front.wait_credited(front.written()).await;
    assert_eq!(front.credited(), front.written());

    // Every stream ended, so the plugin holds no state.
    front.send_now(ToPlugin::Ping(Ping { nonce: 7 })).await;
    match front.recv().await {
        FromPlugin::Pong(p) => {
            assert_eq!(p.nonce, 7);
            assert_eq!(p.active_streams, 0);
            assert!(p.stuck.is_empty());
        }
        other => panic!("{other:?}"),
    }
    front
        .send_now(ToPlugin::Shutdown(Shutdown { grace_ms: 1000 }))
        .await;
    assert_eq!(front.exit_status().await.code(), Some(0));
}

#[tokio::test]
async fn latency_is_computed_from_the_stamps_sent_not_from_arrival() {
    let mut front = spawn("latency", &[], Stdio::inherit()).await;
    front.welcome(Value::Null).await;
    let events = [
        r#"{"model":"m","choices":[{"delta":{"content":"a"}}]}"#,
        r#"{"model":"m","choices":[{"delta":{"content":"b"}}]}"#,
        r#"{"model":"m","choices":[{"delta":{"content":"c"}}]}"#,
        r#"{"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}"#,
    ];
    // Stamps far from "now": the plugin must use them, not its clock.
    let t0 = 5_000_000_000u64;
    for id in 0..50u64 {
        let base = t0 + id * 1_000_000;
        front.feed(start(id, base));
        front.feed(headers(id, base + 40_000_000));
        for (i, ev) in events.iter().enumerate() {
            let stamp = base + 100_000_000 + i as u64 * 25_000_000;
            // Split each event across two chunks to exercise reassembly.
            let line = format!("data: {ev}\n\n").into_bytes();
            let (a, b) = line.split_at(line.len() / 2);
            front.feed(chunk(
                id,
                2 + 2 * i as u32,
                stamp - 1_000_000,
                a.to_vec(),
                false,
            ));
            front.feed(chunk(id, 3 + 2 * i as u32, stamp, b.to_vec(), false));
        }
        front.feed(fin(
            id,
            10,
            base + 300_000_000,
            b"data: [DONE]\n\n".to_vec(),
        ));
    }
    front.flush().await;
    let got = finals(&mut front, 50).await;
    for id in 0..50u64 {
        let own = &meta(&got[&id])["plugvisor.latency"];
        // First body byte: the first half of event 0, 1 ms before its completion stamp.
        assert_eq!(
            own.get("ttfb_ms").and_then(Value::as_f64),
            Some(99.0),
            "stream {id}"
        );
        // First token: event 0 carries content, complete at +100 ms.
        assert_eq!(
            own.get("ttft_ms").and_then(Value::as_f64),
            Some(100.0),
            "stream {id}"
        );
        // Token events complete at +100, +125, +150 ms; usage reports 9 completion tokens.
        assert_eq!(
            own.get("tpot_ms").and_then(Value::as_f64),
            Some(50.0 / 8.0),
            "stream {id}"
        );
        assert_eq!(own.get("duration_ms").and_then(Value::as_f64), Some(300.0));
        assert_eq!(own.get("chunks"), Some(&Value::Int(9)));
        assert_eq!(own.get("events"), Some(&Value::Int(4)));
        assert_eq!(own.get("tokens"), Some(&Value::Int(9)));
    }
    front.close().await;
    assert_eq!(front.exit_status().await.code(), Some(0));
}

#[tokio::test]
async fn a_panic_in_one_stream_leaves_the_other_99_replies_correct() {
    let mut front = spawn("test-crash", &["--workers", "2"], Stdio::piped()).await;
    front
        .welcome(Value::map([
            ("marker", Value::from("BOOM")),
            ("mode", Value::from("panic")),
        ]))
        .await;
    for id in 0..100u64 {
        front.feed(start(id, 1));
        front.feed(headers(id, 2));
        let body = if id == 42 {
            "data: BOOM\n\n"
        } else {
            "data: fine\n\n"
        };
        front.feed(chunk(id, 2, 3, body.as_bytes().to_vec(), false));
        front.feed(chunk(id, 3, 4, b"data: more\n\n".to_vec(), false));
        front.feed(fin(id, 4, 5, vec![]));
    }
    front.flush().await;
    let got = finals(&mut front, 100).await;
    for id in 0..100u64 {
        if id == 42 {
            match &got[&id] {
                FinalOutcome::Error(e) => assert!(e.contains("panicking on purpose"), "{e}"),
                other => panic!("{other:?}"),
            }
        } else {
            let own = &meta(&got[&id])["plugvisor.test-crash"];
            assert_eq!(own.get("events"), Some(&Value::Int(5)), "stream {id}");
        }
    }
    // Still alive and answering.
    front.send_now(ToPlugin::Ping(Ping { nonce: 1 })).await;
    assert!(matches!(front.recv().await, FromPlugin::Pong(_)));
    front
        .send_now(ToPlugin::Shutdown(Shutdown { grace_ms: 500 }))
        .await;
    assert_eq!(front.exit_status().await.code(), Some(0));
    let stderr = front.stderr().await;
    assert!(stderr.contains("plugin=test-crash"), "{stderr}");
    assert!(stderr.contains("stream_id=42"), "{stderr}");
    assert!(stderr.contains("panicking on purpose"), "{stderr}");
    // Logged once, by the host with its context, not a second time by the panic hook.
    assert_eq!(
        stderr.matches("panicking on purpose").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("location="), "{stderr}");
}

#[tokio::test]
async fn inline_chunks_are_acked_after_their_hook_ran() {
    let mut front = spawn("test-order", &[], Stdio::inherit()).await;
    front.welcome(Value::Null).await;
    front.feed(start(1, 1));
    front.feed(chunk(1, 1, 2, b"abc".to_vec(), true));
    front.flush().await;
    match front.recv().await {
        FromPlugin::Ack(a) => assert_eq!((a.stream_id, a.seq), (1, 1)),
        other => panic!("{other:?}"),
    }
    front.send_now(fin(1, 2, 3, vec![])).await;
    let got = finals(&mut front, 1).await;
    assert_eq!(
        meta(&got[&1])["plugvisor.test-order"].get("bytes"),
        Some(&Value::Int(3))
    );
}

#[tokio::test]
async fn gaps_and_partial_streams_are_reported_in_metadata() {
    let mut front = spawn("test-order", &[], Stdio::inherit()).await;
    front.welcome(Value::Null).await;
    front.feed(start(1, 1));
    front.feed(chunk(1, 4, 2, b"x".to_vec(), false));
    front.feed(fin(1, 5, 3, vec![]));
    front.feed(chunk(2, 6, 2, b"x".to_vec(), false));
    front.feed(fin(2, 7, 3, vec![]));
    front.flush().await;
    let got = finals(&mut front, 2).await;
    let one = &meta(&got[&1])["plugvisor.test-order"];
    assert_eq!(one.get("gaps"), Some(&Value::Int(3)));
    let two = &meta(&got[&2])["plugvisor.test-order"];
    assert_eq!(two.get("partial"), Some(&Value::Bool(true)));
}

#[tokio::test]
async fn a_lane_stuck_in_a_hook_is_reported_in_pong_while_others_are_served() {
    let mut front = spawn("test-hang", &["--stuck-after", "100ms"], Stdio::inherit()).await;
    front
        .welcome(Value::map([
            ("marker", Value::from("HANG")),
            ("scope", Value::from("lane")),
        ]))
        .await;
    front.feed(start(1, 1));
    front.feed(chunk(1, 1, 2, b"data: HANG\n\n".to_vec(), false));
    front.feed(fin(1, 2, 3, vec![]));
    front.feed(start(2, 1));
    front.feed(fin(2, 1, 3, vec![]));
    front.flush().await;
    let got = finals(&mut front, 1).await;
    assert!(got.contains_key(&2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    front.send_now(ToPlugin::Ping(Ping { nonce: 9 })).await;
    match front.recv().await {
        FromPlugin::Pong(p) => {
            assert_eq!(p.nonce, 9);
            assert_eq!(p.active_streams, 1);
            assert_eq!(p.stuck.len(), 1);
            assert_eq!(p.stuck[0].stream_id, 1);
            assert!(p.stuck[0].running_ms >= 100);
        }
        other => panic!("{other:?}"),
    }
    // Shutdown cannot drain a hung lane: the grace period bounds the exit.
    front
        .send_now(ToPlugin::Shutdown(Shutdown { grace_ms: 200 }))
        .await;
    assert_eq!(front.exit_status().await.code(), Some(0));
}

#[tokio::test]
async fn test_hang_in_process_scope_stops_answering_pings() {
    let mut front = spawn("test-hang", &[], Stdio::inherit()).await;
    front
        .welcome(Value::map([("marker", Value::from("HANG"))]))
        .await;
    front.feed(start(1, 1));
    front.feed(chunk(1, 1, 2, b"data: HANG\n\n".to_vec(), false));
    front.flush().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    front.send_now(ToPlugin::Ping(Ping { nonce: 1 })).await;
    assert!(front.try_recv(Duration::from_millis(500)).await.is_none());
    front.child().kill().await.unwrap();
}

#[tokio::test]
async fn test_crash_exits_after_the_configured_number_of_events() {
    let mut front = spawn("test-crash", &[], Stdio::null()).await;
    front
        .welcome(Value::map([("after_events", Value::Int(3))]))
        .await;
    front.feed(start(1, 1));
    front.feed(headers(1, 2));
    front.feed(chunk(1, 2, 3, b"x".to_vec(), false));
    front.flush().await;
    assert_eq!(front.exit_status().await.code(), Some(101));
}

#[tokio::test]
async fn refuse_exits_78_with_the_reason_on_stderr() {
    let mut front = spawn("usage", &[], Stdio::piped()).await;
    front
        .send_now(ToPlugin::Refuse(Refuse {
            code: RefuseCode::AlreadyConnected,
            reason: "plugin usage is already connected (pid 1234)".into(),
        }))
        .await;
    assert_eq!(front.exit_status().await.code(), Some(78));
    let stderr = front.stderr().await;
    assert!(stderr.contains("already connected (pid 1234)"), "{stderr}");
}

#[tokio::test]
async fn invalid_cel_in_the_config_exits_78_with_the_parser_message() {
    let mut front = spawn("usage", &[], Stdio::piped()).await;
    let attr = Value::map([
        ("namespace", Value::from("envoy.lb")),
        ("name", Value::from("cost")),
        ("expression", Value::from("usage.prompt_tokens +")),
    ]);
    front
        .welcome(Value::map([("attributes", Value::List(vec![attr]))]))
        .await;
    assert_eq!(front.exit_status().await.code(), Some(78));
    let stderr = front.stderr().await;
    assert!(
        stderr.contains("invalid config for plugin `usage`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("attributes[0].expression: invalid CEL expression"),
        "{stderr}"
    );
}

#[tokio::test]
async fn socket_eof_exits_0() {
    let mut front = spawn("latency", &[], Stdio::inherit()).await;
    front.welcome(Value::Null).await;
    front.send_now(start(1, 1)).await;
    front.close().await;
    assert_eq!(front.exit_status().await.code(), Some(0));
}

#[tokio::test]
async fn shutdown_finishes_queued_streams_then_exits_0() {
    let mut front = spawn("test-spin", &["--workers", "1"], Stdio::inherit()).await;
    assert!(!front.hello.subscriptions.body_bytes);
    front
        .welcome(Value::map([("spin_us", Value::Int(20_000))]))
        .await;
    for id in 0..5 {
        front.feed(start(id, 1));
        front.feed(fin(id, 1, 2, vec![]));
    }
    front.feed(ToPlugin::Shutdown(Shutdown { grace_ms: 5_000 }));
    front.flush().await;
    let got = finals(&mut front, 5).await;
    for id in 0..5 {
        assert_eq!(
            meta(&got[&id])["plugvisor.test-spin"].get("events"),
            Some(&Value::Int(2))
        );
    }
    assert_eq!(front.exit_status().await.code(), Some(0));
}

fn run_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_plugvisor-plugin"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_usage_exits_64_naming_the_built_ins() {
    let out = run_cli(&["no-such-plugin", "--connect", "/nonexistent.sock"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown plugin `no-such-plugin`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("usage, latency, metrics, test-order"),
        "{stderr}"
    );
    assert_eq!(run_cli(&["usage"]).status.code(), Some(64));
    assert_eq!(run_cli(&[]).status.code(), Some(64));
    assert_eq!(
        run_cli(&["usage", "--connect", "/x", "--bogus"])
            .status
            .code(),
        Some(64)
    );
}

#[test]
fn list_help_and_version_exit_0() {
    let out = run_cli(&["--list"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in [
        "usage",
        "latency",
        "metrics",
        "test-order",
        "test-spin",
        "test-crash",
        "test-hang",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(name)),
            "{name} missing in {stdout}"
        );
    }
    assert_eq!(run_cli(&["--help"]).status.code(), Some(0));
    assert_eq!(run_cli(&["--version"]).status.code(), Some(0));
}

#[test]
fn an_unreachable_socket_exits_1() {
    let out = run_cli(&["usage", "--connect", "/nonexistent/plugvisor.sock"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    let _ = WAIT;
}

#[tokio::test]
async fn sigterm_drains_and_exits_0() {
    let mut front = spawn("latency", &[], Stdio::inherit()).await;
    front.welcome(Value::Null).await;
    front.send_now(start(1, 1)).await;
    let pid = nix::unistd::Pid::from_raw(front.child().id().unwrap() as i32);
    // Let the host reach its read loop, where the handler is installed.
    front.send_now(ToPlugin::Ping(Ping { nonce: 2 })).await;
    assert!(matches!(front.recv().await, FromPlugin::Pong(_)));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(front.exit_status().await.code(), Some(0));
}

#[tokio::test]
async fn a_small_window_is_credited_back_while_streams_run_and_in_full_when_idle() {
    let mut front = spawn("test-order", &["--workers", "2"], Stdio::inherit()).await;
    front.welcome_with(Value::Null, 4096, 16 << 10).await;
    for id in 0..5u64 {
        front.feed(start(id, 1));
        for seq in 1..=20 {
            front.feed(chunk(id, seq, 2, vec![b'a' + id as u8; 200], false));
        }
        front.feed(fin(id, 21, 3, vec![]));
    }
    front.flush().await;
    let got = finals(&mut front, 5).await;
    for id in 0..5u64 {
        let own = &meta(&got[&id])["plugvisor.test-order"];
        assert_eq!(own.get("gaps"), Some(&Value::Int(0)), "stream {id}");
        assert_eq!(own.get("bytes"), Some(&Value::Int(20 * 200)), "stream {id}");
    }
    front.wait_credited(front.written()).await;
    assert_eq!(front.credited(), front.written());
    // A connection message counts nothing: no further credit.
    front.send_now(ToPlugin::Ping(Ping { nonce: 3 })).await;
    assert!(matches!(front.recv().await, FromPlugin::Pong(_)));
    assert_eq!(front.credited(), front.written());
}

#[tokio::test]
async fn metadata_over_metadata_max_bytes_becomes_an_error_reply() {
    let mut front = spawn("test-order", &[], Stdio::piped()).await;
    front.welcome_with(Value::Null, 8 << 20, 10).await;
    front.feed(start(1, 1));
    front.feed(fin(1, 1, 2, b"tail".to_vec()));
    front.flush().await;
    let got = finals(&mut front, 1).await;
    match &got[&1] {
        FinalOutcome::Error(e) => {
            assert!(e.starts_with("metadata of "), "{e}");
            assert!(e.contains("is over metadata_max_bytes (10)"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    front
        .send_now(ToPlugin::Shutdown(Shutdown { grace_ms: 500 }))
        .await;
    assert_eq!(front.exit_status().await.code(), Some(0));
    let stderr = front.stderr().await;
    assert_eq!(
        stderr.matches("over metadata_max_bytes").count(),
        1,
        "one warning per occurrence: {stderr}"
    );
}
