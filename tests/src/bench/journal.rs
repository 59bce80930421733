//! Measurement 7: what the replay journal costs. Two fronts with the embedded default config on a
//! Unix socket, each behind its own Envoy, side by side in interleaved rounds of unpaced streams:
//! one with every plugin's `replay_bytes` at its default, one with `replay_bytes = 0` (replay
//! off). Throughput, per-chunk latency, the front's CPU and its RSS (sampled every 5 ms during the
//! rounds, and after them) are compared; then the RSS per in-flight stream (measurement 4's
//! method) of a front with each setting.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::procfs;
use super::sse::{Ask, Ends};
use super::streaming::{self, Acc, Phase, Target};

/// `text` (a config) with `replay_bytes = 0` in every one of `plugins`' tables; checked by
/// parsing it.
pub fn replay_off(plugins: &[String], text: &str) -> String {
    let off = plugins.iter().fold(text.to_owned(), |t, p| {
        let table = format!("[plugins.{p}]\n");
        t.replacen(&table, &format!("{table}replay_bytes = 0\n"), 1)
    });
    let parsed = supervisor::Config::parse(&off, "bench").expect("the edited default parses");
    assert!(
        parsed.plugins.iter().all(|p| p.replay_bytes == 0),
        "replay_bytes = 0 did not reach every plugin of the default config"
    );
    off
}

/// One configuration's figures.
#[derive(Debug, Clone)]
pub struct JournalRow {
    /// `replay_bytes` of every plugin.
    pub replay_bytes: u64,
    /// What the streams collected.
    pub acc: Acc,
    /// The front's RSS before the rounds, bytes.
    pub rss_before: u64,
    /// Its largest RSS during them, bytes.
    pub rss_peak: u64,
    /// Its RSS a second after them, bytes.
    pub rss_after: u64,
}

/// What measurement 7 found.
#[derive(Debug, Clone)]
pub struct Journal {
    /// The load.
    pub phase: Phase,
    /// Default budget first, then `replay_bytes = 0`.
    pub rows: Vec<JournalRow>,
    /// In-flight streams held open, default budget first, then `replay_bytes = 0`.
    pub in_flight: Vec<super::data_path::InFlightCost>,
}

/// Runs measurement 7 with `rounds` interleaved rounds.
pub async fn run(
    dir: &Path,
    upstream: u16,
    ends: &Ends,
    rounds: usize,
    in_flight_streams: usize,
) -> Journal {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let off = |plugins: &[String], text: &str| replay_off(plugins, text);
    let targets: Vec<Target> = tokio::task::block_in_place(|| {
        vec![
            streaming::default_target(
                dir,
                "journal-default",
                "default config, replay_bytes at its default",
                true,
                upstream,
            ),
            streaming::default_target_with(
                dir,
                "journal-off",
                "default config, replay_bytes = 0",
                true,
                upstream,
                off,
            ),
        ]
    });
    streaming::warm_up(&targets, ends).await;
    let phase = Phase {
        name: "unpaced, concurrency 16",
        ask: Ask {
            events: 400,
            size: 1024,
            delay: Duration::ZERO,
        },
        concurrency: 16,
        rounds,
    };
    let pids: Vec<u32> = targets.iter().filter_map(|t| t.server_pid).collect();
    let before: Vec<u64> = pids.iter().map(|p| procfs::rss_bytes(*p)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let samplers: Vec<_> = pids
        .iter()
        .map(|&pid| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    peak = procfs::rss_bytes(pid).max(peak);
                    std::thread::sleep(Duration::from_millis(5));
                }
                peak
            })
        })
        .collect();
    let accs = streaming::run_phase(&targets, phase, ends).await;
    stop.store(true, Ordering::Relaxed);
    let peaks: Vec<u64> = samplers
        .into_iter()
        .map(|s| s.join().expect("sampler"))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<u64> = pids.iter().map(|p| procfs::rss_bytes(*p)).collect();
    let default = supervisor::config::DEFAULT_REPLAY_BYTES as u64;
    let rows = accs
        .into_iter()
        .enumerate()
        .map(|(i, acc)| JournalRow {
            replay_bytes: if i == 0 { default } else { 0 },
            acc,
            rss_before: before[i],
            rss_peak: peaks[i],
            rss_after: after[i],
        })
        .collect();
    drop(targets);
    let mut in_flight = Vec::new();
    for off in [false, true] {
        in_flight
            .push(super::data_path::in_flight_cost(dir, in_flight_streams, 8, 1024, off).await);
    }
    Journal {
        phase,
        rows,
        in_flight,
    }
}
