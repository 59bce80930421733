//! plugvisor's front: an Envoy `ext_proc` server that answers every message at once and feeds the
//! plugins, each its own process on its own Unix socket, through bounded queues; the end of a
//! response is a final RPC whose merged metadata goes back to Envoy as `dynamic_metadata`.
//!
//! [`start`] binds everything and returns a [`Running`] front (tests read its addresses and
//! metrics); [`run`] is `start`, wait for `shutdown`, stop. The modules: [`config`] (TOML, the
//! embedded default), [`ext_proc`] (the gRPC service, one task per stream), [`link`] (a plugin's
//! connection, queue, writer and reader), [`accept`] (plugin sockets and the handshake),
//! [`spawn`] (starting a plugin process), [`metadata`] (merging into `dynamic_metadata`) and
//! [`metrics`] (Prometheus and the admin server).
#![forbid(unsafe_code)]

pub mod accept;
pub mod config;
pub mod ext_proc;
pub mod link;
pub mod metadata;
pub mod metrics;
pub mod spawn;

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
    /// A plugin socket could not be bound.
    #[error("plugin `{plugin}`: {message}")]
    PluginSocket {
        /// The plugin.
        plugin: String,
        /// What failed.
        message: String,
    },
    /// The ext_proc or admin listener could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A plugin process could not be started.
    #[error(transparent)]
    Spawn(#[from] spawn::SpawnError),
    /// The gRPC server failed.
    #[error("ext_proc server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// A plugin process the front started, watched by a task that logs its exit.
struct SpawnedPlugin {
    name: String,
    pid: Option<u32>,
    exited: JoinHandle<()>,
}

/// A started front.
pub struct Running {
    config: Config,
    listen: Listen,
    admin: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    links: Vec<Arc<PluginLink>>,
    children: Vec<SpawnedPlugin>,
    stop_streams: watch::Sender<bool>,
    stop_server: Option<tokio::sync::oneshot::Sender<()>>,
    /// `None` once awaited to completion (a finished `JoinHandle` must not be polled again).
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    background: Vec<JoinHandle<()>>,
}

/// Binds the plugin sockets, the ext_proc listener and the admin listener, starts the plugins the
/// front spawns, waits up to `connect_timeout` for all plugins to connect, and serves.
pub async fn start(config: Config) -> Result<Running, RunError> {
    let metrics = Arc::new(Metrics::new());
    let plugins_dir = config.plugins_dir();
    // The runtime directory keeps the mode it has (systemd's RuntimeDirectoryMode, or the
    // operator's); only plugins/ is ours to restrict.
    std::fs::create_dir_all(&config.runtime_dir)
        .and_then(|()| accept::prepare_dir(&plugins_dir))
        .map_err(|source| RunError::RuntimeDir {
            path: plugins_dir.clone(),
            source,
        })?;

    let mut background = Vec::new();
    let mut links = Vec::new();
    for plugin in &config.plugins {
        let path = config.plugin_socket(&plugin.name);
        let listener =
            accept::bind_plugin_socket(&path, plugin.group.as_deref()).map_err(|message| {
                RunError::PluginSocket {
                    plugin: plugin.name.clone(),
                    message,
                }
            })?;
        let link = Arc::new(PluginLink::new(plugin.clone(), metrics.clone()));
        background.push(tokio::spawn(accept::accept_loop(
            listener,
            link.clone(),
            metrics.clone(),
        )));
        links.push(link);
    }

    let (stop_streams, stop_rx) = watch::channel(false);
    let front = ext_proc::Front::new(
        links.clone(),
        metrics.clone(),
        config.default_response_body_mode,
        stop_rx,
    );
    let service = ExternalProcessorServer::new(front);
    let (stop_server, stop_server_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_signal = async move {
        let _ = stop_server_rx.await;
    };
    let (listen, server) = match &config.listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| RunError::Listen {
                addr: addr.to_string(),
                source,
            })?;
            let incoming = TcpListenerStream::new(listener);
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, shutdown_signal),
            );
            (Listen::Tcp(bound), server)
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let listener =
                tokio::net::UnixListener::bind(path).map_err(|source| RunError::Listen {
                    addr: format!("unix:{}", path.display()),
                    source,
                })?;
            let incoming = UnixListenerStream::new(listener);
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, shutdown_signal),
            );
            (Listen::Unix(path.clone()), server)
        }
    };

    let admin = match config.admin_listen {
        None => None,
        Some(addr) => {
            let listener = metrics::bind_admin(addr)
                .await
                .map_err(|source| RunError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            let bound = listener.local_addr().ok();
            let mut stop = stop_streams.subscribe();
            background.push(tokio::spawn(metrics::serve_admin(
                listener,
                metrics.clone(),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )));
            bound
        }
    };

    for link in &links {
        background.push(tokio::spawn(ping_loop(link.clone(), config.ping_interval)));
    }

    let mut running = Running {
        config: config.clone(),
        listen,
        admin,
        metrics,
        links,
        children: Vec::new(),
        stop_streams,
        stop_server: Some(stop_server),
        server: Some(server),
        background,
    };
    for plugin in config.plugins.iter().filter(|p| p.spawn) {
        let socket = config.plugin_socket(&plugin.name);
        let child = match spawn::spawn_plugin(plugin, &socket) {
            Ok(child) => child,
            Err(e) => {
                running.stop().await;
                return Err(e.into());
            }
        };
        let pid = child.id();
        if let Some(link) = running.links.iter().find(|l| l.name() == plugin.name) {
            link.set_spawned_pid(pid);
        }
        let name = plugin.name.clone();
        let stopping = running.stop_streams.subscribe();
        // The task owns the child (killed if the task is dropped) and reaps it.
        let exited = tokio::spawn(async move {
            let mut child = child;
            match child.wait().await {
                Ok(status) if *stopping.borrow() => {
                    tracing::info!(plugin = %name, pid, %status, "plugin exited")
                }
                Ok(status) => tracing::error!(
                    plugin = %name, pid, %status,
                    "plugin exited while serving; its metadata is missing until it reconnects"
                ),
                Err(e) => {
                    tracing::error!(plugin = %name, pid, error = %e, "cannot wait for plugin")
                }
            }
        });
        running.children.push(SpawnedPlugin {
            name: plugin.name.clone(),
            pid,
            exited,
        });
    }
    if !running.wait_connected(config.connect_timeout).await {
        let missing: Vec<_> = running
            .links
            .iter()
            .filter(|l| !l.is_connected())
            .map(|l| l.name().to_owned())
            .collect();
        tracing::warn!(?missing, "serving without every plugin connected");
    }
    tracing::info!(listen = %running.listen, admin = ?running.admin, "plugvisor front serving");
    Ok(running)
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

async fn ping_loop(link: Arc<PluginLink>, interval: Duration) {
    let mut nonce = 0u64;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        nonce += 1;
        link.ping(nonce);
    }
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

    /// The plugin links, in config order.
    pub fn links(&self) -> &[Arc<PluginLink>] {
        &self.links
    }

    /// The pids of the plugin processes the front started, by plugin name.
    pub fn plugin_pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .filter_map(|c| c.pid.map(|p| (c.name.clone(), p)))
            .collect()
    }

    /// Waits until every plugin is connected, up to `timeout`; true if they all are.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let all = async {
            for link in &self.links {
                link.wait_connected().await;
            }
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    /// Graceful stop: stop accepting streams and let in-flight ones finish for up to
    /// `shutdown_grace`; abort the rest; ask the plugins to stop and kill those still running
    /// after the grace period; remove the sockets.
    pub async fn stop(&mut self) {
        let grace = self.config.shutdown_grace;
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
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
        for link in self.links.iter().rev() {
            link.send_shutdown(grace);
        }
        let plugin_deadline =
            deadline.max(tokio::time::Instant::now() + Duration::from_millis(500));
        for child in self.children.iter_mut().rev() {
            if tokio::time::timeout_at(plugin_deadline, &mut child.exited)
                .await
                .is_err()
            {
                tracing::warn!(plugin = %child.name, pid = ?child.pid, "plugin did not exit in time; killing it");
                // Aborting the task drops the child, which kills it (kill_on_drop).
                child.exited.abort();
                let _ = (&mut child.exited).await;
            }
        }
        for link in &self.links {
            link.disconnect("front stopping");
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        for plugin in &self.config.plugins {
            let _ = std::fs::remove_file(self.config.plugin_socket(&plugin.name));
        }
        if let Listen::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
    }
}
