//! plugvisor's front: an Envoy `ext_proc` server that answers every message at once and feeds the
//! plugins, each its own process on its own Unix socket, through bounded queues; the end of a
//! response is a final RPC whose merged metadata goes back to Envoy as `dynamic_metadata`.
//!
//! [`start`] binds everything and returns a [`Running`] front (tests read its addresses and
//! metrics); [`run`] is `start`, wait for `shutdown`, stop. Besides [`config`] (TOML, the embedded
//! default, what loading checks), the crate is three parts, one folder each:
//! - [`data_path`]: what every request goes through: [`ext_proc`] (the gRPC service, one task per
//!   stream), [`plugin_stream`] (a stream's side of one plugin: sequence numbers, binding, replay
//!   journal), [`metadata`] (merging into `dynamic_metadata`);
//! - [`plugin`]: a plugin's owner side: [`owner`] (one task per plugin, the only way a reload, a
//!   command or the stop reaches it), [`link`] (its live and draining connections, queue, writer
//!   and reader), [`accept`] (its socket and the handshake), [`spawn`] (starting its process),
//!   [`supervise`] (a spawned plugin's process part, driving the pure policy in [`restart`]);
//! - [`shell`]: the service around them: [`service`] and [`systemd`] (running under systemd),
//!   [`control`] (the control socket behind `plugvisor status`), [`reload`] (applying a new
//!   configuration), [`metrics`] (Prometheus and the admin server), [`logging`] (the log and its
//!   rate-limited warnings), [`instance`] (one front per runtime directory, only sockets replaced),
//!   [`upgrade`] (handing the listeners to a new binary and draining).
//!
//! Each module is also re-exported here by its own name (`supervisor::link`, ...).
//!
//! Unsafe code is denied everywhere but in [`spawn`], which sets the parent-death signal between
//! fork and exec, and [`systemd`], which takes ownership of inherited and received fds.
#![deny(unsafe_code)]

pub mod config;
pub mod data_path;
pub mod plugin;
pub mod shell;

// The modules by their own names, as the rest of the crate and the tests call them.
pub use data_path::{ext_proc, metadata, plugin_stream};
pub use plugin::registry::Plugins;
pub use plugin::{accept, link, owner, registry, restart, spawn, supervise};
pub use shell::{
    control, crash_loop, instance, logging, metrics, reload, service, systemd, upgrade,
};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

pub use config::{Config, ConfigError, Listen};
use link::PluginLink;
use metrics::Metrics;

/// Why the front could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The runtime directory could not be prepared.
    #[error("cannot prepare runtime directory {path}; set runtime_dir or RUNTIME_DIRECTORY")]
    RuntimeDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another front holds the runtime directory's lock ([`instance`]); nothing was touched.
    #[error(
        "another plugvisor ({}) is running with runtime directory {}; stop it or set runtime_dir",
        .pid.map_or("pid unknown".to_owned(), |p| format!("pid {p}")),
        .dir.display()
    )]
    AlreadyRunning {
        /// The runtime directory.
        dir: std::path::PathBuf,
        /// The holder's pid, once it has written it into the lock file.
        pid: Option<u32>,
    },
    /// A plugin socket could not be bound.
    #[error("plugin `{plugin}`: {message}")]
    PluginSocket {
        /// The plugin.
        plugin: String,
        /// What failed.
        message: String,
    },
    /// The ext_proc or admin listener could not be bound.
    #[error("{key}: cannot listen on {addr}")]
    Listen {
        /// The config key the address comes from (`listen`, `admin_listen`), or where it came
        /// from instead (systemd).
        key: &'static str,
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The spawner thread or the control socket could not be set up.
    #[error("cannot set up {what}")]
    Setup {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("ext_proc server failed")]
    Serve(#[source] tonic::transport::Error),
    /// Started by an upgrade, this front could not take over from the old one (which serves
    /// on).
    #[error("cannot take over from the old front")]
    TakeOver(#[source] std::io::Error),
}

/// A message and its causes on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// What a front started by an upgrade takes from the old one instead of binding it.
#[derive(Debug)]
pub struct Inherited {
    /// The runtime directory's lock (the old front's open file).
    pub lock: instance::InstanceLock,
    /// The ext_proc listener.
    pub ext_proc: std::os::fd::OwnedFd,
    /// The admin listener, if the old front had one.
    pub admin: Option<std::os::fd::OwnedFd>,
    /// The ext_proc socket's file belongs to the service manager.
    pub keep_listen_file: bool,
}

/// A started front.
pub struct Running {
    /// The runtime directory's lock, held until the front is dropped.
    instance: instance::InstanceLock,
    /// Copies of the listeners' fds, to hand to a new front.
    listeners: upgrade::Listeners,
    /// Closed until a front started by an upgrade is told to serve; then the servers accept.
    accept_gate: watch::Sender<bool>,
    /// Upgrade requests from the control socket, for the service loop.
    upgrades: Option<upgrade::Receiver>,
    /// Set once a new front serves the listeners: this one only drains, and leaves the socket
    /// paths and the lock to it.
    handed_over: Option<u32>,
    stop_admin: watch::Sender<bool>,
    config: Config,
    listen: Listen,
    admin: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    plugins: Arc<Plugins>,
    /// Loops the watchdog checks before it pings systemd.
    probes: Vec<systemd::Probe>,
    /// The ext_proc socket's file is this front's to remove at stop (not systemd's, nor, before
    /// a handover is done, the old front's).
    remove_listen_file: bool,
    stop_streams: watch::Sender<bool>,
    stop_server: Option<tokio::sync::oneshot::Sender<()>>,
    /// `None` once awaited to completion (a finished `JoinHandle` must not be polled again).
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    background: Vec<JoinHandle<()>>,
}

/// Binds the plugin sockets, the ext_proc listener and the admin listener, starts the plugins the
/// front spawns, waits up to `connect_timeout` for those to connect, and serves. Plugins with
/// `spawn = false` are not waited for: they are started by someone else, often only once this
/// front is ready (systemd template units are ordered after it).
pub async fn start(config: Config) -> Result<Running, RunError> {
    start_with(config, None).await
}

/// [`start`], or, with `inherited`, the start of a front an upgrade runs: it takes the old
/// front's lock and listeners instead of binding them, and accepts only once
/// [`Running::open_accept`] is called.
pub async fn start_with(config: Config, inherited: Option<Inherited>) -> Result<Running, RunError> {
    // First of all: a second front on this runtime directory must fail before it unlinks or
    // binds anything of the running one's.
    let (instance, passed) = match inherited {
        None => (instance::InstanceLock::acquire(&config.runtime_dir)?, None),
        Some(i) => (i.lock, Some((i.ext_proc, i.admin, i.keep_listen_file))),
    };
    let (accept_gate, gate) = watch::channel(passed.is_none());
    let metrics = Arc::new(Metrics::new());
    let plugins_dir = config.plugins_dir();
    // The runtime directory keeps the mode it has (systemd's RuntimeDirectoryMode, or the
    // operator's); only plugins/ is ours to restrict.
    accept::prepare_dir(&plugins_dir).map_err(|source| RunError::RuntimeDir {
        path: plugins_dir.clone(),
        source,
    })?;

    let mut background = Vec::new();
    let mut bound = Vec::new();
    for plugin in &config.plugins {
        bound.push(
            owner::Bound::bind(&config, plugin, &metrics).map_err(|message| {
                RunError::PluginSocket {
                    plugin: plugin.name.clone(),
                    message,
                }
            })?,
        );
    }
    let links: Vec<Arc<PluginLink>> = bound.iter().map(|b| b.link().clone()).collect();

    let (stop_streams, stop_rx) = watch::channel(false);
    let front = ext_proc::Front::new(
        links.clone(),
        metrics.clone(),
        ext_proc::StreamLimits::from_config(&config),
        stop_rx,
    );
    // Checked by tonic from the message's length prefix, before it is buffered.
    let service = ExternalProcessorServer::new(front.clone())
        .max_decoding_message_size(config.max_message_bytes);
    let (stop_server, stop_server_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_signal = async move {
        let _ = stop_server_rx.await;
    };
    // The old front's listener after an upgrade, else socket activation's `extproc` fd when
    // systemd passed one, else `listen` bound here. The accept stream answers the watchdog's
    // probe whenever the server polls it.
    let (passed_admin, keep_listen_file) = match &passed {
        Some((_, admin, keep)) => (admin.as_ref().map(|a| a.try_clone()), *keep),
        None => (None, false),
    };
    let (listen, listener, remove_listen_file, keep_for_next) = match passed.as_ref() {
        Some((ext_proc, _, _)) => {
            let failed = |source| RunError::Listen {
                key: "upgrade",
                addr: "the ext_proc listener passed by the old front".to_owned(),
                source,
            };
            let fd = ext_proc.try_clone().map_err(failed)?;
            let activated =
                systemd::listening_socket(fd).map_err(|e| failed(std::io::Error::other(e)))?;
            let (listen, listener) = systemd::serve_passed(activated).map_err(failed)?;
            if listen != config.listen {
                tracing::warn!(inherited = %listen, configured = %config.listen, "the config's `listen` differs from the listener taken over; keeping the listener (a new address needs a restart)");
            }
            // Not this front's to remove until it serves it (see `open_accept`).
            (listen, listener, false, keep_listen_file)
        }
        None => {
            let (listen, listener, activated) = systemd::bind_ext_proc(&config.listen).await?;
            (listen, listener, !activated, activated)
        }
    };
    let listeners = {
        use std::os::fd::AsFd;
        let ext_proc = match &listener {
            systemd::ExtProcListener::Tcp(l) => l.as_fd(),
            systemd::ExtProcListener::Unix(l) => l.as_fd(),
        };
        upgrade::Listeners::new(ext_proc, None, keep_for_next)
    };
    let mut listeners = listeners.map_err(|source| RunError::Setup {
        what: "a copy of the ext_proc listener for upgrades".into(),
        source,
    })?;
    let (accept_probe, accept_answerer) = systemd::probe("ext_proc accept loop");
    let mut server_gate = gate.clone();
    let server = match listener {
        systemd::ExtProcListener::Tcp(listener) => tokio::spawn(async move {
            if server_gate.wait_for(|open| *open).await.is_err() {
                return Ok(());
            }
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    systemd::Watched::new(nodelay_incoming(listener), accept_answerer),
                    shutdown_signal,
                )
                .await
        }),
        systemd::ExtProcListener::Unix(listener) => tokio::spawn(async move {
            if server_gate.wait_for(|open| *open).await.is_err() {
                return Ok(());
            }
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    systemd::Watched::new(UnixListenerStream::new(listener), accept_answerer),
                    shutdown_signal,
                )
                .await
        }),
    };

    let admin = match config.admin_listen {
        None => None,
        Some(addr) => {
            let failed = |source| RunError::Listen {
                key: "admin_listen",
                addr: addr.to_string(),
                source,
            };
            // The old front's admin listener when it listens where the config says; a changed
            // address is bound anew.
            let inherited = match passed_admin {
                Some(Ok(fd)) => {
                    let l = std::net::TcpListener::from(fd);
                    match l.local_addr() {
                        // Port 0 in the config: the port the old front was given.
                        Ok(a) if a == addr || (addr.port() == 0 && a.ip() == addr.ip()) => {
                            l.set_nonblocking(true).map_err(failed)?;
                            Some(tokio::net::TcpListener::from_std(l).map_err(failed)?)
                        }
                        _ => None,
                    }
                }
                Some(Err(e)) => return Err(failed(e)),
                None => None,
            };
            let listener = match inherited {
                Some(l) => l,
                None => metrics::bind_admin(addr).await.map_err(failed)?,
            };
            {
                use std::os::fd::AsFd;
                listeners
                    .set_admin(listener.as_fd())
                    .map_err(|source| RunError::Setup {
                        what: "a copy of the admin listener for upgrades".into(),
                        source,
                    })?;
            }
            Some(listener)
        }
    };

    let setup = |what: &str| {
        let what = what.to_owned();
        move |source| RunError::Setup { what, source }
    };
    let spawner = spawn::Spawner::start().map_err(setup("the plugin spawner thread"))?;
    let entries = bound
        .into_iter()
        .map(|b| Arc::new(b.start(&config, &spawner)))
        .collect();
    let plugins = Arc::new(Plugins::new(
        entries,
        registry::Launcher {
            config: std::sync::RwLock::new(config.clone()),
            spawner,
            metrics: metrics.clone(),
            front,
        },
    ));
    background.push(tokio::spawn(registry::retry_loop(Arc::downgrade(&plugins))));
    let (stop_admin, _) = watch::channel(false);
    // Served once the plugins exist, so /healthz can ask them (the port is bound above, so a
    // busy port still fails the start early).
    let admin = match admin {
        None => None,
        Some(listener) => {
            let bound = listener.local_addr().ok();
            let mut stop = stop_admin.subscribe();
            let mut admin_gate = gate.clone();
            let health = Arc::downgrade(&plugins);
            let metrics = metrics.clone();
            background.push(tokio::spawn(async move {
                if admin_gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                metrics::serve_admin(
                    listener,
                    metrics,
                    Arc::new(move || {
                        health
                            .upgrade()
                            .map_or_else(Vec::new, |p| p.required_down())
                    }),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await
            }));
            bound
        }
    };
    let control_path = config.control_socket();
    let control = control::bind(&control_path).map_err(setup(&format!(
        "the control socket {}",
        control_path.display()
    )))?;
    let (upgrade_requests, upgrades) = upgrade::Requests::channel();
    background.push(tokio::spawn(control::serve(
        control,
        plugins.clone(),
        upgrade_requests,
    )));

    let running = Running {
        instance,
        listeners,
        accept_gate,
        upgrades: Some(upgrades),
        handed_over: None,
        stop_admin,
        config: config.clone(),
        listen,
        admin,
        metrics,
        plugins,
        stop_streams,
        probes: vec![accept_probe],
        remove_listen_file,
        stop_server: Some(stop_server),
        server: Some(server),
        background,
    };
    let spawned: Vec<_> = links.iter().filter(|l| l.config().spawn).cloned().collect();
    let all_spawned = async {
        for link in &spawned {
            link.wait_connected().await;
        }
    };
    if tokio::time::timeout(config.connect_timeout, all_spawned)
        .await
        .is_err()
    {
        let missing: Vec<_> = spawned
            .iter()
            .filter(|l| !l.is_connected())
            .map(|l| l.name().to_owned())
            .collect();
        tracing::warn!(?missing, "serving before every spawned plugin connected");
    }
    if *running.accept_gate.borrow() {
        tracing::info!(listen = %running.listen, admin = ?running.admin, "plugvisor front serving");
    } else {
        tracing::info!(listen = %running.listen, admin = ?running.admin, "plugvisor front started; serves once the old front lets it");
    }
    Ok(running)
}

/// The accepted connections of a TCP listener, each with `TCP_NODELAY` set.
///
/// `Server::tcp_nodelay` applies only to listeners tonic binds itself, not to an incoming stream
/// handed to it. Without it, a reply written as two small segments (gRPC headers, then the
/// message) waits for the delayed ACK of the first: 40 ms on every ext_proc message over TCP.
pub fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on an ext_proc connection");
        }
        Ok(stream)
    })
}

/// Starts the front, serves until `shutdown` resolves, then stops gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let mut running = start(config).await?;
    tokio::select! {
        _ = shutdown => {}
        r = running.server.as_mut().expect("server task present until stop") => {
            running.server = None;
            let result = match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(RunError::Serve(e)),
                Err(e) => {
                    tracing::error!(error = %e, "ext_proc server task failed");
                    Ok(())
                }
            };
            running.stop().await;
            return result;
        }
    }
    running.stop().await;
    Ok(())
}

impl Running {
    /// Where the ext_proc server listens (the bound port when the config said port 0).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// Where `/metrics` is served.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The liveness probes of the loops the systemd watchdog vouches for.
    pub fn probes(&self) -> &[systemd::Probe] {
        &self.probes
    }

    /// The plugin links, in config order (a snapshot: a reload may change them).
    pub fn links(&self) -> Vec<Arc<PluginLink>> {
        self.plugins
            .entries()
            .iter()
            .map(|e| e.link().clone())
            .collect()
    }

    /// The pids of the plugin processes the front started, by plugin name.
    pub fn plugin_pids(&self) -> Vec<(String, u32)> {
        self.plugins
            .entries()
            .iter()
            .filter_map(|e| Some((e.name().to_owned(), e.pid()?)))
            .collect()
    }

    /// The plugins' owners.
    pub fn plugins(&self) -> &Arc<Plugins> {
        &self.plugins
    }

    /// Where the control socket listens.
    pub fn control_socket(&self) -> std::path::PathBuf {
        self.config.control_socket()
    }

    /// Waits until every plugin is connected, up to `timeout`; true if they all are.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let all = async {
            for link in &self.links() {
                link.wait_connected().await;
            }
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    /// Upgrade requests from the control socket (once; the service loop reads them).
    pub fn take_upgrade_requests(&mut self) -> Option<tokio::sync::mpsc::Receiver<upgrade::Ask>> {
        self.upgrades.take().map(upgrade::Receiver::serve)
    }

    /// A front started by an upgrade begins to accept on the listeners it took over; from now
    /// on the lock and the ext_proc socket's file are its own.
    pub fn open_accept(&mut self) {
        self.accept_gate.send_replace(true);
        if let Err(e) = self.instance.take_over() {
            tracing::warn!(error = %e, "cannot write this front's pid into the lock file");
        }
        self.remove_listen_file = !self.listeners.keeps_listen_file();
    }

    /// What an upgrade hands over from this front: `draining` are older fronts still draining.
    pub fn upgrade_plan(
        &self,
        watchdog_usec: Option<u64>,
        draining: Vec<u32>,
    ) -> Result<upgrade::Plan<'_>, upgrade::UpgradeError> {
        if let Some(to) = self.handed_over {
            return Err(upgrade::UpgradeError::AlreadyHandedOver {
                pid: std::process::id(),
                to,
            });
        }
        let lock = self
            .instance
            .file()
            .ok_or(upgrade::UpgradeError::NotAvailable)?;
        // The plugins whose sockets this front bound (not those it could not start).
        let mut sockets: Vec<_> = self
            .plugins
            .entries()
            .iter()
            .map(|e| self.config.plugin_socket(e.name()))
            .collect();
        sockets.push(self.config.control_socket());
        Ok(upgrade::Plan {
            runtime_dir: &self.config.runtime_dir,
            sockets,
            lock,
            listeners: &self.listeners,
            watchdog_usec,
            draining,
            ready_timeout: self.config.ready_timeout,
        })
    }

    /// The front `to` serves the listeners now: stop accepting, send GOAWAY on every
    /// connection (their streams go on), stop serving `/metrics`, and leave the socket paths
    /// and the lock to `to`. The in-flight streams then drain with [`Running::stop`].
    pub fn hand_over(&mut self, to: u32) {
        self.handed_over = Some(to);
        self.plugins.freeze();
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        self.stop_admin.send_replace(true);
        self.listeners.release();
        self.instance.keep_for_successor();
        self.remove_listen_file = false;
    }

    /// The front this one handed over to, if it did.
    pub fn handed_over(&self) -> Option<u32> {
        self.handed_over
    }

    /// Graceful stop: stop accepting streams and let in-flight ones finish for up to
    /// `shutdown_grace`; abort the rest; ask the plugins to stop and kill those still running
    /// after the grace period; remove the sockets.
    pub async fn stop(&mut self) {
        let grace = self.config.shutdown_grace;
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        self.stop_admin.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        let streams_done = async {
            while self.metrics.streams_active.get() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, streams_done).await;
        self.stop_streams.send_replace(true);
        // Give aborts a moment to reach the queues before the plugins are told to stop.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(mut server) = self.server.take() {
            // tonic drains gracefully, but Envoy keeps its HTTP/2 connection open: bound it.
            if tokio::time::timeout(Duration::from_millis(200), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
        // Plugins stop in reverse config order: each gets `Shutdown`, SIGTERM after the grace
        // period and SIGKILL after another; their owners end once they are reaped, closing
        // their connections and sockets (and removing the socket files, unless a handover gave
        // the paths to the new front).
        let socket = if self.handed_over.is_none() {
            owner::SocketFile::Remove
        } else {
            owner::SocketFile::Keep
        };
        let entries = self.plugins.take_all();
        for entry in entries.iter().rev() {
            entry.begin_stop(grace, socket);
        }
        let all_stopped = async {
            for entry in entries.iter().rev() {
                entry.finished().await;
            }
        };
        if tokio::time::timeout(grace * 2 + Duration::from_secs(1), all_stopped)
            .await
            .is_err()
        {
            tracing::warn!("plugins still running after the stop sequence; killing them");
        }
        // Dropping the owners aborts any task still running, which kills its child.
        for entry in &entries {
            entry.link().disconnect("front stopping");
            // Only while it is still a socket (an owner cut short did not remove it).
            if socket == owner::SocketFile::Remove {
                instance::remove_socket(&self.config.plugin_socket(entry.name()));
            }
        }
        drop(entries);
        for task in self.background.drain(..) {
            task.abort();
        }
        if let (Listen::Unix(path), true) = (&self.listen, self.remove_listen_file) {
            instance::remove_socket(path);
        }
        if self.handed_over.is_none() {
            instance::remove_socket(&self.config.control_socket());
        }
    }
}
