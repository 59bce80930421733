//! The [`Plugin`] trait: what a plugin implements, and the [`EventCtx`] every hook receives.
//!
//! A plugin is one value shared by every worker thread (`&self`, so it is `Send + Sync`) plus one
//! [`Plugin::Stream`] state per ext_proc stream, created by `Default` when the stream's first
//! event arrives and dropped when its `Final` or `Abort` has run (or when it is evicted as idle).
//! The host calls a stream's hooks one at a time in sequence order, so the state needs no locks.

use ipc_protocol::{
    Abort, Chunk, Final, Metadata, RequestStart, ResponseHeaders, StreamId, Subscriptions, Value,
};

use crate::config::ConfigError;

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

/// A plugin: per-stream hooks called in sequence order, different streams in parallel.
///
/// Every hook but [`Plugin::on_final`] has an empty default, so a plugin implements only what it
/// needs. A panic in a hook is caught by the host: it is logged with the plugin name, stream id
/// and message, the stream's final reply becomes [`ipc_protocol::FinalOutcome::Error`], later
/// hooks of that stream are skipped, and every other stream is unaffected.
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

    /// The stream ended without a response end; its state is dropped right after.
    fn on_abort(&self, stream: &mut Self::Stream, ctx: &EventCtx, event: &Abort) {
        let _ = (stream, ctx, event);
    }
}
