//! The [`Plugin`] trait: what a plugin implements, and the [`EventCtx`] every hook receives.
//!
//! A plugin is one value shared by every worker thread (`&self`, so it is `Send + Sync`) plus one
//! [`Plugin::Stream`] state per ext_proc stream, created by `Default` when the stream's first
//! event arrives and dropped when its `Final` or `Abort` has run (or when it is evicted as idle).
//! The host calls a stream's hooks one at a time in sequence order, so the state needs no locks.
//!
//! After a plugin process crashed, the front resends each in-flight stream's events to the
//! replacement, from the stream's first event, before new ones ([`EventCtx::is_replayed`]): the
//! hooks run exactly as for live events, so the state is rebuilt and the stream ends whole.

use ipc_protocol::{
    Abort, AbortedFinal, Chunk, Final, Metadata, RequestStart, ResponseHeaders, StreamId,
    Subscriptions, Value,
};

use std::cell::Cell;

use crate::config::ConfigError;

thread_local! {
    /// The replayed event this thread is running plugin code for, if any.
    static REPLAYING: Cell<Option<(StreamId, u32)>> = const { Cell::new(None) };
}

/// Where an event sits in its stream, as the host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventCtx {
    /// The front's id of the ext_proc stream.
    pub stream_id: StreamId,
    /// The event's sequence number within the stream.
    pub seq: u32,
    /// Arrival of the event at the front, `CLOCK_MONOTONIC` nanoseconds.
    pub stamp_ns: u64,
    /// How many events of this stream are missing right before this one (dropped by the front
    /// under overload, or lost to a restart). 0 when nothing is missing.
    pub gap: u32,
    /// The host never saw this stream's start (its first event here had a sequence number past
    /// the start, e.g. after a plugin restart mid-stream), so totals computed from it are partial.
    pub partial: bool,
}

impl EventCtx {
    /// Whether this event is a replay: the front sent it before, to a process of this plugin
    /// that crashed, and sends it again (same stream id, seq and stamp) so this process can
    /// rebuild the stream's state. Compute from it exactly as from a live event; skip only side
    /// effects outside the process that the crashed one may already have made (a write to an
    /// external system, a message sent per event).
    ///
    /// It is true only inside a hook (or `Default`/`Drop` of the stream's state) that the host
    /// runs for a replayed event. The flag is kept by the host, not in a field, so plugins and
    /// tests that build an `EventCtx` themselves keep compiling; tests mark one with
    /// [`EventCtx::replaying`].
    pub fn is_replayed(&self) -> bool {
        REPLAYING.with(|r| r.get() == Some((self.stream_id, self.seq)))
    }

    /// Runs `f` with this event marked replayed on the current thread (what the host does around
    /// a replayed event's plugin code); for tests of a plugin's replay behaviour.
    pub fn replaying<R>(&self, f: impl FnOnce() -> R) -> R {
        let _mark = ReplayMark::set(Some((self.stream_id, self.seq)));
        f()
    }
}

/// Marks the event this thread runs plugin code for as replayed (or not) until dropped, even
/// when that code panics.
pub(crate) struct ReplayMark(Option<(StreamId, u32)>);

impl ReplayMark {
    pub(crate) fn set(event: Option<(StreamId, u32)>) -> ReplayMark {
        ReplayMark(REPLAYING.with(|r| r.replace(event)))
    }
}

impl Drop for ReplayMark {
    fn drop(&mut self) {
        REPLAYING.with(|r| r.set(self.0));
    }
}

/// A plugin: per-stream hooks called in sequence order, different streams in parallel.
///
/// Every hook but [`Plugin::on_final`] has an empty default, so a plugin implements only what it
/// needs. A panic in any plugin code the host runs (a hook, the stream state's `Default` or
/// `Drop`) is caught by the host: it is logged with the plugin name, stream id and message, the
/// stream's final reply becomes [`ipc_protocol::FinalOutcome::Error`], later hooks of that stream
/// are skipped, and every other stream is unaffected; the worker thread goes on serving.
pub trait Plugin: Send + Sync + 'static {
    /// The state the plugin keeps for one stream; created with `Default` at the stream's first
    /// event.
    type Stream: Default + Send + 'static;

    /// The plugin's name when the command line names none (a binary built on [`crate::run`] may
    /// be started without a name; `plugvisor-plugin` always gets one).
    fn name(&self) -> &str;

    /// What the plugin wants to receive; sent in the `Hello`. Default: every event with body
    /// bytes ([`Subscriptions::ALL`]).
    fn subscriptions(&self) -> Subscriptions {
        Subscriptions::ALL
    }

    /// Applies the config the front sent in `Welcome` (the plugin's `[plugins.<name>.config]`
    /// table as a [`Value::Map`], or [`Value::Null`] when there is none). Called once, before any
    /// event. An error ends the process with exit code 78 and its message on stderr.
    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let _ = config;
        Ok(())
    }

    /// A request's headers reached the front.
    fn on_request_start(&self, stream: &mut Self::Stream, ctx: &EventCtx, event: &RequestStart) {
        let _ = (stream, ctx, event);
    }

    /// The upstream's response headers arrived.
    fn on_response_headers(
        &self,
        stream: &mut Self::Stream,
        ctx: &EventCtx,
        event: &ResponseHeaders,
    ) {
        let _ = (stream, ctx, event);
    }

    /// A response body chunk arrived (its bytes are empty unless the plugin subscribed to body
    /// bytes).
    fn on_chunk(&self, stream: &mut Self::Stream, ctx: &EventCtx, chunk: &Chunk) {
        let _ = (stream, ctx, chunk);
    }

    /// The response ended: every earlier event of the stream has run. The returned metadata
    /// (namespace → value, normally `plugvisor.<name>` → a map) goes back to the front and into
    /// Envoy's `dynamic_metadata`. The final's own last bytes are in `event.bytes`.
    fn on_final(&self, stream: &mut Self::Stream, ctx: &EventCtx, event: &Final) -> Metadata;

    /// Whether [`Plugin::on_final`] is quick and never blocks (no I/O, no locks held by other
    /// threads for long): the host may then run the final of a stream whose lane is idle on the
    /// thread that read it, instead of handing it to a worker thread and back, which saves a
    /// thread wake-up on every final RPC. That thread also answers the front's pings, so a final
    /// that blocks there would make the plugin look hung. Default `false`.
    fn quick_final(&self) -> bool {
        false
    }

    /// Whether the other per-stream hooks ([`Plugin::on_request_start`],
    /// [`Plugin::on_response_headers`], [`Plugin::on_chunk`], [`Plugin::on_abort`]) are quick
    /// and never block, in the sense of [`Plugin::quick_final`]: the host may then run an event
    /// whose stream has nothing queued or running on the thread that read it. A slow stream then
    /// costs no thread hand-off per chunk, which is most of a light plugin's CPU. Default
    /// `false`.
    fn quick_events(&self) -> bool {
        false
    }

    /// The stream ended without a response end; its state is dropped right after.
    fn on_abort(&self, stream: &mut Self::Stream, ctx: &EventCtx, event: &Abort) {
        let _ = (stream, ctx, event);
    }

    /// The final call of a stream that ended without a response end (the client left, the
    /// upstream reset, the front stopped; `event.cause` says which): return what the plugin
    /// knows, marked as partial or estimated where it is. It goes into the request's usage
    /// record (Envoy, whose stream is gone, gets nothing). The stream's state is dropped right
    /// after. The default runs [`Plugin::on_abort`] and answers with no metadata of its own.
    fn on_aborted_final(
        &self,
        stream: &mut Self::Stream,
        ctx: &EventCtx,
        event: &AbortedFinal,
    ) -> Metadata {
        self.on_abort(stream, ctx, &event.as_abort());
        Metadata::new()
    }
}
