//! One stream's side of one plugin: the sequence numbers the stream gives the plugin (the one
//! place they are assigned), the connection the stream is bound to, and the journal that lets a
//! replacement process rebuild the stream after the process serving it went away.
//!
//! A stream binds to the plugin's live connection when it first sends it something and stays on
//! that connection while it lives, so a connection that is being replaced (a planned restart)
//! finishes the streams it has. When the bound connection ends (a crash, a kill, a hang), the
//! stream's next event or its final finds the replacement, replays its journal to it from the
//! first event (wrapped as `Replayed` where the old process had it; plain where nobody had it
//! yet), and carries on there; its final is retried on the replacement until its deadline. So a
//! crash costs time, not billing data. What the journal could not hold (`replay_bytes` is shared
//! by all in-flight streams of the plugin) and what a full queue dropped are lost for the plugin:
//! they show as gaps in the plugin's own metadata and under `plugvisor.partial`.

use std::sync::Arc;
use std::time::Instant;

use ipc_protocol::{Metadata, Subscriptions, ToPlugin};

use crate::plugin::link::{queued_size, Conn, Expected, Missing, PluginLink};

/// A journaled event.
struct Entry {
    msg: ToPlugin,
    /// A process has had it (so a replacement gets it marked as replayed).
    sent: bool,
}

/// One stream's state for one plugin.
pub struct PluginStream {
    link: Arc<PluginLink>,
    stream_id: u64,
    /// This stream's event hung the plugin: nothing more goes to the plugin for it.
    poisoned: bool,
    next_seq: u32,
    bound: Option<Arc<Conn>>,
    journal: Vec<Entry>,
    journal_bytes: usize,
    /// Events that could not be journaled (budget spent): a replay will miss them.
    unjournaled: u32,
    /// Events the plugin's current process will never see (queue full, or down without room in
    /// the journal); a replay resets it to `unjournaled`.
    lost: u32,
    /// Times the stream moved to a replacement process.
    replays: u32,
    /// When the stream moved to another connection, and whether by handover (the old one was
    /// draining) rather than after a crash; kept only for a traced stream (`None` otherwise).
    moves: Option<Vec<Move>>,
    /// A traced stream's `traceparent` naming its request span, for the `RequestStart` of a
    /// connection that agreed on `trace` (`None`: not traced).
    traceparent: Option<Arc<str>>,
}

use crate::traces::span::Move;

/// How a stream's final went for one plugin, beside its metadata.
pub struct Outcome {
    /// The metadata, or why there is none.
    pub result: Result<Metadata, Missing>,
    /// Events of this stream the answering process never got.
    pub lost: u32,
    /// Times the stream was replayed to a replacement process.
    pub replays: u32,
    /// The stream's moves, for its trace (empty when not traced).
    pub moves: Vec<Move>,
    /// What the plugin added to the stream's trace before its answer (traced streams only).
    pub spans: Option<Box<ipc_protocol::Spans>>,
}

impl PluginStream {
    /// A stream that has sent `link`'s plugin nothing yet.
    pub fn new(link: Arc<PluginLink>, stream_id: u64) -> PluginStream {
        PluginStream {
            link,
            stream_id,
            poisoned: false,
            next_seq: 0,
            bound: None,
            journal: Vec::new(),
            journal_bytes: 0,
            unjournaled: 0,
            lost: 0,
            replays: 0,
            moves: None,
            traceparent: None,
        }
    }

    /// The stream is traced: keeps the times of its moves from now on, gives `traceparent`
    /// (naming its request span) to connections that agreed on `trace`, and takes their
    /// `Spans`.
    pub fn traced(&mut self, traceparent: Arc<str>) {
        self.moves.get_or_insert_with(Vec::new);
        self.traceparent = Some(traceparent);
    }

    /// The plugin's link.
    pub fn link(&self) -> &Arc<PluginLink> {
        &self.link
    }

    /// The next sequence number. Every event of this stream for this plugin gets one, delivered
    /// or not, so a plugin that misses an event sees the gap.
    fn next_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// What the plugin subscribed to: its bound or live connection's, else the last it said.
    pub fn subscriptions(&self) -> Subscriptions {
        match self.bound.as_ref().filter(|c| !c.is_closed()) {
            Some(c) => c.subscriptions(),
            None => self.link.last_subscriptions(),
        }
    }

    /// Whether the plugin answers this stream's final call if the stream ends without a response
    /// end: the connection it is bound to agreed on `aborted_final`, else the plugin's.
    pub fn answers_aborted(&self) -> bool {
        match self.bound.as_ref().filter(|c| !c.is_closed()) {
            Some(c) => c.aborted_finals(),
            None => self.link.answers_aborted_finals(),
        }
    }

    /// The connection this stream's events go to now, binding (and replaying) if it has none.
    fn route(&mut self) -> Option<Arc<Conn>> {
        if let Some(c) = self.bound.as_ref().filter(|c| !c.is_closed()) {
            return Some(c.clone());
        }
        if self.poisoned || self.link.is_poisoned(self.stream_id) {
            // Replaying the event that hung the plugin would hang its replacement too.
            self.poisoned = true;
            return None;
        }
        let current = self.link.connection().filter(|c| !c.is_closed())?;
        if !self.journal.is_empty() {
            let moved = self.bound.is_some();
            // A plugin that does not decode `Replayed` gets only what it never had: the events
            // an earlier process had are lost to it, and the stream ends partial, said so.
            let replays = current.replays();
            let mut withheld = 0;
            let events: Vec<ToPlugin> = self
                .journal
                .iter_mut()
                .filter_map(|e| {
                    let mut msg = e.msg.clone();
                    if let Some(tp) = &self.traceparent {
                        with_traceparent(&mut msg, tp, current.traces());
                    }
                    let msg = match (e.sent, replays) {
                        (false, _) => msg,
                        (true, true) => ToPlugin::Replayed(Box::new(msg)),
                        (true, false) => {
                            withheld += 1;
                            return None;
                        }
                    };
                    e.sent = true;
                    Some(msg)
                })
                .collect();
            if moved {
                if let Some(moves) = &mut self.moves {
                    moves.push(Move {
                        at: Instant::now(),
                        handover: self.bound.as_ref().is_some_and(|c| c.was_draining()),
                    });
                }
            }
            if moved && replays {
                self.replays += 1;
                tracing::debug!(plugin = %self.link.name(), events = events.len(), unjournaled = self.unjournaled, "replaying a stream to the plugin's new process");
            }
            if !events.is_empty() {
                self.link.replay(&current, events);
            }
            self.lost = self.unjournaled + withheld;
        }
        if let Some(old) = self.bound.take() {
            self.link.unbind(&old);
        }
        self.link.bind(&current);
        self.bound = Some(current.clone());
        Some(current)
    }

    /// Keeps `msg` for a replay; false when the plugin's `replay_bytes` are spent.
    fn journal(&mut self, msg: &ToPlugin, sent: bool) -> bool {
        let bytes = queued_size(msg);
        if self.link.config().replay_bytes == 0 || !self.link.journal_take(bytes) {
            self.unjournaled += 1;
            return false;
        }
        self.journal.push(Entry {
            msg: msg.clone(),
            sent,
        });
        self.journal_bytes += bytes;
        true
    }

    /// Sends a fire-and-forget event built for its sequence number. Never waits: a full queue
    /// drops it (the plugin sees the gap); with the plugin down, it waits in the journal for the
    /// replacement.
    pub fn send(&mut self, make: impl FnOnce(u32) -> ToPlugin) {
        self.send_as::<false>(make);
    }

    /// [`PluginStream::send`] for the stream's `RequestStart`: a traced stream's copy for a
    /// connection that agreed on `trace` carries the front's `traceparent` instead of the
    /// request's (the journal keeps the request's, for a replacement that may not agree).
    pub fn send_start(&mut self, make: impl FnOnce(u32) -> ToPlugin) {
        self.send_as::<true>(make);
    }

    /// `START`: the message is the `RequestStart` (a constant, so the other events' path has no
    /// trace check at all).
    fn send_as<const START: bool>(&mut self, make: impl FnOnce(u32) -> ToPlugin) {
        let msg = make(self.next_seq());
        let conn = self.route();
        if self.poisoned {
            return;
        }
        match conn {
            Some(c) => {
                let journaled = self.journal(&msg, true);
                let mut msg = msg;
                if START {
                    if let Some(tp) = &self.traceparent {
                        with_traceparent(&mut msg, tp, c.traces());
                    }
                }
                let sent = if journaled {
                    self.link.send_journaled(&c, msg)
                } else {
                    self.link.send_event(Some(&c), msg)
                };
                if !sent {
                    self.lost += 1;
                }
            }
            None => self.park(msg),
        }
    }

    /// With the plugin down: the event waits in the journal for the replacement, or, with no
    /// room there, is dropped and counted.
    fn park(&mut self, msg: ToPlugin) {
        if !self.journal(&msg, false) {
            self.link.send_event(None, msg);
            self.lost += 1;
        }
    }

    /// Sends an inline chunk (built for its sequence number, `ack = true`) and returns what to
    /// wait on for its acknowledgement; `None` when it could not be sent (counted as a drop).
    pub async fn send_inline(
        &mut self,
        stream_id: u64,
        make: impl FnOnce(u32) -> ToPlugin,
        deadline: tokio::time::Instant,
    ) -> Option<(Arc<Conn>, u32, tokio::sync::oneshot::Receiver<()>)> {
        let seq = self.next_seq();
        let msg = make(seq);
        let conn = self.route();
        if self.poisoned {
            return None;
        }
        let Some(conn) = conn else {
            self.park(msg);
            return None;
        };
        self.journal(&msg, true);
        match self
            .link
            .send_inline(&conn, stream_id, seq, msg, deadline)
            .await
        {
            Some(rx) => Some((conn, seq, rx)),
            None => {
                self.lost += 1;
                None
            }
        }
    }

    /// The final call: `make(seq, call_id)` builds the `Final`. If the serving process goes away
    /// before it answers, the stream moves to the replacement (journal replayed) and the call is
    /// made again there, all within the deadline `final_timeout` after `started`.
    pub async fn finish(
        mut self,
        make: impl Fn(u32, u64) -> ToPlugin,
        started: Instant,
    ) -> Outcome {
        let seq = self.next_seq();
        let deadline = tokio::time::Instant::from_std(started + self.link.config().final_timeout);
        let mut connected = self.link.subscribe_connected();
        let mut expected = self.link.subscribe_expected();
        let mut spans = None;
        let result = loop {
            let routed = self.route();
            if self.poisoned {
                self.link.count_missing(Missing::Stuck);
                break Err(Missing::Stuck);
            }
            let conn = match routed {
                Some(conn) => conn,
                None => {
                    // Down: a replacement may be on its way (a restart takes tens of ms). Only
                    // then is it worth waiting for: a plugin stopped, failed, external and not
                    // connected, or restarting after the deadline is reported at once.
                    if tokio::time::Instant::now() >= deadline {
                        break self.link.final_call(None, 0, make(seq, 0), started).await;
                    }
                    if self.link.is_connected() {
                        // The old connection is being taken down right now.
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        continue;
                    }
                    let why = match *expected.borrow_and_update() {
                        Expected::NotComing(why) => Some(why),
                        Expected::Coming { at: Some(at) } if at >= deadline => {
                            Some(Missing::Backoff)
                        }
                        Expected::Coming { .. } => None,
                    };
                    if let Some(why) = why {
                        self.link.count_missing(why);
                        break Err(why);
                    }
                    tokio::select! {
                        _ = connected.wait_for(|c| *c) => {}
                        _ = expected.changed() => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                    continue;
                }
            };
            let call_id = self.link.next_call_id();
            let (result, got) = self
                .link
                .traced_final_call(
                    Some(conn.clone()),
                    call_id,
                    make(seq, call_id),
                    started,
                    self.traceparent.is_some(),
                )
                .await;
            spans = got;
            match result {
                Err(Missing::Down) if tokio::time::Instant::now() < deadline => {
                    // The process went away mid-call: wait for its replacement, replay, retry.
                    if !conn.is_closed() {
                        break Err(Missing::Down);
                    }
                    continue;
                }
                other => break other,
            }
        };
        Outcome {
            result,
            lost: self.lost,
            replays: self.replays,
            moves: self.moves.take().unwrap_or_default(),
            spans,
        }
    }

    /// Sends `msg` (an abort) to the process that knows this stream, if it is still there; a
    /// replacement never heard of the stream and needs nothing.
    pub fn abort(&mut self, make: impl FnOnce(u32) -> ToPlugin, patience: std::time::Duration) {
        let Some(conn) = self.bound.clone().filter(|c| !c.is_closed()) else {
            return;
        };
        if !conn.subscriptions().abort {
            return;
        }
        let msg = make(self.next_seq());
        self.link.send_event_patiently(conn, msg, patience);
    }
}

/// Puts `traceparent` in place of the request's in a `RequestStart` for a connection that agreed
/// on `trace` (`agreed`); any other message, or connection, is left as it is.
fn with_traceparent(msg: &mut ToPlugin, traceparent: &str, agreed: bool) {
    let ToPlugin::RequestStart(start) = msg else {
        return;
    };
    if !agreed {
        return;
    }
    start.headers.retain(|(name, _)| name != "traceparent");
    start
        .headers
        .push(("traceparent".to_owned(), traceparent.to_owned()));
}

impl Drop for PluginStream {
    fn drop(&mut self) {
        self.link.journal_release(self.journal_bytes);
        if self.poisoned {
            self.link.forget_poisoned(self.stream_id);
        }
        if let Some(conn) = self.bound.take() {
            self.link.unbind(&conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ipc_protocol::Chunk;

    use super::*;
    use crate::config::Config;
    use crate::observe::metrics::Metrics;

    fn chunk(seq: u32) -> ToPlugin {
        ToPlugin::Chunk(Chunk {
            stream_id: 1,
            seq,
            stamp_ns: 0,
            len: 3,
            bytes: Bytes::from_static(b"abc"),
            end_of_stream: false,
            ack: false,
        })
    }

    fn down_link(extra: &str) -> (Arc<PluginLink>, Arc<Metrics>) {
        let config = Config::parse(&format!("[plugins.p]\nspawn = false\n{extra}"), "t")
            .unwrap()
            .plugins
            .remove(0);
        let metrics = Arc::new(Metrics::new());
        (Arc::new(PluginLink::new(config, metrics.clone())), metrics)
    }

    #[tokio::test]
    async fn events_for_a_down_plugin_wait_in_the_journal_or_are_dropped_and_counted() {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        let dropped = "plugvisor_plugin_events_dropped_total{plugin=\"p\",reason=\"down\"}";

        // Room in the journal: both kinds of event wait there for the replacement.
        let (link, metrics) = down_link("");
        let mut ps = PluginStream::new(link.clone(), 1);
        ps.send(chunk);
        assert!(ps.send_inline(1, chunk, deadline).await.is_none());
        assert_eq!((ps.lost, ps.journal.len()), (0, 2));
        assert!(link.journal_used() > 0);
        assert!(!metrics.encode().contains(dropped));
        drop(ps);
        assert_eq!(link.journal_used(), 0);

        // No journal: each is lost to the plugin and counted.
        let (link, metrics) = down_link("replay_bytes = 0\n");
        let mut ps = PluginStream::new(link, 1);
        ps.send(chunk);
        assert!(ps.send_inline(1, chunk, deadline).await.is_none());
        assert_eq!((ps.lost, ps.journal.len()), (2, 0));
        assert!(metrics.encode().contains(&format!("{dropped} 2")));
    }

    #[test]
    fn the_traceparent_replaces_the_requests_only_in_a_request_start_for_a_trace_connection() {
        let start = || {
            ToPlugin::RequestStart(ipc_protocol::RequestStart {
                stream_id: 1,
                seq: 0,
                stamp_ns: 0,
                request_id: None,
                headers: vec![
                    (":path".into(), "/".into()),
                    ("traceparent".into(), "client".into()),
                    ("tracestate".into(), "a=b".into()),
                ],
            })
        };
        let headers = |m: ToPlugin| match m {
            ToPlugin::RequestStart(s) => s.headers,
            _ => unreachable!(),
        };
        let mut m = start();
        with_traceparent(&mut m, "front", true);
        assert_eq!(
            headers(m),
            vec![
                (":path".to_owned(), "/".to_owned()),
                ("tracestate".into(), "a=b".into()),
                ("traceparent".into(), "front".into()),
            ]
        );
        let mut m = start();
        with_traceparent(&mut m, "front", false);
        assert_eq!(headers(m), headers(start()));
        let mut c = chunk(1);
        with_traceparent(&mut c, "front", true);
        assert_eq!(c, chunk(1));
    }
}
