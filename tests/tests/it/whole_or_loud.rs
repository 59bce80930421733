//! A stream the front has to cut reaches the client whole or visibly failed, never as a 200 with
//! chunks missing from the middle: through real Envoy with `failure_mode_allow: true` (as
//! examples/envoy.yaml has it), in `FULL_DUPLEX_STREAMED`, where Envoy hands each chunk to the
//! front and forgets it.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tests::client::chat;
use tests::envoy::{Envoy, EnvoyOptions};
use tests::front::FrontProcess;
use tests::upstream::{Params, Upstream};

const STREAMS: usize = 20;

/// Each response either equals the upstream's body or failed where the client sees it (a reset,
/// a truncated transfer, a non-200 status); returns how many failed.
fn assert_whole_or_loud(results: &[(String, Params, tests::client::Received)]) -> usize {
    let mut loud = 0;
    for (id, p, got) in results {
        let whole = got.status == 200 && got.error.is_none() && got.body() == p.body();
        let failed = got.status != 200 || got.error.is_some();
        assert!(
            whole || failed,
            "{id}: a 200 whose body differs from the upstream's and that nothing marks as failed \
             ({} of {} bytes)",
            got.body().len(),
            p.body().len()
        );
        if !whole {
            loud += 1;
        }
    }
    loud
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_by_a_stop_fail_loudly_instead_of_losing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let listen = format!("unix:{}", dir.path().join("ext_proc.sock").display());
    let (mut front, envoy) = tokio::task::block_in_place(|| {
        let front = FrontProcess::start_from(
            &tests::bins::plugvisor(),
            dir.path(),
            &listen,
            "shutdown_grace_ms = 300",
            "[plugins.usage]\n[plugins.test-order]\n",
            &["usage", "test-order"],
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
    // Streams of 4 s: all in the middle of their body when the front stops.
    let params = Params {
        chunks: 80,
        delay: Duration::from_millis(50),
        ..Params::default()
    };
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (port, p, id) = (envoy.port, params.clone(), format!("cut-{i}"));
        tasks.push(tokio::spawn(async move {
            let got = chat(port, &p, &id).await;
            (id, p, got)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    kill(Pid::from_raw(front.pid() as i32), Signal::SIGTERM).unwrap();
    let exited = tokio::task::block_in_place(|| front.wait_exit(Duration::from_secs(20)));
    assert!(exited.is_some(), "the front did not stop:\n{}", front.log());
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let loud = assert_whole_or_loud(&results);
    // Not vacuous: the stop came in the middle of every stream, so the front cut them.
    assert_eq!(loud, STREAMS, "{}", front.log());
    assert!(
        front.log().contains("stream cut while Envoy may hold"),
        "{}",
        front.log()
    );
}
