//! The service manager's side of plugvisor: the ext_proc listener handed over by socket
//! activation (`LISTEN_FDS`, the fd named `extproc`), `sd_notify` messages (`READY=1`, `STATUS=`,
//! `WATCHDOG=1`, `STOPPING=1`, `RELOADING=1`, `EXTEND_TIMEOUT_USEC=`), the STATUS line itself, and
//! the liveness probes the watchdog sends through the loops it vouches for.
//!
//! Outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`) every function here is a no-op, so the
//! front behaves the same under a test harness, a shell or a container runtime.
//!
//! This is the one module of the crate allowed `unsafe`: taking ownership of an inherited file
//! descriptor ([`adopt_listen_fd`]), or of one received over the upgrade handover socket
//! ([`adopt_received_fds`]). `sd-notify` 0.4 and nix's `SCM_RIGHTS` hand out raw fds only.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
};
use sd_notify::NotifyState;
use tokio::sync::oneshot;

use crate::config::Listen;
use crate::observe::probe::{Probe, Sent};
use crate::RunError;

/// The `FileDescriptorName=` of the ext_proc socket in `plugvisor.socket`.
pub const EXTPROC_FD_NAME: &str = "extproc";

/// A listening socket inherited from the service manager.
#[derive(Debug)]
pub enum Activated {
    /// `ListenStream=127.0.0.1:9002` and the like.
    Tcp(std::net::TcpListener),
    /// `ListenStream=/run/plugvisor/extproc.sock`.
    Unix(std::os::unix::net::UnixListener),
}

/// The activated socket was unusable.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS`/`LISTEN_FDNAMES` could not be read.
    #[error("cannot read the sockets passed by systemd (LISTEN_FDS, LISTEN_FDNAMES)")]
    Env(#[source] io::Error),
    /// Sockets were passed but none is named `extproc`.
    #[error(
        "systemd passed {count} socket(s) named {names:?} but none named `extproc`; \
         set FileDescriptorName=extproc in the socket unit"
    )]
    NotNamed {
        /// How many fds came.
        count: usize,
        /// Their names.
        names: Vec<String>,
    },
    /// The `extproc` fd is not a listening stream socket of a family we serve.
    #[error(
        "the socket named `extproc` (fd {fd}) {what}; use ListenStream= with a path or ip:port"
    )]
    NotListening {
        /// The fd.
        fd: RawFd,
        /// What is wrong with it.
        what: String,
    },
}

/// Set once the `extproc` fd has been adopted, so it is never wrapped twice.
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// The ext_proc listener passed by systemd, if this process was socket-activated. Returns
/// `Ok(None)` without `LISTEN_FDS` for this pid, and on every call after the first that found it
/// (the fd then belongs to the listener returned the first time).
pub fn take_extproc_listener() -> Result<Option<Activated>, ActivationError> {
    // Not unsetting the environment: other threads may be running, and plugins do not use these
    // variables (LISTEN_PID names this process, so they would ignore them anyway).
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names(false)
        .map_err(ActivationError::Env)?
        .collect();
    if fds.is_empty() {
        return Ok(None);
    }
    let Some(&(fd, _)) = fds.iter().find(|(_, name)| name == EXTPROC_FD_NAME) else {
        return Err(ActivationError::NotNamed {
            count: fds.len(),
            names: fds.into_iter().map(|(_, n)| n).collect(),
        });
    };
    if ADOPTED.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let owned = adopt_listen_fd(fd);
    listening_socket(owned).map(Some)
}

/// What a listening socket passed to this process (by systemd, or by the front handing over)
/// is: a TCP or Unix stream listener, set non-blocking.
pub fn listening_socket(owned: OwnedFd) -> Result<Activated, ActivationError> {
    let fd = owned.as_raw_fd();
    let bad = |what: String| ActivationError::NotListening { fd, what };
    match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(bad("is not listening".into())),
        Err(e) => return Err(bad(format!("is not a socket ({e})"))),
    }
    let family = getsockname::<SockaddrStorage>(owned.as_raw_fd())
        .map_err(|e| bad(format!("has no address ({e})")))?
        .family();
    let listener = match family {
        Some(AddressFamily::Unix) => Activated::Unix(std::os::unix::net::UnixListener::from(owned)),
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            Activated::Tcp(std::net::TcpListener::from(owned))
        }
        other => return Err(bad(format!("has address family {other:?}"))),
    };
    let nonblocking = match &listener {
        Activated::Tcp(l) => l.set_nonblocking(true),
        Activated::Unix(l) => l.set_nonblocking(true),
    };
    nonblocking.map_err(|e| bad(format!("cannot be made non-blocking ({e})")))?;
    Ok(listener)
}

/// Takes ownership of an fd passed by the service manager.
#[allow(unsafe_code)]
fn adopt_listen_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` comes from `sd_notify::listen_fds_with_names`, which yields only the fds
    // 3..3+LISTEN_FDS that systemd opened for this very process (LISTEN_PID is checked). Nothing
    // else in plugvisor opens, closes or wraps them, and `ADOPTED` guarantees this runs at most
    // once per process, so the returned `OwnedFd` is the fd's only owner and closes it once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Takes ownership of the fds that arrived in one `SCM_RIGHTS` message on the handover socket
/// ([`crate::shell::upgrade`]).
#[allow(unsafe_code)]
pub(crate) fn adopt_received_fds(fds: Vec<RawFd>) -> Vec<OwnedFd> {
    fds.into_iter()
        // SAFETY: the kernel installed each of these fds in this process's table while
        // delivering the `SCM_RIGHTS` message (`recvmsg` with `MSG_CMSG_CLOEXEC`); nothing else
        // knows their numbers, and each is wrapped exactly once here, so every `OwnedFd` is its
        // fd's only owner and closes it once.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// The ext_proc listener, bound and ready for the gRPC server.
#[derive(Debug)]
pub enum ExtProcListener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket.
    Unix(tokio::net::UnixListener),
}

/// The ext_proc listener: the socket systemd passed as `extproc` when socket-activated (the
/// config's `listen` is then not used), else `listen` bound here. Returns where it listens, the
/// listener, and whether it came from systemd (whose socket file the front must never remove).
pub async fn bind_ext_proc(listen: &Listen) -> Result<(Listen, ExtProcListener, bool), RunError> {
    let activation_error = |source: io::Error| RunError::Listen {
        key: "socket activation",
        addr: "the socket passed by systemd (LISTEN_FDS)".to_owned(),
        source,
    };
    if let Some(activated) =
        take_extproc_listener().map_err(|e| activation_error(io::Error::other(e)))?
    {
        let (passed, listener) = serve_passed(activated).map_err(activation_error)?;
        tracing::info!(listen = %passed, "ext_proc listener passed by systemd");
        warn_ignored_listen(listen, &passed);
        return Ok((passed, listener, true));
    }
    match listen {
        Listen::Tcp(addr) => {
            let failed = |source| RunError::Listen {
                key: "listen",
                addr: addr.to_string(),
                source,
            };
            let l = tokio::net::TcpListener::bind(addr).await.map_err(failed)?;
            let bound = l.local_addr().map_err(failed)?;
            Ok((Listen::Tcp(bound), ExtProcListener::Tcp(l), false))
        }
        Listen::Unix(path) => {
            let failed = |source| RunError::Listen {
                key: "listen",
                addr: format!("unix:{}", path.display()),
                source,
            };
            // The path may lie outside the runtime directory its lock guards: a socket someone
            // still accepts on is another server's, not a stale one.
            if crate::shell::instance::someone_listens(path) {
                return Err(failed(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on it",
                )));
            }
            crate::shell::instance::prepare_socket_path(path).map_err(failed)?;
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let l = tokio::net::UnixListener::bind(path).map_err(failed)?;
            Ok((Listen::Unix(path.clone()), ExtProcListener::Unix(l), false))
        }
    }
}

/// Says so when the config's `listen` names another address than the socket systemd passed:
/// an operator who set `listen` expects Envoy to reach plugvisor there, and it will not.
fn warn_ignored_listen(configured: &Listen, passed: &Listen) {
    if let Some(line) = ignored_listen(configured, passed) {
        tracing::warn!("{line}");
    }
}

/// The warning for [`warn_ignored_listen`], `None` when both name the same address.
fn ignored_listen(configured: &Listen, passed: &Listen) -> Option<String> {
    (configured != passed).then(|| {
        format!(
            "ignoring listen = \"{configured}\": systemd passed the ext_proc socket {passed} \
             (plugvisor.socket); to serve on {configured}, set ListenStream= in a drop-in \
             (scripts/install --listen) or mask plugvisor.socket"
        )
    })
}

/// A passed listening socket (systemd's, or the one a front hands over) as the gRPC server's
/// listener, with where it listens.
pub fn serve_passed(activated: Activated) -> io::Result<(Listen, ExtProcListener)> {
    match activated {
        Activated::Tcp(l) => {
            let addr = l.local_addr()?;
            let l = tokio::net::TcpListener::from_std(l)?;
            Ok((Listen::Tcp(addr), ExtProcListener::Tcp(l)))
        }
        Activated::Unix(l) => {
            let path = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
                .unwrap_or_default();
            let l = tokio::net::UnixListener::from_std(l)?;
            Ok((Listen::Unix(path), ExtProcListener::Unix(l)))
        }
    }
}

/// Whether a service manager listens for notifications (`NOTIFY_SOCKET` is set).
pub fn notify_enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

/// Sends `states` to the service manager; nothing without `NOTIFY_SOCKET`. A failed send is
/// logged, never fatal: a front that cannot notify still serves.
pub fn notify(states: &[NotifyState<'_>]) {
    if HANDED_OVER.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, ?states, "cannot notify the service manager");
    }
}

/// Set once this front made another the service's main process: systemd (`NotifyAccess=main`)
/// refuses, and logs, every message from a process that is no longer the main one.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// `MAINPID=<pid>` with a STATUS line: the front taking over from this one is the service's main
/// process from now on. Nothing more is sent from this process afterwards.
pub fn hand_over_main_pid(pid: u32, status: &str) {
    notify(&[NotifyState::MainPid(pid), NotifyState::Status(status)]);
    HANDED_OVER.store(true, Ordering::SeqCst);
}

/// `READY=1` with a STATUS line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=<line>`.
pub fn status(line: &str) {
    notify(&[NotifyState::Status(line)]);
}

/// `RELOADING=1` (with `MONOTONIC_USEC`, which systemd 253+ requires) and a STATUS line.
pub fn reloading(status: &str) {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status(status)];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

/// `STOPPING=1`, a STATUS line, and `EXTEND_TIMEOUT_USEC` so the stop timeout covers `drain`.
pub fn stopping(status: &str, drain: Duration) {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status(status),
        NotifyState::ExtendTimeoutUsec(extend_usec(drain)),
    ]);
}

/// `EXTEND_TIMEOUT_USEC` while draining: the time still needed plus a margin for the plugins.
pub fn extend_timeout(remaining: Duration) {
    notify(&[NotifyState::ExtendTimeoutUsec(extend_usec(remaining))]);
}

fn extend_usec(d: Duration) -> u32 {
    let with_margin = d + Duration::from_secs(5);
    u32::try_from(with_margin.as_micros()).unwrap_or(u32::MAX)
}

/// The watchdog interval to ping at (half of `WATCHDOG_USEC`), if systemd set one for this pid.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_usec().map(|usec| Duration::from_micros(usec) / 2)
}

/// `WATCHDOG_USEC`, if systemd set a watchdog for this pid.
pub fn watchdog_usec() -> Option<u64> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then_some(usec)
}

/// `WATCHDOG=1`.
pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

/// The STATUS line during a stop: it follows the streams still draining (`draining 3
/// stream(s)`, then `streams drained; stopping plugins`), and is sent only when it changes.
#[derive(Debug)]
pub struct DrainStatus {
    base: StatusSnapshot,
    last: Option<i64>,
}

impl DrainStatus {
    /// Starts from the line as it was when the stop began (phase `stopping`).
    pub fn new(base: StatusSnapshot) -> DrainStatus {
        DrainStatus { base, last: None }
    }

    /// The line for `streams` in flight, if it differs from the last one returned.
    pub fn update(&mut self, streams: i64) -> Option<String> {
        let streams = streams.max(0);
        if self.last == Some(streams) {
            return None;
        }
        self.last = Some(streams);
        let drain = if streams > 0 {
            format!("draining {streams} stream(s)")
        } else {
            "streams drained; stopping plugins".to_owned()
        };
        let mut snapshot = self.base.clone();
        snapshot.note = Some(match snapshot.note.take() {
            Some(other) => format!("{drain}; {other}"),
            None => drain,
        });
        Some(snapshot.line())
    }
}

/// What the STATUS line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// `starting`, `serving`, `reloading`, `stopping`.
    pub phase: &'static str,
    /// Plugins, in config order, and whether each is connected.
    pub plugins: Vec<(String, bool)>,
    /// Plugin restarts done by plugvisor since it started.
    pub restarts: u64,
    /// A note appended at the end (e.g. what readiness gave up waiting for).
    pub note: Option<String>,
}

impl StatusSnapshot {
    /// `serving; plugins 2/3 up (down: latency); restarts 1`.
    pub fn line(&self) -> String {
        let up = self.plugins.iter().filter(|(_, up)| *up).count();
        let mut s = format!("{}; plugins {up}/{} up", self.phase, self.plugins.len());
        let down: Vec<&str> = self
            .plugins
            .iter()
            .filter(|(_, up)| !up)
            .map(|(n, _)| n.as_str())
            .collect();
        if !down.is_empty() {
            s.push_str(&format!(" (down: {})", down.join(", ")));
        }
        s.push_str(&format!("; restarts {}", self.restarts));
        if let Some(note) = &self.note {
            s.push_str("; ");
            s.push_str(note);
        }
        s
    }
}

/// One probe's standing in [`watchdog_loop`].
struct Standing {
    answered: tokio::time::Instant,
    waiting: Option<oneshot::Receiver<()>>,
}

/// Pings the watchdog every `interval` while every probe from `probes` (asked again each round,
/// so loops can come and go) was answered within its tolerance; logs (once per change) when one
/// was not. Runs until dropped.
pub async fn watchdog_loop(interval: Duration, probes: impl Fn() -> Vec<Probe> + Send + 'static) {
    use std::collections::HashMap;
    use tokio::time::Instant;

    let limit = (interval / 2).min(Duration::from_secs(2));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut standing: HashMap<String, Standing> = HashMap::new();
    let mut healthy = true;
    loop {
        tick.tick().await;
        let round = Instant::now();
        let probes = probes();
        standing.retain(|name, _| probes.iter().any(|p| p.name() == name));
        let mut stuck = Vec::new();
        for probe in &probes {
            let st = standing.entry(probe.name().to_owned()).or_insert(Standing {
                answered: round,
                waiting: None,
            });
            if st.waiting.is_none() {
                match probe.send() {
                    Sent::Waiting(rx) => st.waiting = Some(rx),
                    Sent::Gone => st.answered = round,
                    Sent::Stuck => stuck.push(probe.name().to_owned()),
                }
            }
        }
        let deadline = round + limit;
        for st in standing.values_mut() {
            if let Some(rx) = st.waiting.as_mut() {
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(())) => {
                        st.answered = Instant::now();
                        st.waiting = None;
                    }
                    // Dropped unanswered: the loop ended; the next round asks again.
                    Ok(Err(_)) => st.waiting = None,
                    Err(_) => {}
                }
            }
        }
        // Silent: not answered in this round, and not within its tolerance before it either.
        let silent: Vec<&str> = probes
            .iter()
            .filter(|p| {
                stuck.iter().any(|s| s == p.name())
                    || standing.get(p.name()).is_some_and(|st| {
                        round.saturating_duration_since(st.answered) > p.tolerance()
                    })
            })
            .map(|p| p.name())
            .collect();
        if silent.is_empty() {
            watchdog_ping();
            if !healthy {
                tracing::info!("every watched loop answers again; watchdog pings resumed");
            }
            healthy = true;
        } else if healthy {
            tracing::error!(
                loops = ?silent,
                "loop(s) did not answer the liveness probe; withholding WATCHDOG=1"
            );
            healthy = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::probe::{probe, Watched};

    #[test]
    fn the_drain_status_follows_the_streams_and_is_sent_only_when_it_changes() {
        let mut drain = DrainStatus::new(StatusSnapshot {
            phase: "stopping",
            plugins: vec![("usage".into(), true), ("latency".into(), true)],
            restarts: 1,
            note: None,
        });
        assert_eq!(
            drain.update(3).as_deref(),
            Some("stopping; plugins 2/2 up; restarts 1; draining 3 stream(s)")
        );
        assert_eq!(drain.update(3), None, "unchanged: nothing sent");
        assert_eq!(
            drain.update(1).as_deref(),
            Some("stopping; plugins 2/2 up; restarts 1; draining 1 stream(s)")
        );
        assert_eq!(
            drain.update(0).as_deref(),
            Some("stopping; plugins 2/2 up; restarts 1; streams drained; stopping plugins")
        );
        assert_eq!(drain.update(0), None);
    }

    #[test]
    fn status_line_counts_plugins_and_names_the_missing() {
        let mut s = StatusSnapshot {
            phase: "serving",
            plugins: vec![
                ("usage".into(), true),
                ("latency".into(), true),
                ("metrics".into(), true),
            ],
            restarts: 0,
            note: None,
        };
        assert_eq!(s.line(), "serving; plugins 3/3 up; restarts 0");
        s.plugins[1].1 = false;
        s.restarts = 2;
        s.note = Some("required plugin(s) not up after 10s: latency".into());
        assert_eq!(
            s.line(),
            "serving; plugins 2/3 up (down: latency); restarts 2; \
             required plugin(s) not up after 10s: latency"
        );
    }

    #[tokio::test]
    async fn a_probe_is_answered_only_while_its_loop_polls() {
        let (probe, mut answerer) = probe("test");
        let polling = tokio::spawn(async move {
            loop {
                answerer.answer().await;
            }
        });
        assert!(probe.check(Duration::from_secs(1)).await);
        polling.abort();
        let _ = polling.await;
        assert!(!probe.check(Duration::from_millis(50)).await);
    }

    #[tokio::test]
    async fn a_watched_stream_answers_probes_when_polled() {
        let (probe, answerer) = probe("accept");
        let mut watched = Watched::new(tokio_stream::pending::<()>(), answerer);
        let server = tokio::spawn(async move {
            use tokio_stream::StreamExt;
            watched.next().await
        });
        assert!(probe.check(Duration::from_secs(1)).await);
        server.abort();
        let _ = server.await;
        assert!(!probe.check(Duration::from_millis(50)).await);
    }

    #[tokio::test]
    async fn the_watchdog_pings_only_while_every_probe_is_answered() {
        let dir = std::env::temp_dir().join(format!("plugvisor-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sink = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sink.set_nonblocking(true).unwrap();
        // No other test of this crate notifies, so the socket hears only this watchdog.
        std::env::set_var("NOTIFY_SOCKET", &path);
        let pings = |sink: &std::os::unix::net::UnixDatagram| {
            let mut n = 0;
            let mut buf = [0u8; 256];
            while let Ok(len) = sink.recv(&mut buf) {
                assert_eq!(&buf[..len], b"WATCHDOG=1\n");
                n += 1;
            }
            n
        };

        let (accept, mut answerer) = probe("accept");
        let (patient, _never_answers) = probe("patient");
        let patient = patient.with_tolerance(Duration::from_secs(3600));
        let (wedge, mut wedged) = oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = answerer.answer() => {}
                    _ = &mut wedged => break,
                }
            }
            // Wedged: alive, holding its end of the probe, never reading it again.
            std::future::pending::<()>().await;
            drop(answerer);
        });
        let watchdog = tokio::spawn(watchdog_loop(Duration::from_millis(40), move || {
            vec![accept.clone(), patient.clone()]
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let healthy = pings(&sink);
        assert!(healthy >= 3, "a healthy front pings ({healthy} pings)");

        // The accept loop wedges: within a round or two the pings stop for good.
        wedge.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let _ = pings(&sink);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pings(&sink), 0, "a wedged loop must cost the watchdog ping");
        watchdog.abort();
        serving.abort();
        std::env::remove_var("NOTIFY_SOCKET");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_listen_other_than_the_passed_socket_is_named_as_ignored() {
        let unix = |p: &str| Listen::Unix(p.into());
        let tcp = |a: &str| Listen::Tcp(a.parse().unwrap());
        let run = "/run/plugvisor/extproc.sock";
        assert_eq!(ignored_listen(&unix(run), &unix(run)), None);
        assert_eq!(
            ignored_listen(&tcp("127.0.0.1:9002"), &tcp("127.0.0.1:9002")),
            None
        );
        let line = ignored_listen(&tcp("127.0.0.1:9002"), &unix(run)).unwrap();
        assert!(
            line.starts_with(
                "ignoring listen = \"127.0.0.1:9002\": systemd passed the ext_proc socket \
                 unix:/run/plugvisor/extproc.sock"
            ),
            "{line}"
        );
        assert!(ignored_listen(&unix(run), &tcp("0.0.0.0:9002")).is_some());
    }

    #[test]
    fn without_listen_fds_nothing_is_activated() {
        // The test process was not socket-activated (LISTEN_PID is not ours).
        assert!(take_extproc_listener().unwrap().is_none());
    }

    #[test]
    fn extend_timeout_adds_a_margin_and_saturates() {
        assert_eq!(extend_usec(Duration::from_secs(5)), 10_000_000);
        assert_eq!(extend_usec(Duration::from_secs(1 << 40)), u32::MAX);
    }
}
