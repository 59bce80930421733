//! The front, started in-process, between a real Envoy and fake plugins that connect as external
//! plugins: the data path, the final RPC and its deadlines, aborts, inline dispatch, refusals.

use std::time::Duration;

use sha2::{Digest, Sha256};
use supervisor::Config;
use tests::client::{chat, chat_and_disconnect, chat_as};
use tests::fake_plugin::{Behaviour, FakePlugin, Handshake};
use tests::inproc::InProc as Setup;
use tests::upstream::Params;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn assert_in_order(line: &serde_json::Value, body: &[u8]) {
    let order = &line["test_order"];
    assert_eq!(order["out_of_order"], 0.0, "{line}");
    assert_eq!(order["gaps"], 0.0, "{line}");
    assert_eq!(order["sha256"], sha(body), "{line}");
    assert!(order["events"].as_f64().unwrap() >= 3.0, "{line}");
}

async fn streams_every_chunk_byte_identical(mode: &'static str) {
    let setup = Setup::new(mode, &[("order", "", Behaviour::default())]).await;
    let params = Params {
        chunks: 20,
        size: 40,
        delay: Duration::from_millis(2),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "r-1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body(), params.body(), "body differs");
    let line = setup.log_for("r-1");
    assert_in_order(&line, &params.body());
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );
    let metrics = setup.front.metrics().encode();
    assert!(metrics.contains("plugvisor_streams_total 1"), "{metrics}");
    assert!(
        metrics.contains("plugvisor_plugin_events_sent_total{plugin=\"order\"}"),
        "{metrics}"
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_streamed_chunks_arrive_byte_identical_and_in_order() {
    streams_every_chunk_byte_identical("FULL_DUPLEX_STREAMED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_mode_chunks_arrive_byte_identical_and_in_order() {
    streams_every_chunk_byte_identical("STREAMED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_trailers_end_the_stream_and_carry_the_metadata() {
    let setup = Setup::new(
        "FULL_DUPLEX_STREAMED",
        &[("order", "", Behaviour::default())],
    )
    .await;
    let params = Params {
        chunks: 6,
        trailers: true,
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "r-trailers").await;
    assert_eq!(got.body(), params.body());
    let line = setup.log_for("r-trailers");
    assert_in_order(&line, &params.body());
    assert_eq!(setup.plugins[0].record.lock().unwrap().finished.len(), 1);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_does_not_wait_for_a_slow_plugin() {
    let slow = Behaviour {
        chunk_delay: Duration::from_millis(500),
        ..Behaviour::default()
    };
    let setup = Setup::new(
        "FULL_DUPLEX_STREAMED",
        &[("slow", "final_timeout_ms = 1500", slow)],
    )
    .await;
    let params = Params {
        chunks: 10,
        delay: Duration::from_millis(10),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "r-slow").await;
    assert_eq!(got.body(), params.body());
    // Every chunk but the end reached the client long before the plugin could have run them
    // (inline, 10 chunks × 500 ms would take 5 s).
    let last_data = got.chunks.last().unwrap().0;
    assert!(
        last_data < Duration::from_secs(2),
        "chunks took {last_data:?}"
    );
    // The end waited for the final RPC, at most its 1.5 s deadline (plus Envoy and slack).
    assert!(
        got.total < Duration::from_millis(3500),
        "end took {:?}",
        got.total
    );
    let line = setup.log_for("r-slow");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!(["slow"]),
        "{line}"
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_plugin_costs_only_its_own_metadata() {
    let hang = Behaviour {
        hang_finals: true,
        ..Behaviour::default()
    };
    let setup = Setup::new(
        "FULL_DUPLEX_STREAMED",
        &[
            ("order", "", Behaviour::default()),
            ("hang", "final_timeout_ms = 300", hang),
        ],
    )
    .await;
    let params = Params::default();
    let got = chat(setup.envoy.port, &params, "r-hang").await;
    assert_eq!(got.body(), params.body());
    assert!(got.total >= Duration::from_millis(300), "{:?}", got.total);
    assert!(got.total < Duration::from_secs(2), "{:?}", got.total);
    let line = setup.log_for("r-hang");
    assert_in_order(&line, &params.body());
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!(["hang"]),
        "{line}"
    );
    let metrics = setup.front.metrics().encode();
    assert!(
        metrics.contains(
            "plugvisor_plugin_finals_missing_total{plugin=\"hang\",reason=\"timeout\"} 1"
        ),
        "{metrics}"
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_stream_sends_abort_and_frees_the_lane() {
    let setup = Setup::new(
        "FULL_DUPLEX_STREAMED",
        &[("order", "", Behaviour::default())],
    )
    .await;
    let params = Params {
        chunks: 100,
        delay: Duration::from_millis(20),
        ..Params::default()
    };
    chat_and_disconnect(setup.envoy.port, &params, "r-gone", 3).await;
    let record = setup.plugins[0].record.clone();
    tests::eventually_async(
        "one abort and no open stream",
        Duration::from_secs(5),
        async || {
            let r = record.lock().unwrap();
            if r.aborted.len() == 1 && r.open == 0 {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    )
    .await;
    {
        let r = record.lock().unwrap();
        assert_eq!(r.aborted[0].1, ipc_protocol::AbortCause::ClientDisconnect);
        assert!(r.finished.is_empty());
    }
    assert_eq!(setup.front.metrics().streams_active.get(), 0);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_keep_their_order_and_bytes() {
    let setup = Setup::new(
        "FULL_DUPLEX_STREAMED",
        &[("order", "", Behaviour::default())],
    )
    .await;
    let port = setup.envoy.port;
    let mut tasks = Vec::new();
    for i in 0..100usize {
        let params = Params {
            chunks: 5 + i % 7,
            size: 10 + i,
            delay: Duration::from_millis((i % 3) as u64),
            ..Params::default()
        };
        tasks.push(tokio::spawn(async move {
            let rid = format!("r{i}");
            let got = chat_as(port, &params, &rid, "the-same-x-request-id").await;
            (rid, params, got)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    for (rid, params, got) in &results {
        assert_eq!(got.body(), params.body(), "{rid}");
        let line = setup.log_for(rid);
        assert_in_order(&line, &params.body());
    }
    assert_eq!(setup.plugins[0].record.lock().unwrap().finished.len(), 100);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_dispatch_waits_for_each_acknowledgement() {
    let slowish = Behaviour {
        chunk_delay: Duration::from_millis(100),
        ..Behaviour::default()
    };
    let setup = Setup::new(
        "FULL_DUPLEX_STREAMED",
        &[("inline", "dispatch = \"inline\"", slowish)],
    )
    .await;
    let params = Params {
        chunks: 5,
        delay: Duration::from_millis(20),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "r-inline").await;
    assert_eq!(got.body(), params.body());
    let acked = setup.plugins[0].record.lock().unwrap().acked;
    assert!(acked >= 5, "acked {acked}");
    assert!(
        got.total >= Duration::from_millis(100 * acked as u64),
        "{:?}",
        got.total
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_and_a_wrong_name_are_refused_with_reasons() {
    tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(
        &format!(
            "listen = \"127.0.0.1:0\"\nruntime_dir = \"{}\"\nconnect_timeout_ms = 1\n[plugins.one]\nspawn = false\nbudget_bytes = 131072\nmetadata_max_bytes = 2048\n[plugins.one.config]\nanswer = 42\n",
            dir.path().display()
        ),
        "test",
    )
    .unwrap();
    let mut front = supervisor::start(config.clone()).await.unwrap();
    let socket = config.plugin_socket("one");
    let mode = std::fs::metadata(&socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    let first = FakePlugin::welcome(&socket, "one", Behaviour::default()).await;
    assert_eq!(
        first.record.lock().unwrap().config,
        Some(ipc_protocol::Value::map([(
            "answer",
            ipc_protocol::Value::Int(42)
        )]))
    );
    // The plugin's flow-control window and metadata cap travel in the Welcome.
    assert_eq!(first.record.lock().unwrap().limits, Some((131_072, 2048)));
    match FakePlugin::connect(&socket, "one", Behaviour::default()).await {
        Handshake::Refused(code, reason) => {
            assert_eq!(code, ipc_protocol::RefuseCode::AlreadyConnected);
            assert!(reason.contains("already"), "{reason}");
        }
        Handshake::Welcome(_) => panic!("second connection welcomed"),
    }
    match FakePlugin::connect(&socket, "two", Behaviour::default()).await {
        Handshake::Refused(code, _) => assert_eq!(code, ipc_protocol::RefuseCode::UnknownPlugin),
        Handshake::Welcome(_) => panic!("wrong name welcomed"),
    }
    front.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_reconnects_is_welcomed_on_the_same_link() {
    let mut setup = Setup::new(
        "FULL_DUPLEX_STREAMED",
        &[("order", "", Behaviour::default())],
    )
    .await;
    let socket = setup.dir.path().join("run/plugins/order.sock");
    // The process goes away (crash, restart, a developer stopping it) ...
    drop(setup.plugins.remove(0));
    let link = setup.front.links()[0].clone();
    tests::eventually_async(
        "the disconnect noticed",
        Duration::from_secs(3),
        async || !link.is_connected(),
    )
    .await;
    // ... a stream meanwhile lists it as missing ...
    let params = Params::default();
    let got = chat(setup.envoy.port, &params, "r-down").await;
    assert_eq!(got.body(), params.body());
    let line = setup.log_for("r-down");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!(["order"]),
        "{line}"
    );
    assert_eq!(
        line["plugvisor"]["reasons"]["order"], "not_connected",
        "{line}"
    );
    // ... and a new process connects to the same socket and serves the next streams.
    setup
        .plugins
        .push(FakePlugin::welcome(&socket, "order", Behaviour::default()).await);
    let got = chat(setup.envoy.port, &params, "r-back").await;
    assert_eq!(got.body(), params.body());
    assert_in_order(&setup.log_for("r-back"), &params.body());
    let metrics = setup.front.metrics().encode();
    // Nobody here restarts an external plugin: the stream did not wait for one.
    assert!(
        metrics.contains(
            "plugvisor_plugin_finals_missing_total{plugin=\"order\",reason=\"not_connected\"} 1"
        ),
        "{metrics}"
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_front_aborts_streams_still_running_after_the_grace_period() {
    let mut setup = Setup::new(
        "FULL_DUPLEX_STREAMED",
        &[("order", "", Behaviour::default())],
    )
    .await;
    let port = setup.envoy.port;
    let client = tokio::spawn(async move {
        let params = Params {
            chunks: 200,
            delay: Duration::from_millis(20),
            ..Params::default()
        };
        chat(port, &params, "r-stop").await
    });
    tests::eventually_async("the stream active", Duration::from_secs(10), async || {
        setup.front.metrics().streams_active.get() != 0
    })
    .await;
    // Well into the stream (a few of its chunks sent), not at its start: what is under test is
    // stopping in the middle of one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    setup.front.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let record = setup.plugins[0].record.clone();
    tests::eventually_async("an abort", Duration::from_secs(2), async || {
        !record.lock().unwrap().aborted.is_empty()
    })
    .await;
    assert_eq!(
        record.lock().unwrap().aborted[0].1,
        ipc_protocol::AbortCause::Shutdown
    );
    drop(setup.envoy);
    let _ = client.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_until_its_shutdown_future_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("x.sock");
    let config = Config::parse(
        &format!(
            "listen = \"unix:{}\"\nruntime_dir = \"{}\"\nconnect_timeout_ms = 1\n[plugins.p]\nspawn = false\n",
            sock.display(),
            dir.path().display()
        ),
        "test",
    )
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(supervisor::run(config, async move {
        let _ = rx.await;
    }));
    tests::eventually_async("the ext_proc socket", Duration::from_secs(3), async || {
        sock.exists()
    })
    .await;
    tx.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("run returned");
    result.unwrap().unwrap();
    assert!(!sock.exists(), "the ext_proc socket is removed on stop");
    assert!(!dir.path().join("plugins/p.sock").exists());
}
