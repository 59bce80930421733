//! The front's life as a service: start, tell the service manager when it is ready and how it is
//! doing, keep the watchdog fed while the loops it vouches for answer, and drain on stop.
//!
//! [`run`] is what the `plugvisor` binary runs. It wraps [`crate::start`] and
//! [`crate::Running::stop`] with the [`crate::systemd`] messages:
//! - `READY=1` once the ext_proc listener is bound and every plugin marked `required` is
//!   connected, or once `ready_timeout_ms` has passed (the STATUS line then names what is missing);
//! - `STATUS=` whenever the line changes (`serving; plugins 3/3 up; restarts 0`);
//! - `WATCHDOG=1` at half of `WATCHDOG_USEC`, only while the watched loops answer their probes;
//! - `STOPPING=1` and `EXTEND_TIMEOUT_USEC=` while in-flight streams drain;
//! - on SIGHUP, `RELOADING=1`, the config file read again and applied ([`crate::reload`]), then
//!   `READY=1`; a file that does not load is rejected with the error logged and in the STATUS
//!   line, and the running configuration stays.
//!
//! Without systemd the messages go nowhere and [`run`] is `start`, wait, `stop`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::link::PluginLink;
use crate::systemd::{self, StatusSnapshot};
use crate::{Config, RunError, Running};

/// How often the STATUS line is recomputed (it is sent only when it changed).
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How often the STATUS line follows the streams still draining during a stop.
const DRAIN_STATUS_EVERY: Duration = Duration::from_millis(250);

/// Starts the front, reports to the service manager, serves until `shutdown` resolves (or the
/// ext_proc server fails), then stops gracefully. SIGHUP reloads `config_path` (without one, the
/// embedded default, i.e. nothing changes).
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let started = Instant::now();
    // Installed first: SIGHUP's default action would end the process.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(
        |source| RunError::Setup {
            what: "the SIGHUP handler".into(),
            source,
        },
    )?;
    let ready_timeout = config.ready_timeout;
    systemd::status("starting");
    let mut running = crate::start(config).await?;

    let watchdog = systemd::watchdog_interval().map(|interval| {
        tracing::info!(?interval, "systemd watchdog enabled");
        let fixed = running.probes().to_vec();
        let plugins = running.plugins().clone();
        // The ext_proc accept loop, and each plugin's owner as they are now (a reload changes
        // them).
        tokio::spawn(systemd::watchdog_loop(interval, move || {
            let mut probes = fixed.clone();
            probes.extend(plugins.entries().iter().map(|e| e.probe()));
            probes
        }))
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
            _ = hup.recv() => {
                reload(&mut running, config_path.as_deref(), &mut report).await;
                ready_sent = true;
            }
            _ = &mut shutdown => break Ok(()),
            result = server_exited(&mut running) => break result,
        }
    };

    let grace = running.config.shutdown_grace;
    report.phase = "stopping";
    report.note = None;
    let metrics = running.metrics().clone();
    let mut drain = systemd::DrainStatus::new(report.snapshot(&running));
    let first = drain
        .update(metrics.streams_active.get())
        .unwrap_or_default();
    // The whole stop: the drain, then the plugins' own grace period after `Shutdown`.
    systemd::stopping(&first, grace * 2);
    {
        let stop = running.stop();
        tokio::pin!(stop);
        let mut extend = tokio::time::interval(Duration::from_secs(1));
        extend.tick().await;
        // The count follows the streams as they finish, not the moment the stop began.
        let mut follow = tokio::time::interval(DRAIN_STATUS_EVERY);
        follow.tick().await;
        let stop_started = Instant::now();
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = extend.tick() => {
                    systemd::extend_timeout((grace * 2).saturating_sub(stop_started.elapsed()));
                }
                _ = follow.tick() => {
                    if let Some(line) = drain.update(metrics.streams_active.get()) {
                        systemd::status(&line);
                    }
                }
            }
        }
    }
    if let Some(task) = watchdog {
        task.abort();
    }
    result
}

/// `RELOADING=1`, read and apply the config file, `READY=1` with the new STATUS line.
async fn reload(running: &mut Running, path: Option<&Path>, report: &mut Report) {
    report.phase = "reloading";
    systemd::reloading(&report.line(running));
    let loaded = match path {
        Some(path) => Config::load(path),
        None => Config::default_config(),
    };
    report.reload_note = match loaded {
        Err(e) => {
            let why = crate::error_chain(&e);
            tracing::error!(error = %why, "reload rejected; keeping the running configuration");
            Some(format!("reload rejected: {}", clip(&why, 200)))
        }
        Ok(new) => match running.reload(new).await {
            Ok(plan) => {
                tracing::info!(%plan, "reload applied");
                None
            }
            Err(e) => Some(format!("reload incomplete: {e}")),
        },
    };
    report.phase = "serving";
    let line = report.line(running);
    systemd::ready(&line);
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

/// At most `max` bytes of `s`, cut at a character boundary.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The STATUS line's state between updates.
#[derive(Debug)]
struct Report {
    phase: &'static str,
    /// What readiness or stopping is waiting for; dropped once every plugin is up.
    note: Option<String>,
    /// The outcome of the last reload when it was not clean; kept until the next reload.
    reload_note: Option<String>,
    last: String,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            phase: "starting",
            note: None,
            reload_note: None,
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
            note: match (&self.note, &self.reload_note) {
                (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                (a, b) => a.clone().or_else(|| b.clone()),
            },
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
