//! The front as a whole: [`start`] brings it up in named phases (the lock, the plugins' sockets,
//! the listeners, the servers, the plugins), [`Running`] is a started front, [`Running::stop`]
//! takes it down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, Listen, Published};
use crate::data_path::ext_proc::Front;
use crate::observe::metrics::{self, Metrics};
use crate::observe::probe::{probe, Probe};
use crate::plugin::accept::prepare_dir;
use crate::plugin::link::{BatchClock, PluginLink};
use crate::plugin::owner::{Bound, SocketFile};
use crate::plugin::registry::{self, Launcher, Plugins};
use crate::plugin::spawn::Spawner;
use crate::records::{Records, RecordsError};
use crate::shell::instance::{self, InstanceLock};
use crate::shell::listeners;
use crate::shell::{control, systemd, upgrade};
use crate::traces::Traces;

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
    /// The usage records' file or spool cannot be used.
    #[error("cannot start the usage records")]
    Records(#[source] RecordsError),
    /// The span exporter cannot be built from `[traces]`.
    #[error("cannot start tracing: traces: {0}")]
    Traces(String),
    /// Started by an upgrade, this front could not take over from the old one (which serves
    /// on).
    #[error("cannot take over from the old front")]
    TakeOver(#[source] std::io::Error),
}

/// The most a stop waits for the collector to take the last records before it spools them.
const RECORDS_STOP_GRACE: Duration = Duration::from_secs(2);

/// What a front started by an upgrade takes from the old one instead of binding it.
#[derive(Debug)]
pub struct Inherited {
    /// The runtime directory's lock (the old front's open file).
    pub lock: InstanceLock,
    /// The listeners.
    pub listeners: listeners::Passed,
}

/// A started front.
pub struct Running {
    /// The runtime directory's lock, held until the front is dropped.
    instance: InstanceLock,
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
    /// The running configuration, as the reload replaces it.
    pub(crate) config: Published,
    listen: Listen,
    admin: Option<SocketAddr>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) plugins: Arc<Plugins>,
    /// The usage records' sinks, stopped once the streams are done.
    records: Records,
    /// The span exporter (empty when tracing is off).
    traces: Traces,
    /// Loops the watchdog checks before it pings systemd.
    probes: Vec<Probe>,
    /// The ext_proc socket's file is this front's to remove at stop (not systemd's, nor, before
    /// a handover is done, the old front's).
    remove_listen_file: bool,
    stop_streams: watch::Sender<bool>,
    stop_server: Option<tokio::sync::oneshot::Sender<()>>,
    /// `None` once awaited to completion (a finished `JoinHandle` must not be polled again).
    pub(crate) server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
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
///
/// The phases, in order: take the runtime directory (its lock first, so a second front fails
/// before it touches anything of the running one's); bind every plugin's socket; get the
/// listeners ([`listeners`]); serve ext_proc; start the plugins' owners (which spawn the
/// processes); serve `/metrics` and the control socket; wait for the spawned plugins.
pub async fn start_with(config: Config, inherited: Option<Inherited>) -> Result<Running, RunError> {
    let (instance, passed) = match inherited {
        None => (InstanceLock::acquire(&config.runtime_dir)?, None),
        Some(i) => (i.lock, Some(i.listeners)),
    };
    let (accept_gate, gate) = watch::channel(passed.is_none());
    let metrics = Arc::new(Metrics::new());
    // Before anything is bound: a records file or spool that cannot be used fails the start.
    let records = Records::start(&config.records, metrics.clone()).map_err(RunError::Records)?;
    let traces =
        Traces::start(config.traces.as_ref(), metrics.clone()).map_err(RunError::Traces)?;
    let config = Published::new(config);
    let current = config.current();
    // One timer for every plugin connection's batches (see `plugin::link::BatchClock`).
    let clock = BatchClock::new();
    let bound = bind_plugin_sockets(&current, &metrics, &clock)?;
    // Until the front is up, a failed start removes the sockets it bound.
    let mut bound_files = BoundFiles(
        current
            .plugins
            .iter()
            .map(|p| current.plugin_socket(&p.name))
            .collect(),
    );

    // The data path reads the plugins' links as the registry publishes them.
    let (links, links_rx) = watch::channel(Arc::new(
        bound.iter().map(|b| b.link().clone()).collect::<Vec<_>>(),
    ));
    let (stop_streams, stop_rx) = watch::channel(false);
    let front = Front::new(
        links_rx,
        config.clone(),
        metrics.clone(),
        stop_rx,
        records.clone(),
        traces.clone(),
    );

    let ext_proc = listeners::ext_proc(&current, passed.as_ref()).await?;
    let mut copies = {
        use std::os::fd::AsFd;
        let fd = match &ext_proc.listener {
            systemd::ExtProcListener::Tcp(l) => l.as_fd(),
            systemd::ExtProcListener::Unix(l) => l.as_fd(),
        };
        upgrade::Listeners::new(fd, None, ext_proc.keep_for_next)
    }
    .map_err(|source| RunError::Setup {
        what: "a copy of the ext_proc listener for upgrades".into(),
        source,
    })?;
    let (accept_probe, accept_answerer) = probe("ext_proc accept loop");
    let (stop_server, stop_server_rx) = tokio::sync::oneshot::channel::<()>();
    // The decode limit is checked by tonic from the message's length prefix, before it is
    // buffered; the server is built with it, so it needs a restart (docs/configuration.md).
    let service =
        ExternalProcessorServer::new(front).max_decoding_message_size(current.max_message_bytes);
    let server = listeners::serve_ext_proc(
        ext_proc.listener,
        service,
        gate.clone(),
        accept_answerer,
        async move {
            let _ = stop_server_rx.await;
        },
    );
    let admin_listener =
        listeners::admin(current.admin_listen, passed.as_ref(), &mut copies).await?;

    let setup = |what: &str| {
        let what = what.to_owned();
        move |source| RunError::Setup { what, source }
    };
    let spawner = Spawner::start().map_err(setup("the plugin spawner thread"))?;
    let owners = bound
        .into_iter()
        .map(|b| Arc::new(b.start(&config, &spawner)))
        .collect();
    let plugins = Arc::new(Plugins::new(
        owners,
        Launcher {
            config: config.clone(),
            spawner,
            metrics: metrics.clone(),
            clock,
            links,
        },
    ));
    let mut background = vec![tokio::spawn(registry::retry_loop(Arc::downgrade(&plugins)))];
    let (stop_admin, _) = watch::channel(false);
    let admin = admin_listener.and_then(|listener| {
        let bound = listener.local_addr().ok();
        background.push(serve_admin(listener, &metrics, &plugins, gate, &stop_admin));
        bound
    });
    let control_path = current.control_socket();
    let control = control::bind(&control_path).map_err(setup(&format!(
        "the control socket {}",
        control_path.display()
    )))?;
    let (upgrade_requests, upgrades) = upgrade::Requests::channel();
    background.push(tokio::spawn(control::serve(
        control,
        plugins.clone(),
        upgrade_requests,
        records.clone(),
        traces.clone(),
    )));

    let running = Running {
        instance,
        listeners: copies,
        accept_gate,
        upgrades: Some(upgrades),
        handed_over: None,
        stop_admin,
        config,
        listen: ext_proc.listen,
        admin,
        metrics,
        plugins,
        records,
        traces,
        stop_streams,
        probes: vec![accept_probe],
        remove_listen_file: ext_proc.remove_listen_file,
        stop_server: Some(stop_server),
        server: Some(server),
        background,
    };
    bound_files.0.clear();
    running.wait_for_spawned(current.connect_timeout).await;
    // A plain address, or no field at all without /metrics (not `Some(...)`).
    let admin = running.admin.map(|a| a.to_string());
    let admin = admin.as_deref();
    // What runs, not what the file said (`workers`).
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    if *running.accept_gate.borrow() {
        tracing::info!(listen = %running.listen, admin, workers, "plugvisor front serving");
    } else {
        tracing::info!(listen = %running.listen, admin, workers, "plugvisor front started; serves once the old front lets it");
    }
    Ok(running)
}

/// The plugin sockets a start bound, removed if the start fails before the front is up.
struct BoundFiles(Vec<std::path::PathBuf>);

impl Drop for BoundFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            instance::remove_socket(path);
        }
    }
}

/// Binds every configured plugin's socket and creates its link; the owners start later, once
/// the data path and the listeners exist.
fn bind_plugin_sockets(
    config: &Config,
    metrics: &Arc<Metrics>,
    clock: &Arc<BatchClock>,
) -> Result<Vec<Bound>, RunError> {
    // The runtime directory keeps the mode it has (systemd's RuntimeDirectoryMode, or the
    // operator's); only plugins/ is ours to restrict.
    let plugins_dir = config.plugins_dir();
    prepare_dir(&plugins_dir).map_err(|source| RunError::RuntimeDir {
        path: plugins_dir.clone(),
        source,
    })?;
    let mut bound = Vec::new();
    for plugin in &config.plugins {
        match Bound::bind(config, plugin, metrics, clock) {
            Ok(b) => bound.push(b),
            Err(message) => {
                // Leave none of the sockets bound before it behind.
                for b in &bound {
                    instance::remove_socket(&config.plugin_socket(b.link().name()));
                }
                return Err(RunError::PluginSocket {
                    plugin: plugin.name.clone(),
                    message,
                });
            }
        }
    }
    Ok(bound)
}

/// Serves `/metrics` and `/healthz` on `listener` once `gate` opens, until `stop` turns true.
/// Served once the plugins exist, so `/healthz` can ask them (the port is bound before, so a
/// busy port still fails the start early).
fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: &Arc<Metrics>,
    plugins: &Arc<Plugins>,
    mut gate: watch::Receiver<bool>,
    stop: &watch::Sender<bool>,
) -> JoinHandle<()> {
    let mut stop = stop.subscribe();
    let health = Arc::downgrade(plugins);
    let metrics = metrics.clone();
    tokio::spawn(async move {
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        metrics::serve_admin(
            listener,
            metrics,
            Arc::new(move || {
                health
                    .upgrade()
                    .and_then(|p| metrics::required_down(&p.required_down()))
            }),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await
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
    pub fn probes(&self) -> &[Probe] {
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
        self.config.current().control_socket()
    }

    /// The running configuration.
    pub fn config(&self) -> &Published {
        &self.config
    }

    /// The usage records' handle.
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Waits up to `timeout` for the plugins the front spawns to connect; serving starts
    /// regardless, with a warning naming those that did not.
    async fn wait_for_spawned(&self, timeout: Duration) {
        let spawned: Vec<_> = self
            .links()
            .into_iter()
            .filter(|l| l.config().process.spawn)
            .collect();
        let all_spawned = async {
            for link in &spawned {
                link.wait_connected().await;
            }
        };
        if tokio::time::timeout(timeout, all_spawned).await.is_err() {
            let missing: Vec<_> = spawned
                .iter()
                .filter(|l| !l.is_connected())
                .map(|l| l.name().to_owned())
                .collect();
            tracing::warn!(?missing, "serving before every spawned plugin connected");
        }
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
        let config = self.config.current();
        // The plugins whose sockets this front bound (not those it could not start).
        let mut sockets: Vec<_> = self
            .plugins
            .entries()
            .iter()
            .map(|e| config.plugin_socket(e.name()))
            .collect();
        sockets.push(config.control_socket());
        Ok(upgrade::Plan {
            runtime_dir: config.runtime_dir.clone(),
            sockets,
            lock,
            listeners: &self.listeners,
            watchdog_usec,
            draining,
            ready_timeout: config.ready_timeout,
            followers: self
                .links()
                .iter()
                .filter(|l| !l.config().process.spawn && l.reconnects())
                .cloned()
                .collect(),
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
        let drain = self.config.current().shutdown_grace;
        self.stop_after(drain).await;
    }

    /// [`Running::stop`] with the in-flight streams given `drain` to finish (zero: cut at once,
    /// as after an upgrade's drain already ran out); the plugins still get `shutdown_grace_ms`.
    pub async fn stop_after(&mut self, drain: Duration) {
        let config = self.config.current();
        let grace = config.shutdown_grace;
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        self.stop_admin.send_replace(true);
        let deadline = tokio::time::Instant::now() + drain;
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
            SocketFile::Remove
        } else {
            SocketFile::Keep
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
            entry.cut("front stopping");
            // Only while it is still a socket (an owner cut short did not remove it).
            if socket == SocketFile::Remove {
                instance::remove_socket(&config.plugin_socket(entry.name()));
            }
        }
        drop(entries);
        // Every stream has ended (or was cut and submitted its record): flush the file, and send
        // or spool what OTLP has, so a front that exits (a stop, the end of an upgrade's drain)
        // leaves its records on disk for the next one.
        self.records
            .clone()
            .stop(grace.min(RECORDS_STOP_GRACE))
            .await;
        self.traces.stop(grace.min(RECORDS_STOP_GRACE)).await;
        for task in self.background.drain(..) {
            task.abort();
        }
        if let (Listen::Unix(path), true) = (&self.listen, self.remove_listen_file) {
            instance::remove_socket(path);
        }
        if self.handed_over.is_none() {
            instance::remove_socket(&config.control_socket());
        }
    }
}
