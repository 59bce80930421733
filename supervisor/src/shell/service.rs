//! The front's life as a service: start, tell the service manager when it is ready and how it is
//! doing, keep the watchdog fed while the loops it vouches for answer, and drain on stop.
//!
//! [`run`] is what the `plugvisor` binary runs. It wraps [`crate::start`] and
//! [`crate::Running::stop`] with the [`crate::shell::systemd`] messages:
//! - `READY=1` once the ext_proc listener is bound and every plugin marked `required` is
//!   connected, or once `ready_timeout_ms` has passed (the STATUS line then names what is missing);
//! - `STATUS=` whenever the line changes (`serving; plugins 3/3 up; restarts 0`);
//! - `WATCHDOG=1` at half of `WATCHDOG_USEC`, only while the watched loops answer their probes;
//! - `STOPPING=1` and `EXTEND_TIMEOUT_USEC=` while in-flight streams drain;
//! - on SIGHUP, `RELOADING=1`, the config file read again and applied ([`crate::shell::reload`]), then
//!   `READY=1`; a file that does not load is rejected with the error logged and in the STATUS
//!   line, and the running configuration stays;
//! - on SIGUSR2 or `plugvisor upgrade`, the handover to the binary now on disk ([`crate::shell::upgrade`]):
//!   once the new front serves, `MAINPID=` names it, this front sends nothing more and drains
//!   for up to `upgrade_drain_ms` (a SIGTERM cuts that to `shutdown_grace_ms`). A front started
//!   by an upgrade ([`run_with`] with the handover socket) reports ready to the old front, not to
//!   systemd, and sends `READY=1` once it is the main process.
//!
//! Without systemd the messages go nowhere and [`run`] is `start`, wait, `stop`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::plugin::link::PluginLink;
use crate::shell::systemd::{self, StatusSnapshot};
use crate::shell::upgrade;
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
    run_with(config, config_path, shutdown, None).await
}

/// [`run`]; with `handover` (the old front's handover socket, from
/// [`crate::shell::upgrade::SOCKET_ENV`]), as the new front of an upgrade.
pub async fn run_with(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
    handover: Option<PathBuf>,
) -> Result<(), RunError> {
    let started = Instant::now();
    // Installed first: SIGHUP's default action would end the process, and so would SIGUSR2's.
    let signal = |kind, what: &str| {
        tokio::signal::unix::signal(kind).map_err(|source| RunError::Setup {
            what: what.into(),
            source,
        })
    };
    use tokio::signal::unix::SignalKind;
    let mut hup = signal(SignalKind::hangup(), "the SIGHUP handler")?;
    let mut usr2 = signal(SignalKind::user_defined2(), "the SIGUSR2 handler")?;
    let ready_timeout = config.ready_timeout;
    let mut predecessor = match &handover {
        None => None,
        Some(path) => Some(
            upgrade::Predecessor::connect(path)
                .await
                .map_err(RunError::TakeOver)?,
        ),
    };
    let mut running = match predecessor.as_mut() {
        None => {
            systemd::status("starting");
            crate::start(config).await?
        }
        Some(p) => {
            tracing::info!(old = p.from_pid, "taking over from the old front");
            let lock = crate::shell::instance::InstanceLock::inherit(
                p.lock.try_clone().map_err(RunError::TakeOver)?,
                &config.runtime_dir,
            )
            .map_err(RunError::TakeOver)?;
            let inherited = crate::Inherited {
                lock,
                listeners: crate::shell::listeners::Passed {
                    ext_proc: p.ext_proc.try_clone().map_err(RunError::TakeOver)?,
                    admin: p
                        .admin
                        .as_ref()
                        .map(|a| a.try_clone())
                        .transpose()
                        .map_err(RunError::TakeOver)?,
                    keep_listen_file: p.keep_listen_file,
                },
            };
            crate::start_with(config, Some(inherited)).await?
        }
    };
    let mut upgrades = running.take_upgrade_requests();
    // Older fronts still draining, which a stop of this one cuts short.
    let mut draining: Vec<u32> = Vec::new();
    let mut watchdog_usec = systemd::watchdog_usec();
    if let Some(mut p) = predecessor.take() {
        take_over(&mut running, &mut p, started + ready_timeout).await?;
        watchdog_usec = p.watchdog_usec;
        draining = p.draining.clone();
    }

    let watchdog = watchdog_usec.map(|usec| {
        let interval = Duration::from_micros(usec) / 2;
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
    // The STATUS line goes to systemd only: without it, nothing to refresh (and no wake-up twice
    // a second of an otherwise idle front).
    let notifying = systemd::notify_enabled();
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
            _ = tick.tick(), if notifying => {
                if let Some(line) = report.changed(&running) {
                    systemd::status(&line);
                }
            }
            _ = hup.recv() => {
                let _ = reload(&mut running, config_path.as_deref(), &mut report).await;
                ready_sent = true;
            }
            ask = recv(&mut upgrades) => {
                if ask.what == upgrade::Asked::Reload {
                    let outcome = reload(&mut running, config_path.as_deref(), &mut report).await;
                    ready_sent = true;
                    let _ = ask.reply.send(outcome);
                    continue;
                }
                match hand_over(&mut running, watchdog_usec, &draining, &mut shutdown).await {
                    Handover::Done(message) => {
                        let _ = ask.reply.send(Ok(message));
                        break Ok(());
                    }
                    Handover::Failed(why) => {
                        let _ = ask.reply.send(Err(why));
                    }
                    Handover::Stopped => break Ok(()),
                }
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading");
                match hand_over(&mut running, watchdog_usec, &draining, &mut shutdown).await {
                    Handover::Done(_) => break Ok(()),
                    Handover::Failed(_) => {}
                    Handover::Stopped => break Ok(()),
                }
            }
            _ = &mut shutdown => break Ok(()),
            result = server_exited(&mut running) => break result,
        }
    };

    if let Some(to) = running.handed_over() {
        if let Some(task) = watchdog {
            task.abort();
        }
        drain_after_upgrade(&mut running, to, &mut shutdown, &mut hup, &mut usr2).await;
        // The drain is over (every stream ended, or its time ran out): what is left is cut now,
        // not drained once more for shutdown_grace_ms.
        running.stop_after(Duration::ZERO).await;
        return result;
    }
    // A service stop cuts the drains of older fronts short too, and waits for them: systemd
    // counts the stop done when the last process of the unit is gone.
    let cut = upgrade::stop_draining(&draining);

    let grace = running.config.current().shutdown_grace;
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
    upgrade::wait_gone(&cut, grace * 2 + Duration::from_secs(1)).await;
    // The last STATUS= stays on the unit after it stopped: say so rather than leave a count of
    // streams that no longer drain.
    systemd::status(&format!(
        "stopped; streams cut after the drain: {}",
        metrics.streams_cut.get()
    ));
    result
}

/// The new front's side of an upgrade, after its start: ready (every plugin it spawns
/// connected by `deadline`) or not, then accept once the old front says so, then `READY=1` once
/// it is the main process.
async fn take_over(
    running: &mut Running,
    predecessor: &mut upgrade::Predecessor,
    deadline: Instant,
) -> Result<(), RunError> {
    let spawned: Vec<Arc<PluginLink>> = running
        .links()
        .iter()
        .filter(|l| l.config().process.spawn)
        .cloned()
        .collect();
    // The plugins run by someone else that follow `Reconnect` come over now: the old front asks
    // them once this one listens, and streams wait for them meanwhile. The others stay with the
    // old front until it has drained.
    let followers: Vec<Arc<PluginLink>> = running
        .links()
        .iter()
        .filter(|l| {
            !l.config().process.spawn && predecessor.followers.iter().any(|f| f == l.name())
        })
        .cloned()
        .collect();
    for link in running
        .links()
        .iter()
        .filter(|l| !l.config().process.spawn && !followers.iter().any(|f| f.name() == l.name()))
    {
        tracing::warn!(plugin = %link.name(), "plugin with spawn = false does not follow Reconnect: it stays with the old front until that has drained, and new streams lack it meanwhile");
    }
    if !predecessor.followers.is_empty() {
        for link in &followers {
            link.expect_follower();
        }
        predecessor.listening().await.map_err(|e| {
            tracing::error!(error = %e, "cannot tell the old front this one listens; exiting");
            RunError::TakeOver(e)
        })?;
    }
    let missing = wait_required(spawned, deadline).await;
    if !missing.is_empty() {
        let reason = format!(
            "plugins not connected within ready_timeout_ms: {}",
            missing.join(", ")
        );
        tracing::error!(
            old = predecessor.from_pid,
            "{reason}; leaving the old front serving"
        );
        predecessor.not_ready(reason.clone()).await;
        return Err(RunError::TakeOver(std::io::Error::other(reason)));
    }
    let late = wait_required(followers.clone(), deadline).await;
    for link in followers
        .iter()
        .filter(|l| late.iter().any(|n| n == l.name()))
    {
        tracing::warn!(plugin = %link.name(), "plugin asked over from the old front did not connect within ready_timeout_ms; serving without it");
        link.follower_missing();
    }
    predecessor.ready().await.map_err(|e| {
        tracing::error!(error = %e, "the old front did not let this one serve; exiting");
        RunError::TakeOver(e)
    })?;
    running.open_accept();
    if !predecessor.serving().await {
        tracing::warn!(
            old = predecessor.from_pid,
            "the old front did not confirm the handover; serving anyway"
        );
    }
    tracing::info!(
        old = predecessor.from_pid,
        "serving; the old front drains its streams"
    );
    Ok(())
}

/// What became of an upgrade request.
enum Handover {
    /// A new front serves; this one drains. The message is for the operator.
    Done(String),
    /// The new front failed and is gone; this front serves on. Why, for the operator.
    Failed(String),
    /// A stop arrived while the new front was starting (it was killed).
    Stopped,
}

/// Starts the new front and, once it is ready, hands over to it.
async fn hand_over(
    running: &mut Running,
    watchdog_usec: Option<u64>,
    draining: &[u32],
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Handover {
    let failed = |e: upgrade::UpgradeError| {
        let why = format!(
            "upgrade failed: {}; still serving as pid {}",
            crate::observe::logging::error_chain(&e),
            std::process::id()
        );
        tracing::error!("{why}");
        Handover::Failed(why)
    };
    let plan = match running.upgrade_plan(watchdog_usec, draining.to_vec()) {
        Ok(plan) => plan,
        Err(e) => return failed(e),
    };
    let attempt = tokio::select! {
        attempt = upgrade::start_successor(plan) => attempt,
        () = &mut *shutdown => return Handover::Stopped,
    };
    let mut attempt = match attempt {
        Ok(a) => a,
        Err(e) => return failed(e),
    };
    if let Err(e) = attempt.go().await {
        return failed(e);
    }
    let to = attempt.pid();
    let streams = running.metrics().streams_active.get().max(0);
    systemd::hand_over_main_pid(
        to,
        &format!("handing over to pid {to}; draining {streams} stream(s)"),
    );
    running.hand_over(to);
    attempt.finish().await;
    let drain = running.config.current().upgrade_drain;
    let message = format!(
        "upgraded: pid {to} serves; pid {} drains {streams} stream(s) for up to {}s (upgrade_drain_ms)",
        std::process::id(),
        drain.as_secs()
    );
    tracing::info!(new = to, streams, "{message}");
    Handover::Done(message)
}

/// The next upgrade request; pending forever without a channel.
async fn recv(upgrades: &mut Option<tokio::sync::mpsc::Receiver<upgrade::Ask>>) -> upgrade::Ask {
    match upgrades.as_mut() {
        Some(rx) => match rx.recv().await {
            Some(ask) => ask,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The old front after a handover: waits until its last stream ends, or `upgrade_drain_ms`, cut
/// to `shutdown_grace_ms` by a SIGTERM. It only logs now: systemd hears from the new front.
async fn drain_after_upgrade(
    running: &mut Running,
    to: u32,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    hup: &mut tokio::signal::unix::Signal,
    usr2: &mut tokio::signal::unix::Signal,
) {
    let started = Instant::now();
    let mut deadline = started + running.config.current().upgrade_drain;
    let metrics = running.metrics().clone();
    let mut stopped = false;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut report = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if metrics.streams_active.get() <= 0 {
                    tracing::info!(new = to, drained_ms = started.elapsed().as_millis() as u64, "every stream drained after the upgrade; stopping");
                    return;
                }
            }
            _ = report.tick() => {
                tracing::info!(new = to, streams = metrics.streams_active.get(), left_s = deadline.saturating_duration_since(Instant::now()).as_secs(), "draining after the upgrade");
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(new = to, streams = metrics.streams_active.get(), "drain time is up; cutting the streams left");
                return;
            }
            () = &mut *shutdown, if !stopped => {
                stopped = true;
                deadline = deadline.min(Instant::now() + running.config.current().shutdown_grace);
                tracing::info!(new = to, "stop requested while draining after the upgrade; draining for shutdown_grace_ms at most");
            }
            _ = hup.recv() => {
                tracing::warn!(new = to, "SIGHUP ignored: this front has handed over and only drains; reload pid {to}");
            }
            _ = usr2.recv() => {
                tracing::warn!(new = to, "SIGUSR2 ignored: this front has handed over and only drains; upgrade pid {to}");
            }
        }
    }
}

/// `RELOADING=1`, read and apply the config file, `READY=1` with the new STATUS line. Returns
/// what was done (`plugvisor reload`'s answer), or why the file was refused or not all applied.
async fn reload(
    running: &mut Running,
    path: Option<&Path>,
    report: &mut Report,
) -> Result<String, String> {
    report.phase = "reloading";
    systemd::reloading(&report.line(running));
    let loaded = match path {
        Some(path) => Config::load(path),
        None => Config::default_config(),
    };
    if let Ok(new) = &loaded {
        for warning in &new.warnings {
            tracing::warn!("{warning}");
        }
    }
    let outcome = match loaded {
        Err(e) => {
            let why = crate::observe::logging::error_chain(&e);
            tracing::error!(error = %why, "reload rejected; keeping the running configuration");
            report.reload_note = Some(format!("reload rejected: {}", clip(&why, 200)));
            Err(format!(
                "reload rejected, the running configuration stays: {why}"
            ))
        }
        Ok(new) => match running.reload(new).await {
            Ok(plan) => {
                tracing::info!(%plan, "reload applied");
                // Keys the reload could not apply stay visible until the next reload.
                report.reload_note = (!plan.needs_restart.is_empty()).then(|| {
                    let keys: Vec<&str> = plan.needs_restart.iter().map(|(k, _)| *k).collect();
                    format!("not applied until restart/upgrade: {}", keys.join(", "))
                });
                Ok(format!("reloaded: {plan}"))
            }
            Err(e) => {
                report.reload_note = Some(format!("reload incomplete: {e}"));
                Err(format!("reload incomplete: {e}"))
            }
        },
    };
    report.phase = "serving";
    let line = report.line(running);
    systemd::ready(&line);
    outcome
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
