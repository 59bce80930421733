//! Crash loops under systemd, without losing the listener. systemd's start limit counts every
//! start (a `systemctl restart`, a socket activation, a watchdog restart), and a service that hits
//! it takes `plugvisor.socket` down with it, so `plugvisor.service` turns it off
//! (`StartLimitIntervalSec=0`) and counts only failures instead: its `ExecStopPost=` appends the
//! time of every stop that was not a success to `$RUNTIME_DIRECTORY/failures` and removes the
//! file after a clean stop.
//!
//! A front that finds [`LIMIT`] failures within [`WINDOW`] there does not try again: it [`hold`]s
//! the ext_proc listener and closes every connection at once (Envoy's `failure_mode_allow` then
//! passes traffic instead of waiting on a backlog), reports READY with a STATUS line that says
//! why, keeps the watchdog fed, and exits cleanly on SIGTERM, which clears the count: after the
//! fix, `systemctl restart plugvisor` starts afresh.
//!
//! The hold is visible: `/healthz` on the config's `admin_listen` answers 503 with the STATUS
//! line, `/metrics` has `plugvisor_crash_loop_held 1`, and the control socket answers every
//! request (`plugvisor status`) with the same line. A configuration that did not load when the
//! hold began is tried again every [`RECHECK`]: once it loads, the hold ends by itself (the
//! ledger is cleared and the process exits with EX_TEMPFAIL, so `Restart=on-failure` starts a
//! fresh front). So does an admin address that another process held when the hold began (a
//! start fails on it): the hold tries it every [`RECHECK`] and ends once it is free. Holding matters because systemd cannot keep
//! a listener for a failed service: a connection waiting in the backlog activates it again at
//! once, and 20 activations in 2 s fail the socket (`trigger-limit-hit`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::systemd::{self, Activated};
use crate::config::Config;
use crate::observe::metrics::{self, Metrics};

/// How often a hold caused by a configuration that does not load tries it again.
pub const RECHECK: Duration = Duration::from_secs(2);

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// SIGTERM or SIGINT: a clean stop, which clears the count.
    Stopped,
    /// What kept the front from starting is gone (the configuration that did not load loads
    /// again, or the admin address that was taken is free): start afresh.
    Fixed,
}

/// The file in the runtime directory that `ExecStopPost=` of plugvisor.service appends to.
pub const LEDGER: &str = "failures";
/// Failed stops within [`WINDOW`] after which the front holds instead of serving.
pub const LIMIT: usize = 5;
/// The window [`LIMIT`] counts in.
pub const WINDOW: Duration = Duration::from_secs(60);

/// How many of the ledger's lines (Unix seconds, one per failed stop) fall within `window`
/// before `now`. Lines that are not numbers, or lie in the future, do not count.
pub fn recent_failures(ledger: &str, now: u64, window: Duration) -> usize {
    ledger
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .filter(|&t| t <= now && now - t < window.as_secs())
        .count()
}

/// The ledger of this service, when running under systemd with a runtime directory.
fn ledger_path() -> Option<PathBuf> {
    if !systemd::notify_enabled() {
        return None;
    }
    let dirs = std::env::var("RUNTIME_DIRECTORY").ok()?;
    let first = dirs.split(':').next().filter(|d| !d.is_empty())?;
    Some(Path::new(first).join(LEDGER))
}

/// Under systemd: the number of recent failures when it reached [`LIMIT`], else `None`.
pub fn tripped() -> Option<usize> {
    let text = std::fs::read_to_string(ledger_path()?).ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    let failures = recent_failures(&text, now, WINDOW);
    (failures >= LIMIT).then_some(failures)
}

/// The STATUS line (and error record) while holding.
pub fn hold_status(failures: usize) -> String {
    format!(
        "crash loop: {failures} failed starts within {}s; not serving, ext_proc connections \
         are closed at once; fix the cause (journalctl -u plugvisor), then systemctl restart plugvisor",
        WINDOW.as_secs()
    )
}

/// The configuration the front would run, and its admin address as the file gives it even when
/// it does not load (read from the TOML table, so a bad value elsewhere does not hide it).
fn load(config: Option<&Path>) -> (Result<Config, String>, Option<std::net::SocketAddr>) {
    let loaded = match config {
        Some(path) => Config::load(path),
        None => Config::default_config(),
    }
    .map_err(|e| crate::observe::logging::error_chain(&e));
    let admin = match &loaded {
        Ok(c) => c.admin_listen,
        Err(_) => config
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
            .and_then(|t| t.get("admin_listen")?.as_str()?.parse().ok())
            .filter(|a: &std::net::SocketAddr| a.ip().is_loopback()),
    };
    (loaded, admin)
}

/// Holds the listener systemd passed (if any) until SIGTERM or SIGINT, closing every connection
/// as it arrives; READY=1 with [`hold_status`], watchdog pings while holding; `/healthz`,
/// `/metrics` and the control socket say so. Ends by itself ([`Held::Fixed`]) once a
/// configuration that did not load when the hold began loads.
pub fn hold(failures: usize, config: Option<&Path>) -> std::io::Result<Held> {
    let line = hold_status(failures);
    tracing::error!("{line}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let listener = systemd::take_extproc_listener().map_err(std::io::Error::other)?;
        let listener = match listener {
            Some(Activated::Tcp(l)) => Some(Listener::Tcp(tokio::net::TcpListener::from_std(l)?)),
            Some(Activated::Unix(l)) => {
                Some(Listener::Unix(tokio::net::UnixListener::from_std(l)?))
            }
            None => None,
        };
        let (loaded, admin) = load(config);
        let broken = loaded.as_ref().err().cloned();
        if let Some(why) = &broken {
            tracing::info!(error = %why, "the configuration does not load; the hold ends by itself once it does");
        }
        let metrics = Arc::new(Metrics::new());
        metrics.crash_loop_held.set(1);
        let visible = Arc::new(line.clone());
        let mut side_tasks = Vec::new();
        // Taken by another process when the hold began: likely what failed the starts.
        let mut admin_taken = None;
        if let Some(addr) = admin {
            match metrics::bind_admin(addr).await {
                Ok(l) => {
                    let why = visible.clone();
                    side_tasks.push(tokio::spawn(metrics::serve_admin(
                        l,
                        metrics.clone(),
                        Arc::new(move || Some(why.to_string())),
                        std::future::pending(),
                    )));
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot serve /healthz while holding; the hold ends by itself once the address is free");
                    admin_taken = Some(addr);
                }
            }
        }
        if let Some(dir) = ledger_path().and_then(|p| p.parent().map(Path::to_owned)) {
            match super::control::bind(&dir.join("control.sock")) {
                Ok(l) => side_tasks.push(tokio::spawn(answer_control(l, visible.clone()))),
                Err(e) => tracing::warn!(error = %e, "cannot answer the control socket while holding"),
            }
        }
        systemd::ready(&line);
        let mut ping = tokio::time::interval(
            systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
        );
        let mut recheck = tokio::time::interval(RECHECK);
        let mut closed = 0u64;
        let outcome = loop {
            tokio::select! {
                _ = term.recv() => break Held::Stopped,
                _ = int.recv() => break Held::Stopped,
                _ = ping.tick() => systemd::watchdog_ping(),
                _ = recheck.tick(), if broken.is_some() || admin_taken.is_some() => {
                    let loads = broken.is_none() || load(config).0.is_ok();
                    let admin_free = admin_taken
                        .is_none_or(|addr| std::net::TcpListener::bind(addr).is_ok());
                    if loads && admin_free {
                        break Held::Fixed;
                    }
                }
                accepted = accept(listener.as_ref()) => {
                    // Dropped at once: the peer sees the connection close.
                    if accepted.is_ok() {
                        closed += 1;
                    }
                }
            }
        };
        for task in side_tasks {
            task.abort();
        }
        if outcome == Held::Fixed {
            // The next start must not find the old failures and hold again.
            if let Some(ledger) = ledger_path() {
                let _ = std::fs::remove_file(ledger);
            }
            let line = if broken.is_some() {
                "crash loop over: the configuration loads again; restarting"
            } else {
                "crash loop over: the admin address is free again; restarting"
            };
            tracing::warn!(closed, "{line}");
            systemd::status(line);
        } else {
            tracing::info!(closed, "stopping; held the listener through a crash loop");
        }
        Ok(outcome)
    })
}

/// Answers every control request with why this process holds instead of serving.
async fn answer_control(listener: tokio::net::UnixListener, why: Arc<String>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let why = why.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let _ = tokio::time::timeout(
                super::control::REQUEST_TIMEOUT,
                tokio::io::BufReader::new(read.take(super::control::MAX_REQUEST))
                    .read_line(&mut line),
            )
            .await;
            let answer = super::control::Response {
                ok: false,
                error: Some(format!("held: {why}")),
                ..Default::default()
            };
            if let Ok(mut text) = serde_json::to_string(&answer) {
                text.push('\n');
                let _ = write.write_all(text.as_bytes()).await;
            }
        });
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

async fn accept(listener: Option<&Listener>) -> std::io::Result<()> {
    match listener {
        Some(Listener::Tcp(l)) => l.accept().await.map(drop),
        Some(Listener::Unix(l)) => l.accept().await.map(drop),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_within_the_window_count() {
        let window = Duration::from_secs(60);
        let cases: &[(&str, u64, usize)] = &[
            ("", 1000, 0),
            ("1000\n", 1000, 1),
            ("941\n", 1000, 1),
            // exactly a window ago is outside it
            ("940\n", 1000, 0),
            ("900\n950\n960\n970\n980\n990\n", 1000, 5),
            // garbage and the future never count
            ("x\n\n1001\n999\n", 1000, 1),
            (" 999 \n", 1000, 1),
        ];
        for (ledger, now, want) in cases {
            assert_eq!(
                recent_failures(ledger, *now, window),
                *want,
                "{ledger:?} at {now}"
            );
        }
    }

    #[test]
    fn outside_systemd_nothing_trips() {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert_eq!(tripped(), None);
        }
    }

    #[test]
    fn the_hold_status_says_what_to_do() {
        let line = hold_status(5);
        assert!(
            line.starts_with("crash loop: 5 failed starts within 60s"),
            "{line}"
        );
        assert!(line.ends_with("systemctl restart plugvisor"), "{line}");
    }
}
