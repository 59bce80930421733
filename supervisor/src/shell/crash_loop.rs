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
//! fix, `systemctl restart plugvisor` starts afresh. Holding matters because systemd cannot keep
//! a listener for a failed service: a connection waiting in the backlog activates it again at
//! once, and 20 activations in 2 s fail the socket (`trigger-limit-hit`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::systemd::{self, Activated};

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

/// Holds the listener systemd passed (if any) until SIGTERM or SIGINT, closing every connection
/// as it arrives; READY=1 with [`hold_status`], watchdog pings while holding.
pub fn hold(failures: usize) -> std::io::Result<()> {
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
            Some(Activated::Tcp(l)) => Some(Held::Tcp(tokio::net::TcpListener::from_std(l)?)),
            Some(Activated::Unix(l)) => Some(Held::Unix(tokio::net::UnixListener::from_std(l)?)),
            None => None,
        };
        systemd::ready(&line);
        let mut ping = tokio::time::interval(
            systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
        );
        let mut closed = 0u64;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = ping.tick() => systemd::watchdog_ping(),
                accepted = accept(listener.as_ref()) => {
                    // Dropped at once: the peer sees the connection close.
                    if accepted.is_ok() {
                        closed += 1;
                    }
                }
            }
        }
        tracing::info!(closed, "stopping; held the listener through a crash loop");
        Ok(())
    })
}

enum Held {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

async fn accept(listener: Option<&Held>) -> std::io::Result<()> {
    match listener {
        Some(Held::Tcp(l)) => l.accept().await.map(drop),
        Some(Held::Unix(l)) => l.accept().await.map(drop),
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
