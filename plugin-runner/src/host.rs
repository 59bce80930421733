//! The host: the connections to the front, from handshake to exit.
//!
//! [`serve`] connects to the plugin's socket, says `Hello`, configures a clone of the plugin
//! template from `Welcome` (or exits 78 on `Refuse` or an invalid config), then reads frames:
//! per-stream events go to their lanes (`lanes.rs`), a `Replayed` one unwrapped and marked
//! replayed (anything but one per-stream event inside is a protocol error), `Ping` is answered
//! right here from the reader with the lanes' counts (so a plugin busy in its hooks is never
//! mistaken for a hung one), `Shutdown` drains the lanes for up to its grace period. Every
//! event's frame length is counted: once the lanes are done with it, the bytes go back to the
//! front as `Credit` (see `credit.rs`), which is what lets the front keep at most
//! `Welcome.budget_bytes` of events in this process. A final reply whose metadata encodes larger
//! than `Welcome.metadata_max_bytes` becomes an error reply here, for every plugin; a trace
//! `Spans` larger than that is dropped. Whoever answers (a lane worker's final reply or ack, the
//! reader's pong) writes the frame to the socket itself, at once, from its own thread; only what
//! the socket cannot take right now waits in a buffer that a task drains when it is writable
//! again (see [`Replies`]).
//!
//! `Reconnect` (capability `reconnect`) opens one more connection to the same path: a new
//! plugin instance (`template.clone()`, configured from the new `Welcome`) with its own lanes,
//! window and credit serves it, while the old connection goes on with its own instance until
//! the front closes it. Each connection is a task; the host ([`Connections`], a small state
//! machine) opens them, ignores a `Reconnect` while another is under way, tells them all to
//! drain on `Shutdown` (on any of them) or SIGTERM/SIGINT, and ends the process with its last
//! connection: 0, or 78 when a reconnection was refused since the last welcome.
//!
//! The transport is tokio's `UnixStream` on a filesystem path (see "Transport" in
//! `docs/plugins.md` for why not `interprocess`), split into the quiet halves of
//! `ipc_protocol::quiet_socket` once connected.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipc_protocol::frame::{DEFAULT_MAX_FRAME, PREFIX_LEN};
use ipc_protocol::quiet_socket::{self, ReadHalf, WriteHalf};
use ipc_protocol::{
    FinalOutcome, FinalReply, FrameReader, FrameWriter, FromPlugin, Hello, Metadata, Pong,
    ProtocolError, Spans, ToPlugin, Value, Welcome, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use crate::credit::Credits;
use crate::lanes::{LaneConfig, Lanes, Outbox};
use crate::plugin::Plugin;

/// The capabilities this host implements, announced in every `Hello`.
pub const CAPABILITIES: &[&str] = &[
    ipc_protocol::handshake::capability::REPLAYED,
    ipc_protocol::handshake::capability::ABORTED_FINAL,
    ipc_protocol::handshake::capability::RECONNECT,
    ipc_protocol::handshake::capability::TRACE,
    ipc_protocol::handshake::capability::CREDIT_ON_PING,
];

/// How long the host waits for the front's answer to `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a plugin process ends; [`Exit::code`] is its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `Shutdown` handled or the front closed the socket: 0.
    Clean,
    /// Bad command line or unknown plugin name: 64 (`EX_USAGE`).
    Usage,
    /// The front refused the handshake, or the plugin rejected its config: 78 (`EX_CONFIG`).
    Config,
    /// Anything else (cannot connect, protocol error, ...): 1.
    Failed,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> i32 {
        match self {
            Exit::Clean => 0,
            Exit::Usage => 64,
            Exit::Config => 78,
            Exit::Failed => 1,
        }
    }
}

/// Everything [`serve`] needs besides the plugin.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The plugin's configured name, sent in `Hello`; its own namespace is `plugvisor.<name>`.
    pub plugin: String,
    /// The plugin's own name when it runs under another configured name (`--as`): the plugin
    /// writes `plugvisor.<runs>`, which the host reports as `plugvisor.<plugin>`. `None` when the
    /// two are the same.
    pub runs: Option<String>,
    /// The front's socket for this plugin.
    pub connect: PathBuf,
    /// Worker threads running hooks.
    pub workers: usize,
    /// Idle time after which a stream without `Final`/`Abort` is evicted.
    pub idle_timeout: Duration,
    /// Running time of one event after which its lane is reported stuck in `Pong`.
    pub stuck_after: Duration,
    /// Most events queued per stream.
    pub lane_queue_events: usize,
    /// Most body bytes queued per stream.
    pub lane_queue_bytes: usize,
    /// How long SIGTERM/SIGINT let queued events finish before the process exits.
    pub term_grace: Duration,
    /// How long to keep retrying while the front's socket is missing or refuses (a plugin unit
    /// ordered before plugvisor starts first); zero fails at once.
    pub connect_wait: Duration,
}

impl HostOptions {
    /// Options with the defaults of the command line for `plugin` on socket `connect`.
    pub fn new(plugin: impl Into<String>, connect: impl Into<PathBuf>) -> Self {
        HostOptions {
            plugin: plugin.into(),
            runs: None,
            connect: connect.into(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            idle_timeout: Duration::from_secs(300),
            stuck_after: Duration::from_secs(5),
            lane_queue_events: 4096,
            lane_queue_bytes: 16 * 1024 * 1024,
            term_grace: Duration::from_secs(5),
            connect_wait: Duration::ZERO,
        }
    }
}

/// What can end a connection with an error (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The socket could not be reached.
    #[error("cannot connect to the front's socket {path}; is plugvisor running and is this the plugin's socket?")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The front did not answer `Hello` properly.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// Reading or writing frames failed.
    #[error("protocol error on the front's connection")]
    Protocol(#[from] ProtocolError),
    /// The worker threads could not be started.
    #[error("cannot start worker threads")]
    Workers(#[source] std::io::Error),
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// Serves the front from one process: a connection configured from a clone of `template`,
/// then, on each `Reconnect` (capability `reconnect`), one more, each with its own plugin
/// instance (`template.clone()` configured from that connection's `Welcome`), lanes, window and
/// credit. Returns how the process should exit once its last connection has ended. Errors are
/// logged here.
///
/// `template` is never configured itself: give it the state a fresh process would have.
pub async fn serve<P: Plugin + Clone>(template: P, opts: HostOptions) -> Exit {
    match serve_inner(template, Arc::new(opts)).await {
        Ok(exit) => exit,
        Err(e) => {
            log_host_error(&e);
            Exit::Failed
        }
    }
}

fn log_host_error(e: &HostError) {
    tracing::error!(error = %e, cause = ?std::error::Error::source(e).map(|s| s.to_string()), "plugin host failed");
}

/// Connects to `path`, retrying for up to `wait` while the socket is missing or nobody listens
/// on it yet (the front is starting or restarting); other errors fail at once.
async fn connect(path: &std::path::Path, wait: Duration) -> std::io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut said = false;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && tokio::time::Instant::now() < deadline =>
            {
                if !said {
                    tracing::info!(socket = %path.display(), wait_ms = wait.as_millis() as u64, "front not listening yet; waiting for it");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How the process was asked to stop; every connection hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// `Shutdown{grace_ms}` on one of the connections (the front is stopping): each keeps
    /// reading within the grace ([`drain_reading`]).
    Shutdown(Duration),
    /// SIGTERM or SIGINT: each drains its lanes within `--term-grace` ([`drain`]).
    Signal(Duration),
}

/// What a connection tells the host.
#[derive(Debug)]
enum Report {
    /// Connection `conn` was welcomed and configured; it serves from now on.
    Welcomed(u64),
    /// The front asked connection `conn` for a new connection.
    Reconnect { conn: u64, reason: String },
    /// The front sent `Shutdown` on connection `conn`.
    Shutdown { conn: u64, grace: Duration },
}

/// The host's own state across connections: a pure state machine, tested from a table, fed
/// with what the connections report and how they end.
#[derive(Debug, Default)]
struct Connections {
    next_id: u64,
    /// Connections running (in their handshake or serving).
    live: usize,
    /// The connection whose handshake is under way, if any.
    pending: Option<u64>,
    /// The front (or the plugin) refused the last new connection, and none was welcomed since:
    /// the process exits 78 once its last connection ends.
    refused: bool,
    stopping: Option<Stop>,
    /// How the last connection to end ended.
    last: Option<Exit>,
}

/// What the host does next.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Open connection `id`.
    Open(u64),
    /// Tell every connection to stop.
    Stop(Stop),
    /// Nothing.
    None,
}

impl Connections {
    /// The first connection, at start.
    fn start(&mut self) -> Action {
        self.open()
    }

    fn open(&mut self) -> Action {
        self.next_id += 1;
        self.live += 1;
        self.pending = Some(self.next_id);
        Action::Open(self.next_id)
    }

    fn report(&mut self, report: Report) -> Action {
        match report {
            Report::Welcomed(id) => {
                if self.pending == Some(id) {
                    self.pending = None;
                    self.refused = false;
                }
                Action::None
            }
            Report::Reconnect { conn, reason } => {
                if self.stopping.is_some() {
                    tracing::info!(conn, %reason, "Reconnect while stopping; ignored");
                    Action::None
                } else if let Some(pending) = self.pending {
                    tracing::info!(
                        conn,
                        pending,
                        %reason,
                        "Reconnect while a reconnection is under way; ignored"
                    );
                    Action::None
                } else {
                    tracing::info!(conn, %reason, "the front asks for a new connection; opening it");
                    self.open()
                }
            }
            Report::Shutdown { conn, grace } => {
                if self.live > 1 {
                    tracing::info!(
                        conn,
                        live = self.live,
                        "Shutdown on one connection: draining every connection"
                    );
                }
                self.stop(Stop::Shutdown(grace))
            }
        }
    }

    /// A signal asks the process to stop.
    fn signal(&mut self, grace: Duration) -> Action {
        self.stop(Stop::Signal(grace))
    }

    fn stop(&mut self, stop: Stop) -> Action {
        if self.stopping.is_some() {
            return Action::None;
        }
        self.stopping = Some(stop);
        Action::Stop(stop)
    }

    /// Connection `id` ended with `exit`. Returns the process's exit once it was the last.
    fn ended(&mut self, id: u64, exit: Exit) -> Option<Exit> {
        self.live = self.live.saturating_sub(1);
        if self.pending == Some(id) {
            // It ended in its handshake: refused (78), or failed (logged where it failed).
            self.pending = None;
            if exit == Exit::Config {
                self.refused = true;
                if self.live > 0 {
                    tracing::warn!(
                        conn = id,
                        "the new connection was refused; the old one goes on, and the process exits 78 when it ends"
                    );
                }
            } else if self.live > 0 {
                tracing::warn!(conn = id, "the new connection failed; the old one goes on");
            }
        }
        self.last = Some(exit);
        if self.live > 0 {
            tracing::info!(
                conn = id,
                live = self.live,
                "connection ended; the process goes on"
            );
            return None;
        }
        Some(match exit {
            Exit::Clean if self.refused => Exit::Config,
            exit => exit,
        })
    }
}

async fn serve_inner<P: Plugin + Clone>(
    template: P,
    opts: Arc<HostOptions>,
) -> Result<Exit, HostError> {
    // SIGTERM/SIGINT (systemd stopping a plugin unit, a developer's Ctrl-C) drain every
    // connection like Shutdown.
    let mut sigterm = signal(SignalKind::terminate()).map_err(HostError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(HostError::Signals)?;
    let (stop_tx, stop_rx) = watch::channel(None::<Stop>);
    let (report_tx, mut reports) = mpsc::unbounded_channel::<Report>();
    let mut tasks: JoinSet<(u64, Result<Exit, HostError>)> = JoinSet::new();
    let mut state = Connections::default();
    let act = |action: Action, tasks: &mut JoinSet<_>| match action {
        Action::Open(id) => {
            let conn = connection(
                id,
                template.clone(),
                Arc::clone(&opts),
                report_tx.clone(),
                stop_rx.clone(),
            );
            tasks.spawn(async move { (id, conn.await) });
        }
        Action::Stop(stop) => {
            stop_tx.send_replace(Some(stop));
        }
        Action::None => {}
    };
    act(state.start(), &mut tasks);
    let term_grace = opts.term_grace;
    loop {
        tokio::select! {
            // Reports first: a connection's `Welcomed` is in the channel before its task ends.
            biased;
            Some(report) = reports.recv() => {
                let action = state.report(report);
                act(action, &mut tasks);
            }
            _ = sigterm.recv() => {
                tracing::info!(grace_ms = term_grace.as_millis() as u64, "SIGTERM; draining lanes");
                act(state.signal(term_grace), &mut tasks);
            }
            _ = sigint.recv() => {
                tracing::info!(grace_ms = term_grace.as_millis() as u64, "SIGINT; draining lanes");
                act(state.signal(term_grace), &mut tasks);
            }
            Some(joined) = tasks.join_next() => {
                let (id, exit) = match joined {
                    Ok((id, Ok(exit))) => (id, exit),
                    Ok((id, Err(e))) => {
                        log_host_error(&e);
                        (id, Exit::Failed)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "bug: a connection's task panicked");
                        // Its id is lost with it: count it as the pending one if any.
                        (state.pending.unwrap_or(0), Exit::Failed)
                    }
                };
                if let Some(exit) = state.ended(id, exit) {
                    return Ok(exit);
                }
            }
        }
    }
}

/// Resolves when the process is told to stop, with how; `None` if the host is gone (it cannot
/// be while a connection runs). The watch's guard stays inside, so the future is `Send`.
async fn told(stop: &mut watch::Receiver<Option<Stop>>) -> Option<Stop> {
    stop.wait_for(Option::is_some).await.ok().and_then(|s| *s)
}

/// Opens connection `id` to the front, configures `plugin` from its `Welcome` and serves it
/// until the front closes it, the process is told to stop, or it fails. `Ok(Exit::Config)`
/// when the front refused it or the plugin rejected its config.
async fn connection<P: Plugin>(
    id: u64,
    mut plugin: P,
    opts: Arc<HostOptions>,
    reports: mpsc::UnboundedSender<Report>,
    mut stop: watch::Receiver<Option<Stop>>,
) -> Result<Exit, HostError> {
    let opened = tokio::select! {
        opened = handshake(&mut plugin, &opts) => opened?,
        _ = told(&mut stop) => {
            tracing::info!(conn = id, "stopping before the handshake ended; connection abandoned");
            return Ok(Exit::Clean);
        }
    };
    let Some((reader, wr, welcome)) = opened else {
        return Ok(Exit::Config);
    };
    if id > 1 {
        tracing::info!(
            conn = id,
            "reconnected: a new plugin instance serves the new connection"
        );
    }
    let _ = reports.send(Report::Welcomed(id));
    run_connection(id, plugin, &opts, reader, wr, welcome, &reports, &mut stop).await
}

/// Connects, says `Hello` and waits for the answer; configures `plugin` from a `Welcome`.
/// `None` when the front refused it or the plugin rejected its config (both logged).
async fn handshake<P: Plugin>(
    plugin: &mut P,
    opts: &HostOptions,
) -> Result<Option<(FrameReader<ReadHalf>, WriteHalf, Welcome)>, HostError> {
    let stream = connect(&opts.connect, opts.connect_wait)
        .await
        .map_err(|source| HostError::Connect {
            path: opts.connect.clone(),
            source,
        })?;
    // Halves that do not wake this process when the front reads what it wrote (see
    // `ipc_protocol::quiet_socket`): a final reply is read at the busiest moment of a response.
    let (rd, mut wr) = quiet_socket::split(stream).map_err(|source| HostError::Connect {
        path: opts.connect.clone(),
        source,
    })?;
    // Any frame the protocol allows: an event carries one Envoy body message, which the front
    // caps (`max_message_bytes`) below this ceiling.
    let mut reader = FrameReader::with_max_frame(rd, ipc_protocol::codec::MAX_FRAME_CEILING);

    let subscriptions = plugin.subscriptions();
    FrameWriter::new(&mut wr)
        .send(&FromPlugin::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            plugin: opts.plugin.clone(),
            pid: std::process::id(),
            subscriptions,
            capabilities: CAPABILITIES.iter().map(|c| (*c).to_owned()).collect(),
        }))
        .await?;
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.read::<ToPlugin>())
        .await
        .map_err(|_| {
            HostError::Handshake(format!("no answer to Hello within {HANDSHAKE_TIMEOUT:?}"))
        })??;
    match answer {
        Some(ToPlugin::Welcome(welcome)) => {
            if let Err(e) = plugin.configure(&welcome.config) {
                tracing::error!("invalid config for plugin `{}`: {e}", opts.plugin);
                return Ok(None);
            }
            // One word per field, so the front can log them as fields of their own.
            let subscribed = [
                ("request_start", subscriptions.request_start),
                ("response_headers", subscriptions.response_headers),
                ("chunks", subscriptions.chunks),
                ("body_bytes", subscriptions.body_bytes),
                ("abort", subscriptions.abort),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(",");
            tracing::info!(
                version = welcome.protocol_version,
                subscriptions = %subscribed,
                capabilities = %welcome.capabilities.join(","),
                workers = opts.workers,
                budget_bytes = welcome.budget_bytes,
                metadata_max_bytes = welcome.metadata_max_bytes,
                "connected to the front"
            );
            Ok(Some((reader, wr, welcome)))
        }
        Some(ToPlugin::Refuse(refuse)) => {
            tracing::error!(
                code = ?refuse.code,
                "the front refused plugin `{}`: {}",
                opts.plugin,
                refuse.reason
            );
            Ok(None)
        }
        Some(other) => Err(HostError::Handshake(format!(
            "expected Welcome or Refuse, got {}",
            other.kind()
        ))),
        None => Err(HostError::Handshake(
            "the front closed the connection before answering Hello".into(),
        )),
    }
}

/// Serves one welcomed connection with its own plugin instance, lanes, window and credit.
#[allow(clippy::too_many_arguments)]
async fn run_connection<P: Plugin>(
    id: u64,
    plugin: P,
    opts: &HostOptions,
    mut reader: FrameReader<ReadHalf>,
    wr: WriteHalf,
    welcome: Welcome,
    reports: &mpsc::UnboundedSender<Report>,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Result<Exit, HostError> {
    let replies = Arc::new(Replies {
        half: wr,
        pending: std::sync::Mutex::new(Pending::default()),
        wake: Notify::new(),
    });
    let writer_task = tokio::spawn(replies.clone().drain_when_writable());
    // The host adds gaps/partial to the namespace the plugin itself writes; under `--as`, that
    // namespace is renamed on the way out, so several instances of one built-in stay apart.
    let own_namespace = format!(
        "plugvisor.{}",
        opts.runs.as_deref().unwrap_or(opts.plugin.as_str())
    );
    let rename = opts
        .runs
        .as_ref()
        .map(|_| (own_namespace.clone(), format!("plugvisor.{}", opts.plugin)));
    let metadata_max = welcome.metadata_max_bytes;
    let plugin_name = opts.plugin.clone();
    let out: Outbox = {
        let replies = replies.clone();
        Arc::new(move |mut msg| {
            match &mut msg {
                FromPlugin::FinalReply(reply) => {
                    if let (Some((from, to)), FinalOutcome::Metadata(md)) =
                        (&rename, &mut reply.outcome)
                    {
                        rename_namespace(md, from, to);
                    }
                    cap_metadata(reply, metadata_max, &plugin_name);
                }
                FromPlugin::Spans(spans) if !spans_fit(spans, metadata_max) => return,
                _ => {}
            }
            replies.send(msg);
        })
    };
    let traced = welcome
        .capabilities
        .iter()
        .any(|c| c == ipc_protocol::handshake::capability::TRACE);
    let credits = Credits::new(
        welcome.budget_bytes,
        out.clone(),
        welcome
            .capabilities
            .iter()
            .any(|c| c == ipc_protocol::handshake::capability::CREDIT_ON_PING),
    );
    let consumed = credits.clone();
    let lanes = Lanes::start(
        Arc::new(plugin),
        LaneConfig {
            workers: opts.workers,
            queue_events: opts.lane_queue_events,
            queue_bytes: opts.lane_queue_bytes,
            plugin: opts.plugin.clone(),
            namespace: own_namespace,
            trace: traced,
        },
        out,
        credits,
    )
    .map_err(HostError::Workers)?;

    let sweep = (opts.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(10));
    let mut sweeper = tokio::time::interval(sweep);
    sweeper.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let exit = loop {
        tokio::select! {
            told = told(stop) => {
                match told {
                    Some(Stop::Shutdown(grace)) => {
                        tracing::info!(conn = id, grace_ms = grace.as_millis() as u64, "the process is shutting down; draining this connection's lanes");
                        drain_reading(&mut reader, &lanes, &replies, grace, opts.stuck_after).await?;
                    }
                    Some(Stop::Signal(grace)) => drain(&lanes, grace).await,
                    // The host is gone (it cannot be while this runs): stop.
                    None => {}
                }
                break Exit::Clean;
            }
            frame = reader.read::<ToPlugin>() => match frame {
                Ok(Some(ToPlugin::Ping(ping))) => {
                    replies.send(pong(&lanes, ping.nonce, opts.stuck_after));
                }
                Ok(Some(ToPlugin::Shutdown(shutdown))) => {
                    let grace = Duration::from_millis(shutdown.grace_ms);
                    tracing::info!(grace_ms = shutdown.grace_ms, "shutdown requested; draining lanes");
                    let _ = reports.send(Report::Shutdown { conn: id, grace });
                    drain_reading(&mut reader, &lanes, &replies, grace, opts.stuck_after).await?;
                    break Exit::Clean;
                }
                Ok(Some(ToPlugin::Reconnect(reconnect))) => {
                    let _ = reports.send(Report::Reconnect { conn: id, reason: reconnect.reason });
                }
                Ok(Some(msg @ (ToPlugin::Welcome(_) | ToPlugin::Refuse(_)))) => {
                    tracing::warn!(kind = msg.kind(), "unexpected handshake message after Welcome; ignored");
                }
                Ok(Some(msg)) => {
                    // A replayed event counts its whole `Replayed` frame, like a live one.
                    let frame_len = reader.last_frame_len();
                    let (event, replayed) = msg.into_event()?;
                    lanes.submit(event, frame_len, replayed);
                }
                Ok(None) => {
                    tracing::info!(conn = id, "the front closed the connection");
                    break Exit::Clean;
                }
                Err(e) if e.is_peer_reset() => {
                    tracing::info!(conn = id, "the front closed the connection (before reading all this plugin sent)");
                    break Exit::Clean;
                }
                Err(e) => return Err(HostError::Protocol(e)),
            },
            lost = lanes.worker_lost() => {
                tracing::error!(
                    lost,
                    workers = opts.workers,
                    "a worker thread ended unexpectedly; ending the connection with status 1 so the plugin is restarted"
                );
                break Exit::Failed;
            }
            _ = sweeper.tick() => {
                lanes.evict_idle(opts.idle_timeout);
            }
        }
    };

    replies.flushed(Duration::from_secs(2)).await;
    let stats = lanes.stats();
    tracing::info!(
        conn = id,
        dropped = stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
        evicted = stats.evicted.load(std::sync::atomic::Ordering::Relaxed),
        panics = stats.panics.load(std::sync::atomic::Ordering::Relaxed),
        replayed = stats.replayed.load(std::sync::atomic::Ordering::Relaxed),
        consumed_bytes = consumed.consumed(),
        "connection done"
    );
    writer_task.abort();
    Ok(exit)
}

/// Whether `spans` fits `max` bytes (`Welcome.metadata_max_bytes`, the front's cap on a
/// `Spans`); one that does not is dropped with a warning, the final reply still goes. Measured
/// as its whole frame (prefix, the one-byte `FromPlugin` index, the fields), the largest reading
/// of "its encoding", so that no front drops what this host sends.
fn spans_fit(spans: &Spans, max: u64) -> bool {
    match ipc_protocol::codec::encoded_len(spans).map(|fields| PREFIX_LEN + 1 + fields) {
        Ok(len) if len as u64 <= max => true,
        Ok(len) => {
            tracing::warn!(
                stream_id = spans.stream_id,
                len,
                max,
                "trace spans over metadata_max_bytes; not sent"
            );
            false
        }
        Err(e) => {
            tracing::warn!(stream_id = spans.stream_id, error = %e, "trace spans not encodable; not sent");
            false
        }
    }
}

/// Replaces metadata that encodes larger than `max` bytes by an error naming both sizes: the
/// front would refuse it anyway, and a plugin must not make the front buffer unbounded replies.
fn cap_metadata(reply: &mut FinalReply, max: u64, plugin: &str) {
    let FinalOutcome::Metadata(md) = &reply.outcome else {
        return;
    };
    let len = match ipc_protocol::codec::encoded_len(md) {
        Ok(len) => len as u64,
        Err(e) => {
            reply.outcome = FinalOutcome::Error(format!("metadata not encodable: {e}"));
            return;
        }
    };
    if len <= max {
        return;
    }
    let msg = format!(
        "metadata of {len} bytes is over metadata_max_bytes ({max}); plugin `{plugin}` must \
         return less, or raise metadata_max_bytes in the front's config"
    );
    tracing::warn!(
        stream_id = reply.stream_id,
        call_id = reply.call_id,
        len,
        max,
        "final metadata over metadata_max_bytes; replying with an error instead"
    );
    reply.outcome = FinalOutcome::Error(msg);
}

/// Moves the namespace `from` to `to` (`--as`); if both exist and are maps, `from`'s keys win.
fn rename_namespace(md: &mut Metadata, from: &str, to: &str) {
    let Some(value) = md.remove(from) else {
        return;
    };
    match (md.get_mut(to), value) {
        (Some(Value::Map(existing)), Value::Map(moved)) => existing.extend(moved),
        (_, value) => {
            md.insert(to.to_owned(), value);
        }
    }
}

/// The answer to `Ping{nonce}`: from the reading loop, whatever the lanes are doing.
fn pong<P: Plugin>(lanes: &Lanes<P>, nonce: u64, stuck_after: Duration) -> FromPlugin {
    // Credit first: a front on `credit_on_ping` may be waiting for it.
    lanes.pinged();
    let pong = Pong {
        nonce,
        active_streams: lanes.active_streams(),
        stuck: lanes.stuck(stuck_after),
    };
    if !pong.stuck.is_empty() {
        tracing::warn!(stuck = ?pong.stuck, "lanes stuck in one event");
    }
    FromPlugin::Pong(pong)
}

/// How long the lanes must stay idle, with nothing more read, before a plugin told to shut down
/// exits early.
const QUIET_AFTER_SHUTDOWN: Duration = Duration::from_millis(50);

/// After `Shutdown`: the front's `Shutdown` overtakes the events it had queued, so keep reading
/// within the grace, running those events and answering their finals (and pings), until the
/// lanes are idle and nothing more came for [`QUIET_AFTER_SHUTDOWN`], the front closes the
/// connection, or the grace is over.
async fn drain_reading<P: Plugin>(
    reader: &mut FrameReader<ReadHalf>,
    lanes: &Lanes<P>,
    replies: &Replies,
    grace: Duration,
    stuck_after: Duration,
) -> Result<(), HostError> {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        // The deadline branch below bounds this.
        let quiet = async {
            while !lanes.is_idle() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(QUIET_AFTER_SHUTDOWN).await;
        };
        tokio::select! {
            frame = reader.read::<ToPlugin>() => match frame {
                Ok(Some(ToPlugin::Ping(ping))) => replies.send(pong(lanes, ping.nonce, stuck_after)),
                Ok(Some(msg @ (ToPlugin::Welcome(_) | ToPlugin::Refuse(_) | ToPlugin::Shutdown(_) | ToPlugin::Reconnect(_)))) => {
                    tracing::debug!(kind = msg.kind(), "ignored while shutting down");
                }
                Ok(Some(msg)) => {
                    let frame_len = reader.last_frame_len();
                    let (event, replayed) = msg.into_event()?;
                    lanes.submit(event, frame_len, replayed);
                }
                Ok(None) => return Ok(()),
                Err(e) if e.is_peer_reset() => return Ok(()),
                Err(e) => return Err(HostError::Protocol(e)),
            },
            () = quiet => return Ok(()),
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    active_streams = lanes.active_streams(),
                    "grace period over with events still queued or running; exiting anyway"
                );
                return Ok(());
            }
        }
    }
}

/// Waits until no event is queued, running or being answered, or `grace` has passed.
async fn drain<P: Plugin>(lanes: &Lanes<P>, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    while !lanes.is_idle() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                active_streams = lanes.active_streams(),
                "grace period over with events still queued or running; exiting anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The write half of the connection, shared by every thread that answers the front.
///
/// A final reply used to cross to a writer task on the reader's thread before it was written:
/// one more thread wake-up on every final RPC, which measured as most of its round trip beyond
/// the raw socket's (see docs/benchmarks.md). Now the thread that has the answer writes it with
/// one non-blocking `write` under a lock, which also keeps frames whole and in order. What the
/// socket does not take (its buffer is full) is kept, and everything after it is appended, until
/// [`Replies::drain_when_writable`] has written it.
struct Replies {
    half: WriteHalf,
    pending: std::sync::Mutex<Pending>,
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    /// Encoded frames not yet written; non-empty means the drain task has been woken.
    buf: Vec<u8>,
    /// A write failed: the front is gone, drop everything.
    failed: bool,
}

impl Replies {
    /// Writes `msg` now, or queues it behind what the socket has not taken yet.
    fn send(&self, msg: FromPlugin) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.failed {
            return;
        }
        let was_empty = pending.buf.is_empty();
        encode(&msg, &mut pending.buf);
        if was_empty {
            self.write_some(&mut pending);
            if !pending.buf.is_empty() {
                self.wake.notify_one();
            }
        }
    }

    /// Writes as much of the buffer as the socket takes without blocking.
    fn write_some(&self, pending: &mut Pending) {
        while !pending.buf.is_empty() {
            match self.half.try_write(&pending.buf) {
                Ok(0) => {
                    pending.failed = true;
                    pending.buf.clear();
                }
                Ok(n) => {
                    pending.buf.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write to the front");
                    pending.failed = true;
                    pending.buf.clear();
                }
            }
        }
    }

    /// Writes what [`Replies::send`] could not, whenever the socket is writable again.
    async fn drain_when_writable(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            loop {
                {
                    let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                    self.write_some(&mut pending);
                    if pending.buf.is_empty() {
                        break;
                    }
                }
                if self.half.writable().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Waits until everything sent is written (or the connection failed), at most `limit`.
    async fn flushed(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .buf
                .is_empty()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Appends `msg` as one frame (the layout of `ipc_protocol::FrameWriter`); a final reply too large
/// for a frame is replaced by an error reply so the front is not left waiting.
fn encode(msg: &FromPlugin, buf: &mut Vec<u8>) {
    if let Err(e) = try_encode(msg, buf) {
        tracing::error!(error = %e, kind = msg.kind(), "cannot encode a message for the front");
        if let FromPlugin::FinalReply(reply) = msg {
            let fallback = FromPlugin::FinalReply(FinalReply {
                call_id: reply.call_id,
                stream_id: reply.stream_id,
                outcome: FinalOutcome::Error(format!("metadata not sendable: {e}")),
            });
            let _ = try_encode(&fallback, buf);
        }
    }
}

fn try_encode(msg: &FromPlugin, buf: &mut Vec<u8>) -> Result<(), String> {
    let start = buf.len();
    buf.extend_from_slice(&[0; PREFIX_LEN]);
    match ipc_protocol::codec::encode_into(msg, buf) {
        Ok(len) if len <= DEFAULT_MAX_FRAME => {
            buf[start..start + PREFIX_LEN].copy_from_slice(&(len as u32).to_le_bytes());
            Ok(())
        }
        Ok(len) => {
            buf.truncate(start);
            Err(format!(
                "frame of {len} bytes is over the {DEFAULT_MAX_FRAME}-byte limit"
            ))
        }
        Err(e) => {
            buf.truncate(start);
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What happens to the host's connections, step by step, and what it does or how the
    /// process exits after each step.
    enum Step {
        Report(Report),
        Signal,
        Ended(u64, Exit),
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Then {
        Do(Action),
        Exits(Exit),
        GoOn,
    }

    fn play(steps: Vec<(Step, Then)>) {
        let mut c = Connections::default();
        assert_eq!(c.start(), Action::Open(1));
        for (i, (step, want)) in steps.into_iter().enumerate() {
            let got = match step {
                Step::Report(r) => Then::Do(c.report(r)),
                Step::Signal => Then::Do(c.signal(Duration::from_secs(5))),
                Step::Ended(id, exit) => c.ended(id, exit).map_or(Then::GoOn, Then::Exits),
            };
            assert_eq!(got, want, "step {i}");
        }
    }

    fn reconnect(conn: u64) -> Step {
        Step::Report(Report::Reconnect {
            conn,
            reason: "config changed".into(),
        })
    }

    #[test]
    fn connections_table() {
        use Then::*;
        let secs = Duration::from_secs;
        // A plain run: welcomed, closed by the front.
        play(vec![
            (Step::Report(Report::Welcomed(1)), Do(Action::None)),
            (Step::Ended(1, Exit::Clean), Exits(Exit::Clean)),
        ]);
        // Refused at start: 78.
        play(vec![(Step::Ended(1, Exit::Config), Exits(Exit::Config))]);
        // Reconnect: a second connection; the old one's end does not end the process; a second
        // Reconnect while the first is under way is ignored, one after it is not.
        play(vec![
            (Step::Report(Report::Welcomed(1)), Do(Action::None)),
            (reconnect(1), Do(Action::Open(2))),
            (reconnect(1), Do(Action::None)),
            (Step::Report(Report::Welcomed(2)), Do(Action::None)),
            (Step::Ended(1, Exit::Clean), GoOn),
            (reconnect(2), Do(Action::Open(3))),
            (Step::Report(Report::Welcomed(3)), Do(Action::None)),
            (Step::Ended(3, Exit::Clean), GoOn),
            (Step::Ended(2, Exit::Clean), Exits(Exit::Clean)),
        ]);
        // A refused reconnection: the old connection goes on, then the process exits 78.
        play(vec![
            (Step::Report(Report::Welcomed(1)), Do(Action::None)),
            (reconnect(1), Do(Action::Open(2))),
            (Step::Ended(2, Exit::Config), GoOn),
            (Step::Ended(1, Exit::Clean), Exits(Exit::Config)),
        ]);
        // ... unless a later one was welcomed; a failed (not refused) one changes nothing.
        play(vec![
            (Step::Report(Report::Welcomed(1)), Do(Action::None)),
            (reconnect(1), Do(Action::Open(2))),
            (Step::Ended(2, Exit::Config), GoOn),
            (reconnect(1), Do(Action::Open(3))),
            (Step::Ended(3, Exit::Failed), GoOn),
            (reconnect(1), Do(Action::Open(4))),
            (Step::Report(Report::Welcomed(4)), Do(Action::None)),
            (Step::Ended(1, Exit::Clean), GoOn),
            (Step::Ended(4, Exit::Clean), Exits(Exit::Clean)),
        ]);
        // Shutdown on any connection stops them all, once; no reconnection while stopping.
        play(vec![
            (Step::Report(Report::Welcomed(1)), Do(Action::None)),
            (reconnect(1), Do(Action::Open(2))),
            (Step::Report(Report::Welcomed(2)), Do(Action::None)),
            (
                Step::Report(Report::Shutdown {
                    conn: 1,
                    grace: secs(2),
                }),
                Do(Action::Stop(Stop::Shutdown(secs(2)))),
            ),
            (Step::Signal, Do(Action::None)),
            (reconnect(2), Do(Action::None)),
            (Step::Ended(2, Exit::Clean), GoOn),
            (Step::Ended(1, Exit::Clean), Exits(Exit::Clean)),
        ]);
        // A signal drains all.
        play(vec![
            (Step::Report(Report::Welcomed(1)), Do(Action::None)),
            (Step::Signal, Do(Action::Stop(Stop::Signal(secs(5))))),
            (Step::Ended(1, Exit::Clean), Exits(Exit::Clean)),
        ]);
    }

    #[test]
    fn metadata_at_the_cap_passes_and_one_byte_over_becomes_an_error() {
        let md = Metadata::from([(
            "plugvisor.x".to_owned(),
            Value::map([("k", Value::from("v".repeat(100)))]),
        )]);
        let len = ipc_protocol::codec::encoded_len(&md).unwrap() as u64;
        let reply = |md: &Metadata| FinalReply {
            call_id: 1,
            stream_id: 2,
            outcome: FinalOutcome::Metadata(md.clone()),
        };
        let mut at = reply(&md);
        cap_metadata(&mut at, len, "x");
        assert_eq!(at.outcome, FinalOutcome::Metadata(md.clone()));
        let mut over = reply(&md);
        cap_metadata(&mut over, len - 1, "x");
        match over.outcome {
            FinalOutcome::Error(e) => {
                let want = format!(
                    "metadata of {len} bytes is over metadata_max_bytes ({})",
                    len - 1
                );
                assert!(e.starts_with(&want), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let mut error = FinalReply {
            call_id: 1,
            stream_id: 2,
            outcome: FinalOutcome::Error("boom".into()),
        };
        cap_metadata(&mut error, 0, "x");
        assert_eq!(error.outcome, FinalOutcome::Error("boom".into()));
    }

    #[test]
    fn spans_at_the_cap_as_a_whole_frame_pass_and_one_byte_over_are_dropped() {
        let spans = Spans {
            stream_id: 7,
            attributes: vec![("k".into(), Value::from("v".repeat(100)))],
            spans: vec![],
        };
        let frame = ipc_protocol::codec::encoded_len(&FromPlugin::Spans(spans.clone())).unwrap()
            + PREFIX_LEN;
        assert!(spans_fit(&spans, frame as u64));
        assert!(!spans_fit(&spans, frame as u64 - 1));
    }

    #[test]
    fn rename_moves_the_namespace_and_merges_into_an_existing_map() {
        let mut md = Metadata::from([
            (
                "plugvisor.test-spin".to_owned(),
                Value::map([("events", Value::from(3u64))]),
            ),
            (
                "envoy.lb".to_owned(),
                Value::map([("x", Value::from(1u64))]),
            ),
        ]);
        rename_namespace(&mut md, "plugvisor.test-spin", "plugvisor.spin1");
        assert!(!md.contains_key("plugvisor.test-spin"));
        assert_eq!(
            md["plugvisor.spin1"].get("events"),
            Some(&Value::from(3u64))
        );
        assert!(md.contains_key("envoy.lb"));

        let mut md = Metadata::from([
            (
                "plugvisor.a".to_owned(),
                Value::map([("k", Value::from(1u64))]),
            ),
            (
                "plugvisor.b".to_owned(),
                Value::map([("j", Value::from(2u64))]),
            ),
        ]);
        rename_namespace(&mut md, "plugvisor.a", "plugvisor.b");
        assert_eq!(md.len(), 1);
        assert_eq!(md["plugvisor.b"].get("k"), Some(&Value::from(1u64)));
        assert_eq!(md["plugvisor.b"].get("j"), Some(&Value::from(2u64)));

        // Nothing to rename: untouched.
        let mut md = Metadata::new();
        rename_namespace(&mut md, "plugvisor.a", "plugvisor.b");
        assert!(md.is_empty());
    }
}
