//! Ordered per-stream lanes on a bounded pool of worker threads.
//!
//! Each stream the front tells the plugin about gets a lane: a FIFO of that stream's events and
//! the plugin's per-stream state. A lane is either idle, waiting in the ready queue, or running on
//! exactly one worker, so its events run one after another in arrival (= sequence) order, while
//! lanes of different streams run in parallel on `workers` threads. A worker runs one event and
//! then puts the lane at the back of the ready queue, so a stream with a long backlog gets its
//! share of the pool and no more.
//!
//! Bounds: the front sends no more than the flow-control window (`budget_bytes`) of event bytes
//! the host has not finished with (see `credit.rs`), so all lanes together hold at most about
//! that much. Within it, a lane's queue holds at most `queue_events` events and `queue_bytes` body
//! bytes (one event alone in its lane gets in whatever its size); a droppable event (response headers, a chunk not sent for inline dispatch) arriving at a full
//! lane is dropped and counted, and the next event that gets in carries the gap. Finals, aborts,
//! request starts and inline chunks are never dropped: the front waits for their answers or the
//! stream cannot start without them. Lanes of streams that never got `Final`/`Abort` are evicted
//! after an idle time.
//!
//! Every piece of plugin code a worker runs (a hook, the stream state's `Default` and `Drop`,
//! building the final metadata) goes through one catch_unwind path ([`Shared::guarded`]): the
//! panic is logged once with plugin, stream id and message, counted, the lane is marked failed
//! (its later hooks are skipped, its final reply carries the error), and the worker goes on. A
//! panic in the host's own code around it is caught per step too; and should a worker thread end
//! anyway, the host is told ([`Lanes::worker_lost`]) and exits non-zero, so the pool never
//! shrinks silently.
//!
//! A replayed event (resent by the front after a plugin restart) runs like a live one, with
//! [`EventCtx::is_replayed`] true while its plugin code runs.

use std::any::Any;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipc_protocol::{
    Ack, FinalOutcome, FinalReply, FromPlugin, Metadata, StreamId, StuckLane, Subscriptions,
    ToPlugin, Value,
};

use crate::credit::{Credits, Owed};
use crate::plugin::{EventCtx, Plugin, ReplayMark};
use crate::sequence::{starts_partial, Kind, SeqState};
use crate::trace::{self, TraceParent};

/// Where a lane's answers (final replies, acks) go: the connection's writer.
pub(crate) type Outbox = Arc<dyn Fn(FromPlugin) + Send + Sync>;

/// Sizing of the lanes.
#[derive(Debug, Clone)]
pub(crate) struct LaneConfig {
    /// Worker threads running hooks.
    pub workers: usize,
    /// Most events queued in one lane.
    pub queue_events: usize,
    /// Most body bytes queued in one lane.
    pub queue_bytes: usize,
    /// The configured plugin name, for logs and errors.
    pub plugin: String,
    /// The plugin's own metadata namespace, where the host adds `gaps` and `partial`.
    pub namespace: String,
    /// The connection agreed on `trace`: each stream keeps a [`trace::Record`], current while
    /// its hooks run, sent as `Spans` right before its final reply.
    pub trace: bool,
}

/// Counters of what the lanes had to do besides running hooks.
#[derive(Debug, Default)]
pub(crate) struct LaneStats {
    pub dropped: AtomicU64,
    pub evicted: AtomicU64,
    pub panics: AtomicU64,
    pub out_of_order: AtomicU64,
    /// Replayed events received (resent by the front after a plugin restart).
    pub replayed: AtomicU64,
}

struct Job {
    msg: ToPlugin,
    ctx: EventCtx,
    bytes: usize,
    /// Resent by the front after a plugin restart (`ToPlugin::Replayed`).
    replayed: bool,
    /// The event's counted frame bytes, consumed when the job is dropped (run or not).
    _owed: Owed,
}

struct Lane<S> {
    state: Option<S>,
    queue: VecDeque<Job>,
    queued_bytes: usize,
    /// In the ready queue or running: a worker will look at this lane again.
    scheduled: bool,
    seq: SeqState,
    gaps: u64,
    partial: bool,
    failed: Option<String>,
    last_active: Instant,
    /// What the stream's hooks recorded for its trace (only with `trace`); dropped with the
    /// lane when the stream is aborted or evicted.
    trace: Option<trace::Record>,
}

struct Inner<S> {
    lanes: HashMap<StreamId, Lane<S>>,
    ready: VecDeque<StreamId>,
    running: HashMap<StreamId, Instant>,
    /// Steps done running whose answers (a final reply, an ack) are still being handed out
    /// ([`Answering`]): the lanes are not idle until they are out.
    answering: usize,
    stop: bool,
    /// Makes the next worker to look for work end its thread, as a bug would.
    #[cfg(test)]
    kill_a_worker: bool,
}

impl<S> Inner<S> {
    /// No event queued or running, and no answer being handed out.
    fn idle(&self) -> bool {
        self.ready.is_empty() && self.running.is_empty() && self.answering == 0
    }
}

/// A step's answers on their way out, after its lane stopped running: counted in
/// [`Inner::answering`] from the lock that ended the step until dropped (also by a panic), so
/// the lanes do not look idle meanwhile. A host told to shut down ends the connection once they
/// are idle, and must not end it with a final reply unsent. Dropped, it reports credit if the
/// lanes are idle.
struct Answering<'a, P: Plugin> {
    shared: &'a Shared<P>,
    counted: bool,
}

impl<'a, P: Plugin> Answering<'a, P> {
    /// Counts the answers (if `any`) under `inner`, the lock that ended the step, and releases it.
    fn start(
        shared: &'a Shared<P>,
        mut inner: MutexGuard<'_, Inner<P::Stream>>,
        any: bool,
    ) -> Self {
        inner.answering += usize::from(any);
        drop(inner);
        Answering {
            shared,
            counted: any,
        }
    }
}

impl<P: Plugin> Drop for Answering<'_, P> {
    fn drop(&mut self) {
        if self.counted {
            self.shared.lock().answering -= 1;
        }
        self.shared.flush_credit_if_idle();
    }
}

struct Shared<P: Plugin> {
    plugin: Arc<P>,
    subs: Subscriptions,
    /// [`Plugin::quick_final`]: a final whose lane is idle runs on the submitting thread.
    quick_final: bool,
    /// [`Plugin::quick_events`]: so does any other event whose lane is idle.
    quick_events: bool,
    cfg: LaneConfig,
    inner: Mutex<Inner<P::Stream>>,
    work: Condvar,
    out: Outbox,
    credits: Arc<Credits>,
    stats: LaneStats,
    lost: WorkerLost,
}

/// The lanes of one plugin connection and the worker threads that run them.
pub(crate) struct Lanes<P: Plugin> {
    shared: Arc<Shared<P>>,
}

impl<P: Plugin> Lanes<P> {
    /// Starts `cfg.workers` worker threads running `plugin`'s hooks; answers go to `out`, and
    /// every event's counted bytes are consumed in `credits` once the lanes are done with it.
    pub(crate) fn start(
        plugin: Arc<P>,
        cfg: LaneConfig,
        out: Outbox,
        credits: Arc<Credits>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            subs: plugin.subscriptions(),
            quick_final: plugin.quick_final(),
            quick_events: plugin.quick_events(),
            plugin,
            cfg,
            inner: Mutex::new(Inner {
                lanes: HashMap::new(),
                ready: VecDeque::new(),
                running: HashMap::new(),
                answering: 0,
                stop: false,
                #[cfg(test)]
                kill_a_worker: false,
            }),
            work: Condvar::new(),
            out,
            credits,
            stats: LaneStats::default(),
            lost: WorkerLost::default(),
        });
        for i in 0..shared.cfg.workers.max(1) {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("pv-lane-{i}"))
                .spawn(move || shared.worker(i))?;
        }
        Ok(Lanes { shared })
    }

    /// Queues a per-stream event on its stream's lane (creating the lane for a new stream).
    /// `frame_len` is the event's whole frame length as read, what it counts against the
    /// flow-control window; `replayed` marks an event the front resent after a restart (the
    /// host unwrapped its `ToPlugin::Replayed`). Connection messages are ignored.
    pub(crate) fn submit(&self, msg: ToPlugin, frame_len: usize, replayed: bool) {
        self.shared.submit(msg, frame_len, replayed)
    }

    /// Resolves when a worker thread has ended while the lanes were not stopping (a bug: every
    /// panic is caught). The host then exits non-zero, so the plugin is restarted rather than
    /// left running on a smaller pool.
    pub(crate) async fn worker_lost(&self) -> u64 {
        loop {
            let lost = self.shared.lost.count.load(Ordering::Acquire);
            if lost > 0 {
                return lost;
            }
            self.shared.lost.notify.notified().await;
        }
    }

    /// A `Ping` came: report credit now, ahead of the `Pong` ([`Credits::pinged`]).
    pub(crate) fn pinged(&self) {
        self.shared.credits.pinged();
    }

    /// Streams the plugin holds state for.
    pub(crate) fn active_streams(&self) -> u32 {
        self.shared
            .lock()
            .lanes
            .len()
            .try_into()
            .unwrap_or(u32::MAX)
    }

    /// Lanes that have been running one event for at least `limit`.
    pub(crate) fn stuck(&self, limit: Duration) -> Vec<StuckLane> {
        let now = Instant::now();
        let inner = self.shared.lock();
        let mut stuck: Vec<StuckLane> = inner
            .running
            .iter()
            .filter_map(|(&stream_id, &since)| {
                let running = now.saturating_duration_since(since);
                (running >= limit).then(|| StuckLane {
                    stream_id,
                    running_ms: running.as_millis().try_into().unwrap_or(u64::MAX),
                })
            })
            .collect();
        stuck.sort_by_key(|s| s.stream_id);
        stuck
    }

    /// Drops the lanes of streams with no queued or running work and no event for `idle`.
    /// Returns how many were evicted.
    pub(crate) fn evict_idle(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut inner = self.shared.lock();
        let victims: Vec<StreamId> = inner
            .lanes
            .iter()
            .filter(|(_, l)| !l.scheduled && now.saturating_duration_since(l.last_active) >= idle)
            .map(|(&id, _)| id)
            .collect();
        let evicted: Vec<Lane<P::Stream>> = victims
            .iter()
            .filter_map(|id| inner.lanes.remove(id))
            .collect();
        drop(inner);
        // Their queues are empty (not scheduled), but return any credit before going on. Their
        // states are plugin code: dropped through the same guard as on a worker.
        for (id, lane) in victims.iter().zip(evicted) {
            let mut failed = None;
            self.shared
                .drop_state(lane.state, *id, lane.seq.last(), &mut failed);
        }
        self.shared.flush_credit_if_idle();
        if !victims.is_empty() {
            let total = self
                .shared
                .stats
                .evicted
                .fetch_add(victims.len() as u64, Ordering::Relaxed)
                + victims.len() as u64;
            tracing::warn!(
                evicted = victims.len(),
                evicted_total = total,
                idle_s = idle.as_secs_f64(),
                streams = ?victims,
                "evicted state of streams that never ended (no Final or Abort)"
            );
        }
        victims.len()
    }

    /// Whether no event is queued, running or being answered.
    pub(crate) fn is_idle(&self) -> bool {
        self.shared.lock().idle()
    }

    /// The lanes' counters.
    pub(crate) fn stats(&self) -> &LaneStats {
        &self.shared.stats
    }
}

impl<P: Plugin> Drop for Lanes<P> {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
    }
}

fn body_len(msg: &ToPlugin) -> usize {
    match msg {
        ToPlugin::Chunk(c) => c.bytes.len(),
        ToPlugin::Final(f) => f.bytes.len(),
        _ => 0,
    }
}

fn droppable(msg: &ToPlugin) -> bool {
    match msg {
        ToPlugin::ResponseHeaders(_) => true,
        ToPlugin::Chunk(c) => !c.ack,
        _ => false,
    }
}

fn stamp_of(msg: &ToPlugin) -> u64 {
    match msg {
        ToPlugin::RequestStart(e) => e.stamp_ns,
        ToPlugin::ResponseHeaders(e) => e.stamp_ns,
        ToPlugin::Chunk(e) => e.stamp_ns,
        ToPlugin::Final(e) => e.stamp_ns,
        ToPlugin::Abort(e) => e.stamp_ns,
        ToPlugin::AbortedFinal(e) => e.stamp_ns,
        _ => 0,
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Adds the host's own findings to the plugin's namespace map.
fn annotate(meta: &mut Metadata, namespace: &str, gaps: u64, partial: bool) {
    if gaps == 0 && !partial {
        return;
    }
    let entry = meta
        .entry(namespace.to_owned())
        .or_insert_with(|| Value::Map(Default::default()));
    if let Value::Map(map) = entry {
        if gaps > 0 {
            map.insert("gaps".into(), Value::from(gaps));
        }
        if partial {
            map.insert("partial".into(), Value::Bool(true));
        }
    } else {
        tracing::debug!(
            namespace,
            "plugin's own namespace is not a map; gaps not added"
        );
    }
}

impl<P: Plugin> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, Inner<P::Stream>> {
        // A hook never runs under this lock, so a poisoned lock means a bug in this module;
        // the data is still consistent enough to keep answering.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the credit count when no event is queued, running or being answered, so the front
    /// is never left waiting for credit while the host sits idle ([`Credits::idle`]).
    fn flush_credit_if_idle(&self) {
        let idle = self.lock().idle();
        if idle {
            self.credits.idle();
        }
    }

    fn submit(&self, msg: ToPlugin, frame_len: usize, replayed: bool) {
        let owed = self.credits.owe(msg.flow_bytes(frame_len));
        let (Some(kind), Some((stream_id, seq))) = (Kind::of(&msg), msg.stream_seq()) else {
            drop(owed);
            self.flush_credit_if_idle();
            return;
        };
        let stamp_ns = stamp_of(&msg);
        let bytes = body_len(&msg);
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let (gap, partial) = match inner.lanes.get_mut(&stream_id) {
            Some(lane) => {
                // An event alone in its lane always gets in, however large (the front's window
                // bounds it), so a single body message over `queue_bytes` is not a gap.
                if droppable(&msg)
                    && (lane.queue.len() >= self.cfg.queue_events
                        || (!lane.queue.is_empty()
                            && lane.queued_bytes + bytes > self.cfg.queue_bytes))
                {
                    let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::debug!(stream_id, seq, dropped, "lane queue full; event dropped");
                    if dropped.is_power_of_two() {
                        tracing::warn!(
                            dropped_total = dropped,
                            "lane queues overflowing; events dropped (the streams report gaps)"
                        );
                    }
                    return;
                }
                let verdict = lane.seq.next(seq);
                if verdict.out_of_order {
                    self.stats.out_of_order.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream_id, seq, "event arrived out of sequence order");
                }
                lane.gaps += u64::from(verdict.gap);
                (verdict.gap, lane.partial)
            }
            None => {
                let partial = starts_partial(&self.subs, seq, kind);
                if partial {
                    tracing::debug!(
                        stream_id,
                        seq,
                        "first event of an unknown stream; lane is partial"
                    );
                }
                inner.lanes.insert(
                    stream_id,
                    Lane {
                        state: None,
                        queue: VecDeque::new(),
                        queued_bytes: 0,
                        scheduled: false,
                        seq: SeqState::first(seq),
                        gaps: 0,
                        partial,
                        failed: None,
                        last_active: now,
                        trace: self.cfg.trace.then(|| trace::Record::new(stream_id)),
                    },
                );
                (0, partial)
            }
        };
        let lane = inner
            .lanes
            .get_mut(&stream_id)
            .expect("lane was just found or made");
        lane.queue.push_back(Job {
            msg,
            ctx: EventCtx {
                stream_id,
                seq,
                stamp_ns,
                gap,
                partial,
            },
            bytes,
            replayed,
            _owed: owed,
        });
        if replayed {
            self.stats.replayed.fetch_add(1, Ordering::Relaxed);
        }
        lane.queued_bytes += bytes;
        lane.last_active = now;
        if !lane.scheduled {
            lane.scheduled = true;
            let quick = if kind == Kind::Final {
                self.quick_final
            } else {
                self.quick_events
            };
            if quick {
                // Nothing else of this stream is queued or running (the lane was not
                // scheduled), so running the event here keeps the stream's order, and saves
                // the hand-off to a worker and back (`Plugin::quick_final`,
                // `Plugin::quick_events`). Running from now on, as a worker's lane is from the
                // moment it leaves the ready queue.
                inner.running.insert(stream_id, now);
                drop(guard);
                self.run_here(stream_id);
                return;
            }
            inner.ready.push_back(stream_id);
            drop(guard);
            self.work.notify_one();
        }
    }

    /// Runs the one job of `stream_id`'s scheduled lane on the calling thread, caught like a
    /// worker's step.
    fn run_here(&self, stream_id: StreamId) {
        let mut step = Step::default();
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.step(stream_id, &mut step))) {
            self.recover(stream_id, step, &*payload);
        }
    }

    /// A worker thread: runs lanes' events until the lanes are dropped. Every piece of plugin
    /// code goes through [`Shared::guarded`]; a panic anywhere else in a step (a bug here) is
    /// caught around the whole step, so the thread keeps serving either way. If the thread ends
    /// anyway, [`Alive`] tells the host, which exits rather than run on a shrunk pool.
    fn worker(&self, index: usize) {
        let _alive = Alive {
            lost: &self.lost,
            stopping: || self.lock().stop,
            index,
        };
        while let Some(stream_id) = self.next_ready() {
            self.run_here(stream_id);
        }
    }

    /// The next lane to run, or `None` once the lanes are dropped.
    fn next_ready(&self) -> Option<StreamId> {
        let mut inner = self.lock();
        loop {
            if inner.stop {
                return None;
            }
            #[cfg(test)]
            if inner.kill_a_worker {
                inner.kill_a_worker = false;
                panic!("worker killed by a test");
            }
            if let Some(id) = inner.ready.pop_front() {
                // Running from the moment it leaves the ready queue: between this lock and the
                // step's, the lane must not look idle (a drain would end too early).
                inner.running.insert(id, Instant::now());
                return Some(id);
            }
            inner = self.work.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Runs the next event of `stream_id`'s lane, noting in `step` what [`Shared::recover`]
    /// would need if it panicked.
    fn step(&self, stream_id: StreamId, step: &mut Step) {
        let mut inner = self.lock();
        let Some(lane) = inner.lanes.get_mut(&stream_id) else {
            inner.running.remove(&stream_id);
            return;
        };
        let Some(job) = lane.queue.pop_front() else {
            lane.scheduled = false;
            inner.running.remove(&stream_id);
            return;
        };
        lane.queued_bytes -= job.bytes;
        let mut state = lane.state.take();
        let mut record = lane.trace.take();
        let mut failed = lane.failed.clone();
        let (gaps, partial) = (lane.gaps, lane.partial);
        inner.running.insert(stream_id, Instant::now());
        drop(inner);
        if let Some((call_id, _)) = job.msg.final_call() {
            step.call_id = Some(call_id);
        }

        let _mark = ReplayMark::set(job.replayed.then_some((stream_id, job.ctx.seq)));
        if let (Some(record), ToPlugin::RequestStart(start)) = (&mut record, &job.msg) {
            record.traceparent = TraceParent::from_headers(&start.headers);
        }
        let scope = trace::Scope::enter(record);
        if state.is_none() && failed.is_none() {
            match self.guarded(stream_id, job.ctx.seq, "Default (new stream state)", || {
                P::Stream::default()
            }) {
                Ok(s) => state = Some(s),
                Err(e) => failed = Some(e),
            }
        }
        let (ended, reply) = self.run(&mut state, &job, &mut failed, gaps, partial);
        let mut record = scope.take();
        drop(_mark);
        // Consumed before the lane stops counting as running, so whichever worker finds the
        // lanes idle reports these bytes too.
        drop(job);

        let mut inner = self.lock();
        inner.running.remove(&stream_id);
        let mut leftover = Vec::new();
        if ended {
            if let Some(lane) = inner.lanes.remove(&stream_id) {
                leftover.extend(lane.queue);
            }
        } else if let Some(lane) = inner.lanes.get_mut(&stream_id) {
            lane.state = state;
            lane.trace = record.take();
            lane.last_active = Instant::now();
            lane.failed = failed;
            if lane.queue.is_empty() {
                lane.scheduled = false;
            } else {
                inner.ready.push_back(stream_id);
            }
        }
        let _answering = Answering::start(self, inner, reply.is_some() || !leftover.is_empty());
        if let Some(reply) = reply {
            step.call_id = None;
            // One `Spans` right before the stream's final reply, when something was recorded;
            // an ended stream without a final (an abort) drops its record.
            if matches!(reply, FromPlugin::FinalReply(_)) {
                if let Some(spans) = record.and_then(trace::Record::into_spans) {
                    (self.out)(FromPlugin::Spans(spans));
                }
            }
            (self.out)(reply);
        }
        for job in leftover {
            self.answer_after_end(job);
        }
    }

    /// After a panic outside plugin code in [`Shared::step`] (a bug in the host): logs it, fails
    /// the stream, answers its final if one was in flight, and leaves the lane runnable, so
    /// neither the worker nor the stream's later events are lost.
    fn recover(&self, stream_id: StreamId, step: Step, payload: &(dyn Any + Send)) {
        let msg = panic_message(payload);
        let total = self.stats.panics.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(
            plugin = %self.cfg.plugin,
            stream_id,
            panic = %msg,
            panics_total = total,
            "bug: the plugin host panicked outside plugin code; failing this stream, the worker goes on"
        );
        let err = format!(
            "plugin host of `{}` panicked outside plugin code: {msg}",
            self.cfg.plugin
        );
        let mut inner = self.lock();
        // Marked running when a worker took it (or by the step itself): one worker per lane,
        // so the mark is this step's.
        inner.running.remove(&stream_id);
        let mut leftover = Vec::new();
        if step.call_id.is_some() {
            if let Some(lane) = inner.lanes.remove(&stream_id) {
                leftover.extend(lane.queue);
            }
        } else if let Some(lane) = inner.lanes.get_mut(&stream_id) {
            lane.failed.get_or_insert(err.clone());
            if lane.queue.is_empty() {
                lane.scheduled = false;
            } else {
                inner.ready.push_back(stream_id);
            }
        }
        let _answering =
            Answering::start(self, inner, step.call_id.is_some() || !leftover.is_empty());
        if let Some(call_id) = step.call_id {
            (self.out)(FromPlugin::FinalReply(FinalReply {
                call_id,
                stream_id,
                outcome: FinalOutcome::Error(err),
            }));
        }
        for job in leftover {
            self.answer_after_end(job);
        }
    }

    /// Events queued behind a stream's end: still answer what the front waits for.
    fn answer_after_end(&self, job: Job) {
        tracing::warn!(
            stream_id = job.ctx.stream_id,
            seq = job.ctx.seq,
            "event after the stream's Final or Abort; not run"
        );
        match job.msg {
            ToPlugin::Chunk(c) if c.ack => (self.out)(FromPlugin::Ack(Ack {
                stream_id: c.stream_id,
                seq: c.seq,
            })),
            msg => {
                if let Some((call_id, stream_id)) = msg.final_call() {
                    (self.out)(FromPlugin::FinalReply(FinalReply {
                        call_id,
                        stream_id,
                        outcome: FinalOutcome::Error("stream had already ended".into()),
                    }))
                }
            }
        }
    }

    /// The one path plugin code runs through: `f` with a panic caught, logged once with plugin,
    /// stream id and message, and counted. `Err` is the message the stream's final reply carries.
    fn guarded<T>(
        &self,
        stream_id: StreamId,
        seq: u32,
        what: &'static str,
        f: impl FnOnce() -> T,
    ) -> Result<T, String> {
        let caught = {
            let _catching = Catching::enter();
            catch_unwind(AssertUnwindSafe(f))
        };
        caught.map_err(|payload| {
            let msg = panic_message(&*payload);
            let location = CAUGHT_AT.with(|c| c.take()).unwrap_or_default();
            // Dropping the payload could run plugin code too (a panic with a custom type).
            if catch_unwind(AssertUnwindSafe(|| drop(payload))).is_err() {
                tracing::error!(stream_id, "dropping a panic payload panicked; ignored");
            }
            let total = self.stats.panics.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(
                plugin = %self.cfg.plugin,
                stream_id,
                seq,
                hook = what,
                panic = %msg,
                %location,
                panics_total = total,
                "plugin panicked; this stream's final reply carries the error, other streams go on"
            );
            format!(
                "plugin `{}` panicked in {what} (seq {seq}): {msg}",
                self.cfg.plugin
            )
        })
    }

    /// Drops a stream's state through [`Shared::guarded`]; a panic fails the stream (unless it
    /// had failed already: the first error is the one reported).
    fn drop_state(
        &self,
        state: Option<P::Stream>,
        stream_id: StreamId,
        seq: u32,
        failed: &mut Option<String>,
    ) {
        let Some(state) = state else {
            return;
        };
        if let Err(e) = self.guarded(stream_id, seq, "Drop (stream state)", move || drop(state)) {
            failed.get_or_insert(e);
        }
    }

    /// Runs one event's hook. Returns whether the stream ended (its state is then dropped) and
    /// the reply to send. A panic fails the stream (`failed`); a failed stream's hooks are
    /// skipped and its final reply carries the first error.
    fn run(
        &self,
        state: &mut Option<P::Stream>,
        job: &Job,
        failed: &mut Option<String>,
        gaps: u64,
        partial: bool,
    ) -> (bool, Option<FromPlugin>) {
        let plugin = &*self.plugin;
        let ctx = &job.ctx;
        let (stream_id, seq) = (ctx.stream_id, ctx.seq);
        let mut hook = |name: &'static str, f: &mut dyn FnMut(&mut P::Stream)| {
            if failed.is_some() {
                return;
            }
            if let Some(s) = state.as_mut() {
                if let Err(e) = self.guarded(stream_id, seq, name, || f(s)) {
                    *failed = Some(e);
                }
            }
        };
        match &job.msg {
            ToPlugin::RequestStart(e) => {
                hook("on_request_start", &mut |s| {
                    plugin.on_request_start(s, ctx, e)
                });
                (false, None)
            }
            ToPlugin::ResponseHeaders(e) => {
                hook("on_response_headers", &mut |s| {
                    plugin.on_response_headers(s, ctx, e)
                });
                (false, None)
            }
            ToPlugin::Chunk(c) => {
                hook("on_chunk", &mut |s| plugin.on_chunk(s, ctx, c));
                let ack = c.ack.then_some({
                    FromPlugin::Ack(Ack {
                        stream_id: c.stream_id,
                        seq: c.seq,
                    })
                });
                (false, ack)
            }
            ToPlugin::Final(_) | ToPlugin::AbortedFinal(_) => {
                let (call_id, final_stream) = job.msg.final_call().expect("a final call");
                let mut meta = None;
                match &job.msg {
                    ToPlugin::Final(f) => {
                        hook("on_final", &mut |s| meta = Some(plugin.on_final(s, ctx, f)))
                    }
                    ToPlugin::AbortedFinal(a) => hook("on_aborted_final", &mut |s| {
                        meta = Some(plugin.on_aborted_final(s, ctx, a))
                    }),
                    _ => unreachable!("matched above"),
                }
                // Dropped before the reply is built, so a panic in `Drop` is in the reply too.
                self.drop_state(state.take(), stream_id, seq, failed);
                if let (None, Some(meta)) = (&*failed, &mut meta) {
                    let annotated =
                        self.guarded(stream_id, seq, "building the final metadata", || {
                            annotate(meta, &self.cfg.namespace, gaps, partial)
                        });
                    if let Err(e) = annotated {
                        *failed = Some(e);
                    }
                }
                let outcome = match (failed.take(), meta) {
                    (Some(err), meta) => {
                        if let Some(meta) = meta {
                            if let Err(e) =
                                self.guarded(stream_id, seq, "Drop (metadata)", || drop(meta))
                            {
                                tracing::debug!(stream_id, error = %e, "metadata drop panicked");
                            }
                        }
                        FinalOutcome::Error(err)
                    }
                    (None, Some(meta)) => FinalOutcome::Metadata(meta),
                    (None, None) => FinalOutcome::Error("final hook returned nothing".into()),
                };
                let reply = FromPlugin::FinalReply(FinalReply {
                    call_id,
                    stream_id: final_stream,
                    outcome,
                });
                (true, Some(reply))
            }
            ToPlugin::Abort(a) => {
                hook("on_abort", &mut |s| plugin.on_abort(s, ctx, a));
                self.drop_state(state.take(), stream_id, seq, failed);
                (true, None)
            }
            _ => (false, None),
        }
    }
}

thread_local! {
    /// Plugin code runs under [`Shared::guarded`] on this thread: its panic is logged there.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// Where the last panic caught by [`Shared::guarded`] on this thread happened.
    static CAUGHT_AT: Cell<Option<String>> = const { Cell::new(None) };
}

/// Marks this thread as running guarded plugin code until dropped.
struct Catching(bool);

impl Catching {
    fn enter() -> Catching {
        quiet_panic_hook();
        Catching(CATCHING.with(|c| c.replace(true)))
    }
}

impl Drop for Catching {
    fn drop(&mut self) {
        CATCHING.with(|c| c.set(self.0));
    }
}

/// Wraps the process's panic hook (the one `logging.rs` installs, or the default) once, so that
/// a panic [`Shared::guarded`] catches is logged once, by it, with plugin, stream and the
/// location the hook saw, rather than also by the hook without them. Panics anywhere else still
/// reach the previous hook. (A plugin that catches its own panics inside a hook is not logged by
/// the hook either: it handled them.)
fn quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                CAUGHT_AT.with(|c| c.set(at));
            } else {
                previous(info);
            }
        }));
    });
}

/// What a step had done when it panicked, for [`Shared::recover`].
#[derive(Default)]
struct Step {
    /// A final is being run and not yet answered.
    call_id: Option<u64>,
}

/// Held by a worker thread; if the thread ends while the lanes are not stopping (which the
/// catch-all in [`Shared::worker`] should make impossible), logs it and wakes the host, which
/// exits non-zero so the supervisor restarts the plugin instead of it running on a shrunk pool.
struct Alive<'a, F: Fn() -> bool> {
    lost: &'a WorkerLost,
    stopping: F,
    index: usize,
}

impl<F: Fn() -> bool> Drop for Alive<'_, F> {
    fn drop(&mut self) {
        if (self.stopping)() {
            return;
        }
        tracing::error!(
            worker = self.index,
            panicking = std::thread::panicking(),
            "worker thread pv-lane-{} exited unexpectedly; the plugin exits so it is restarted",
            self.index
        );
        self.lost.count.fetch_add(1, Ordering::AcqRel);
        self.lost.notify.notify_one();
    }
}

/// Worker threads that ended while they should not have.
#[derive(Default)]
pub(crate) struct WorkerLost {
    count: AtomicU64,
    notify: tokio::sync::Notify,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ipc_protocol::{Abort, AbortCause, Chunk, Final, RequestStart};
    use std::sync::mpsc;

    /// Records the sequence numbers its hooks see; panics on a chunk saying "panic"; blocks on
    /// a chunk saying "block" until `release` is dropped or sent to.
    #[derive(Default)]
    struct Recorder {
        release: Mutex<Option<mpsc::Receiver<()>>>,
        /// Reports `quick_final`, and records the thread each final ran on.
        quick: bool,
        final_threads: Mutex<HashMap<StreamId, std::thread::ThreadId>>,
        /// Reports `quick_events`, and records the thread each chunk ran on.
        quick_events: bool,
        chunk_threads: Mutex<Vec<(StreamId, std::thread::ThreadId)>>,
    }

    #[derive(Default)]
    struct Seen(Vec<u32>);

    impl Plugin for Recorder {
        type Stream = Seen;
        fn name(&self) -> &str {
            "rec"
        }
        fn on_request_start(&self, s: &mut Seen, ctx: &EventCtx, _: &RequestStart) {
            s.0.push(ctx.seq);
        }
        fn on_chunk(&self, s: &mut Seen, ctx: &EventCtx, c: &Chunk) {
            if &c.bytes[..] == b"panic" {
                panic!("asked to panic");
            }
            if &c.bytes[..] == b"block" {
                if let Some(rx) = self.release.lock().unwrap().take() {
                    let _ = rx.recv();
                }
            }
            if ctx.stream_id.is_multiple_of(3) {
                std::thread::yield_now();
            }
            s.0.push(ctx.seq);
            self.chunk_threads
                .lock()
                .unwrap()
                .push((ctx.stream_id, std::thread::current().id()));
        }
        fn quick_final(&self) -> bool {
            self.quick
        }
        fn quick_events(&self) -> bool {
            self.quick_events
        }
        fn on_final(&self, s: &mut Seen, ctx: &EventCtx, _: &Final) -> Metadata {
            s.0.push(ctx.seq);
            self.final_threads
                .lock()
                .unwrap()
                .insert(ctx.stream_id, std::thread::current().id());
            let seqs = s.0.iter().map(|&q| Value::from(q)).collect::<Vec<_>>();
            Metadata::from([(
                "plugvisor.rec".to_owned(),
                Value::map([
                    ("seqs", Value::List(seqs)),
                    ("gap_here", Value::from(ctx.gap)),
                ]),
            )])
        }
    }

    fn lanes(
        plugin: Recorder,
        workers: usize,
        queue_events: usize,
    ) -> (Lanes<Recorder>, mpsc::Receiver<FromPlugin>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let out: Outbox = Arc::new(move |m| {
            let _ = tx.lock().unwrap().send(m);
        });
        let cfg = LaneConfig {
            workers,
            queue_events,
            queue_bytes: 1 << 20,
            plugin: "rec".into(),
            namespace: "plugvisor.rec".into(),
            trace: false,
        };
        let credits = Credits::new(1 << 20, out.clone(), false);
        (
            Lanes::start(Arc::new(plugin), cfg, out, credits).unwrap(),
            rx,
        )
    }

    impl Lanes<Recorder> {
        /// Submits `msg` with its real frame length; returns that length.
        fn submit_test(&self, msg: ToPlugin) -> u64 {
            let len = ipc_protocol::codec::encoded_len(&msg).unwrap() + 4;
            self.submit(msg, len, false);
            len as u64
        }

        fn consumed(&self) -> u64 {
            self.shared.credits.consumed()
        }
    }

    /// Waits until stream `id`'s lane is running with nothing queued: its worker is inside the
    /// blocking hook (not still in an earlier event).
    fn wait_blocked(lanes: &Lanes<Recorder>, id: StreamId) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            {
                let inner = lanes.shared.lock();
                let queued = inner.lanes.get(&id).map_or(0, |l| l.queue.len());
                if inner.running.contains_key(&id) && queued == 0 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "stream {id} never blocked");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn start(id: u64) -> ToPlugin {
        ToPlugin::RequestStart(RequestStart {
            stream_id: id,
            seq: 0,
            stamp_ns: 1,
            request_id: None,
            headers: vec![],
        })
    }

    fn chunk(id: u64, seq: u32, body: &'static str, ack: bool) -> ToPlugin {
        ToPlugin::Chunk(Chunk {
            stream_id: id,
            seq,
            stamp_ns: 2,
            len: body.len() as u32,
            bytes: Bytes::from_static(body.as_bytes()),
            end_of_stream: false,
            ack,
        })
    }

    fn fin(id: u64, seq: u32) -> ToPlugin {
        ToPlugin::Final(Final {
            stream_id: id,
            seq,
            stamp_ns: 3,
            call_id: id * 10,
            len: 0,
            bytes: Bytes::new(),
            trailers: vec![],
        })
    }

    fn replies(rx: &mpsc::Receiver<FromPlugin>, n: usize) -> HashMap<StreamId, FinalOutcome> {
        let mut got = HashMap::new();
        while got.len() < n {
            let msg = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("reply within 10 s");
            if let FromPlugin::FinalReply(r) = msg {
                assert_eq!(r.call_id, r.stream_id * 10);
                got.insert(r.stream_id, r.outcome);
            }
        }
        got
    }

    fn seqs(outcome: &FinalOutcome) -> Vec<i64> {
        let FinalOutcome::Metadata(m) = outcome else {
            panic!("expected metadata, got {outcome:?}")
        };
        match m["plugvisor.rec"].get("seqs") {
            Some(Value::List(l)) => l.iter().map(|v| v.as_i64().unwrap()).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// The lanes are not idle until a step's answers are handed out: a host told to shut down
    /// ends the connection once they are idle, and must not end it with a final reply still on
    /// its way.
    #[test]
    fn a_lane_is_not_idle_until_its_final_reply_is_handed_out() {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
        let out: Outbox = Arc::new(move |m| {
            if matches!(m, FromPlugin::FinalReply(_)) {
                let _ = entered_tx.lock().unwrap().send(());
                let _ = release_rx.lock().unwrap().recv();
            }
        });
        let cfg = LaneConfig {
            workers: 1,
            queue_events: 16,
            queue_bytes: 1 << 20,
            plugin: "rec".into(),
            namespace: "plugvisor.rec".into(),
            trace: false,
        };
        let credits = Credits::new(1 << 20, out.clone(), false);
        let lanes = Lanes::start(Arc::new(Recorder::default()), cfg, out, credits).unwrap();
        lanes.submit_test(start(1));
        lanes.submit_test(fin(1, 1));
        entered_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the final reply is handed out");
        assert!(!lanes.is_idle(), "idle while the final reply is on its way");
        drop(release_tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lanes.is_idle() {
            assert!(Instant::now() < deadline, "never idle after the reply");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(lanes.active_streams(), 0);
    }

    #[test]
    fn interleaved_streams_each_run_in_sequence_order() {
        assert_interleaved_streams_run_in_order(Recorder::default(), 4, 200, 20);
    }

    /// Starts `streams` streams, then sends each `chunks` chunks round-robin and ends them all:
    /// every stream's hooks must have seen its events in sequence order, and no lane is left.
    fn assert_interleaved_streams_run_in_order(
        plugin: Recorder,
        workers: usize,
        streams: u64,
        chunks: u32,
    ) {
        let (lanes, rx) = lanes(plugin, workers, 10_000);
        for id in 0..streams {
            lanes.submit_test(start(id));
        }
        for seq in 1..=chunks {
            for id in 0..streams {
                lanes.submit_test(chunk(id, seq, "x", false));
            }
        }
        for id in 0..streams {
            lanes.submit_test(fin(id, chunks + 1));
        }
        let got = replies(&rx, streams as usize);
        let want: Vec<i64> = (0..=i64::from(chunks) + 1).collect();
        for id in 0..streams {
            assert_eq!(seqs(&got[&id]), want, "stream {id}");
        }
        assert_eq!(lanes.active_streams(), 0);
    }

    #[test]
    fn a_quick_final_of_an_idle_lane_runs_on_the_reading_thread_and_a_busy_lane_keeps_its_order() {
        let (release_tx, release_rx) = mpsc::channel();
        let plugin = Recorder {
            release: Mutex::new(Some(release_rx)),
            quick: true,
            ..Recorder::default()
        };
        let (lanes, rx) = lanes(plugin, 2, 100);
        // Stream 1 idle when its final comes: answered before `submit` returns, on this thread.
        lanes.submit_test(start(1));
        lanes.submit_test(chunk(1, 1, "x", false));
        let deadline = Instant::now() + Duration::from_secs(5);
        while lanes
            .shared
            .lock()
            .lanes
            .get(&1)
            .is_none_or(|l| l.scheduled)
        {
            assert!(Instant::now() < deadline, "stream 1 never went idle");
            std::thread::sleep(Duration::from_millis(1));
        }
        lanes.submit_test(fin(1, 2));
        let here = std::thread::current().id();
        assert_eq!(
            lanes.shared.plugin.final_threads.lock().unwrap().get(&1),
            Some(&here)
        );
        // Stream 2's worker is inside a hook: its final waits its turn on a worker.
        lanes.submit_test(start(2));
        lanes.submit_test(chunk(2, 1, "block", false));
        wait_blocked(&lanes, 2);
        lanes.submit_test(fin(2, 2));
        assert!(!lanes
            .shared
            .plugin
            .final_threads
            .lock()
            .unwrap()
            .contains_key(&2));
        release_tx.send(()).unwrap();
        let got = replies(&rx, 2);
        assert_eq!(seqs(&got[&1]), vec![0, 1, 2]);
        assert_eq!(seqs(&got[&2]), vec![0, 1, 2]);
        assert_ne!(
            lanes.shared.plugin.final_threads.lock().unwrap().get(&2),
            Some(&here)
        );
    }

    #[test]
    fn quick_events_of_an_idle_lane_run_on_the_reading_thread_and_a_busy_lane_keeps_its_order() {
        let (release_tx, release_rx) = mpsc::channel();
        let plugin = Recorder {
            release: Mutex::new(Some(release_rx)),
            quick_events: true,
            ..Recorder::default()
        };
        let (lanes, rx) = lanes(plugin, 2, 100);
        let here = std::thread::current().id();
        // Stream 1 is idle whenever its events come: each runs before `submit` returns.
        lanes.submit_test(start(1));
        lanes.submit_test(chunk(1, 1, "x", false));
        lanes.submit_test(chunk(1, 2, "x", false));
        assert_eq!(
            *lanes.shared.plugin.chunk_threads.lock().unwrap(),
            vec![(1, here), (1, here)]
        );
        // Stream 2's chunk blocks a hook (on this thread, so it is released from another): its
        // next chunk waits its turn on a worker, in order.
        let blocked = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            release_tx.send(()).unwrap();
        });
        lanes.submit_test(start(2));
        lanes.submit_test(chunk(2, 1, "block", false));
        blocked.join().unwrap();
        lanes.submit_test(chunk(2, 2, "x", false));
        lanes.submit_test(fin(1, 3));
        lanes.submit_test(fin(2, 3));
        let got = replies(&rx, 2);
        assert_eq!(seqs(&got[&1]), vec![0, 1, 2, 3]);
        assert_eq!(seqs(&got[&2]), vec![0, 1, 2, 3]);
        // Finals are not quick here: a worker ran them.
        assert!(lanes
            .shared
            .plugin
            .final_threads
            .lock()
            .unwrap()
            .values()
            .all(|t| *t != here));
    }

    #[test]
    fn quick_events_keep_every_stream_in_sequence_order_under_load() {
        let plugin = Recorder {
            quick: true,
            quick_events: true,
            ..Recorder::default()
        };
        // Streams interleaved, so some lanes are busy on a worker when their next event comes.
        assert_interleaved_streams_run_in_order(plugin, 2, 100, 10);
    }

    #[test]
    fn quick_finals_keep_every_stream_in_sequence_order_under_load() {
        let plugin = Recorder {
            quick: true,
            ..Recorder::default()
        };
        let (lanes, rx) = lanes(plugin, 2, 10_000);
        let streams = 100u64;
        for id in 0..streams {
            lanes.submit_test(start(id));
            for seq in 1..=10 {
                lanes.submit_test(chunk(id, seq, "x", false));
            }
            lanes.submit_test(fin(id, 11));
        }
        let got = replies(&rx, streams as usize);
        let want: Vec<i64> = (0..=11).collect();
        for id in 0..streams {
            assert_eq!(seqs(&got[&id]), want, "stream {id}");
        }
    }

    #[test]
    fn a_panicking_stream_gets_an_error_reply_and_the_others_are_untouched() {
        let (lanes, rx) = lanes(Recorder::default(), 2, 100);
        for id in 1..=10 {
            lanes.submit_test(start(id));
            lanes.submit_test(chunk(id, 1, if id == 5 { "panic" } else { "ok" }, false));
            lanes.submit_test(chunk(id, 2, "ok", true));
            lanes.submit_test(fin(id, 3));
        }
        let got = replies(&rx, 10);
        match &got[&5] {
            FinalOutcome::Error(e) => assert!(
                e.contains("asked to panic") && e.contains("on_chunk"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        for id in (1..=10).filter(|&i| i != 5) {
            assert_eq!(seqs(&got[&id]), vec![0, 1, 2, 3]);
        }
        assert_eq!(lanes.stats().panics.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn gaps_and_partial_streams_are_added_to_the_plugin_s_namespace() {
        let (lanes, rx) = lanes(Recorder::default(), 1, 100);
        lanes.submit_test(start(1));
        lanes.submit_test(chunk(1, 3, "x", false));
        lanes.submit_test(fin(1, 4));
        lanes.submit_test(chunk(2, 5, "x", false));
        lanes.submit_test(fin(2, 6));
        let got = replies(&rx, 2);
        let FinalOutcome::Metadata(m1) = &got[&1] else {
            panic!()
        };
        assert_eq!(m1["plugvisor.rec"].get("gaps"), Some(&Value::Int(2)));
        assert_eq!(m1["plugvisor.rec"].get("partial"), None);
        let FinalOutcome::Metadata(m2) = &got[&2] else {
            panic!()
        };
        assert_eq!(m2["plugvisor.rec"].get("partial"), Some(&Value::Bool(true)));
        assert_eq!(m2["plugvisor.rec"].get("gaps"), None);
    }

    #[test]
    fn a_full_lane_drops_chunks_which_then_show_as_gaps_but_never_drops_acked_or_final() {
        let (release_tx, release_rx) = mpsc::channel();
        let plugin = Recorder {
            release: Mutex::new(Some(release_rx)),
            ..Recorder::default()
        };
        let (lanes, rx) = lanes(plugin, 1, 3);
        lanes.submit_test(start(1));
        lanes.submit_test(chunk(1, 1, "block", false));
        wait_blocked(&lanes, 1);
        for seq in 2..=7 {
            lanes.submit_test(chunk(1, seq, "x", false));
        }
        lanes.submit_test(chunk(1, 8, "x", true));
        lanes.submit_test(fin(1, 9));
        assert_eq!(lanes.stats().dropped.load(Ordering::Relaxed), 3);
        release_tx.send(()).unwrap();
        let got = replies(&rx, 1);
        assert_eq!(seqs(&got[&1]), vec![0, 1, 2, 3, 4, 8, 9]);
        let FinalOutcome::Metadata(m) = &got[&1] else {
            panic!()
        };
        assert_eq!(m["plugvisor.rec"].get("gaps"), Some(&Value::Int(3)));
    }

    /// Waits until the lanes are idle and the last credit report (kept in `last`) is in.
    fn credited(lanes: &Lanes<Recorder>, rx: &mpsc::Receiver<FromPlugin>, last: &mut u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            while let Ok(m) = rx.try_recv() {
                if let FromPlugin::Credit(c) = m {
                    assert!(c.consumed > *last, "credit went backwards");
                    *last = c.consumed;
                }
            }
            if lanes.is_idle() && *last == lanes.consumed() {
                return *last;
            }
            assert!(
                Instant::now() < deadline,
                "credit {last} of {}, idle {}",
                lanes.consumed(),
                lanes.is_idle()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn every_event_byte_is_credited_whether_run_dropped_or_left_behind_an_end() {
        let (release_tx, release_rx) = mpsc::channel();
        let plugin = Recorder {
            release: Mutex::new(Some(release_rx)),
            ..Recorder::default()
        };
        let (lanes, rx) = lanes(plugin, 1, 3);
        let (mut sent, mut last) = (0, 0);
        sent += lanes.submit_test(start(1));
        sent += lanes.submit_test(chunk(1, 1, "block", false));
        wait_blocked(&lanes, 1);
        // Three fit in the lane, three are dropped at the full lane.
        for seq in 2..=7 {
            sent += lanes.submit_test(chunk(1, seq, "x", false));
        }
        assert_eq!(lanes.stats().dropped.load(Ordering::Relaxed), 3);
        sent += lanes.submit_test(fin(1, 8));
        // Behind the final (an inline chunk, never dropped): never run, still credited.
        sent += lanes.submit_test(chunk(1, 9, "late", true));
        // A connection message counts nothing.
        lanes.submit(ToPlugin::Ping(ipc_protocol::Ping { nonce: 1 }), 13, false);
        release_tx.send(()).unwrap();
        assert_eq!(credited(&lanes, &rx, &mut last), sent);
        // An evicted stream's events were all run: its credit is already in.
        sent += lanes.submit_test(start(2));
        assert_eq!(credited(&lanes, &rx, &mut last), sent);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(lanes.evict_idle(Duration::ZERO), 1);
        assert_eq!(credited(&lanes, &rx, &mut last), sent);
    }

    #[test]
    fn a_long_running_event_is_reported_stuck_and_others_keep_running() {
        let (release_tx, release_rx) = mpsc::channel();
        let plugin = Recorder {
            release: Mutex::new(Some(release_rx)),
            ..Recorder::default()
        };
        let (lanes, rx) = lanes(plugin, 2, 100);
        lanes.submit_test(start(1));
        lanes.submit_test(chunk(1, 1, "block", false));
        lanes.submit_test(fin(1, 2));
        std::thread::sleep(Duration::from_millis(60));
        lanes.submit_test(start(2));
        lanes.submit_test(fin(2, 1));
        let got = replies(&rx, 1);
        assert!(got.contains_key(&2));
        let stuck = lanes.stuck(Duration::from_millis(50));
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].stream_id, 1);
        assert!(stuck[0].running_ms >= 50);
        release_tx.send(()).unwrap();
        assert!(replies(&rx, 1).contains_key(&1));
        assert!(lanes.stuck(Duration::ZERO).is_empty());
    }

    #[test]
    fn streams_that_never_end_are_evicted_when_idle_and_aborts_free_their_lane() {
        let (lanes, _rx) = lanes(Recorder::default(), 1, 100);
        lanes.submit_test(start(1));
        lanes.submit_test(start(2));
        lanes.submit_test(ToPlugin::Abort(Abort {
            stream_id: 2,
            seq: 1,
            stamp_ns: 5,
            cause: AbortCause::ClientDisconnect,
            detail: String::new(),
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lanes.is_idle() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(lanes.active_streams(), 1);
        assert_eq!(lanes.evict_idle(Duration::from_secs(60)), 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(lanes.evict_idle(Duration::from_millis(10)), 1);
        assert_eq!(lanes.active_streams(), 0);
        assert_eq!(lanes.stats().evicted.load(Ordering::Relaxed), 1);
    }

    /// Records, per stream, whether each event it saw was replayed.
    struct ReplaySeer;

    #[derive(Default)]
    struct Flags(Vec<bool>);

    impl Plugin for ReplaySeer {
        type Stream = Flags;
        fn name(&self) -> &str {
            "rec"
        }
        fn on_request_start(&self, s: &mut Flags, ctx: &EventCtx, _: &RequestStart) {
            s.0.push(ctx.is_replayed());
        }
        fn on_chunk(&self, s: &mut Flags, ctx: &EventCtx, _: &Chunk) {
            s.0.push(ctx.is_replayed());
        }
        fn on_final(&self, s: &mut Flags, ctx: &EventCtx, _: &Final) -> Metadata {
            s.0.push(ctx.is_replayed());
            let flags = s.0.iter().map(|&b| Value::Bool(b)).collect();
            Metadata::from([(
                "plugvisor.rec".to_owned(),
                Value::map([("replayed", Value::List(flags))]),
            )])
        }
    }

    #[test]
    fn replayed_events_run_in_order_marked_replayed_and_the_stream_is_whole() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let out: Outbox = Arc::new(move |m| {
            let _ = tx.lock().unwrap().send(m);
        });
        let cfg = LaneConfig {
            workers: 1,
            queue_events: 100,
            queue_bytes: 1 << 20,
            plugin: "rec".into(),
            namespace: "plugvisor.rec".into(),
            trace: false,
        };
        let credits = Credits::new(1 << 20, out.clone(), false);
        let lanes = Lanes::start(Arc::new(ReplaySeer), cfg, out, credits).unwrap();
        lanes.submit(start(1), 40, true);
        lanes.submit(chunk(1, 1, "x", false), 40, true);
        lanes.submit(chunk(1, 2, "x", false), 40, false);
        lanes.submit(fin(1, 3), 40, false);
        let got = replies(&rx, 1);
        let FinalOutcome::Metadata(m) = &got[&1] else {
            panic!("{:?}", got[&1])
        };
        let flags = |b: &[bool]| Value::List(b.iter().map(|&b| Value::Bool(b)).collect());
        assert_eq!(
            m["plugvisor.rec"].get("replayed"),
            Some(&flags(&[true, true, false, false]))
        );
        assert_eq!(m["plugvisor.rec"].get("gaps"), None);
        assert_eq!(m["plugvisor.rec"].get("partial"), None);
        assert_eq!(lanes.stats().replayed.load(Ordering::Relaxed), 2);
        // The mark does not outlive the hook, and a test can set it itself.
        let ctx = EventCtx {
            stream_id: 1,
            seq: 0,
            stamp_ns: 0,
            gap: 0,
            partial: false,
        };
        assert!(!ctx.is_replayed());
        assert!(ctx.replaying(|| ctx.is_replayed()));
        assert!(!ctx.is_replayed());
    }

    #[tokio::test]
    async fn a_worker_thread_that_ends_is_reported_and_the_others_keep_serving() {
        let (lanes, rx) = lanes(Recorder::default(), 2, 100);
        lanes.shared.lock().kill_a_worker = true;
        lanes.shared.work.notify_all();
        let lost = tokio::time::timeout(Duration::from_secs(10), lanes.worker_lost())
            .await
            .expect("the host is told within 10 s");
        assert_eq!(lost, 1);
        lanes.submit_test(start(1));
        lanes.submit_test(fin(1, 1));
        assert_eq!(seqs(&replies(&rx, 1)[&1]), vec![0, 1]);
    }

    #[tokio::test]
    async fn stopping_the_lanes_is_not_a_lost_worker() {
        let (lanes, _rx) = lanes(Recorder::default(), 2, 100);
        let shared = Arc::clone(&lanes.shared);
        drop(lanes);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(shared.lost.count.load(Ordering::Acquire), 0);
    }
}
