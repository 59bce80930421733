//! The OTLP exporter's task: batches records, sends them while the collector takes them, and
//! while it does not, writes them to the spool and sends the spool, oldest file first, as soon
//! as it does again.
//!
//! Two modes. **Live**: a batch ([`BATCH`] records or [`BATCH_EVERY`]) is sent at once, tried
//! again [`LIVE_RETRIES`] times after short delays; a batch that still fails goes to the spool
//! and the task turns to **spooling**: every batch goes to the spool, and the oldest spooled
//! file is tried after a delay that grows exponentially with the failures in a row
//! ([`backoff`], with jitter, up to [`RETRY_MAX`]). Once the spool is empty the task is live
//! again. A live task also looks at the spool every [`SCAN_EVERY`] for files of other fronts
//! (one that stopped, or one that was killed) and sends them.
//!
//! A stop gives the task what is left of the grace: the batch in hand is sent if the task is
//! live and the collector answers in time, and spooled otherwise; a file being sent is given
//! back to the spool; the open spool file is sealed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::otlp;
use super::record::{redacted, Record};
use super::spool::{Claimed, Spool};
use super::Shared;
use crate::otlp::{Client, ExportError, Logs};

/// The most records in one export request.
pub const BATCH: usize = 512;
/// The longest a record waits in memory for its batch.
pub const BATCH_EVERY: Duration = Duration::from_millis(200);
/// Quick retries of a live batch before it is spooled.
pub const LIVE_RETRIES: u32 = 2;
/// The first delay of a live retry.
const LIVE_RETRY_MIN: Duration = Duration::from_millis(100);
/// The first delay before the spool is tried again.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest delay before the spool is tried again.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a live exporter looks for other fronts' spooled files.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);

/// The delay before try number `failures` (1 after the first failure): `min` doubled for each
/// failure after the first, capped at `max`, then spread by `jitter` (0 to 1) over the upper
/// half, so fronts that failed together do not retry together.
pub fn backoff(failures: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let step = min.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let step = step.min(max);
    step / 2 + (step / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

/// Resolves once the stop is set (the watch's guard is not held across an await).
async fn stopped(stop: &mut watch::Receiver<Option<std::time::Instant>>) {
    let _ = stop.wait_for(Option::is_some).await;
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

/// A file being sent: its records and how many the collector took so far.
struct Sending {
    claimed: Claimed,
    lines: Vec<String>,
    next: usize,
}

/// The exporter and its state.
pub(super) struct Exporter {
    pub client: Client<Logs>,
    pub resource: Vec<(String, String)>,
    pub spool: Arc<Spool>,
    pub omit: Arc<Vec<String>>,
    pub shared: Arc<Shared>,
    pub stop: watch::Receiver<Option<std::time::Instant>>,
    spooling: bool,
    failures: u32,
    next_try: Instant,
    sending: Option<Sending>,
}

/// What an export came to.
enum Sent {
    Ok,
    Failed(ExportError),
    /// The stop came first.
    Stopped,
}

impl Exporter {
    pub(super) fn new(
        client: Client<Logs>,
        resource: Vec<(String, String)>,
        spool: Arc<Spool>,
        omit: Arc<Vec<String>>,
        shared: Arc<Shared>,
        stop: watch::Receiver<Option<std::time::Instant>>,
    ) -> Exporter {
        Exporter {
            client,
            resource,
            spool,
            omit,
            shared,
            stop,
            spooling: false,
            failures: 0,
            next_try: Instant::now(),
            sending: None,
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Arc<Record>>) {
        // What an earlier front left is sent first.
        self.set_spooling(self.spool.has_pending());
        let mut batch: Vec<String> = Vec::with_capacity(BATCH);
        let mut batch_due = Instant::now();
        let mut next_scan = Instant::now() + SCAN_EVERY;
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => break,
                r = rx.recv() => {
                    let Some(record) = r else { break };
                    if batch.is_empty() {
                        batch_due = Instant::now() + BATCH_EVERY;
                    }
                    batch.push(self.line(&record));
                    if batch.len() >= BATCH {
                        self.flush(std::mem::take(&mut batch)).await;
                    }
                }
                _ = tokio::time::sleep_until(batch_due), if !batch.is_empty() => {
                    self.flush(std::mem::take(&mut batch)).await;
                }
                _ = tokio::time::sleep_until(self.next_try), if self.spooling => {
                    self.send_spooled().await;
                }
                _ = tokio::time::sleep_until(next_scan), if !self.spooling => {
                    next_scan = Instant::now() + SCAN_EVERY;
                    if self.spool.has_pending() {
                        self.set_spooling(true);
                        self.next_try = Instant::now();
                    }
                }
            }
        }
        self.finish(rx, batch).await;
    }

    fn line(&self, record: &Record) -> String {
        serde_json::to_string(&redacted(record, &self.omit)).expect("a JSON object serializes")
    }

    fn set_spooling(&mut self, on: bool) {
        self.spooling = on;
        self.shared.spooling.store(on, Ordering::Relaxed);
    }

    /// One batch: sent when live, spooled otherwise (or when it keeps failing).
    async fn flush(&mut self, lines: Vec<String>) {
        if self.spooling {
            self.to_spool(&lines);
            return;
        }
        let n = lines.len() as u64;
        for attempt in 0..=LIVE_RETRIES {
            match self.send(&lines).await {
                Sent::Ok => return,
                Sent::Failed(ExportError::Permanent(m)) => {
                    self.shared.dropped("otlp", "rejected", n, &m);
                    return;
                }
                Sent::Stopped => break,
                Sent::Failed(ExportError::Retryable(m)) => {
                    if attempt == LIVE_RETRIES {
                        self.shared.warn_limited(
                            "records-otlp-down",
                            &format!("OTLP export failing ({m}); spooling records until the collector takes them"),
                        );
                        break;
                    }
                    self.shared.metrics.records_retried.inc_by(n);
                    self.shared.counters.retried.fetch_add(n, Ordering::Relaxed);
                    let delay = backoff(attempt + 1, LIVE_RETRY_MIN, RETRY_MAX, jitter());
                    if self.sleep_or_stop(delay).await {
                        break;
                    }
                }
            }
        }
        self.to_spool(&lines);
        self.set_spooling(true);
        self.failures = 1;
        self.next_try = Instant::now() + backoff(1, RETRY_MIN, RETRY_MAX, jitter());
    }

    /// Sends (part of) the oldest spooled file; on failure waits longer before the next try;
    /// once nothing is left, the task is live again.
    async fn send_spooled(&mut self) {
        if self.sending.is_none() {
            match self.spool.claim_oldest() {
                Ok(None) => {
                    if self.failures > 0 || self.spooling {
                        tracing::info!("records spool sent; exporting live again");
                    }
                    self.set_spooling(false);
                    self.failures = 0;
                    self.shared.update_spool_gauge(&self.spool);
                    return;
                }
                Ok(Some(claimed)) => match self.spool.read(&claimed) {
                    Ok((lines, corrupt)) => {
                        if corrupt > 0 {
                            self.shared.dropped(
                                "otlp",
                                "corrupt",
                                corrupt,
                                "lines of a spool file cut short by a crash",
                            );
                        }
                        self.sending = Some(Sending {
                            claimed,
                            lines,
                            next: 0,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read a records spool file; leaving it for later");
                        let _ = self.spool.release(claimed);
                        self.retry_later();
                        return;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, dir = %self.spool.dir().display(), "cannot list the records spool");
                    self.retry_later();
                    return;
                }
            }
        }
        loop {
            let sending = self.sending.as_ref().expect("claimed above");
            if sending.next >= sending.lines.len() {
                break;
            }
            let end = (sending.next + BATCH).min(sending.lines.len());
            let chunk: Vec<String> = sending.lines[sending.next..end].to_vec();
            let n = chunk.len() as u64;
            match self.send(&chunk).await {
                Sent::Ok => {}
                Sent::Failed(ExportError::Permanent(m)) => {
                    self.shared.dropped("otlp", "rejected", n, &m)
                }
                Sent::Stopped => return,
                Sent::Failed(ExportError::Retryable(m)) => {
                    self.shared.metrics.records_retried.inc_by(n);
                    self.shared.counters.retried.fetch_add(n, Ordering::Relaxed);
                    self.shared.warn_limited(
                        "records-otlp-down",
                        &format!("OTLP export of spooled records failing ({m}); trying again"),
                    );
                    self.retry_later();
                    return;
                }
            }
            let sending = self.sending.as_mut().expect("still sending");
            sending.next = end;
        }
        let done = self.sending.take().expect("sending");
        if let Err(e) = self.spool.done(done.claimed) {
            tracing::warn!(error = %e, "cannot remove a sent records spool file");
        }
        self.shared.update_spool_gauge(&self.spool);
        self.failures = 0;
        self.next_try = Instant::now();
    }

    fn retry_later(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.next_try = Instant::now() + backoff(self.failures, RETRY_MIN, RETRY_MAX, jitter());
    }

    /// One export request, unless the stop comes first.
    async fn send(&mut self, lines: &[String]) -> Sent {
        let records: Vec<(Map<String, Value>, String)> = lines
            .iter()
            .filter_map(|l| Some((serde_json::from_str(l).ok()?, l.clone())))
            .collect();
        let request = otlp::request(&self.resource, &records);
        let started = std::time::Instant::now();
        let mut stop = self.stop.clone();
        let stopping = self.stop.borrow().is_some();
        let result = tokio::select! {
            r = self.client.export(request) => r,
            _ = stopped(&mut stop), if !stopping => return Sent::Stopped,
        };
        self.shared
            .metrics
            .records_export_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(accepted) => {
                let n = records.len() as u64;
                let taken = n.saturating_sub(accepted.rejected);
                self.shared.counted_exported(taken);
                if accepted.rejected > 0 {
                    self.shared.dropped(
                        "otlp",
                        "rejected",
                        accepted.rejected,
                        "the collector rejected part of a batch",
                    );
                }
                Sent::Ok
            }
            Err(e) => Sent::Failed(e),
        }
    }

    /// Sleeps `delay`; true if the stop came first.
    async fn sleep_or_stop(&mut self, delay: Duration) -> bool {
        let mut stop = self.stop.clone();
        if self.stop.borrow().is_some() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stopped(&mut stop) => true,
        }
    }

    fn to_spool(&self, lines: &[String]) {
        self.shared.spool_lines(&self.spool, lines);
    }

    /// The stop: what is queued joins the batch; sent if live and in time, else spooled.
    async fn finish(mut self, mut rx: mpsc::Receiver<Arc<Record>>, mut batch: Vec<String>) {
        rx.close();
        while let Some(record) = rx.recv().await {
            batch.push(self.line(&record));
        }
        let deadline = (*self.stop.borrow()).map(Instant::from_std);
        if !self.spooling && !batch.is_empty() {
            let mut rest = batch.as_slice();
            while !rest.is_empty() {
                let (chunk, after) = rest.split_at(rest.len().min(BATCH));
                let left = deadline.map_or(Duration::ZERO, |d| {
                    d.saturating_duration_since(Instant::now())
                });
                // Within the grace, without the stop cutting it short (it has come already).
                let records: Vec<(Map<String, Value>, String)> = chunk
                    .iter()
                    .filter_map(|l| Some((serde_json::from_str(l).ok()?, l.clone())))
                    .collect();
                let request = otlp::request(&self.resource, &records);
                match tokio::time::timeout(left, self.client.export(request)).await {
                    Ok(Ok(accepted)) => {
                        self.shared.counted_exported(
                            (chunk.len() as u64).saturating_sub(accepted.rejected),
                        );
                        rest = after;
                    }
                    _ => break,
                }
            }
            batch = rest.to_vec();
        }
        if !batch.is_empty() {
            self.to_spool(&batch);
        }
        if let Some(sending) = self.sending.take() {
            if let Err(e) = self.spool.release(sending.claimed) {
                tracing::warn!(error = %e, "cannot give a records spool file back");
            }
        }
        if let Err(e) = self.spool.close() {
            tracing::warn!(error = %e, "cannot seal the records spool file");
        }
        self.shared.update_spool_gauge(&self.spool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_its_minimum_to_its_cap_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let table = [
            (1, 0.0, 250),
            (1, 1.0, 500),
            (2, 1.0, 1000),
            (3, 0.5, 1500),
            (7, 1.0, 30_000),
            (8, 1.0, 30_000),
            (1000, 0.0, 15_000),
        ];
        for (failures, jitter, ms) in table {
            assert_eq!(
                backoff(failures, min, max, jitter),
                Duration::from_millis(ms),
                "failures {failures}, jitter {jitter}"
            );
        }
        // Never past the cap, never below half the step.
        for f in 1..40 {
            let d = backoff(f, min, max, super::jitter());
            assert!(d <= max && d >= min / 2, "{d:?}");
        }
    }
}
