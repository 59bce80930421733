//! One owner per plugin: a task that holds everything of the plugin, and a handle
//! ([`PluginOwner`]) through which a reload, a control command or the front's stop only sends it
//! a message.
//!
//! The task owns the plugin's socket and the loop accepting on it, its [`PluginLink`] (the live
//! connection and the draining ones), its configuration, the pings and hang checks, and, for a
//! plugin the front spawns, its [`Process`] (the child and the restart policy). The data path
//! keeps a shared reference to the link, to send events and call finals without a round trip
//! through the task; everything that changes the plugin goes through the task, one message at a
//! time, so a reload, an operator's `restart` and a crash never race each other.
//!
//! ```text
//!   bind ──► Bound ──start──► running ──Stop──► stopped (socket removed, task ended)
//!                               │  ▲
//!                 Command,      │  │ answers
//!                 Reconfigure ──┘  │
//!                 Wake / tick ─────┘ (process events, pings, hang checks)
//! ```
//!
//! What a reconfiguration does ([`PluginConfig::same_process`]): front-side keys are updated in
//! place; a change to the process (command, args, env, its `config` table, ...) restarts it by
//! handover (the old process finishes its streams, a new one takes new ones). A change of
//! `spawn` or `group` needs a new socket: the reload stops this owner and starts another.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::{Config, PluginConfig, Published};
use crate::observe::metrics::Metrics;
use crate::plugin::link::PluginLink;
use crate::plugin::restart::State;
use crate::plugin::spawn::Spawner;
use crate::plugin::supervise::{self, sleep_until, Command, PluginStatus, Process, Shared};

/// A message to the owner task.
enum Message {
    /// An operator's `start`/`stop`/`restart`.
    Command(Command, oneshot::Sender<Result<String, String>>),
    /// A reload published a new configuration: apply the plugin's table (same `spawn` and
    /// `group`) and the top-level keys the owner reads.
    Reconfigure(oneshot::Sender<String>),
}

/// What a stopping owner does with its socket's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFile {
    /// Removes it (while it is still a socket).
    Remove,
    /// Leaves it: the path now belongs to another front (after an upgrade handover).
    Keep,
}

/// A plugin whose socket is bound and whose link exists, not yet started: the front hands its
/// link to the data path before any plugin process runs.
pub struct Bound {
    link: Arc<PluginLink>,
    socket: PathBuf,
    listener: tokio::net::UnixListener,
    metrics: Arc<Metrics>,
}

impl Bound {
    /// Binds `plugin`'s socket and creates its link, whose batches go by `clock`.
    pub fn bind(
        config: &Config,
        plugin: &PluginConfig,
        metrics: &Arc<Metrics>,
        clock: &Arc<crate::plugin::link::BatchClock>,
    ) -> Result<Bound, String> {
        let socket = config.plugin_socket(&plugin.name);
        let listener =
            crate::plugin::accept::bind_plugin_socket(&socket, plugin.process.group.as_deref())?;
        Ok(Bound {
            link: Arc::new(PluginLink::with_clock(
                plugin.clone(),
                metrics.clone(),
                clock.clone(),
            )),
            socket,
            listener,
            metrics: metrics.clone(),
        })
    }

    /// The plugin's link, as the data path holds it.
    pub fn link(&self) -> &Arc<PluginLink> {
        &self.link
    }

    /// Starts the owner task: it accepts connections, pings, and (for `spawn = true`) starts the
    /// plugin's process at once. It reads the ping interval and the stop grace from `config`
    /// whenever it needs them.
    pub fn start(self, config: &Published, spawner: &Spawner) -> PluginOwner {
        let Bound {
            link,
            socket,
            listener,
            metrics,
        } = self;
        let stop_grace = config.current().shutdown_grace;
        let process = link.config().process.spawn.then(|| {
            Process::new(
                link.clone(),
                socket.clone(),
                spawner.clone(),
                metrics.clone(),
                config.clone(),
            )
        });
        let shared = process.as_ref().map(Process::shared);
        let (mailbox, rx) = mpsc::channel(16);
        let (stop, stop_rx) = oneshot::channel();
        // A step of the loop may take up to two stop grace periods (stopping a process).
        let (probe, answerer) =
            crate::observe::probe::probe(format!("owner of plugin {}", link.name()));
        let probe = probe.with_tolerance(stop_grace * 2 + Duration::from_secs(5));
        let accept = tokio::spawn(crate::plugin::accept::accept_loop(
            listener,
            link.clone(),
            metrics.clone(),
        ));
        let task = tokio::spawn(
            Owner {
                link: link.clone(),
                socket,
                process,
                accept: Some(accept),
                config: config.clone(),
            }
            .run(rx, stop_rx, answerer),
        );
        PluginOwner {
            link,
            metrics,
            shared,
            mailbox,
            stop: Mutex::new(Some(stop)),
            task: Mutex::new(Some(task)),
            probe,
        }
    }
}

/// The handle to one plugin's owner task.
pub struct PluginOwner {
    link: Arc<PluginLink>,
    metrics: Arc<Metrics>,
    /// The process part's published state, for `spawn = true` plugins.
    shared: Option<Arc<Mutex<Shared>>>,
    mailbox: mpsc::Sender<Message>,
    stop: Mutex<Option<oneshot::Sender<(Duration, SocketFile)>>>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Answered by the task's loop; the systemd watchdog pings only while it is.
    probe: crate::observe::probe::Probe,
}

impl PluginOwner {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        self.link.name()
    }

    /// The plugin's link (its connections, as the data path uses them).
    pub fn link(&self) -> &Arc<PluginLink> {
        &self.link
    }

    /// Whether the front spawns this plugin's process.
    pub fn spawned(&self) -> bool {
        self.shared.is_some()
    }

    /// The liveness probe the owner task's loop answers.
    pub fn probe(&self) -> crate::observe::probe::Probe {
        self.probe.clone()
    }

    /// The current status.
    pub fn status(&self) -> PluginStatus {
        match &self.shared {
            Some(shared) => supervise::spawned_status(shared, &self.link, &self.metrics),
            None => supervise::link_status(&self.link, &self.metrics),
        }
    }

    /// The pid of the process the front spawned, while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.shared.as_ref().and_then(|_| self.link.spawned_pid())
    }

    /// Asks the owner to carry out `command`; the answer says what was done.
    pub async fn command(&self, command: Command) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        let gone = || format!("plugin `{}`: its owner has stopped", self.name());
        self.mailbox
            .send(Message::Command(command, tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Tells the owner a reload published a new configuration; returns what it did with its
    /// table: nothing, an update in place, or a restart by handover.
    pub async fn reconfigure(&self) -> String {
        let (tx, rx) = oneshot::channel();
        if self.mailbox.send(Message::Reconfigure(tx)).await.is_err() {
            return "its owner has stopped".into();
        }
        rx.await.unwrap_or_else(|_| "its owner has stopped".into())
    }

    /// Stops the plugin for good (front shutdown, removal or replacement by a reload): its
    /// process gets `Shutdown`, SIGTERM after `grace`, SIGKILL after another `grace` (a plugin
    /// someone else runs gets `Shutdown`); then its connections close and its socket's path is
    /// removed or kept as `socket` says. [`PluginOwner::finished`] waits for that.
    pub fn begin_stop(&self, grace: Duration, socket: SocketFile) {
        if let Some(tx) = self.stop.lock().expect("stop lock").take() {
            let _ = tx.send((grace, socket));
        }
    }

    /// Closes the plugin's live connection without its stop sequence: for the front's stop, once
    /// the owner did not end in time.
    pub(crate) fn cut(&self, why: &str) {
        self.link.disconnect(why);
    }

    /// Waits for the owner task to end (after [`PluginOwner::begin_stop`]).
    pub async fn finished(&self) {
        let task = self.task.lock().expect("task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for PluginOwner {
    fn drop(&mut self) {
        // The task owns the child (kill_on_drop) and the accept loop's handle: aborting it
        // kills the process and closes the socket.
        if let Some(task) = self.task.lock().expect("task lock").take() {
            task.abort();
        }
    }
}

/// The owner task's state.
struct Owner {
    link: Arc<PluginLink>,
    socket: PathBuf,
    process: Option<Process>,
    accept: Option<JoinHandle<()>>,
    /// The running configuration: the plugin's table, the ping interval.
    config: Published,
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

impl Owner {
    async fn run(
        mut self,
        mut mailbox: mpsc::Receiver<Message>,
        mut stop: oneshot::Receiver<(Duration, SocketFile)>,
        mut probes: crate::observe::probe::ProbeAnswerer,
    ) {
        let mut nonce = 0u64;
        let mut ping_tick = interval(self.config.current().ping_interval);
        let mut hang_tick = interval(hang_check(&self.link));
        if let Some(process) = &mut self.process {
            process.start().await;
        }
        loop {
            let up = self.process.as_ref().map(Process::state) == Some(State::Up);
            tokio::select! {
                how = &mut stop => {
                    let (grace, socket) = how.unwrap_or((Duration::ZERO, SocketFile::Remove));
                    self.stop(grace, socket).await;
                    return;
                }
                () = probes.answer() => {}
                Some(message) = mailbox.recv() => match message {
                    Message::Command(command, reply) => {
                        let answer = self.on_command(command).await;
                        let _ = reply.send(answer);
                    }
                    Message::Reconfigure(reply) => {
                        let done = self.reconfigure().await;
                        ping_tick = interval(self.config.current().ping_interval);
                        hang_tick = interval(hang_check(&self.link));
                        let _ = reply.send(done);
                    }
                },
                wake = wait_process(&mut self.process) => {
                    if let Some(process) = &mut self.process {
                        process.on_wake(wake).await;
                    }
                }
                _ = ping_tick.tick() => {
                    nonce += 1;
                    self.link.ping(nonce);
                    // A plugin someone else runs can only be let go, so its streams move to
                    // whatever connects next; a spawned one is checked on `hang_tick`.
                    if self.process.is_none() {
                        drop_hung_external(&self.link);
                    }
                }
                () = sleep_until(self.link.next_drain_deadline()) => {
                    self.link.expire_drains();
                }
                _ = hang_tick.tick(), if up => {
                    if let Some(process) = &mut self.process {
                        process.check_hang().await;
                    }
                }
            }
        }
    }

    async fn on_command(&mut self, command: Command) -> Result<String, String> {
        match &mut self.process {
            Some(process) => process.on_command(command).await,
            None => {
                let name = self.link.name();
                Err(format!(
                    "plugin `{name}` has spawn = false: plugvisor does not run its process; \
                     manage it where it was started (e.g. `systemctl restart plugvisor-plugin@{name}`)"
                ))
            }
        }
    }

    /// Applies a reload's table: in place when only front-side keys changed, else a restart
    /// by handover.
    async fn reconfigure(&mut self) -> String {
        let name = self.link.name().to_owned();
        let Some(plugin) = self.config.plugin(&name) else {
            // Removed: the reload stops this owner.
            return format!("{name}: no longer configured");
        };
        let before = self.link.config();
        if *before == plugin {
            return format!("{name}: unchanged");
        }
        let same_process = before.same_process(&plugin);
        let drain_grace = plugin.drain_grace;
        if let Some(process) = &mut self.process {
            // The restart policy applies at once, to the next exit.
            process.set_policy(plugin.restart.clone());
        }
        self.link.set_config(plugin);
        if same_process {
            tracing::info!(plugin = %name, "reload: updated in place; its process keeps running");
            return format!("{name}: updated in place");
        }
        match &mut self.process {
            Some(process) => {
                tracing::info!(plugin = %name, "reload: restarting for reload");
                match process.on_command(Command::Restart).await {
                    Ok(done) => done,
                    Err(message) => {
                        tracing::warn!(plugin = %name, %message, "reload: restart not carried out");
                        message
                    }
                }
            }
            None => {
                // Someone else runs it. One that follows `Reconnect` opens its next connection
                // at once, with the new table, while this one finishes its streams; any other
                // gets `Shutdown` once its streams are done, and whoever runs it starts it
                // again, with the new table.
                let wait = self.config.current().connect_timeout;
                if self
                    .link
                    .hand_over_by_reconnect(drain_grace, wait, "config changed")
                    .is_some()
                {
                    return format!(
                        "{name}: asked to reconnect; its new connection gets the new table"
                    );
                }
                self.link.begin_handover(drain_grace, "reload");
                format!("{name}: handed over; its next connection gets the new table")
            }
        }
    }

    /// Stops the plugin, closes its connections and its socket.
    async fn stop(&mut self, grace: Duration, socket: SocketFile) {
        let name = self.link.name().to_owned();
        match &mut self.process {
            Some(process) => process.stop(grace).await,
            None => {
                if !self.link.shut_down_all(grace).await {
                    tracing::info!(plugin = %self.link.name(), grace_ms = grace.as_millis() as u64, "plugin still connected after Shutdown and its grace; closing its connection");
                }
            }
        }
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        self.link
            .close_all("plugin stopped by the front", Duration::from_secs(2))
            .await;
        if socket == SocketFile::Remove {
            crate::shell::instance::remove_socket(&self.socket);
        }
        tracing::info!(plugin = %name, "plugin stopped; its socket is closed");
    }
}

/// How often an `Up` plugin is checked for a hang: a quarter of `hang_timeout_ms`.
fn hang_check(link: &PluginLink) -> Duration {
    (link.config().hang_timeout / 4).max(Duration::from_millis(20))
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

async fn wait_process(process: &mut Option<Process>) -> supervise::Wake {
    match process {
        Some(p) => p.wait().await,
        None => std::future::pending().await,
    }
}

/// Disconnects an external (`spawn = false`) plugin that answers no ping for `hang_timeout_ms`,
/// or one of whose lanes is stuck past `stuck_timeout_ms` (that stream is not replayed).
fn drop_hung_external(link: &PluginLink) {
    let Some(since) = link.connected_since() else {
        return;
    };
    let name = link.name();
    if let Some(lane) = link.stuck_past_limit() {
        tracing::error!(plugin = %name, stream = lane.stream_id, running_ms = lane.running_ms, "a lane of the external plugin is stuck past stuck_timeout_ms; disconnecting it");
        link.poison(lane.stream_id);
        link.disconnect("a lane stuck past stuck_timeout_ms");
        return;
    }
    if let Some(stalled) = link.credit_stall_past_limit() {
        tracing::error!(plugin = %name, stalled_ms = stalled.as_millis() as u64, "external plugin sent no Credit with its window full for longer than hang_timeout_ms and stuck_timeout_ms; disconnecting it");
        link.disconnect("no Credit with the window full");
        return;
    }
    let silent = link.silent_since(since);
    if silent > link.config().hang_timeout {
        tracing::error!(plugin = %name, silent_ms = silent.as_millis() as u64, "external plugin answered no ping within hang_timeout_ms; disconnecting it");
        link.disconnect("no pong within hang_timeout_ms");
    }
}
