//! Idle ext_proc streams against the real front process: what each one costs in memory, and that
//! none is ever timed out by default (a reasoning model can be silent for minutes).

use std::time::Duration;

use tests::front::{metric, FrontProcess};
use tests::idle::{open, rss_kib};

const CONNECTIONS: usize = 10;
const STREAMS_PER_CONNECTION: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_streams_cost_little_and_are_never_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let front = tokio::task::block_in_place(|| {
        FrontProcess::start(dir.path(), "[plugins.latency]\n", &["latency"])
    });
    let before = rss_kib(front.pid());
    let streams = open(&front.ext_proc, CONNECTIONS, STREAMS_PER_CONNECTION).await;
    // Settled memory is what is measured: nothing to wait for but time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(front.pid());
    let per_stream = after.saturating_sub(before) * 1024 / streams.len() as u64;
    println!("front RSS {before} KiB -> {after} KiB: {per_stream} bytes per idle stream");
    assert_eq!(
        metric(&front.metrics(), "plugvisor_streams_active"),
        streams.len() as f64
    );
    // Debug build: 13.5 KiB measured (19 KiB before replies and handling futures were boxed).
    assert!(per_stream < 16 * 1024, "{per_stream} bytes per idle stream");
    // Still there a while later: nothing times an idle stream out by default.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metric(&front.metrics(), "plugvisor_streams_active"),
        streams.len() as f64
    );
    assert_eq!(
        metric(&front.metrics(), "plugvisor_stream_errors_total"),
        0.0
    );
    // After the burst, the memory goes back to the system: the RSS falls back near where it
    // was (glibc's allocator kept it: 24 MiB -> 157 MiB, and stayed there).
    drop(streams);
    let grown = after.saturating_sub(before);
    let settled = tests::eventually_async(
        "the front's memory returned after the streams ended",
        Duration::from_secs(30),
        async || {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = rss_kib(front.pid());
            if now <= before + grown / 4 {
                Ok(now)
            } else {
                Err(format!(
                    "RSS {now} KiB; {before} KiB before, {after} KiB with the streams"
                ))
            }
        },
    )
    .await;
    println!("front RSS {settled} KiB once the streams ended");
}
