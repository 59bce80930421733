//! The front's life as a service: start, tell the service manager when it is ready and how it is
//! doing, keep the watchdog fed while the loops it vouches for answer, and drain on stop.
//!
//! [`run`] is what the `plugvisor` binary runs. It wraps [`crate::start`] and
//! [`crate::Running::stop`] with the [`crate::systemd`] messages:
//! - `READY=1` once the ext_proc listener is bound and every plugin marked `required` is
//!   connected, or once `ready_timeout_ms` has passed (the STATUS line then names what is missing);
//! - `STATUS=` whenever the line changes (`serving; plugins 3/3 up; restarts 0`);
//! - `WATCHDOG=1` at half of `WATCHDOG_USEC`, only while the watched loops answer their probes;
//! - `STOPPING=1` and `EXTEND_TIMEOUT_USEC=` while in-flight streams drain.
//!
//! Without systemd the messages go nowhere and [`run`] is `start`, wait, `stop`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::link::PluginLink;
use crate::systemd::{self, StatusSnapshot};
use crate::{Config, RunError, Running};

/// How often the STATUS line is recomputed (it is sent only when it changed).
const STATUS_EVERY: Duration = Duration::from_millis(500);

/// Starts the front, reports to the service manager, serves until `shutdown` resolves (or the
/// ext_proc server fails), then stops gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let started = Instant::now();
    let ready_timeout = config.ready_timeout;
    systemd::status("starting");
    let mut running = crate::start(config).await?;

    let watchdog = systemd::watchdog_interval().map(|interval| {
        tracing::info!(?interval, "systemd watchdog enabled");
        tokio::spawn(systemd::watchdog_loop(interval, running.probes().to_vec()))
    });

    let mut report = Report::default();
    let required: Vec<Arc<PluginLink>> = running
        .links()
        .iter()
        .filter(|l| l.config().required)
        .cloned()
        .collect();
    let ready = wait_required(required, started + ready_timeout);
    tokio::pin!(ready);
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready_sent = false;

    let result = loop {
        tokio::select! {
            missing = &mut ready, if !ready_sent => {
                ready_sent = true;
                if !missing.is_empty() {
                    tracing::warn!(
                        ?missing,
                        timeout = ?ready_timeout,
                        "required plugins are not up; reporting ready without them"
                    );
                    report.note = Some(format!(
                        "required not up after {}ms: {}",
                        ready_timeout.as_millis(),
                        missing.join(", ")
                    ));
                }
                report.phase = "serving";
                let line = report.line(&running);
                systemd::ready(&line);
                tracing::info!(status = %line, "ready");
            }
            _ = tick.tick() => {
                if let Some(line) = report.changed(&running) {
                    systemd::status(&line);
                }
            }
            _ = &mut shutdown => break Ok(()),
            result = server_exited(&mut running) => break result,
        }
    };

    let grace = running.config.shutdown_grace;
    report.phase = "stopping";
    let streams = running.metrics().streams_active.get();
    report.note = Some(format!("draining {streams} stream(s)"));
    // The whole stop: the drain, then the plugins' own grace period after `Shutdown`.
    systemd::stopping(&report.line(&running), grace * 2);
    {
        let stop = running.stop();
        tokio::pin!(stop);
        let mut extend = tokio::time::interval(Duration::from_secs(1));
        extend.tick().await;
        let stop_started = Instant::now();
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = extend.tick() => {
                    systemd::extend_timeout((grace * 2).saturating_sub(stop_started.elapsed()));
                }
            }
        }
    }
    if let Some(task) = watchdog {
        task.abort();
    }
    result
}

/// Resolves when the ext_proc server task ends on its own (it only should at shutdown): `Ok` for
/// a clean end, the error otherwise. Pending forever once the task was awaited.
async fn server_exited(running: &mut Running) -> Result<(), RunError> {
    let Some(server) = running.server.as_mut() else {
        return std::future::pending().await;
    };
    let result = server.await;
    running.server = None;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RunError::Serve(e)),
        Err(e) => {
            tracing::error!(error = %e, "ext_proc server task failed");
            Ok(())
        }
    }
}

/// Plugin restarts done by the front so far, over every configured plugin.
fn restarts(running: &Running) -> u64 {
    running.plugins().status().iter().map(|s| s.restarts).sum()
}

/// Waits until every link in `required` is connected or `deadline` passes; returns the names
/// still not connected.
async fn wait_required(required: Vec<Arc<PluginLink>>, deadline: Instant) -> Vec<String> {
    let all = async {
        for link in &required {
            link.wait_connected().await;
        }
    };
    let _ = tokio::time::timeout_at(deadline, all).await;
    required
        .iter()
        .filter(|l| !l.is_connected())
        .map(|l| l.name().to_owned())
        .collect()
}

/// The STATUS line's state between updates.
#[derive(Debug)]
struct Report {
    phase: &'static str,
    note: Option<String>,
    last: String,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            phase: "starting",
            note: None,
            last: String::new(),
        }
    }
}

impl Report {
    fn snapshot(&self, running: &Running) -> StatusSnapshot {
        StatusSnapshot {
            phase: self.phase,
            plugins: running
                .links()
                .iter()
                .map(|l| (l.name().to_owned(), l.is_connected()))
                .collect(),
            restarts: restarts(running),
            note: self.note.clone(),
        }
    }

    fn line(&mut self, running: &Running) -> String {
        let line = self.snapshot(running).line();
        self.last = line.clone();
        line
    }

    /// The new line if it differs from the last one sent. A note about required plugins is
    /// dropped once every plugin is up.
    fn changed(&mut self, running: &Running) -> Option<String> {
        if self.note.is_some() && running.links().iter().all(|l| l.is_connected()) {
            self.note = None;
        }
        let line = self.snapshot(running).line();
        (line != self.last).then(|| {
            self.last = line.clone();
            line
        })
    }
}
