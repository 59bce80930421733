//! Measurement 4: the front's memory while one plugin is frozen (SIGSTOP).
//!
//! A `plugvisor` process with the `usage` plugin (which takes body bytes) and a small queue
//! budget, behind its own Envoy. After a warm-up its RSS is the idle figure; then the plugin is
//! stopped and many streams run through at once. A sampler thread records the front's peak RSS
//! and its queue gauges; the drops come from `plugvisor_plugin_events_dropped_total`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::counted;
use super::envoy::BenchEnvoy;
use super::procfs;
use super::sse::{self, Ask, Ends};
use crate::envoy::http_get;
use crate::front::FrontProcess;

/// The queue budget given to the plugin (`BENCH_QUEUE_BYTES` overrides it, for experiments).
pub fn queue_bytes() -> u64 {
    std::env::var("BENCH_QUEUE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4 * 1024 * 1024)
}
/// The replay journal given to the plugin (`BENCH_REPLAY_BYTES` overrides it): what the front
/// keeps of in-flight streams for a replacement process, on top of the queue.
pub fn replay_bytes() -> u64 {
    std::env::var("BENCH_REPLAY_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4 * 1024 * 1024)
}

/// What docs/configuration.md "Memory bounds" counts beside the queue: at most this much being
/// written to the plugin's socket.
pub const WRITE_BYTES: u64 = 256 * 1024;

/// The front's memory for the plugin's backlog, as docs/configuration.md "Memory bounds" gives
/// it: `queue_bytes + max_event + 256 KiB` for the queue and the writer, plus `replay_bytes`
/// for the journal.
pub fn budget(max_event: u64) -> u64 {
    queue_bytes() + max_event + WRITE_BYTES + replay_bytes()
}

/// The queue bound in events.
pub const QUEUE_EVENTS: u64 = 4096;

/// What measurement 4 found.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Streams run while the plugin was stopped.
    pub streams: u64,
    /// Of those, completed with every event at the client.
    pub completed: u64,
    /// Content events per stream and their size.
    pub ask: (u64, usize),
    /// Front RSS after the warm-up, bytes.
    pub idle_rss: u64,
    /// Largest front RSS under the same load with the plugin running, bytes.
    pub healthy_rss: u64,
    /// Largest front RSS while the plugin was stopped, bytes.
    pub peak_rss: u64,
    /// Largest `plugvisor_plugin_queue_bytes` seen.
    pub peak_queue_bytes: f64,
    /// Largest `plugvisor_plugin_queue_depth` seen.
    pub peak_queue_depth: f64,
    /// Events dropped because the queue was full.
    pub dropped_full: f64,
    /// Events queued for the plugin.
    pub sent: f64,
    /// Final RPCs that timed out.
    pub finals_timeout: f64,
    /// Wall time of the stopped phase, s.
    pub wall_s: f64,
}

impl Memory {
    /// The formula's `max_event`: a whole response body (Envoy may hand an unpaced body over in
    /// fewer, larger messages than the upstream wrote), an upper bound of one event.
    pub fn max_event(&self) -> u64 {
        self.ask.0 * self.ask.1 as u64
    }
}

/// Runs measurement 4.
pub async fn run(
    dir: &Path,
    upstream: u16,
    ends: &Ends,
    streams: u64,
    concurrency: usize,
    ask: Ask,
) -> Memory {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let front = FrontProcess::start(
        dir,
        &format!(
            "[plugins.usage]\nqueue_events = {QUEUE_EVENTS}\nqueue_bytes = {}\nreplay_bytes = {}\nfinal_timeout_ms = 100\n",
            queue_bytes(),
            replay_bytes()
        ),
        &["usage"],
    );
    let sock = PathBuf::from(front.ext_proc.strip_prefix("unix:").expect("unix"));
    let envoy = BenchEnvoy::start(&dir.join("envoy"), Some(&sock), upstream, &[]);
    let pid = front.pid();
    let plugin = procfs::child_with_arg(pid, "usage").expect("usage plugin process");

    // Warm-up with the plugin running: the same shape, fewer streams.
    run_streams(envoy.port, ends, concurrency as u64, concurrency, ask).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = procfs::rss_bytes(pid);

    // The same load with the plugin healthy: what the streams themselves cost.
    let sampler = Sampler::start(pid, front.admin_port);
    run_streams(envoy.port, ends, streams, concurrency, ask).await;
    let (healthy_rss, _, _) = sampler.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;

    kill(Pid::from_raw(plugin as i32), Signal::SIGSTOP).expect("SIGSTOP the plugin");
    let sampler = Sampler::start(pid, front.admin_port);
    let started = std::time::Instant::now();
    let completed = run_streams(envoy.port, ends, streams, concurrency, ask).await;
    let wall_s = started.elapsed().as_secs_f64();
    let (peak_rss, peak_queue_bytes, peak_queue_depth) = sampler.stop();
    let m = front.metrics();
    let _ = kill(Pid::from_raw(plugin as i32), Signal::SIGCONT);
    drop(envoy);
    drop(front);
    Memory {
        streams,
        completed,
        ask: (ask.events, ask.size),
        idle_rss,
        healthy_rss,
        peak_rss,
        peak_queue_bytes,
        peak_queue_depth,
        dropped_full: counted(
            &m,
            "plugvisor_plugin_events_dropped_total{plugin=\"usage\",reason=\"queue_full\"}",
        ),
        sent: counted(&m, "plugvisor_plugin_events_sent_total{plugin=\"usage\"}"),
        finals_timeout: counted(
            &m,
            "plugvisor_plugin_finals_missing_total{plugin=\"usage\",reason=\"timeout\"}",
        ),
        wall_s,
    }
}

/// Samples the front's RSS every 5 ms and its queue gauges every 50 ms, until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, f64, f64)>,
}

impl Sampler {
    fn start(pid: u32, admin: u16) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut rss, mut qb, mut qd) = (0u64, 0f64, 0f64);
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                rss = rss.max(procfs::rss_bytes(pid));
                if n.is_multiple_of(10) {
                    let m = http_get(admin, "/metrics").unwrap_or_default();
                    qb = qb.max(counted(
                        &m,
                        "plugvisor_plugin_queue_bytes{plugin=\"usage\"}",
                    ));
                    qd = qd.max(counted(
                        &m,
                        "plugvisor_plugin_queue_depth{plugin=\"usage\"}",
                    ));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (rss, qb, qd)
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> (u64, f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

async fn run_streams(port: u16, ends: &Ends, streams: u64, concurrency: usize, ask: Ask) -> u64 {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for i in 0..streams {
        let permits = permits.clone();
        let ends = ends.clone();
        tasks.push(tokio::spawn(async move {
            let _p = permits.acquire_owned().await.expect("semaphore");
            let id = 10_000_000 + i;
            tokio::time::timeout(Duration::from_secs(60), sse::stream(port, ask, id, &ends))
                .await
                .ok()
                .and_then(Result::ok)
                .is_some_and(|r| r.status == 200 && r.events as u64 == ask.events)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap_or(false) {
            ok += 1;
        }
    }
    ok
}
