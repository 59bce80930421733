//! A spawned plugin's process part: spawning, watching and stopping its process, driven by the
//! pure restart policy in [`crate::plugin::restart`].
//!
//! [`Process`] belongs to the plugin's owner task ([`crate::plugin::owner`]), which hands it
//! what it sees: the process exited and how, the handshake completed, the start deadline or the
//! backoff passed, the plugin hung, an operator or a reload asked for `start`/`stop`/`restart`.
//! It turns those into policy events and carries out the policy's actions (spawn, SIGKILL the
//! process group, terminate gracefully, hand over to a new process and reap the old one apart).
//! What it knows is published for [`PluginStatus`], which `plugvisor status` and `/metrics`
//! read.
//!
//! A plugin with `spawn = false` has no process part: the front only listens on its socket, and
//! its status is read from the link ([`link_status`]).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::Child;

use crate::config::Published;
use crate::observe::metrics::Metrics;
use crate::plugin::link::{Expected, Missing, PluginLink};
use crate::plugin::restart::{Action, Event, Exit, Restarter, State};
use crate::plugin::spawn::Spawner;

/// What `plugvisor status` shows for one plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginStatus {
    /// The configured name.
    pub name: String,
    /// `up`, `starting`, `backoff`, `failed`, `stopped`, or `external` (connected, but not a
    /// process this front spawned: `spawn = false`, or a hand-started one after `stop`).
    pub state: String,
    /// Whether the front spawns this plugin (`spawn = true`).
    pub spawned: bool,
    /// Whether a plugin process is connected and welcomed.
    pub connected: bool,
    /// The pid serving the plugin (the spawned process, or the connected peer).
    pub pid: Option<u32>,
    /// Seconds since the current process completed its handshake.
    pub uptime_secs: Option<f64>,
    /// Restarts since the front started.
    pub restarts: u64,
    /// How the previous process ended: `exit status N` or `signal N (SIGNAME)`.
    pub last_exit: Option<String>,
    /// The last error line of its processes (an ERROR record, an unformatted stderr line such
    /// as a traceback's last, a refused handshake's reason), at most 512 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Events waiting in the plugin's queue.
    pub queue_depth: i64,
    /// Events dropped for this plugin (full queue or no connection).
    pub dropped_events: u64,
    /// In backoff: milliseconds until the next start.
    pub retry_in_ms: Option<u64>,
    /// Lanes stuck in one event, as the plugin's last pong said.
    #[serde(default)]
    pub stuck_lanes: u32,
    /// Replaced processes still finishing their streams (a restart or reload by handover).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<crate::plugin::link::Draining>,
}

/// An operator's or the front's request to a supervised plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start it if it is not running (also revives a `failed` plugin).
    Start,
    /// Stop it and keep it stopped; its socket stays for a hand-started instance.
    Stop,
    /// Stop the running process and start a new one (or start it if it is not running).
    Restart,
}

/// The status of a plugin as far as its link knows (used alone for `spawn = false` plugins).
pub fn link_status(link: &PluginLink, metrics: &Metrics) -> PluginStatus {
    let conn = link.connection();
    let label = Metrics::plugin(link.name());
    let dropped = ["queue_full", "down"]
        .iter()
        .map(|r| {
            metrics
                .events_dropped
                .get_or_create(&Metrics::reason(link.name(), r))
                .get()
        })
        .sum();
    PluginStatus {
        name: link.name().to_owned(),
        state: "external".into(),
        spawned: false,
        connected: conn.is_some(),
        pid: conn.as_ref().map(|c| c.pid()),
        uptime_secs: link.connected_since().map(|t| t.elapsed().as_secs_f64()),
        restarts: 0,
        last_exit: None,
        last_error: link.last_error(),
        queue_depth: metrics.queue_depth.get_or_create(&label).get(),
        dropped_events: dropped,
        retry_in_ms: None,
        stuck_lanes: if conn.is_some() {
            link.stuck_lanes().len() as u32
        } else {
            0
        },
        draining: link.draining_status(),
    }
}

/// `exit status 3`, `signal 9 (SIGKILL)`.
fn describe(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => format!("exit status {c}"),
        Exit::Signal(s) => match Signal::try_from(s) {
            Ok(sig) => format!("signal {s} ({})", sig.as_str()),
            Err(_) => format!("signal {s}"),
        },
        Exit::SpawnFailed => "could not be spawned".into(),
    }
}

/// A spawned plugin's process state, kept once: the process part changes it, `plugvisor status`
/// reads it. The pid of the running process is the link's (the one the handshake is checked
/// against); its state, uptime, backoff deadline and restarts are the restart policy's.
#[derive(Debug)]
pub(crate) struct Shared {
    restarter: Restarter,
    last_exit: Option<String>,
    /// Replaced processes still finishing their streams, with when they are terminated.
    replaced: Vec<(Option<u32>, Instant)>,
}

/// A spawned plugin's status: the link's view, with the process part's state, pid, uptime,
/// restarts and last exit.
pub(crate) fn spawned_status(
    shared: &Mutex<Shared>,
    link: &PluginLink,
    metrics: &Metrics,
) -> PluginStatus {
    let shared = shared.lock().expect("status lock");
    let state = shared.restarter.state();
    let pid = link.spawned_pid();
    let mut status = link_status(link, metrics);
    status.spawned = true;
    status.restarts = shared.restarter.restarts_total();
    status.last_exit = shared.last_exit.clone();
    let ours = pid.is_some() && status.pid == pid;
    status.state = if status.connected && !ours && state == State::Stopped {
        "external".into()
    } else {
        state.name().into()
    };
    if status.state != "external" {
        status.pid = pid;
    }
    status.uptime_secs = match state {
        State::Up => shared
            .restarter
            .up_since()
            .map(|t| t.elapsed().as_secs_f64()),
        // A hand-started instance: the link knows since when it is connected.
        _ if status.state == "external" => status.uptime_secs,
        _ => None,
    };
    // A replaced process whose connection is gone but that is not reaped yet.
    let now = Instant::now();
    for (pid, until) in &shared.replaced {
        if let Some(pid) = *pid {
            if !status.draining.iter().any(|d| d.pid == pid) {
                status.draining.push(crate::plugin::link::Draining {
                    pid,
                    streams: 0,
                    grace_left_ms: Some(until.saturating_duration_since(now).as_millis() as u64),
                });
            }
        }
    }
    status.retry_in_ms = match state {
        State::Backoff { until } => {
            Some(until.saturating_duration_since(Instant::now()).as_millis() as u64)
        }
        _ => None,
    };
    status
}

/// What woke a [`Process`] up (see [`Process::wait`]).
#[derive(Debug)]
pub(crate) enum Wake {
    /// The child exited.
    Exited(Exit),
    /// The link's connection changed (a handshake may have completed).
    Connected,
    /// The handshake did not complete within `start_timeout_ms`.
    StartTimedOut,
    /// The backoff delay is over.
    BackoffElapsed,
    /// A replaced process (its pid) was reaped.
    ReplacedExited(Option<u32>, Exit),
}

/// A spawned plugin's process and its restart policy. Owned by the plugin's owner task
/// ([`crate::plugin::owner`]), which feeds it what it sees: the process exited, the handshake
/// completed, a deadline passed, a command arrived, the plugin hung.
pub(crate) struct Process {
    link: Arc<PluginLink>,
    socket: PathBuf,
    spawner: Spawner,
    metrics: Arc<Metrics>,
    /// The running configuration (the stop grace).
    config: Published,
    shared: Arc<Mutex<Shared>>,
    connected: tokio::sync::watch::Receiver<bool>,
    child: Option<Child>,
    start_deadline: Option<tokio::time::Instant>,
    /// Replaced processes finishing their streams apart, each reaped (and terminated past its
    /// drain) by a task this process part owns; listed in [`Shared`] for the status.
    reaping: tokio::task::JoinSet<(Option<u32>, Exit)>,
    spawned_at: Option<Instant>,
}

impl Process {
    /// A process part in `Stopped`, for `link`'s plugin; [`Process::start`] starts it.
    pub(crate) fn new(
        link: Arc<PluginLink>,
        socket: PathBuf,
        spawner: Spawner,
        metrics: Arc<Metrics>,
        config: Published,
    ) -> Process {
        let restarter = Restarter::new(link.config().restart.clone());
        Process {
            connected: link.subscribe_connected(),
            link,
            socket,
            spawner,
            metrics,
            config,
            shared: Arc::new(Mutex::new(Shared {
                restarter,
                last_exit: None,
                replaced: Vec::new(),
            })),
            child: None,
            start_deadline: None,
            reaping: tokio::task::JoinSet::new(),
            spawned_at: None,
        }
    }

    /// What the status readers share with this process part.
    pub(crate) fn shared(&self) -> Arc<Mutex<Shared>> {
        self.shared.clone()
    }

    /// Takes a reload's restart policy, for what happens from now on.
    pub(crate) fn set_policy(&mut self, policy: crate::plugin::restart::Policy) {
        self.shared
            .lock()
            .expect("status lock")
            .restarter
            .set_policy(policy);
    }

    /// How long a stopping process gets for each step (`shutdown_grace_ms`, as published now).
    fn stop_grace(&self) -> Duration {
        self.config.current().shutdown_grace
    }

    /// The policy's state.
    pub(crate) fn state(&self) -> State {
        self.shared.lock().expect("status lock").restarter.state()
    }

    /// Starts the plugin (the policy's `Start`).
    pub(crate) async fn start(&mut self) {
        self.feed(Event::Start).await;
    }

    /// Waits for the next thing the process part must act on; pending while there is none.
    pub(crate) async fn wait(&mut self) -> Wake {
        let state = self.state();
        tokio::select! {
            status = wait_child(&mut self.child) => Wake::Exited(status.map_or(Exit::Code(-1), exit_of)),
            Ok(()) = self.connected.changed() => Wake::Connected,
            _ = sleep_until(self.start_deadline), if state == State::Starting => Wake::StartTimedOut,
            _ = sleep_until(backoff_until(state)), if matches!(state, State::Backoff { .. }) => Wake::BackoffElapsed,
            Some(Ok((pid, exit))) = self.reaping.join_next(), if !self.reaping.is_empty() => Wake::ReplacedExited(pid, exit),
            else => std::future::pending().await,
        }
    }

    /// Acts on what [`Process::wait`] returned.
    pub(crate) async fn on_wake(&mut self, wake: Wake) {
        match wake {
            Wake::Exited(exit) => {
                self.child = None;
                self.record_exit(exit);
                self.feed(Event::Exited(exit)).await;
            }
            Wake::Connected => {
                if self.state() == State::Starting && self.handshake_done() {
                    self.feed(Event::HandshakeDone).await;
                }
            }
            Wake::StartTimedOut => {
                self.start_deadline = None;
                tracing::error!(
                    plugin = %self.link.name(),
                    timeout = ?self.link.config().start_timeout,
                    "plugin did not complete its handshake in time; killing it"
                );
                self.feed(Event::StartTimedOut).await;
            }
            Wake::BackoffElapsed => {
                self.feed(Event::BackoffElapsed).await;
            }
            Wake::ReplacedExited(pid, exit) => {
                self.shared
                    .lock()
                    .expect("status lock")
                    .replaced
                    .retain(|(p, _)| *p != pid);
                tracing::info!(plugin = %self.link.name(), pid, exit = %describe(exit), "replaced process exited");
            }
        }
    }

    /// Checks an `Up` plugin for a hang: a lane stuck past `stuck_timeout_ms` (that stream is
    /// poisoned, never replayed) or no pong within `hang_timeout_ms`. A hang kills the process
    /// group and lets the policy restart it.
    pub(crate) async fn check_hang(&mut self) {
        if self.state() != State::Up {
            return;
        }
        let name = self.link.name().to_owned();
        let pid = self.child.as_ref().and_then(|c| c.id());
        if let Some(lane) = self.link.stuck_past_limit() {
            tracing::error!(
                plugin = %name,
                pid,
                stream = lane.stream_id,
                running_ms = lane.running_ms,
                limit = ?self.link.config().stuck_timeout,
                "a lane of the plugin is stuck in one event past stuck_timeout_ms; killing its process group (its other streams move to the replacement)"
            );
            self.link.poison(lane.stream_id);
            self.feed(Event::Hung).await;
        } else if let Some(stalled) = self.link.credit_stall_past_limit() {
            tracing::error!(
                plugin = %name,
                pid,
                stalled_ms = stalled.as_millis() as u64,
                "plugin sent no Credit with its window full for longer than hang_timeout_ms and stuck_timeout_ms; killing its process group"
            );
            self.feed(Event::Hung).await;
        } else if self.hung() {
            tracing::error!(
                plugin = %name,
                pid,
                timeout = ?self.link.config().hang_timeout,
                "plugin stopped answering pings; killing its process group"
            );
            self.feed(Event::Hung).await;
        }
    }

    fn handshake_done(&self) -> bool {
        let pid = self.child.as_ref().and_then(|c| c.id());
        pid.is_some() && self.link.connection().map(|c| c.pid()) == pid
    }

    fn hung(&self) -> bool {
        let Some(up_since) = self
            .shared
            .lock()
            .expect("status lock")
            .restarter
            .up_since()
        else {
            return false;
        };
        self.link.silent_since(up_since) > self.link.config().hang_timeout
    }

    /// Carries out an operator's (or a reload's) command; the answer says what was done.
    pub(crate) async fn on_command(&mut self, command: Command) -> Result<String, String> {
        let name = self.link.name().to_owned();
        let state = self.state();
        match command {
            Command::Start if matches!(state, State::Starting | State::Up) => {
                Ok(format!("{name} is already {}", state.name()))
            }
            Command::Start | Command::Restart => {
                // A reload may have changed the policy along with the process's config.
                self.set_policy(self.link.config().restart.clone());
                if state == State::Stopped && self.link.is_connected() {
                    // A hand-started instance holds the socket: make room for ours.
                    self.link
                        .disconnect("the operator started the supervised plugin");
                }
                self.feed(Event::Start).await;
                Ok(format!("{name}: {}", self.state().name()))
            }
            Command::Stop if state == State::Stopped => Ok(format!("{name} is already stopped")),
            Command::Stop => {
                self.feed(Event::Stop).await;
                Ok(format!(
                    "{name}: stopped; its socket {} accepts a hand-started instance",
                    self.socket.display()
                ))
            }
        }
    }

    /// Stops the plugin for good (front shutdown, removal by a reload): `Shutdown`, SIGTERM to
    /// its process group after `grace`, SIGKILL after another `grace`; returns once it is reaped.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        self.shared
            .lock()
            .expect("status lock")
            .restarter
            .handle(Event::Stop, Instant::now(), 0.0);
        if let Some(exit) = self.terminate(grace).await {
            self.record_exit(exit);
        }
        self.publish_expected();
    }

    /// Logs and publishes how the process ended; the caller feeds the policy.
    fn record_exit(&mut self, exit: Exit) {
        let name = self.link.name().to_owned();
        let pid = self.link.spawned_pid();
        let described = describe(exit);
        let expected = self
            .shared
            .lock()
            .expect("status lock")
            .restarter
            .exit_expected();
        if expected {
            tracing::info!(plugin = %name, pid, exit = %described, "plugin exited");
        } else {
            tracing::error!(plugin = %name, pid, exit = %described, "plugin exited unexpectedly");
        }
        self.shared.lock().expect("status lock").last_exit = Some(described);
        let label = Metrics::plugin(&name);
        match exit {
            Exit::Code(c) => {
                self.metrics
                    .last_exit_code
                    .get_or_create(&label)
                    .set(c.into());
                self.metrics.last_exit_signal.get_or_create(&label).set(0);
            }
            Exit::Signal(s) => {
                self.metrics
                    .last_exit_signal
                    .get_or_create(&label)
                    .set(s.into());
            }
            Exit::SpawnFailed => {}
        }
        self.metrics.plugin_up.get_or_create(&label).set(0);
        if self.link.spawned_pid() == pid {
            self.link.set_spawned_pid(None);
        }
    }

    /// Tells the link whether a process is on its way, from the policy's state, so a final
    /// waits only for one that is.
    fn publish_expected(&self) {
        let expected = match self.state() {
            State::Starting | State::Up => Expected::Coming { at: None },
            State::Backoff { until } => Expected::Coming {
                at: Some(tokio::time::Instant::from_std(until)),
            },
            State::Stopped => Expected::NotComing(Missing::Stopped),
            State::Failed => Expected::NotComing(Missing::GaveUp),
        };
        self.link.set_expected(expected);
    }

    /// Feeds one event to the policy and carries out its actions (which may produce more events,
    /// e.g. a failed spawn).
    async fn feed(&mut self, event: Event) {
        let mut pending = vec![event];
        while let Some(event) = pending.pop() {
            let actions = self.shared.lock().expect("status lock").restarter.handle(
                event,
                Instant::now(),
                rand::random::<f64>(),
            );
            if event == Event::HandshakeDone && self.state() == State::Up {
                self.on_up();
            }
            for action in actions {
                if let Some(next) = self.act(action).await {
                    pending.push(next);
                }
            }
        }
        self.publish_expected();
    }

    fn on_up(&mut self) {
        self.start_deadline = None;
        let name = self.link.name();
        let label = Metrics::plugin(name);
        if let Some(at) = self.spawned_at.take() {
            self.metrics
                .start_duration
                .get_or_create(&label)
                .observe(at.elapsed().as_secs_f64());
        }
        self.metrics.plugin_up.get_or_create(&label).set(1);
        tracing::info!(plugin = %name, pid = self.child.as_ref().and_then(|c| c.id()), "plugin up");
    }

    async fn act(&mut self, action: Action) -> Option<Event> {
        let name = self.link.name().to_owned();
        match action {
            Action::Spawn => {
                let config = self.link.config().clone();
                let errors = self.link.error_sink();
                match self
                    .spawner
                    .spawn_plugin(&config, &self.socket, errors)
                    .await
                {
                    Ok(child) => {
                        let pid = child.id();
                        self.link.set_spawned_pid(pid);
                        self.child = Some(child);
                        self.start_deadline =
                            Some(tokio::time::Instant::now() + config.start_timeout);
                        self.spawned_at = Some(Instant::now());
                        None
                    }
                    Err(e) => {
                        tracing::error!(plugin = %name, error = %crate::observe::logging::error_chain(&e), "cannot start plugin");
                        self.shared.lock().expect("status lock").last_exit =
                            Some(describe(Exit::SpawnFailed));
                        Some(Event::Exited(Exit::SpawnFailed))
                    }
                }
            }
            Action::Handover => {
                let child = self.child.take()?;
                let pid = child.id();
                let config = self.link.config();
                self.link.set_spawned_pid(None);
                let streams = self.link.begin_handover(config.drain_grace, "restart");
                tracing::info!(plugin = %name, pid, streams, "restarting: a new process takes new streams while this one finishes its own");
                let limit = config.drain_grace + self.stop_grace();
                self.shared
                    .lock()
                    .expect("status lock")
                    .replaced
                    .push((pid, Instant::now() + limit));
                self.reaping.spawn(reap_replaced(name, child, limit));
                None
            }
            Action::Kill => {
                if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                None
            }
            Action::Terminate => {
                let exit = self.terminate(self.stop_grace()).await?;
                self.record_exit(exit);
                Some(Event::Exited(exit))
            }
            Action::RetryAfter(delay) => {
                tracing::warn!(plugin = %name, delay = ?delay, restarts = self.shared.lock().expect("status lock").restarter.restarts_total(), "restarting plugin after backoff");
                self.metrics
                    .restarts
                    .get_or_create(&Metrics::plugin(&name))
                    .inc();
                None
            }
            Action::ConfigRefused => {
                let why = self
                    .link
                    .last_error()
                    .unwrap_or_else(|| "see the plugin's log above".to_owned());
                tracing::error!(
                    plugin = %name,
                    reason = %why,
                    "plugin refused its configuration (exit status 78); it stays failed until a \
                     reload changes its table or `plugvisor restart {name}`"
                );
                None
            }
            Action::GaveUp { restarts } => {
                let period = self
                    .shared
                    .lock()
                    .expect("status lock")
                    .restarter
                    .policy()
                    .period;
                tracing::error!(
                    plugin = %name,
                    restarts,
                    period = ?period,
                    "plugin failed: too many restarts; the others keep serving; `plugvisor restart {name}` brings it back"
                );
                None
            }
        }
    }

    /// Stops the running process: `Shutdown` over its socket, SIGTERM to its group after
    /// `grace`, SIGKILL after another `grace`. Returns how it ended once it is reaped, or `None`
    /// if no process was running.
    async fn terminate(&mut self, grace: Duration) -> Option<Exit> {
        let mut child = self.child.take()?;
        let pid = child.id();
        let name = self.link.name().to_owned();
        let group = pid.map(|p| Pid::from_raw(p as i32));
        let welcomed = pid.is_some() && self.link.connection().map(|c| c.pid()) == pid;
        // Still starting, no connection carries a Shutdown: do not wait a grace for it.
        let first_wait = if welcomed { grace } else { Duration::ZERO };
        if welcomed {
            self.link.send_shutdown(grace);
        }
        let mut exit = tokio::time::timeout(first_wait, child.wait()).await;
        if exit.is_err() {
            if welcomed {
                tracing::warn!(plugin = %name, pid, "plugin did not stop after Shutdown; sending SIGTERM");
            } else {
                tracing::info!(plugin = %name, pid, "plugin still starting (no connection for Shutdown); sending SIGTERM");
            }
            if let Some(g) = group {
                let _ = killpg(g, Signal::SIGTERM);
            }
            exit = tokio::time::timeout(grace, child.wait()).await;
        }
        let status = match exit {
            Ok(status) => status.ok(),
            Err(_) => {
                tracing::warn!(plugin = %name, pid, "plugin ignored SIGTERM; sending SIGKILL");
                if let Some(g) = group {
                    let _ = killpg(g, Signal::SIGKILL);
                }
                child.wait().await.ok()
            }
        };
        Some(status.map_or(Exit::Code(-1), exit_of))
    }
}

/// Reaps a process that handed its plugin over to a successor: it exits by itself once the link
/// has told it its last stream ended; past `limit` it is terminated. Runs in the process part's
/// own task set, so the status lists it until it is reaped.
async fn reap_replaced(name: String, mut child: Child, limit: Duration) -> (Option<u32>, Exit) {
    let pid = child.id();
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::warn!(plugin = %name, pid, "replaced process still running after its drain; terminating it");
            if let Some(p) = pid {
                let _ = killpg(Pid::from_raw(p as i32), Signal::SIGTERM);
            }
            match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                Ok(status) => status.ok(),
                Err(_) => {
                    if let Some(p) = pid {
                        let _ = killpg(Pid::from_raw(p as i32), Signal::SIGKILL);
                    }
                    child.wait().await.ok()
                }
            }
        }
    };
    (pid, status.map_or(Exit::Code(-1), exit_of))
}

/// When a backoff ends, as the policy's state says.
fn backoff_until(state: State) -> Option<tokio::time::Instant> {
    match state {
        State::Backoff { until } => Some(tokio::time::Instant::from_std(until)),
        _ => None,
    }
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    status
        .code()
        .map(Exit::Code)
        .or(status.signal().map(Exit::Signal))
        .unwrap_or(Exit::Code(-1))
}

async fn wait_child(child: &mut Option<Child>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; pending forever without one (a `select!` arm that is off).
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
