//! Liveness probes: a loop proves it is still running by answering a [`Probe`] through its
//! [`ProbeAnswerer`]. The systemd watchdog (`shell::systemd::watchdog_loop`) pings only while
//! every probe is answered in time; the owners of the plugins and the ext_proc accept loop answer
//! them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;

/// Asks a loop to prove it is still running: the loop answers a [`Probe`] by polling its
/// [`ProbeAnswerer`]. The watchdog pings only while every probe is answered in time.
#[derive(Debug, Clone)]
pub struct Probe {
    name: String,
    tolerance: Duration,
    tx: mpsc::Sender<oneshot::Sender<()>>,
}

/// The loop's end of a [`Probe`].
#[derive(Debug)]
pub struct ProbeAnswerer {
    rx: mpsc::Receiver<oneshot::Sender<()>>,
}

/// A probe for the loop named `name`, which must answer within one watchdog round.
pub fn probe(name: impl Into<String>) -> (Probe, ProbeAnswerer) {
    let (tx, rx) = mpsc::channel(4);
    (
        Probe {
            name: name.into(),
            tolerance: Duration::ZERO,
            tx,
        },
        ProbeAnswerer { rx },
    )
}

/// What became of a probe sent to a loop.
pub(crate) enum Sent {
    /// Waiting for the answer.
    Waiting(oneshot::Receiver<()>),
    /// The loop is gone (ended on purpose, e.g. a plugin removed by a reload): not a failure.
    Gone,
    /// Earlier probes are still queued: the loop is not reading them.
    Stuck,
}

impl Probe {
    /// The loop's name, for the log.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lets the loop stay silent this long before it counts as wedged: for loops that may
    /// legitimately spend a bounded while in one step (a supervisor waiting for a plugin to stop).
    pub fn with_tolerance(mut self, tolerance: Duration) -> Probe {
        self.tolerance = tolerance;
        self
    }

    /// How long the loop may stay silent (see [`Probe::with_tolerance`]).
    pub fn tolerance(&self) -> Duration {
        self.tolerance
    }

    pub(crate) fn send(&self) -> Sent {
        let (tx, rx) = oneshot::channel();
        match self.tx.try_send(tx) {
            Ok(()) => Sent::Waiting(rx),
            Err(mpsc::error::TrySendError::Closed(_)) => Sent::Gone,
            Err(mpsc::error::TrySendError::Full(_)) => Sent::Stuck,
        }
    }

    /// True when the loop answered within `limit`.
    pub async fn check(&self, limit: Duration) -> bool {
        match self.send() {
            Sent::Waiting(rx) => matches!(tokio::time::timeout(limit, rx).await, Ok(Ok(()))),
            Sent::Gone | Sent::Stuck => false,
        }
    }
}

impl ProbeAnswerer {
    /// Answers every pending probe and registers the waker for the next one (poll-based loops).
    pub fn poll_answer(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(reply)) = self.rx.poll_recv(cx) {
            let _ = reply.send(());
        }
    }

    /// Waits for the next probe and answers it (for `select!` loops); pending forever once every
    /// [`Probe`] is dropped.
    pub async fn answer(&mut self) {
        match self.rx.recv().await {
            Some(reply) => {
                let _ = reply.send(());
            }
            None => std::future::pending().await,
        }
    }
}

/// An accept stream that answers probes whenever its server polls it: a server whose accept loop
/// is wedged stops polling, stops answering, and the watchdog stops pinging.
pub struct Watched<S> {
    inner: S,
    probes: ProbeAnswerer,
}

impl<S> Watched<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, probes: ProbeAnswerer) -> Watched<S> {
        Watched { inner, probes }
    }
}

impl<S: Stream + Unpin> Stream for Watched<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.probes.poll_answer(cx);
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
