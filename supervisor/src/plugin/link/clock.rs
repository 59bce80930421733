//! One timer for the batches (`batch_ms`) of every plugin connection of a front.
//!
//! A connection holding a batch sends it when the batch is due. With a timer per connection, the
//! front woke once per connection at every beat, and once more for the runtime's other worker,
//! which tokio wakes whenever a worker has a second task queued (`scripts/wakeups
//! --batch-ms=…`: about three wake-ups per beat with the default config's two plugins). The
//! connections of a front share this clock instead: one task sleeps until the earliest batch is
//! due and then takes the writer's turn of every connection whose batch is due, itself, so a beat
//! costs one wake-up however many plugins hold a batch.

use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Conn;

/// The batch clock of a front's plugin connections (see the module).
#[derive(Default)]
pub struct BatchClock {
    state: Mutex<State>,
    /// Rung when a batch is due before the time the clock's task sleeps until.
    sooner: Notify,
}

#[derive(Default)]
struct State {
    /// The batches held, and when each is due. One entry per time a connection's writer set its
    /// batch's due time; an entry whose batch went earlier (a final call took it) finds nothing
    /// due when it comes.
    due: Vec<(Instant, Weak<Conn>)>,
    /// When the clock's task wakes next; `None`: it does not run (nothing is held).
    wakes_at: Option<Instant>,
}

impl BatchClock {
    /// A clock with nothing held; its task starts with the first batch.
    pub fn new() -> Arc<BatchClock> {
        Arc::new(BatchClock::default())
    }

    /// `conn` holds a batch due `at`: its link's writer turn runs then (`PluginLink::beat`).
    pub(super) fn hold(self: &Arc<Self>, at: Instant, conn: Weak<Conn>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.due.push((at, conn));
        match state.wakes_at {
            None => {
                state.wakes_at = Some(at);
                drop(state);
                tokio::spawn(self.clone().run());
            }
            Some(next) if at < next => {
                state.wakes_at = Some(at);
                drop(state);
                self.sooner.notify_one();
            }
            Some(_) => {}
        }
    }

    /// Sleeps until the earliest batch is due, takes every due connection's turn, and ends when
    /// nothing is held (the next [`BatchClock::hold`] starts it again).
    async fn run(self: Arc<Self>) {
        loop {
            let next = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let Some(next) = state.due.iter().map(|(at, _)| *at).min() else {
                    state.wakes_at = None;
                    return;
                };
                state.wakes_at = Some(next);
                next
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = self.sooner.notified() => continue,
            }
            let now = Instant::now();
            let due: Vec<Weak<Conn>> = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let (due, later) = std::mem::take(&mut state.due)
                    .into_iter()
                    .partition(|(at, _)| *at <= now);
                state.due = later;
                due.into_iter().map(|(_, conn)| conn).collect()
            };
            for conn in due {
                if let Some(conn) = conn.upgrade() {
                    if let Some(link) = conn.link.upgrade() {
                        link.beat(&conn);
                    }
                }
            }
        }
    }

    /// Batches held (their entries), for tests.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due
            .len()
    }
}
