//! Flow-control credit: how the host tells the front which event bytes it has finished with.
//!
//! The front writes events only while `written - consumed <= budget_bytes` (protocol version 2,
//! see "Flow control" in `docs/protocol.md`). Each event read from the socket carries an [`Owed`]
//! for its frame length; whatever happens to the event (run, dropped at a full lane, thrown away
//! with an ended or evicted stream), dropping the `Owed` adds its bytes to the consumed count.
//! Doing it in `Drop` means no path through the lanes can forget to return credit.
//!
//! [`Credits`] reports the cumulative count as [`FromPlugin::Credit`] once the unreported amount
//! reaches a quarter of the budget (few messages, and the front never runs dry while the plugin
//! keeps up), and when the lanes go idle ([`Credits::idle`]), so the front is never left waiting
//! for credit the plugin owes. With a front that agreed on `credit_on_ping`, going idle reports
//! only once after each `Ping` ([`Credits::pinged`], which reports at once too): the front pings
//! when its window is full, so a slow stream no longer costs a `Credit` frame per event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipc_protocol::{Credit, FromPlugin};

use crate::lanes::Outbox;

/// The consumed-bytes counter of one connection and when to report it.
pub(crate) struct Credits {
    consumed: AtomicU64,
    /// The last value sent; the lock also keeps reports in increasing order on the socket.
    reported: Mutex<u64>,
    threshold: u64,
    out: Outbox,
    /// The front agreed on `credit_on_ping`: idle moments report only when a ping asked.
    on_ping: bool,
    /// A `Ping` came since the last idle report.
    asked: std::sync::atomic::AtomicBool,
}

impl Credits {
    /// Credits for a window of `budget_bytes`, reported through `out`; `on_ping` when the front
    /// agreed on `credit_on_ping`.
    pub(crate) fn new(budget_bytes: u64, out: Outbox, on_ping: bool) -> Arc<Credits> {
        Arc::new(Credits {
            consumed: AtomicU64::new(0),
            reported: Mutex::new(0),
            threshold: report_threshold(budget_bytes),
            out,
            on_ping,
            asked: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The lanes have nothing queued or running: report everything, unless the front agreed on
    /// `credit_on_ping` and no `Ping` came since the last such report.
    pub(crate) fn idle(&self) {
        if !self.on_ping || self.asked.swap(false, Ordering::AcqRel) {
            self.flush();
        }
    }

    /// A `Ping` came: report everything now (ahead of the `Pong`), and once more at the next idle
    /// moment.
    pub(crate) fn pinged(&self) {
        self.flush();
        if self.on_ping {
            self.asked.store(true, Ordering::Release);
        }
    }

    /// An event of `bytes` counted bytes is now held; its bytes are consumed when the returned
    /// [`Owed`] is dropped.
    pub(crate) fn owe(self: &Arc<Self>, bytes: u64) -> Owed {
        Owed {
            bytes,
            credits: Arc::clone(self),
        }
    }

    /// Event bytes finished with so far.
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Acquire)
    }

    fn add(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.consumed.fetch_add(bytes, Ordering::AcqRel);
        self.report(self.threshold);
    }

    /// Reports everything consumed and not yet reported (the host went idle).
    pub(crate) fn flush(&self) {
        self.report(1);
    }

    /// Sends `Credit` if at least `min_unreported` bytes are unreported.
    fn report(&self, min_unreported: u64) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.consumed.load(Ordering::Acquire);
        if now.saturating_sub(*reported) >= min_unreported {
            *reported = now;
            (self.out)(FromPlugin::Credit(Credit { consumed: now }));
        }
    }
}

/// When to report: a quarter of the window (at least one byte).
pub(crate) fn report_threshold(budget_bytes: u64) -> u64 {
    (budget_bytes / 4).max(1)
}

/// The counted bytes of one event the host holds; consumed when dropped.
pub(crate) struct Owed {
    bytes: u64,
    credits: Arc<Credits>,
}

impl Drop for Owed {
    fn drop(&mut self) {
        self.credits.add(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn credits(budget: u64) -> (Arc<Credits>, mpsc::Receiver<u64>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let out: Outbox = Arc::new(move |m| {
            if let FromPlugin::Credit(c) = m {
                let _ = tx.lock().unwrap().send(c.consumed);
            }
        });
        (Credits::new(budget, out, false), rx)
    }

    #[test]
    fn on_ping_an_idle_moment_reports_only_once_after_each_ping() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let out: Outbox = Arc::new(move |m| {
            if let FromPlugin::Credit(c) = m {
                let _ = tx.lock().unwrap().send(c.consumed);
            }
        });
        let credits = Credits::new(400, out, true);
        drop(credits.owe(10));
        credits.idle();
        assert!(rx.try_recv().is_err(), "idle without a ping: nothing sent");
        credits.pinged();
        assert_eq!(rx.try_recv().unwrap(), 10, "a ping reports at once");
        drop(credits.owe(5));
        credits.idle();
        assert_eq!(rx.try_recv().unwrap(), 15, "and at the next idle moment");
        drop(credits.owe(5));
        credits.idle();
        assert!(rx.try_recv().is_err(), "only once per ping");
        drop(credits.owe(95));
        assert_eq!(
            rx.try_recv().unwrap(),
            115,
            "a quarter of the window always reports"
        );

        // Without the capability every idle moment reports.
        let (eager, rx) = super::tests::credits(400);
        drop(eager.owe(1));
        eager.idle();
        assert_eq!(rx.try_recv().unwrap(), 1);
        drop(eager.owe(1));
        eager.idle();
        assert_eq!(rx.try_recv().unwrap(), 2);
    }

    #[test]
    fn credit_is_reported_at_a_quarter_of_the_budget_and_on_flush() {
        let (credits, rx) = credits(400);
        let a = credits.owe(60);
        let b = credits.owe(39);
        let c = credits.owe(1);
        let d = credits.owe(7);
        drop(a);
        drop(b);
        assert!(rx.try_recv().is_err(), "99 bytes is under a quarter of 400");
        drop(c);
        assert_eq!(rx.try_recv().unwrap(), 100, "exactly a quarter is reported");
        drop(d);
        assert!(rx.try_recv().is_err());
        assert_eq!(credits.consumed(), 107);
        credits.flush();
        assert_eq!(rx.try_recv().unwrap(), 107);
        credits.flush();
        assert!(rx.try_recv().is_err(), "nothing new, nothing sent");
    }

    #[test]
    fn connection_messages_owe_nothing_and_tiny_budgets_report_every_byte() {
        let (credits, rx) = credits(2);
        drop(credits.owe(0));
        assert!(rx.try_recv().is_err());
        drop(credits.owe(1));
        assert_eq!(rx.try_recv().unwrap(), 1);
        assert_eq!(report_threshold(0), 1);
        assert_eq!(report_threshold(8 << 20), 2 << 20);
    }

    #[test]
    fn reports_from_many_threads_only_ever_increase() {
        let (credits, rx) = credits(64);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let credits = Arc::clone(&credits);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        drop(credits.owe(3));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        credits.flush();
        let seen: Vec<u64> = rx.try_iter().collect();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 12_000);
    }
}
