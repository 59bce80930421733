//! A [`PluginLink`]: everything the front keeps about one configured plugin, independent of the
//! process currently serving it.
//!
//! A link outlives connections: a plugin that reconnects (after a restart, or a developer attaching
//! one in gdb) gets a new [`Conn`] on the same link, and streams in progress carry on with their
//! sequence numbers, so the plugin sees the gap. Each connection has a bounded queue (events and
//! body bytes) drained by a writer task that batches frames into few syscalls (a stream that
//! waits for an answer takes the writer's turn itself: [`PluginLink::write_now`]), and a reader
//! task that routes `FinalReply` to the waiting final call, `Ack` to the waiting inline chunk,
//! `Pong` to the liveness record and `Credit` to the writer.
//!
//! Flow control (protocol version 2): the writer keeps the event bytes written and not yet
//! credited back at or below the plugin's `budget_bytes` ([`window_allows`]); an event that does
//! not fit waits for `Credit`, and meanwhile the backlog stays in the bounded queue, where
//! overflow is dropped and counted. Pings and `Shutdown` go through a small priority channel the
//! writer serves before any queued event and never hold to the window, so a plugin busy with a
//! full window still answers pings, and a full queue never drops one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipc_protocol::frame::{BATCH_BYTES, PREFIX_LEN};
use ipc_protocol::{
    Ack, Credit, FinalOutcome, FinalReply, FrameReader, FrameWriter, FromPlugin, Metadata, Ping,
    Spans, StreamId, Subscriptions, ToPlugin,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::PluginConfig;
use crate::observe::metrics::{Metrics, PluginLabel};
use crate::quiet_socket::{ReadHalf, WriteHalf};

mod clock;
pub use clock::BatchClock;

/// Why a plugin contributed nothing to a stream's final metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// No live connection.
    Down,
    /// No answer within `final_timeout`.
    Timeout,
    /// The plugin answered with an error.
    Failed,
    /// The stream's event hung a lane of the plugin past `stuck_timeout_ms`; the plugin was
    /// restarted and the stream not replayed (it would hang the replacement too).
    Stuck,
    /// No process is coming: the operator stopped the plugin, or its policy does not restart it.
    Stopped,
    /// No process is coming: the plugin failed past its restart intensity limit.
    GaveUp,
    /// No process is coming: the plugin is external (`spawn = false`) and not connected.
    NotConnected,
    /// The plugin restarts, but only after the final's deadline (its backoff).
    Backoff,
    /// The stream ended without a response end and the plugin does not answer for such streams
    /// (it did not agree on the capability `aborted_final`): it got `Abort`, if subscribed.
    NotAsked,
}

impl Missing {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Missing::Down => "down",
            Missing::Timeout => "timeout",
            Missing::Failed => "failed",
            Missing::Stuck => "stuck",
            Missing::Stopped => "stopped",
            Missing::GaveUp => "gave_up",
            Missing::NotConnected => "not_connected",
            Missing::Backoff => "backoff",
            Missing::NotAsked => "not_asked",
        }
    }
}

/// Whether a process is on its way to serve the plugin while none is connected, as its owner
/// knows: a final waits (within its deadline) only for one that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// A process is starting or serving, or restarts `at` (after a backoff).
    Coming {
        /// When a restart after a backoff is due; `None`: now.
        at: Option<tokio::time::Instant>,
    },
    /// None is, and why (one of the `Missing` reasons that say so).
    NotComing(Missing),
}

/// Why an event did not reach a plugin's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// No live connection.
    Down,
    /// The queue is full (events or bytes).
    QueueFull,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::Down => "down",
            Dropped::QueueFull => "queue_full",
        }
    }
}

struct Queued {
    msg: ToPlugin,
    bytes: usize,
    /// From a stream's journal (bounded by `replay_bytes`), so not counted against `queue_bytes`:
    /// a replay burst must not make the queue drop the live events that follow it.
    replayed: bool,
    /// Also kept in its stream's journal: if the connection goes before it is written, the
    /// replacement gets it in the replay, so it is not counted as dropped.
    journaled: bool,
}

/// Room for control messages waiting for the writer: a ping per heartbeat and a shutdown; more
/// than this waiting means the socket itself is stuck, and the heartbeat notices.
const PRIORITY_SLOTS: usize = 16;

/// Whether an event whose frame is `frame_len` bytes may be written while `in_flight` event bytes
/// are written and not yet credited, under a window of `budget` bytes. With nothing in flight any
/// one event may go, so an event larger than the window cannot deadlock the connection.
pub(crate) fn window_allows(in_flight: u64, frame_len: u64, budget: u64) -> bool {
    in_flight == 0 || in_flight.saturating_add(frame_len) <= budget
}

/// What a final call's reply brings: the plugin's outcome, and the `Spans` it sent before it
/// (for a traced stream only).
pub type Reply = (FinalOutcome, Option<Box<Spans>>);

/// A final call waiting for its reply.
struct Waiting {
    /// The stream it is about.
    stream: StreamId,
    /// The stream is traced: a `Spans` for it is kept for the reply (else dropped uncounted).
    traced: bool,
    /// The `Spans` the plugin sent for the call, waiting for the reply.
    spans: Option<Box<Spans>>,
    reply: oneshot::Sender<Reply>,
}

/// What the writer of a connection keeps between turns ([`PluginLink::turn`]). In its [`Conn`]
/// behind a lock, so that a stream waiting for an answer can take a turn itself
/// ([`PluginLink::write_now`]); the writer task holds the lock for a turn, never across a wait.
struct Outgoing {
    writer: FrameWriter<WriteHalf>,
    rx: mpsc::Receiver<Queued>,
    /// Pings and shutdown, written ahead of `rx`'s events and never held to the window.
    priority: mpsc::Receiver<ToPlugin>,
    replay: mpsc::UnboundedReceiver<Queued>,
    /// Live events taken off the queue together, reordered so that the streams waiting for an
    /// answer go first (see `waiting_streams_first`).
    staged: VecDeque<Queued>,
    /// The next event, taken off the queue and waiting for room in the window, with its counted
    /// frame length.
    held: Option<(Queued, u64)>,
    /// While events flow under a `batch_ms`: when the batch goes.
    cadence: Option<tokio::time::Instant>,
    /// What is fed goes at once: something waits for an answer, or a control message.
    urgent: bool,
}

impl Outgoing {
    /// Nothing left to write: no control message, event or fed byte.
    fn is_drained(&self) -> bool {
        self.writer.pending_bytes() == 0
            && self.held.is_none()
            && self.staged.is_empty()
            && self.rx.is_empty()
            && self.replay.is_empty()
            && self.priority.is_empty()
    }
}

/// What a writer turn leaves to wait for.
enum Turn {
    /// It wrote: take another turn.
    Again,
    /// What is fed did not all fit in the socket: wait for room.
    Full,
    /// Nothing is due: wait for the next event (unless a batch is held: the batch clock sends
    /// it) or credit.
    Idle {
        listening: bool,
        waiting_for_credit: bool,
    },
}

/// A connection being replaced, as `plugvisor status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Draining {
    /// The process on the other end.
    pub pid: u32,
    /// Streams it still serves.
    pub streams: u64,
    /// Time left before its streams move to the new process.
    pub grace_left_ms: Option<u64>,
}

/// One live connection of a plugin.
pub struct Conn {
    /// This connection, for the batch clock to come back to.
    me: std::sync::Weak<Conn>,
    /// Its link, for the batch clock.
    link: std::sync::Weak<PluginLink>,
    generation: u64,
    pid: u32,
    subscriptions: Subscriptions,
    /// The protocol version agreed in the handshake.
    protocol_version: u32,
    /// Agreed in the handshake: the plugin decodes `Replayed` frames.
    replays: bool,
    /// Agreed in the handshake: the plugin answers `AbortedFinal` calls.
    aborted_finals: bool,
    /// Agreed in the handshake: the plugin follows `Reconnect` with a second connection.
    reconnects: bool,
    /// Agreed in the handshake: the plugin may hold back `Credit` until a `Ping`, so the writer
    /// pings when it waits for room in the window.
    credit_on_ping: bool,
    /// The window the `Welcome` gave the plugin (`budget_bytes`): the connection keeps it, also
    /// across a reload that changes the setting for the next one.
    budget: u64,
    /// Rung when an urgent event (a final call, an inline chunk), a batch's worth of events or a
    /// control message is queued, so a writer holding a batch (`batch_ms`) sends at once.
    urgent: tokio::sync::Notify,
    /// Rung for every event queued: wakes a writer that waits for the next one.
    queued: tokio::sync::Notify,
    /// Rung when a turn taken outside the writer task changed what the writer task waits for:
    /// its batch ended (it waits for the next event again), or the window filled (it waits for
    /// credit).
    wait_changed: tokio::sync::Notify,
    /// The writer's state between turns: its task's, lent to [`PluginLink::write_now`].
    out: Mutex<Outgoing>,
    /// Asked to reconnect: its process has (or is opening) another connection, so this one is
    /// ended by closing it, never by `Shutdown` (which would end the process).
    moved: std::sync::atomic::AtomicBool,
    /// Agreed in the handshake (capability `trace`): the plugin reads the front's `traceparent`
    /// and may send `Spans`.
    trace: bool,
    tx: mpsc::Sender<Queued>,
    /// Pings and shutdown, written ahead of `tx`'s events and never held to the window.
    priority: mpsc::Sender<ToPlugin>,
    /// Replayed journals of streams that moved to this connection: written before any event of
    /// `tx` (so a stream's replay always precedes its live events), held to the window like any
    /// event. Unbounded here because what it holds is bounded by the link's `replay_bytes`.
    replay: mpsc::UnboundedSender<Queued>,
    queued_bytes: Arc<AtomicUsize>,
    /// Events the writer has taken off `tx` to reorder them but not written yet: still queued,
    /// as far as `queue_events` counts.
    staged: AtomicUsize,
    /// Counted event bytes written to the socket (or about to be, in the writer's buffer).
    written: AtomicU64,
    /// The largest `Credit.consumed` received.
    consumed: watch::Sender<u64>,
    /// Final calls waiting for their reply, by call id.
    finals: Mutex<HashMap<u64, Waiting>>,
    acks: Mutex<HashMap<(StreamId, u32), oneshot::Sender<()>>>,
    closed: watch::Sender<bool>,
    since: Instant,
    /// Streams bound to this connection (they send it their events until they end).
    bound_streams: AtomicUsize,
    /// Being replaced: takes no new stream, gets `Shutdown` once its last stream ends.
    draining: std::sync::atomic::AtomicBool,
    /// Since when the writer has held an event for room in the window without the plugin
    /// crediting anything: a plugin that stops sending `Credit` is hung for the data path.
    stalled_since: Mutex<Option<Instant>>,
    /// While draining: when the streams it still has move to the next connection. Checked by the
    /// plugin's owner ([`PluginLink::expire_drains`]), which sleeps until the earliest one.
    drain_until: Mutex<Option<tokio::time::Instant>>,
    /// Told to shut down: its end is planned, not a failure.
    shutdown_sent: std::sync::atomic::AtomicBool,
}

impl Conn {
    /// Whether the connection has ended (the plugin went away or was disconnected).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Whether it was being replaced (a planned restart, a reload): a stream that leaves it
    /// moves by handover, not because its process went away.
    pub fn was_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Which connection of its link this is (1, 2, ...).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the plugin asked to receive in its `Hello`.
    pub fn subscriptions(&self) -> Subscriptions {
        self.subscriptions
    }

    /// The pid the peer credentials reported.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the plugin said it decodes `Replayed` frames (capability `replayed`): without
    /// it, a stream's earlier events are not resent to this connection.
    pub fn replays(&self) -> bool {
        self.replays
    }

    /// Whether the plugin answers the final call of an aborted stream (capability
    /// `aborted_final`).
    pub fn aborted_finals(&self) -> bool {
        self.aborted_finals
    }

    /// Whether the plugin follows `Reconnect` (capability `reconnect`).
    pub fn reconnects(&self) -> bool {
        self.reconnects
    }

    /// Whether it was asked to reconnect (its process moves on to another connection).
    pub fn was_moved(&self) -> bool {
        self.moved.load(Ordering::Acquire)
    }

    /// Whether the plugin takes the front's `traceparent` and may send `Spans` (capability
    /// `trace`).
    pub fn traces(&self) -> bool {
        self.trace
    }

    /// The protocol version agreed in the handshake.
    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// Event bytes written and not yet credited back by the plugin.
    pub fn in_flight(&self) -> u64 {
        self.written
            .load(Ordering::Acquire)
            .saturating_sub(*self.consumed.borrow())
    }

    fn lock_out(&self) -> std::sync::MutexGuard<'_, Outgoing> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a control message (a ping, `Shutdown`, `Reconnect`): ahead of every event, never
    /// held to the window.
    fn send_control(&self, msg: ToPlugin) -> Result<(), mpsc::error::TrySendError<ToPlugin>> {
        self.priority.try_send(msg)?;
        self.urgent.notify_one();
        Ok(())
    }

    /// Live events queued and not yet written: in the queue, or staged by the writer.
    fn queued_events(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity() + self.staged.load(Ordering::Relaxed)
    }
}

/// The front's side of one configured plugin.
pub struct PluginLink {
    /// The plugin's name (a reload never changes it).
    name: String,
    /// Replaced in place by a reload that changes only what the front does with the plugin.
    config: std::sync::RwLock<Arc<PluginConfig>>,
    metrics: Arc<Metrics>,
    label: PluginLabel,
    /// Its series of `events_sent`, `queue_depth` and `queue_bytes`, which every event moves:
    /// looked up once here rather than per event.
    sent: prometheus_client::metrics::counter::Counter,
    depth: prometheus_client::metrics::gauge::Gauge,
    queued: prometheus_client::metrics::gauge::Gauge,
    /// Its `inflight_bytes`, which every write sets.
    inflight: prometheus_client::metrics::gauge::Gauge,
    /// Sends its connections' batches when they are due; shared by a front's links.
    clock: Arc<BatchClock>,
    conn: Mutex<Option<Arc<Conn>>>,
    generation: AtomicU64,
    connected: watch::Sender<bool>,
    /// Whether a process is on its way while none is connected (set by the owner).
    expected: watch::Sender<Expected>,
    spawned_pid: Mutex<Option<u32>>,
    last_pong: Mutex<Option<Instant>>,
    next_call: AtomicU64,
    /// Bytes of in-flight streams' journals (bounded by `replay_bytes`).
    journal_used: AtomicUsize,
    /// Connections being replaced, finishing the streams they have.
    draining: Mutex<Vec<Arc<Conn>>>,
    /// Lanes the plugin's last `Pong` reported stuck in one event.
    stuck: Mutex<Vec<ipc_protocol::StuckLane>>,
    /// Streams whose event hung the plugin: never replayed to a replacement.
    poisoned: Mutex<std::collections::HashSet<StreamId>>,
    /// What the last connection subscribed to (what streams assume while the plugin is down).
    last_subscriptions: Mutex<Subscriptions>,
    /// Whether the last connection answered aborted streams' finals (what streams assume while
    /// the plugin is down).
    last_aborted_finals: std::sync::atomic::AtomicBool,
    /// The writer and reader tasks of its connections, live and draining.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The last error line of its processes (their output, or a refused handshake).
    last_error: crate::plugin::spawn::LastError,
    /// After a `Reconnect` that handed the plugin over: when the front stops waiting for its new
    /// connection (checked by the owner with the drains).
    reconnect_until: Mutex<Option<tokio::time::Instant>>,
}

impl PluginLink {
    /// A link without a connection, with a batch clock of its own.
    pub fn new(config: PluginConfig, metrics: Arc<Metrics>) -> PluginLink {
        PluginLink::with_clock(config, metrics, BatchClock::new())
    }

    /// A link without a connection whose batches go by `clock` (a front's links share one).
    pub fn with_clock(
        config: PluginConfig,
        metrics: Arc<Metrics>,
        clock: Arc<BatchClock>,
    ) -> PluginLink {
        let label = Metrics::plugin(&config.name);
        let spawned = config.process.spawn;
        // Every per-plugin series exists from the start, so `increase()` sees the first restart
        // and a dashboard sees 0 rather than nothing.
        metrics.plugin_connected.get_or_create(&label).set(0);
        metrics.restarts.get_or_create(&label).inc_by(0);
        metrics.namespaces_denied.get_or_create(&label).inc_by(0);
        metrics.last_exit_code.get_or_create(&label).set(0);
        metrics.last_exit_signal.get_or_create(&label).set(0);
        let sent = metrics.events_sent.get_or_create(&label).clone();
        let depth = metrics.queue_depth.get_or_create(&label).clone();
        let queued = metrics.queue_bytes.get_or_create(&label).clone();
        let inflight = metrics.inflight_bytes.get_or_create(&label).clone();
        PluginLink {
            name: config.name.clone(),
            config: std::sync::RwLock::new(Arc::new(config)),
            sent,
            depth,
            queued,
            inflight,
            clock,
            metrics,
            label,
            conn: Mutex::new(None),
            generation: AtomicU64::new(0),
            connected: watch::channel(false).0,
            // A spawned plugin's process is started by its owner at once; an external one
            // comes when someone starts it.
            expected: watch::channel(if spawned {
                Expected::Coming { at: None }
            } else {
                Expected::NotComing(Missing::NotConnected)
            })
            .0,
            spawned_pid: Mutex::new(None),
            last_pong: Mutex::new(None),
            next_call: AtomicU64::new(1),
            journal_used: AtomicUsize::new(0),
            draining: Mutex::new(Vec::new()),
            stuck: Mutex::new(Vec::new()),
            poisoned: Mutex::new(std::collections::HashSet::new()),
            last_subscriptions: Mutex::new(Subscriptions::ALL),
            last_aborted_finals: std::sync::atomic::AtomicBool::new(false),
            last_error: Default::default(),
            tasks: Mutex::new(Vec::new()),
            reconnect_until: Mutex::new(None),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's configuration.
    pub fn config(&self) -> Arc<PluginConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Replaces the configuration (same name) for what comes next: new events, calls and
    /// connections use it; a connection already open keeps its queue's capacity.
    pub(in crate::plugin) fn set_config(&self, config: PluginConfig) {
        debug_assert_eq!(config.name, self.name);
        *self.config.write().expect("config lock") = Arc::new(config);
    }

    /// The live connection, if any.
    pub fn connection(&self) -> Option<Arc<Conn>> {
        self.conn.lock().expect("link lock").clone()
    }

    /// Whether the plugin answers the final call of an aborted stream: its live connection's
    /// agreement, else its last connection's.
    pub fn answers_aborted_finals(&self) -> bool {
        match self.connection() {
            Some(conn) => conn.aborted_finals,
            None => self.last_aborted_finals.load(Ordering::Acquire),
        }
    }

    /// What the plugin's last connection subscribed to (all events before the first).
    pub fn last_subscriptions(&self) -> Subscriptions {
        *self.last_subscriptions.lock().expect("subscriptions lock")
    }

    /// Whether a connection is live.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Whether a process is on its way while none is connected.
    pub fn expected(&self) -> Expected {
        *self.expected.borrow()
    }

    /// A receiver that changes whenever [`PluginLink::expected`] does.
    pub fn subscribe_expected(&self) -> watch::Receiver<Expected> {
        self.expected.subscribe()
    }

    /// The owner says whether a process is on its way.
    pub(in crate::plugin) fn set_expected(&self, expected: Expected) {
        self.expected.send_if_modified(|e| {
            let changed = *e != expected;
            *e = expected;
            changed
        });
    }

    /// A receiver that changes whenever a connection comes or goes.
    pub fn subscribe_connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// When the live connection was welcomed.
    pub fn connected_since(&self) -> Option<Instant> {
        self.connection().map(|c| c.since)
    }

    /// Waits until a connection is live.
    pub async fn wait_connected(&self) {
        let mut rx = self.connected.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// How long the plugin has given no sign of life: since its last pong, or since `since` (when
    /// its connection came up) if that is later. The one rule behind every hang check.
    pub fn silent_since(&self, since: Instant) -> Duration {
        self.last_pong().map_or(since, |p| p.max(since)).elapsed()
    }

    /// When the plugin last answered a ping.
    pub fn last_pong(&self) -> Option<Instant> {
        *self.last_pong.lock().expect("pong lock")
    }

    /// Records the pid the front spawned for this plugin: only that process may connect.
    pub(in crate::plugin) fn set_spawned_pid(&self, pid: Option<u32>) {
        *self.spawned_pid.lock().expect("pid lock") = pid;
    }

    /// The pid the front spawned, if it spawned one.
    pub fn spawned_pid(&self) -> Option<u32> {
        *self.spawned_pid.lock().expect("pid lock")
    }

    /// Installs an accepted, welcomed connection and starts its writer and reader tasks.
    pub(crate) fn attach(
        self: &Arc<Self>,
        pid: u32,
        subscriptions: Subscriptions,
        welcome: &ipc_protocol::Welcome,
        reader: FrameReader<ReadHalf>,
        writer: FrameWriter<WriteHalf>,
    ) -> Option<Arc<Conn>> {
        let mut slot = self.conn.lock().expect("link lock");
        if slot.is_some() {
            return None;
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // Sized for the largest `queue_events` accepted; the configured bound is checked at each
        // enqueue, so a reload's new bound applies to the open connection at once.
        let (tx, rx) = mpsc::channel(crate::config::MAX_QUEUE_EVENTS);
        let (priority, priority_rx) = mpsc::channel(PRIORITY_SLOTS);
        let (replay, replay_rx) = mpsc::unbounded_channel();
        let conn = Arc::new_cyclic(|me| Conn {
            me: me.clone(),
            link: Arc::downgrade(self),
            generation,
            pid,
            subscriptions,
            protocol_version: welcome.protocol_version,
            replays: welcome
                .capabilities
                .iter()
                .any(|c| c == ipc_protocol::handshake::capability::REPLAYED),
            aborted_finals: welcome
                .capabilities
                .iter()
                .any(|c| c == ipc_protocol::handshake::capability::ABORTED_FINAL),
            reconnects: welcome
                .capabilities
                .iter()
                .any(|c| c == ipc_protocol::handshake::capability::RECONNECT),
            moved: std::sync::atomic::AtomicBool::new(false),
            budget: welcome.budget_bytes,
            urgent: tokio::sync::Notify::new(),
            queued: tokio::sync::Notify::new(),
            wait_changed: tokio::sync::Notify::new(),
            out: Mutex::new(Outgoing {
                writer,
                rx,
                priority: priority_rx,
                replay: replay_rx,
                staged: VecDeque::new(),
                held: None,
                cadence: None,
                urgent: false,
            }),
            credit_on_ping: welcome
                .capabilities
                .iter()
                .any(|c| c == ipc_protocol::handshake::capability::CREDIT_ON_PING),
            trace: welcome
                .capabilities
                .iter()
                .any(|c| c == ipc_protocol::handshake::capability::TRACE),
            tx,
            priority,
            replay,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            staged: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            consumed: watch::channel(0).0,
            finals: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            closed: watch::channel(false).0,
            since: Instant::now(),
            bound_streams: AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            drain_until: Mutex::new(None),
            stalled_since: Mutex::new(None),
            shutdown_sent: std::sync::atomic::AtomicBool::new(false),
        });
        *slot = Some(conn.clone());
        drop(slot);
        *self.reconnect_until.lock().expect("reconnect lock") = None;
        *self.last_subscriptions.lock().expect("subscriptions lock") = subscriptions;
        self.last_aborted_finals
            .store(conn.aborted_finals, Ordering::Release);
        self.connected.send_replace(true);
        self.metrics
            .plugin_connected
            .get_or_create(&self.label)
            .set(1);
        tracing::info!(plugin = %self.name, pid, protocol = welcome.protocol_version, capabilities = ?welcome.capabilities, "plugin connected");
        if !conn.replays {
            tracing::warn!(plugin = %self.name, pid, protocol = welcome.protocol_version,
                "plugin does not decode Replayed frames: streams in flight when a process of it ends \
                 are not replayed to the next one (they end partial); build it against protocol 3 \
                 with the `replayed` capability");
        }
        self.inflight.set(0);
        let writer = tokio::spawn(self.clone().write_loop(conn.clone()));
        let reader = tokio::spawn(self.clone().read_loop(conn.clone(), reader));
        let mut tasks = self.tasks.lock().expect("tasks lock");
        tasks.retain(|t| !t.is_finished());
        tasks.extend([writer, reader]);
        Some(conn)
    }

    fn detach(&self, conn: &Conn, why: &str) {
        let mut slot = self.conn.lock().expect("link lock");
        if slot
            .as_ref()
            .is_some_and(|c| c.generation == conn.generation)
        {
            *slot = None;
            self.connected.send_replace(false);
            if !self.config().process.spawn {
                // Nobody here starts it again: finals report it at once instead of waiting.
                self.set_expected(Expected::NotComing(Missing::NotConnected));
            }
            self.metrics
                .plugin_connected
                .get_or_create(&self.label)
                .set(0);
            if conn.shutdown_sent.load(Ordering::Acquire) {
                tracing::info!(plugin = %self.name, pid = conn.pid, reason = why, "plugin disconnected after Shutdown");
            } else {
                tracing::warn!(plugin = %self.name, pid = conn.pid, reason = why, "plugin disconnected");
            }
        }
        drop(slot);
        self.draining
            .lock()
            .expect("draining lock")
            .retain(|c| c.generation != conn.generation);
        conn.closed.send_replace(true);
        // Dropping the senders wakes every waiter with "down".
        conn.finals.lock().expect("finals lock").clear();
        conn.acks.lock().expect("acks lock").clear();
    }

    /// A stream starts sending its events to `conn`.
    pub(crate) fn bind(&self, conn: &Conn) {
        conn.bound_streams.fetch_add(1, Ordering::AcqRel);
    }

    /// A stream bound to `conn` ended or moved on; a draining connection whose last stream this
    /// was is told to shut down.
    pub(crate) fn unbind(&self, conn: &Conn) {
        let before = conn.bound_streams.fetch_sub(1, Ordering::AcqRel);
        if before == 1 && conn.draining.load(Ordering::Acquire) {
            self.shutdown_drained(conn);
        }
    }

    fn shutdown_drained(&self, conn: &Conn) {
        if conn.moved.load(Ordering::Acquire) {
            // Its process serves another connection now: `Shutdown` would end that one too.
            tracing::info!(plugin = %self.name, pid = conn.pid, "the old connection finished its streams; closing it (the process serves its new one)");
            self.detach(conn, "handed over to the plugin's new connection");
            return;
        }
        conn.shutdown_sent.store(true, Ordering::Release);
        tracing::info!(plugin = %self.name, pid = conn.pid, "replaced process finished its streams; telling it to stop");
        let _ = conn.send_control(ToPlugin::Shutdown(ipc_protocol::Shutdown {
            grace_ms: 1000,
        }));
    }

    /// Hands the plugin over to its next connection (a planned restart, a reload, an upgrade):
    /// the live connection stops taking new streams, finishes the ones bound to it and is told
    /// to shut down after its last one; new streams wait in their journals for the next
    /// connection. After `grace` ([`PluginLink::expire_drains`], called by the owner), a
    /// connection still draining is closed and its streams move to the next connection with
    /// their journals. Returns how many streams it still serves.
    pub(in crate::plugin) fn begin_handover(&self, grace: Duration, why: &str) -> usize {
        let mut slot = self.conn.lock().expect("link lock");
        let Some(conn) = slot.take() else {
            return 0;
        };
        self.connected.send_replace(false);
        self.metrics
            .plugin_connected
            .get_or_create(&self.label)
            .set(0);
        if !self.config().process.spawn {
            // Someone else runs it: its next connection is what a handover waits for.
            self.set_expected(Expected::Coming { at: None });
        }
        conn.draining.store(true, Ordering::Release);
        *conn.drain_until.lock().expect("drain lock") = Some(tokio::time::Instant::now() + grace);
        self.draining
            .lock()
            .expect("draining lock")
            .push(conn.clone());
        drop(slot);
        let streams = conn.bound_streams.load(Ordering::Acquire);
        tracing::info!(plugin = %self.name, pid = conn.pid, streams, reason = why, "handing over to a new process; the current one finishes its streams");
        if streams == 0 {
            self.shutdown_drained(&conn);
        }
        streams
    }

    /// Hands the plugin over to a new connection of its own process (capability `reconnect`),
    /// for a reload that changed its config: like [`PluginLink::begin_handover`], and the live
    /// connection is asked to reconnect. New streams wait in their journals for the new
    /// connection; if none is welcomed within `wait`, finals stop waiting for it
    /// ([`PluginLink::expire_drains`]), and the old connection, closed once its streams end,
    /// ends the process (whoever runs it starts it again). `None` (nothing done) when the live
    /// connection cannot reconnect, or there is none.
    pub(in crate::plugin) fn hand_over_by_reconnect(
        &self,
        grace: Duration,
        wait: Duration,
        why: &str,
    ) -> Option<usize> {
        let conn = self.connection().filter(|c| c.reconnects)?;
        conn.moved.store(true, Ordering::Release);
        *self.reconnect_until.lock().expect("reconnect lock") =
            Some(tokio::time::Instant::now() + wait);
        self.send_reconnect(&conn, why);
        Some(self.begin_handover(grace, why))
    }

    /// Asks the live connection to reconnect without handing over yet (a front upgrade: the new
    /// connection goes to the new front, while this front keeps the old one until it stops).
    /// False when it cannot reconnect, or there is none.
    pub fn ask_reconnect(&self, why: &str) -> bool {
        let Some(conn) = self.connection().filter(|c| c.reconnects) else {
            return false;
        };
        conn.moved.store(true, Ordering::Release);
        self.send_reconnect(&conn, why);
        true
    }

    /// Forgets [`PluginLink::ask_reconnect`] after an upgrade failed: the new front is gone, so
    /// the old connection is again the process's only one.
    pub fn cancel_reconnect(&self) {
        if let Some(conn) = self.connection() {
            conn.moved.store(false, Ordering::Release);
        }
    }

    /// A new front after an upgrade: the old front asks this plugin (run by someone else) to
    /// reconnect here, so until it does, streams wait for it in their journals instead of
    /// reporting it missing.
    pub fn expect_follower(&self) {
        if !self.is_connected() {
            self.set_expected(Expected::Coming { at: None });
        }
    }

    /// The plugin [`PluginLink::expect_follower`] waited for did not come in time: finals stop
    /// waiting for it.
    pub fn follower_missing(&self) {
        if !self.is_connected() && !self.config().process.spawn {
            self.set_expected(Expected::NotComing(Missing::NotConnected));
        }
    }

    /// Whether the live connection follows `Reconnect`.
    pub fn reconnects(&self) -> bool {
        self.connection().is_some_and(|c| c.reconnects)
    }

    fn send_reconnect(&self, conn: &Conn, why: &str) {
        tracing::info!(plugin = %self.name, pid = conn.pid, reason = why, "asking the plugin to reconnect");
        let _ = conn.send_control(ToPlugin::Reconnect(ipc_protocol::Reconnect {
            reason: why.to_owned(),
        }));
    }

    /// When the earliest draining connection's grace is over, or the wait for a reconnecting
    /// plugin, whichever is first.
    pub(in crate::plugin) fn next_drain_deadline(&self) -> Option<tokio::time::Instant> {
        let reconnect = *self.reconnect_until.lock().expect("reconnect lock");
        self.draining
            .lock()
            .expect("draining lock")
            .iter()
            .filter_map(|c| *c.drain_until.lock().expect("drain lock"))
            .chain(reconnect)
            .min()
    }

    /// Closes the draining connections whose grace is over; their streams move to the next
    /// connection with their journals.
    pub(in crate::plugin) fn expire_drains(&self) {
        let now = tokio::time::Instant::now();
        let gave_up = {
            let mut until = self.reconnect_until.lock().expect("reconnect lock");
            let over = until.is_some_and(|t| t <= now);
            if over {
                *until = None;
            }
            over
        };
        if gave_up && !self.is_connected() {
            tracing::warn!(plugin = %self.name, "the plugin did not reconnect within connect_timeout_ms after Reconnect; its old connection is closed once its streams end, and whoever runs it starts it again");
            self.set_expected(Expected::NotComing(Missing::NotConnected));
        }
        let expired: Vec<Arc<Conn>> = self
            .draining
            .lock()
            .expect("draining lock")
            .iter()
            .filter(|c| {
                c.drain_until
                    .lock()
                    .expect("drain lock")
                    .is_some_and(|t| t <= now)
            })
            .cloned()
            .collect();
        for conn in expired {
            tracing::warn!(plugin = %self.name, pid = conn.pid, streams = conn.bound_streams.load(Ordering::Acquire), "replaced process still serving streams after drain_grace_ms; moving them to the new process");
            self.shutdown_drained(&conn);
            self.detach(&conn, "drain grace over");
        }
    }

    /// The connections being replaced: pid, streams they still serve, and time left of their
    /// grace (for `plugvisor status`).
    pub fn draining_status(&self) -> Vec<Draining> {
        let now = tokio::time::Instant::now();
        self.draining
            .lock()
            .expect("draining lock")
            .iter()
            .map(|c| Draining {
                pid: c.pid,
                streams: c.bound_streams.load(Ordering::Acquire) as u64,
                grace_left_ms: c
                    .drain_until
                    .lock()
                    .expect("drain lock")
                    .map(|t| t.saturating_duration_since(now).as_millis() as u64),
            })
            .collect()
    }

    /// How long the live connection's writer has waited for room in the window with no
    /// `Credit` from the plugin, if it is waiting.
    pub fn credit_stalled(&self) -> Option<Duration> {
        let conn = self.connection()?;
        let since = *conn.stalled_since.lock().expect("stall lock");
        since.map(|t| t.elapsed())
    }

    /// Whether the plugin has sent no `Credit` for longer than it may, with its window full:
    /// the larger of `hang_timeout_ms` and `stuck_timeout_ms` (a lane may legitimately run one
    /// event that long).
    pub fn credit_stall_past_limit(&self) -> Option<Duration> {
        let config = self.config();
        let limit = config.hang_timeout.max(config.stuck_timeout);
        self.credit_stalled().filter(|d| *d > limit)
    }

    /// The lanes the plugin's last `Pong` reported stuck in one event.
    pub fn stuck_lanes(&self) -> Vec<ipc_protocol::StuckLane> {
        self.stuck.lock().expect("stuck lock").clone()
    }

    /// The lane stuck longest, if it has been stuck past `stuck_timeout_ms`.
    pub fn stuck_past_limit(&self) -> Option<ipc_protocol::StuckLane> {
        let limit = self.config().stuck_timeout.as_millis() as u64;
        self.stuck_lanes()
            .into_iter()
            .filter(|l| l.running_ms >= limit)
            .max_by_key(|l| l.running_ms)
    }

    /// Marks `stream` as the one that hung the plugin: it is not replayed to the replacement,
    /// and its final says `stuck`. Also forgets the stuck report (the process is about to go).
    pub(in crate::plugin) fn poison(&self, stream: StreamId) {
        self.poisoned.lock().expect("poison lock").insert(stream);
        self.stuck.lock().expect("stuck lock").clear();
        self.metrics.stuck_lanes.get_or_create(&self.label).set(0);
    }

    /// Whether `stream` hung the plugin (see [`PluginLink::poison`]).
    pub fn is_poisoned(&self, stream: StreamId) -> bool {
        self.poisoned.lock().expect("poison lock").contains(&stream)
    }

    /// Forgets a poisoned stream once it has ended.
    pub fn forget_poisoned(&self, stream: StreamId) {
        self.poisoned.lock().expect("poison lock").remove(&stream);
    }

    /// Connections being replaced that still serve streams.
    pub fn draining(&self) -> usize {
        self.draining.lock().expect("draining lock").len()
    }

    /// Closes every connection, live and draining, and waits up to `limit` for their tasks to
    /// end, so nothing of theirs touches the plugin's metric series afterwards (its owner is
    /// stopping it for good).
    pub(in crate::plugin) async fn close_all(&self, why: &str, limit: Duration) {
        self.disconnect(why);
        let draining: Vec<Arc<Conn>> = self.draining.lock().expect("draining lock").clone();
        for conn in draining {
            self.detach(&conn, why);
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        let ended = async {
            for task in tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(limit, ended).await.is_err() {
            tracing::warn!(plugin = %self.name, "connection tasks still running after the plugin stopped");
        }
    }

    /// Closes the live connection (shutdown, or a restart by the supervisor).
    pub(in crate::plugin) fn disconnect(&self, why: &str) {
        if let Some(conn) = self.connection() {
            self.detach(&conn, why);
        }
    }

    /// Takes `q` off the queue's counts for the writer: its frame length, counted as the window
    /// counts it.
    fn take(&self, conn: &Conn, q: Queued) -> Result<(Queued, u64), String> {
        if !q.replayed {
            conn.queued_bytes.fetch_sub(q.bytes, Ordering::Relaxed);
        }
        self.depth.dec();
        self.queued.dec_by(q.bytes as i64);
        let len = ipc_protocol::codec::encoded_len(&q.msg).map_err(|e| e.to_string())?;
        let counted = q.msg.flow_bytes(len + PREFIX_LEN);
        Ok((q, counted))
    }

    /// One turn of the connection's writer: feeds what may go (control messages, then replayed
    /// journals, then what was staged, then the queue, as far as the window and one batch go) and
    /// writes it if it is due, without waiting for the socket. Run by the writer task, or by a
    /// stream waiting for an answer ([`PluginLink::write_now`]); `out` is locked meanwhile.
    ///
    /// With a `batch_ms`, while events flow the writer drains its queue once per batch (at
    /// `cadence`), not at every event, so neither it nor the plugin wakes for each chunk of a
    /// slow stream. What is `urgent` goes at once, with everything queued before it: a final
    /// call or an inline chunk (a stream waits for its answer), or a control message. A window
    /// with nothing in it ends the cadence: the next event wakes the writer again.
    fn turn(&self, conn: &Conn, out: &mut Outgoing) -> Result<Turn, String> {
        let (batch, budget) = (self.config().batch, conn.budget);
        let now = tokio::time::Instant::now();
        let tick = out.cadence.is_some_and(|t| t <= now);
        // Control first: whatever else is queued, a ping never waits behind events.
        while let Ok(msg) = out.priority.try_recv() {
            out.writer.feed(&msg).map_err(|e| e.to_string())?;
            out.urgent = true;
        }
        if out.staged.is_empty() {
            while let Ok(q) = out.rx.try_recv() {
                out.staged.push_back(q);
            }
            waiting_streams_first(&mut out.staged);
            conn.staged.store(out.staged.len(), Ordering::Relaxed);
        }
        // Then events, as far as the window and one batch go: replayed journals first, and no
        // live event while a replay waits, so a stream's replay precedes its live events; then
        // what was staged, which came before the rest of the queue.
        let consumed = *conn.consumed.borrow();
        while out.writer.pending_bytes() < BATCH_BYTES {
            if out.held.is_none() {
                let next = if let Ok(q) = out.replay.try_recv() {
                    q
                } else if let Some(q) = out.staged.pop_front() {
                    conn.staged.fetch_sub(1, Ordering::Relaxed);
                    q
                } else if let Ok(q) = out.rx.try_recv() {
                    q
                } else {
                    break;
                };
                out.held = Some(self.take(conn, next)?);
            }
            let Some((q, len)) = out.held.take() else {
                break;
            };
            let in_flight = conn
                .written
                .load(Ordering::Acquire)
                .saturating_sub(consumed);
            if !window_allows(in_flight, len, budget) {
                out.held = Some((q, len));
                break;
            }
            out.writer.feed_event(&q.msg).map_err(|e| e.to_string())?;
            conn.written.fetch_add(len, Ordering::AcqRel);
            out.urgent |= is_urgent(&q.msg);
        }
        let pending = out.writer.pending_bytes();
        if pending > 0 {
            // A full batch and a full window (nothing more goes until the plugin has these) go
            // at once too.
            if out.urgent || tick || batch.is_zero() || pending >= BATCH_BYTES || out.held.is_some()
            {
                self.inflight.set(conn.in_flight() as i64);
                let all = out.writer.try_flush().map_err(|e| e.to_string())?;
                if tick {
                    // Events came in this window: keep the beat for the next.
                    self.hold_batch(conn, out, now + batch);
                }
                if !all {
                    // The rest goes as soon as the socket has room.
                    out.urgent = true;
                    return Ok(Turn::Full);
                }
                out.urgent = false;
                return Ok(Turn::Again);
            }
            if out.cadence.is_none() {
                self.hold_batch(conn, out, now + batch);
            }
        } else if tick {
            // Nothing came in the last window: wake on the next event again.
            out.cadence = None;
        }
        let waiting_for_credit = out.held.is_some();
        let stall_began = {
            let mut stalled = conn.stalled_since.lock().expect("stall lock");
            match (waiting_for_credit, *stalled) {
                (true, None) => {
                    *stalled = Some(Instant::now());
                    true
                }
                (false, Some(_)) => {
                    *stalled = None;
                    false
                }
                _ => false,
            }
        };
        if stall_began && conn.credit_on_ping {
            // A plugin on `credit_on_ping` may be idle with credit unreported: ask.
            out.writer.feed(&CREDIT_PING).map_err(|e| e.to_string())?;
            out.urgent = true;
            return Ok(Turn::Again);
        }
        Ok(Turn::Idle {
            listening: out.cadence.is_none(),
            waiting_for_credit,
        })
    }

    /// The batch `out` holds goes `at` (by the batch clock), unless something urgent takes it
    /// first.
    fn hold_batch(&self, conn: &Conn, out: &mut Outgoing, at: tokio::time::Instant) {
        out.cadence = Some(at);
        self.clock.hold(at, conn.me.clone());
    }

    /// The batch clock's call: the batch `conn` holds may be due. Takes the writer's turn here,
    /// as [`PluginLink::write_now`] does, so a beat wakes no writer task.
    fn beat(&self, conn: &Conn) {
        if !conn.is_closed() {
            self.turn_here(conn, false);
        }
    }

    /// For an event that waits for an answer (a final call, an inline chunk), just queued: runs
    /// a writer turn from the calling task, so the event and everything queued before it are on
    /// the socket when this returns, rather than when the writer task is next scheduled, maybe on
    /// another thread that must first be woken (at the end of a response, the moment that
    /// decides how late the reply to Envoy is). Never waits: if the writer task is in a turn of
    /// its own, or this one leaves work (a full socket, more than a batch, a full window), the
    /// writer task is rung and does the rest, as it did everything before.
    fn write_now(&self, conn: &Conn) {
        self.turn_here(conn, true);
    }

    /// Takes a writer turn from the calling task (`urgent`: write whatever is fed at once), or,
    /// if the writer task is in a turn of its own or this one leaves work, rings the writer task.
    fn turn_here(&self, conn: &Conn, urgent: bool) {
        let Ok(mut out) = conn.out.try_lock() else {
            conn.urgent.notify_one();
            return;
        };
        let (listening, waiting_for_credit) = (out.cadence.is_none(), out.held.is_some());
        out.urgent |= urgent;
        let turn = self.turn(conn, &mut out);
        let done = match &turn {
            Ok(Turn::Again) => out.is_drained(),
            Ok(Turn::Idle { .. }) => true,
            Ok(Turn::Full) | Err(_) => false,
        };
        let changed =
            out.cadence.is_none() != listening || out.held.is_some() != waiting_for_credit;
        drop(out);
        if let Err(e) = turn {
            // As the writer task would: the connection is done for.
            self.detach(conn, &format!("write failed: {e}"));
        } else if !done {
            conn.urgent.notify_one();
        } else if changed {
            conn.wait_changed.notify_one();
        }
    }

    /// The connection's writer task: takes turns ([`PluginLink::turn`]) and, between them, waits
    /// for what the last one left: room in the socket, the next event, credit (a held batch is
    /// the [`BatchClock`]'s to send).
    async fn write_loop(self: Arc<Self>, conn: Arc<Conn>) {
        let mut closed = conn.closed.subscribe();
        let mut credit = conn.consumed.subscribe();
        let room = conn.lock_out().writer.get_ref().room();
        let result: Result<(), String> = async {
            loop {
                // Credit seen so far: `changed` below waits for more.
                credit.borrow_and_update();
                let turn = self.turn(&conn, &mut conn.lock_out())?;
                match turn {
                    Turn::Again => {}
                    Turn::Full => {
                        tokio::select! {
                            biased;
                            _ = closed.wait_for(|c| *c) => return Ok(()),
                            ready = room.writable() => ready.map_err(|e| e.to_string())?,
                        }
                    }
                    Turn::Idle {
                        listening,
                        waiting_for_credit,
                    } => {
                        tokio::select! {
                            biased;
                            _ = closed.wait_for(|c| *c) => return Ok(()),
                            // An urgent event, a batch's worth, or a control message was queued:
                            // the next turn sends it, and all before it.
                            () = conn.urgent.notified() => conn.lock_out().urgent = true,
                            // A turn taken elsewhere ended the batch or filled the window.
                            () = conn.wait_changed.notified() => {}
                            changed = credit.changed(), if waiting_for_credit => {
                                if changed.is_err() {
                                    return Ok(());
                                }
                                // Progress, if not yet room: the stall starts over.
                                *conn.stalled_since.lock().expect("stall lock") = Some(Instant::now());
                                if conn.credit_on_ping {
                                    let mut out = conn.lock_out();
                                    out.writer.feed(&CREDIT_PING).map_err(|e| e.to_string())?;
                                    out.urgent = true;
                                }
                            }
                            // An event (or a replayed journal) was queued.
                            () = conn.queued.notified(), if listening && !waiting_for_credit => {}
                        }
                    }
                }
            }
        }
        .await;
        match result {
            Err(e) => self.detach(&conn, &format!("write failed: {e}")),
            Ok(()) => {
                // Closed on purpose: a `Shutdown` queued just before still reaches the plugin
                // ahead of the end-of-file, so it knows to finish rather than to vanish.
                let shutdown = {
                    let mut out = conn.lock_out();
                    let mut shutdown = None;
                    while let Ok(msg) = out.priority.try_recv() {
                        if matches!(msg, ToPlugin::Shutdown(_)) {
                            shutdown = Some(msg);
                        }
                    }
                    shutdown
                };
                if let Some(msg) = shutdown {
                    let sent = tokio::time::timeout(SHUTDOWN_WRITE_LIMIT, async {
                        conn.lock_out()
                            .writer
                            .feed(&msg)
                            .map_err(|e| e.to_string())?;
                        while !conn
                            .lock_out()
                            .writer
                            .try_flush()
                            .map_err(|e| e.to_string())?
                        {
                            room.writable().await.map_err(|e| e.to_string())?;
                        }
                        Ok::<(), String>(())
                    })
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        tracing::debug!(plugin = %self.name, pid = conn.pid, "Shutdown not written before the connection closed");
                    }
                }
            }
        }
        // Whatever is still queued will never be written: take it off the gauges and count the
        // events as dropped (the plugin's replacement sees the gap).
        let dropped = self
            .metrics
            .events_dropped
            .get_or_create(&Metrics::reason(&self.name, Dropped::Down.as_str()))
            .clone();
        let mut out = conn.lock_out();
        out.rx.close();
        // Events the stream's journal also keeps reach the replacement in its replay: not lost.
        if let Some((q, _)) = out.held.take() {
            if q.msg.stream_seq().is_some() && !q.journaled {
                dropped.inc();
            }
        }
        out.replay.close();
        while let Ok(q) = out.replay.try_recv() {
            self.depth.dec();
            self.queued.dec_by(q.bytes as i64);
        }
        loop {
            let Some(q) = out.staged.pop_front().or_else(|| out.rx.try_recv().ok()) else {
                break;
            };
            self.depth.dec();
            self.queued.dec_by(q.bytes as i64);
            if q.msg.stream_seq().is_some() && !q.journaled {
                dropped.inc();
            }
        }
        self.inflight.set(0);
        let _ = out.writer.get_ref().shutdown_write();
    }

    async fn read_loop(self: Arc<Self>, conn: Arc<Conn>, mut reader: FrameReader<ReadHalf>) {
        let mut closed = conn.closed.subscribe();
        let why = loop {
            let msg = tokio::select! {
                m = reader.read::<FromPlugin>() => m,
                _ = closed.wait_for(|c| *c) => return,
            };
            match msg {
                Ok(Some(FromPlugin::FinalReply(FinalReply {
                    call_id,
                    stream_id,
                    outcome,
                }))) => {
                    let waiter = {
                        let mut finals = conn.finals.lock().expect("finals lock");
                        match finals.get(&call_id) {
                            // A reply naming another stream than its call's: not this call's
                            // answer (the call waits on for the right one, or its deadline).
                            Some(w) if w.stream != stream_id => {
                                let called = w.stream;
                                drop(finals);
                                self.metrics
                                    .replies_refused
                                    .get_or_create(&Metrics::reason(&self.name, "wrong_stream"))
                                    .inc();
                                if let Some(held) =
                                    crate::observe::logging::limited::allow("wrong stream")
                                {
                                    tracing::warn!(plugin = %self.name, pid = conn.pid, call_id, called, replied = stream_id, held_back = held, "final reply names another stream than its call; refused");
                                }
                                continue;
                            }
                            Some(_) => finals.remove(&call_id),
                            None => None,
                        }
                    };
                    match waiter {
                        Some(w) => {
                            let _ = w.reply.send((outcome, w.spans));
                        }
                        None => {
                            tracing::debug!(plugin = %self.name, call_id, "late final reply ignored")
                        }
                    }
                }
                Ok(Some(FromPlugin::Ack(Ack { stream_id, seq }))) => {
                    if let Some(w) = conn
                        .acks
                        .lock()
                        .expect("acks lock")
                        .remove(&(stream_id, seq))
                    {
                        let _ = w.send(());
                    }
                }
                Ok(Some(FromPlugin::Credit(Credit { consumed }))) => {
                    let written = conn.written.load(Ordering::Acquire);
                    if consumed > written {
                        break format!(
                            "protocol error: credit for {consumed} bytes, only {written} were sent"
                        );
                    }
                    conn.consumed.send_if_modified(|c| {
                        let more = consumed > *c;
                        if more {
                            *c = consumed;
                        }
                        more
                    });
                    self.metrics
                        .inflight_bytes
                        .get_or_create(&self.label)
                        .set(conn.in_flight() as i64);
                }
                Ok(Some(FromPlugin::Pong(pong))) => {
                    *self.last_pong.lock().expect("pong lock") = Some(Instant::now());
                    self.metrics
                        .stuck_lanes
                        .get_or_create(&self.label)
                        .set(pong.stuck.len() as i64);
                    *self.stuck.lock().expect("stuck lock") = pong.stuck.clone();
                    self.metrics
                        .plugin_active_streams
                        .get_or_create(&self.label)
                        .set(i64::from(pong.active_streams));
                }
                Ok(Some(FromPlugin::Spans(spans))) => {
                    if !conn.trace {
                        break "protocol error: Spans from a plugin that did not agree on the \
                               capability trace"
                            .to_owned();
                    }
                    self.take_spans(&conn, spans, reader.last_frame_len());
                }
                Ok(Some(FromPlugin::Hello(_))) => break "protocol error: second Hello".to_owned(),
                Ok(None) => break "connection closed".to_owned(),
                // The plugin closed before reading all this front wrote.
                Err(e) if e.is_peer_reset() => {
                    break "connection closed (with events of ours unread)".to_owned()
                }
                Err(e) => break format!("protocol error: {e}"),
            }
        };
        self.detach(&conn, &why);
    }

    /// Keeps a plugin's `Spans` with the final call of its stream waiting on `conn`, for its
    /// reply; drops (and counts) one that has no such call or is past the limits
    /// (docs/protocol.md, "Traces"). An untraced stream's are dropped without counting.
    fn take_spans(&self, conn: &Conn, spans: Spans, frame_len: usize) {
        use crate::traces::plugin::{check, SpansDropped};
        let checked = check(&spans, frame_len, self.config().process.metadata_max_bytes);
        let dropped = {
            let mut finals = conn.finals.lock().expect("finals lock");
            match finals.values_mut().find(|w| w.stream == spans.stream_id) {
                None => Some(SpansDropped::NoFinal),
                Some(w) if !w.traced => None,
                Some(w) => match checked {
                    Err(why) => Some(why),
                    Ok(()) if w.spans.is_some() => Some(SpansDropped::Duplicate),
                    Ok(()) => {
                        w.spans = Some(Box::new(spans));
                        None
                    }
                },
            }
        };
        if let Some(why) = dropped {
            self.metrics
                .plugin_spans_dropped
                .get_or_create(&Metrics::reason(&self.name, why.as_str()))
                .inc();
            tracing::debug!(plugin = %self.name, reason = why.as_str(), frame_len, "plugin's Spans dropped");
        }
    }

    fn enqueue(&self, conn: &Conn, msg: ToPlugin, journaled: bool) -> Result<(), Dropped> {
        let config = self.config();
        if conn.queued_events() >= config.queue_events {
            return Err(Dropped::QueueFull);
        }
        let bytes = queued_size(&msg);
        let ring = is_urgent(&msg);
        let before = conn.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before > 0 && before + bytes > config.queue_bytes {
            conn.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(Dropped::QueueFull);
        }
        match conn.tx.try_send(Queued {
            msg,
            bytes,
            replayed: false,
            journaled,
        }) {
            Ok(()) => {
                self.account_sent(bytes);
                if ring {
                    // Written now, or the writer task is rung for it.
                    self.write_now(conn);
                    return Ok(());
                }
                conn.queued.notify_one();
                if before + bytes >= BATCH_BYTES || conn.queued_events() >= config.queue_events / 2
                {
                    // A batch's worth waiting, or half the queue, goes without waiting for the
                    // writer's beat: a fast stream is held back by nothing but the window.
                    conn.urgent.notify_one();
                }
                Ok(())
            }
            Err(_) => {
                conn.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                Err(Dropped::QueueFull)
            }
        }
    }

    fn account_sent(&self, bytes: usize) {
        self.sent.inc();
        self.depth.inc();
        self.queued.inc_by(bytes as i64);
    }

    /// Queues a fire-and-forget event without waiting; a full queue or a missing connection drops
    /// it and counts the drop.
    pub fn send_event(&self, conn: Option<&Conn>, msg: ToPlugin) -> bool {
        self.send_event_as(conn, msg, false)
    }

    /// [`PluginLink::send_event`] for an event its stream also keeps in its journal: if the
    /// connection goes before writing it, it is replayed to the replacement, not dropped.
    pub fn send_journaled(&self, conn: &Conn, msg: ToPlugin) -> bool {
        self.send_event_as(Some(conn), msg, true)
    }

    fn send_event_as(&self, conn: Option<&Conn>, msg: ToPlugin, journaled: bool) -> bool {
        let result = match conn {
            Some(conn) => self.enqueue(conn, msg, journaled),
            None => Err(Dropped::Down),
        };
        match result {
            Ok(()) => true,
            Err(reason) => {
                self.metrics
                    .events_dropped
                    .get_or_create(&Metrics::reason(&self.name, reason.as_str()))
                    .inc();
                false
            }
        }
    }

    /// Queues an event, waiting for room until `deadline` (used for the final and for aborts,
    /// which must not be lost to a momentarily full queue).
    async fn send_waiting(
        &self,
        conn: &Conn,
        msg: ToPlugin,
        deadline: tokio::time::Instant,
    ) -> Result<(), Dropped> {
        let bytes = queued_size(&msg);
        let ring = is_urgent(&msg);
        conn.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        let queued = Queued {
            msg,
            bytes,
            replayed: false,
            journaled: false,
        };
        match tokio::time::timeout_at(deadline, conn.tx.send(queued)).await {
            Ok(Ok(())) => {
                self.account_sent(bytes);
                if ring {
                    // Written now, or the writer task is rung for it.
                    self.write_now(conn);
                } else {
                    conn.queued.notify_one();
                }
                Ok(())
            }
            Ok(Err(_)) => {
                conn.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                Err(Dropped::Down)
            }
            Err(_) => {
                conn.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                Err(Dropped::QueueFull)
            }
        }
    }

    /// Queues a stream's journal on `conn`, ahead of any live event the stream sends afterwards.
    /// `events` are in sequence order; those already sent to an earlier connection are wrapped
    /// as replayed by the caller. Not held to `queue_events`/`queue_bytes`: the journal they come
    /// from is bounded by `replay_bytes`.
    pub fn replay(&self, conn: &Conn, events: impl IntoIterator<Item = ToPlugin>) {
        let replayed = self.metrics.events_replayed.get_or_create(&self.label);
        for msg in events {
            let bytes = queued_size(&msg);
            let queued = Queued {
                msg,
                bytes,
                replayed: true,
                // Replayed from the journal, which keeps it until the stream ends.
                journaled: true,
            };
            let ring = is_urgent(&queued.msg);
            if conn.replay.send(queued).is_err() {
                return;
            }
            conn.queued.notify_one();
            if ring {
                conn.urgent.notify_one();
            }
            self.account_sent(bytes);
            replayed.inc();
        }
    }

    /// Takes `bytes` of the link's replay budget (`replay_bytes`) for a journaled event; false
    /// when the budget is spent.
    pub fn journal_take(&self, bytes: usize) -> bool {
        let budget = self.config().replay_bytes;
        self.journal_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= budget).then_some(used + bytes)
            })
            .is_ok()
    }

    /// Gives back journal bytes (the stream ended, or its journal was dropped).
    pub fn journal_release(&self, bytes: usize) {
        self.journal_used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Journal bytes held by in-flight streams.
    pub fn journal_used(&self) -> usize {
        self.journal_used.load(Ordering::Acquire)
    }

    /// Queues an event that must not be dropped for a full queue (an abort): waits up to `patience`
    /// in a task of its own, so the caller never waits.
    pub fn send_event_patiently(
        self: &Arc<Self>,
        conn: Arc<Conn>,
        msg: ToPlugin,
        patience: Duration,
    ) {
        if self.enqueue(&conn, msg.clone(), false).is_ok() {
            return;
        }
        let link = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + patience;
            if let Err(reason) = link.send_waiting(&conn, msg, deadline).await {
                link.metrics
                    .events_dropped
                    .get_or_create(&Metrics::reason(&link.name, reason.as_str()))
                    .inc();
            }
        });
    }

    /// Sends an inline chunk (built by `make` with `ack = true`) and returns a receiver that
    /// resolves when the plugin acknowledges it, or `None` when it could not be queued.
    pub async fn send_inline(
        &self,
        conn: &Conn,
        stream_id: StreamId,
        seq: u32,
        msg: ToPlugin,
        deadline: tokio::time::Instant,
    ) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        conn.acks
            .lock()
            .expect("acks lock")
            .insert((stream_id, seq), tx);
        match self.send_waiting(conn, msg, deadline).await {
            Ok(()) => Some(rx),
            Err(reason) => {
                conn.acks
                    .lock()
                    .expect("acks lock")
                    .remove(&(stream_id, seq));
                self.metrics
                    .events_dropped
                    .get_or_create(&Metrics::reason(&self.name, reason.as_str()))
                    .inc();
                None
            }
        }
    }

    /// Forgets an inline chunk whose acknowledgement came too late.
    pub fn forget_ack(&self, conn: &Conn, stream_id: StreamId, seq: u32) {
        conn.acks
            .lock()
            .expect("acks lock")
            .remove(&(stream_id, seq));
    }

    /// Counts a final that brought no metadata for a reason found outside [`PluginLink::final_call`].
    pub fn count_missing(&self, why: Missing) {
        self.metrics
            .finals_missing
            .get_or_create(&Metrics::reason(&self.name, why.as_str()))
            .inc();
    }

    /// A fresh final call id.
    pub fn next_call_id(&self) -> u64 {
        self.next_call.fetch_add(1, Ordering::Relaxed)
    }

    /// The final RPC: queues `msg` (a `Final` with `call_id`) and waits for the reply until
    /// `final_timeout` has passed since `started`.
    pub async fn final_call(
        &self,
        conn: Option<Arc<Conn>>,
        call_id: u64,
        msg: ToPlugin,
        started: Instant,
    ) -> Result<Metadata, Missing> {
        self.traced_final_call(conn, call_id, msg, started, false)
            .await
            .0
    }

    /// [`PluginLink::final_call`], for a `traced` stream also with the `Spans` the plugin sent
    /// before its reply, if any (an untraced stream's are dropped when they come).
    pub async fn traced_final_call(
        &self,
        conn: Option<Arc<Conn>>,
        call_id: u64,
        msg: ToPlugin,
        started: Instant,
        traced: bool,
    ) -> (Result<Metadata, Missing>, Option<Box<Spans>>) {
        let (result, spans) = self
            .final_call_inner(conn, call_id, msg, started, traced)
            .await;
        match &result {
            Ok(_) => self
                .metrics
                .final_duration
                .get_or_create(&self.label)
                .observe(started.elapsed().as_secs_f64()),
            Err(reason) => self.count_missing(*reason),
        }
        (result, spans)
    }

    async fn final_call_inner(
        &self,
        conn: Option<Arc<Conn>>,
        call_id: u64,
        msg: ToPlugin,
        started: Instant,
        traced: bool,
    ) -> (Result<Metadata, Missing>, Option<Box<Spans>>) {
        let Some(conn) = conn else {
            return (Err(Missing::Down), None);
        };
        if matches!(msg, ToPlugin::AbortedFinal(_)) && !conn.aborted_finals {
            // A process that does not answer for aborted streams took over mid-way.
            return (Err(Missing::NotAsked), None);
        }
        let deadline = tokio::time::Instant::from_std(started + self.config().final_timeout);
        let (tx, rx) = oneshot::channel();
        let stream_id = msg.final_call().map_or(0, |(_, stream)| stream);
        conn.finals.lock().expect("finals lock").insert(
            call_id,
            Waiting {
                stream: stream_id,
                traced,
                spans: None,
                reply: tx,
            },
        );
        // However the call ends (also dropped mid-way, with the stream task that drives it), its
        // entry goes; after a reply the reader has taken it already.
        let _forget = ForgetFinal {
            conn: &conn,
            call_id,
        };
        if let Err(reason) = self.send_waiting(&conn, msg, deadline).await {
            let why = match reason {
                Dropped::Down => Missing::Down,
                Dropped::QueueFull => Missing::Timeout,
            };
            return (Err(why), None);
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok((FinalOutcome::Metadata(md), spans))) => (Ok(md), spans),
            Ok(Ok((FinalOutcome::Error(e), spans))) => {
                if let Some(held) = crate::observe::logging::limited::allow("final failed") {
                    tracing::warn!(plugin = %self.name, call_id, error = %e, held_back = held, "plugin failed the final call");
                }
                (Err(Missing::Failed), spans)
            }
            Ok(Err(_)) => (Err(Missing::Down), None),
            Err(_) => {
                if let Some(held) = crate::observe::logging::limited::allow("final timeout") {
                    tracing::warn!(plugin = %self.name, call_id, held_back = held, "final call timed out");
                }
                (Err(Missing::Timeout), None)
            }
        }
    }

    /// Sends a ping (not an event): ahead of queued events and regardless of the window, so a
    /// busy plugin is not taken for a hung one.
    pub(in crate::plugin) fn ping(&self, nonce: u64) {
        if let Some(conn) = self.connection() {
            if conn.send_control(ToPlugin::Ping(Ping { nonce })).is_err() {
                tracing::debug!(plugin = %self.name, nonce, "ping not sent: the writer is stuck on the socket");
            }
        }
    }

    /// Where the plugin's processes' error lines are kept (see [`PluginLink::last_error`]).
    pub(crate) fn error_sink(&self) -> crate::plugin::spawn::LastError {
        self.last_error.clone()
    }

    /// The last error line of the plugin's processes (an ERROR record or an unformatted stderr
    /// line), or of a refused handshake; what `plugvisor status` shows.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("last error lock").clone()
    }

    /// Keeps `line` as the plugin's last error.
    pub(crate) fn note_error(&self, line: &str) {
        crate::plugin::spawn::note_error(&self.last_error, line);
    }

    /// Sends `Shutdown` to the live connection, if any, ahead of queued events and regardless of
    /// the window.
    pub(in crate::plugin) fn send_shutdown(&self, grace: Duration) {
        if let Some(conn) = self.connection() {
            Self::shutdown_conn(&conn, grace);
        }
    }

    fn shutdown_conn(conn: &Conn, grace: Duration) {
        conn.shutdown_sent.store(true, Ordering::Release);
        let _ = conn.send_control(ToPlugin::Shutdown(ipc_protocol::Shutdown {
            grace_ms: grace.as_millis() as u64,
        }));
    }

    /// Sends `Shutdown` to every connection, live and draining, and waits up to `grace` for the
    /// plugin to finish its streams and close them itself: a plugin the front does not run gets
    /// its grace before the front closes its end. True when all closed in time.
    pub(in crate::plugin) async fn shut_down_all(&self, grace: Duration) -> bool {
        let mut conns: Vec<Arc<Conn>> = self.draining.lock().expect("draining lock").clone();
        conns.extend(self.connection());
        // A moved connection's process serves another one (maybe of another front): it is
        // closed, not shut down.
        conns.retain(|c| !c.moved.load(Ordering::Acquire));
        for conn in &conns {
            if !conn.shutdown_sent.load(Ordering::Acquire) {
                Self::shutdown_conn(conn, grace);
            }
        }
        let all_closed = async {
            for conn in &conns {
                let _ = conn.closed.subscribe().wait_for(|c| *c).await;
            }
        };
        tokio::time::timeout(grace, all_closed).await.is_ok()
    }
}

/// Whether an event must not wait for the writer's batch (`batch_ms`): a final call (a stream's
/// end waits for its answer, so everything before it goes too) or an inline chunk (its stream
/// waits for the acknowledgement).
/// Removes a final call's entry from its connection's waiting calls when dropped.
struct ForgetFinal<'a> {
    conn: &'a Conn,
    call_id: u64,
}

impl Drop for ForgetFinal<'_> {
    fn drop(&mut self) {
        self.conn
            .finals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.call_id);
    }
}

fn is_urgent(msg: &ToPlugin) -> bool {
    match msg {
        ToPlugin::Chunk(c) => c.ack,
        ToPlugin::Replayed(inner) => is_urgent(inner),
        other => other.final_call().is_some(),
    }
}

/// Puts first, in their order, the events of every stream with an urgent event among `staged`
/// (a final call or an inline chunk: its stream waits for the answer), then the rest in theirs.
/// Each stream's events keep their order, which is all the protocol promises; what changes is
/// that a stream's end no longer waits behind a batch of other streams' chunks, in this write or
/// in the plugin, which handles what it reads in order.
fn waiting_streams_first(staged: &mut VecDeque<Queued>) {
    let waiting: HashSet<StreamId> = staged
        .iter()
        .filter(|q| is_urgent(&q.msg))
        .filter_map(|q| q.msg.stream_seq().map(|(stream, _)| stream))
        .collect();
    if waiting.is_empty() {
        return;
    }
    let (first, rest): (VecDeque<Queued>, VecDeque<Queued>) = staged.drain(..).partition(|q| {
        q.msg
            .stream_seq()
            .is_some_and(|(s, _)| waiting.contains(&s))
    });
    staged.extend(first);
    staged.extend(rest);
}

/// The ping a writer waiting for room in the window sends to a plugin on `credit_on_ping`; its
/// `Pong` counts for liveness like any other.
const CREDIT_PING: ToPlugin = ToPlugin::Ping(Ping { nonce: u64::MAX });

/// How long a connection closed on purpose may take to write the `Shutdown` queued for it.
const SHUTDOWN_WRITE_LIMIT: Duration = Duration::from_millis(500);

/// What a queued event holds in memory, counted against the plugin's `queue_bytes`: its body and
/// header bytes plus a fixed per-event overhead, so that every event, header-only ones included,
/// is bounded by bytes and not only by `queue_events`. (A body shared with other plugins' queues
/// is counted in each: a conservative bound.)
pub(crate) fn queued_size(msg: &ToPlugin) -> usize {
    /// A header's two strings' own allocation overhead, beside their bytes.
    const PER_HEADER: usize = 2 * std::mem::size_of::<String>();
    let headers = |h: &[ipc_protocol::Header]| -> usize {
        h.iter().map(|(k, v)| k.len() + v.len() + PER_HEADER).sum()
    };
    std::mem::size_of::<ToPlugin>()
        + match msg {
            ToPlugin::RequestStart(e) => {
                headers(&e.headers) + e.request_id.as_ref().map_or(0, String::len)
            }
            ToPlugin::ResponseHeaders(e) => headers(&e.headers),
            ToPlugin::Chunk(e) => e.bytes.len(),
            ToPlugin::Final(e) => e.bytes.len() + headers(&e.trailers),
            ToPlugin::Abort(e) => e.detail.len(),
            _ => 0,
        }
}

#[cfg(test)]
mod tests;
