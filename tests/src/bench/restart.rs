//! Measurement 3: from SIGKILL of a plugin to its replacement's completed handshake.
//!
//! A `plugvisor` process supervises `usage` and `latency`. Each round kills `latency`'s process
//! with SIGKILL and polls the front's `/metrics` every millisecond until
//! `plugvisor_plugin_restarts_total` has counted the restart and `plugvisor_plugin_up` and
//! `plugvisor_plugin_connected` are 1 again: the replacement has completed its handshake. The
//! new pid is checked to differ. `restart_period_ms = 500` with a wait of 700 ms after each
//! handshake makes every kill a *first* restart (a plugin that stays up a whole period starts
//! over at `backoff_min`, the default 50 ms, which is included in the figure).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::counted;
use super::procfs;
use super::stats::{summarize, Summary};
use crate::front::FrontProcess;

/// What the report says when restarts were not measured.
pub const NOT_MEASURED: &str = "Not measured in this run (`--only` left it out).";

/// Restart latencies, µs.
#[derive(Debug, Clone)]
pub struct Restarts {
    /// Over every kill.
    pub all: Summary,
    /// The first kill's.
    pub first_us: f64,
    /// How it was measured.
    pub method: String,
    /// Anything to add.
    pub note: String,
}

/// Runs measurement 3 with `kills` kills; `None` if the front does not bring the plugin back.
pub async fn run(dir: &Path, kills: usize) -> Option<Restarts> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let front = FrontProcess::start(
        dir,
        "[plugins.usage]\n[plugins.latency]\nrestart_period_ms = 500\n",
        &["usage", "latency"],
    );
    let fpid = front.pid();
    let series = |name: &str| format!("{name}{{plugin=\"latency\"}}");
    let mut samples = Vec::with_capacity(kills);
    let mut failures = 0;
    for _ in 0..kills {
        let Some(victim) = procfs::child_with_arg(fpid, "latency") else {
            failures += 1;
            break;
        };
        let before = counted(&front.metrics(), &series("plugvisor_plugin_restarts_total"));
        let t0 = Instant::now();
        kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("SIGKILL the plugin");
        let mut back = None;
        while t0.elapsed() < Duration::from_secs(10) {
            let m = front.metrics();
            if counted(&m, &series("plugvisor_plugin_restarts_total")) > before
                && counted(&m, &series("plugvisor_plugin_up")) == 1.0
                && counted(&m, &series("plugvisor_plugin_connected")) == 1.0
            {
                back = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let Some(took) = back else {
            failures += 1;
            eprintln!("bench: latency plugin not back within 10 s of SIGKILL");
            break;
        };
        let new = procfs::child_with_arg(fpid, "latency");
        assert_ne!(
            new,
            Some(victim),
            "the killed pid cannot be the replacement"
        );
        samples.push(took.as_secs_f64() * 1e6);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    drop(front);
    if samples.is_empty() {
        return None;
    }
    let first_us = samples[0];
    Some(Restarts {
        all: summarize(&mut samples),
        first_us,
        method:
            "A `plugvisor` process supervises `usage` and `latency` (`restart = \"permanent\"`, \
                 `backoff_min_ms` at its default 50, `restart_period_ms = 500`). Each kill sends \
                 SIGKILL to `latency`'s process and polls `/metrics` every millisecond until \
                 `plugvisor_plugin_restarts_total{plugin=\"latency\"}` went up and \
                 `plugvisor_plugin_up` and `plugvisor_plugin_connected` are 1 again: the \
                 replacement has completed its handshake (its pid is checked to be new). After \
                 700 ms, longer than `restart_period_ms`, the next kill is again a first restart, \
                 so every figure includes the 50 ms backoff minimum once."
                .into(),
        note: if failures > 0 {
            format!("{failures} kill(s) did not bring the plugin back within 10 s.")
        } else {
            String::new()
        },
    })
}
