//! Traces of the front's own work, exported as OpenTelemetry spans over OTLP (docs/traces.md):
//! one span per request (`plugvisor.request`, a child of the request's W3C `traceparent` or the
//! root of a new trace), one child per plugin's final call, and events for the first content
//! byte, replays, handovers and gaps.
//!
//! Off unless `[traces]` (or `OTEL_EXPORTER_OTLP_*`) names an endpoint, and off even then with
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. [`Traces`] is the handle the data
//! path uses: [`Traces::begin`] decides, when a request's headers arrive, whether the request is
//! traced ([`sampler`], with the sampler of the running configuration, so a reload that changes
//! it applies to new streams, from its parent, [`context`]); a traced stream gathers a
//! [`RequestTrace`] and hands it over at its end with [`Traces::finish`], which never waits: a
//! full queue drops the request's spans and counts them. One task turns what is queued into
//! spans ([`span`]), batches them and sends them with [`crate::otlp`]'s client. Spans have no
//! spool: a batch the collector does not take is dropped and counted.
//!
//! With tracing off the handle is empty and the data path does nothing more than look at it.

pub mod context;
pub mod plugin;
pub mod sampler;
pub mod span;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{Sampler, TracesConfig};
use crate::observe::metrics::Metrics;
use crate::otlp::{Client, ExportError};

pub use span::{FinalCall, FinalOutcome, RequestTrace};

/// Requests whose spans wait for the exporter; past it a request's spans are dropped.
pub const QUEUE_REQUESTS: usize = 4096;
/// The most spans in one export request.
pub const BATCH_SPANS: usize = 1024;
/// The longest a span waits in memory for its batch.
pub const BATCH_EVERY: Duration = Duration::from_millis(500);
/// The instrumentation scope of every span.
const SCOPE: &str = "plugvisor.front";

/// The handle the data path traces through; cheap to clone. Empty when tracing is off.
#[derive(Clone, Default)]
pub struct Traces {
    inner: Option<Arc<Inner>>,
    /// Configured, but turned off by this variable (`OTEL_SDK_DISABLED=true`, ...).
    off: Option<&'static str>,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces")
            .field("on", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The sampler at the start; the running configuration's once [`Traces::follow`] gave it.
    sampler: Sampler,
    published: std::sync::OnceLock<crate::config::Published>,
    /// Where spans go, for `status`.
    endpoint: String,
    protocol: &'static str,
    tx: mpsc::Sender<Finished>,
    metrics: Arc<Metrics>,
    counters: Counters,
    task: Mutex<Option<JoinHandle<()>>>,
    stop: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
}

#[derive(Default)]
struct Counters {
    exported: AtomicU64,
    dropped: AtomicU64,
}

/// A stream's trace, ended.
struct Finished {
    trace: Box<RequestTrace>,
    end: Instant,
}

/// Where spans go and what became of them (for `plugvisor status`, tests and the stop's log
/// line).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TracesStatus {
    /// The collector's endpoint; `None` when tracing is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `http/protobuf` or `grpc`, when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The sampler, as `OTEL_TRACES_SAMPLER` names it, when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    /// `[traces]` is configured, but this variable turned tracing off
    /// (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_by: Option<String>,
    /// Spans the collector took.
    pub exported: u64,
    /// Spans lost (see `plugvisor_spans_dropped_total` for why).
    pub dropped: u64,
}

impl TracesStatus {
    /// One line for `plugvisor status`.
    pub fn line(&self) -> String {
        match (&self.endpoint, &self.protocol, &self.sampler) {
            (Some(endpoint), Some(protocol), Some(sampler)) => format!(
                "traces: OTLP {protocol} {endpoint}, sampler {sampler}; {} spans exported, {} dropped",
                self.exported, self.dropped
            ),
            _ => match &self.off_by {
                Some(var) => format!("traces: off ({var} in the environment; [traces] ignored)"),
                None => "traces: off (no endpoint in [traces] or OTEL_EXPORTER_OTLP_*)".to_owned(),
            },
        }
    }
}

impl Traces {
    /// No tracing: [`Traces::begin`] always answers `None`.
    pub fn off() -> Traces {
        Traces::default()
    }

    /// Starts the exporter `config` describes (a task on the current runtime), or nothing when
    /// it is `None`.
    pub fn start(config: Option<&TracesConfig>, metrics: Arc<Metrics>) -> Result<Traces, String> {
        let Some(config) = config else {
            return Ok(Traces::off());
        };
        if let Some(var) = config.off {
            tracing::info!(
                endpoint = %config.transport.endpoint,
                "tracing off: {var} in the environment turns off the configured [traces]"
            );
            return Ok(Traces {
                inner: None,
                off: Some(var),
            });
        }
        let client = Client::<crate::otlp::Traces>::new(&config.transport)?;
        let (tx, rx) = mpsc::channel(QUEUE_REQUESTS);
        let (stop, stop_rx) = tokio::sync::watch::channel(None);
        let inner = Arc::new(Inner {
            sampler: config.sampler,
            published: std::sync::OnceLock::new(),
            endpoint: config.transport.endpoint.clone(),
            protocol: config.transport.protocol.as_str(),
            tx,
            metrics,
            counters: Counters::default(),
            task: Mutex::new(None),
            stop,
        });
        let exporter = Exporter {
            client,
            resource: config.resource.clone(),
            inner: Arc::downgrade(&inner),
            metrics: inner.metrics.clone(),
        };
        let task = tokio::spawn(exporter.run(rx, stop_rx));
        *inner.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        tracing::info!(
            endpoint = %config.transport.endpoint,
            protocol = config.transport.protocol.as_str(),
            sampler = config.sampler.name(),
            "tracing on"
        );
        Ok(Traces {
            inner: Some(inner),
            off: None,
        })
    }

    /// From now on `status` names the sampler of `config` as it stands (a reload may change
    /// it); the data path passes the same one to [`Traces::begin`].
    pub fn follow(&self, config: crate::config::Published) {
        if let Some(inner) = &self.inner {
            let _ = inner.published.set(config);
        }
    }

    /// Whether tracing is on.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// A request's headers arrived at `arrival`: its trace, if tracing is on and `sampler` (the
    /// running configuration's when the stream started) keeps it. `headers` are the request's,
    /// with lowercase names.
    pub fn begin<'a>(
        &self,
        headers: impl Iterator<Item = (&'a str, &'a str)>,
        arrival: Instant,
        sampler: &Sampler,
    ) -> Option<Box<RequestTrace>> {
        self.inner.as_ref()?;
        let parent = context::parent(headers);
        let trace_id = parent
            .as_ref()
            .map_or_else(context::new_trace_id, |p| p.trace_id);
        if !sampler::sampled(sampler, parent.as_ref().map(|p| p.sampled()), &trace_id) {
            return None;
        }
        let (span, state) = match parent {
            Some(p) => (Some(p.span_id), p.tracestate),
            None => (None, String::new()),
        };
        Some(Box::new(RequestTrace::new(trace_id, span, state, arrival)))
    }

    /// The stream ended: its spans go to the exporter's queue without waiting, or, when the
    /// queue is full (or the exporter stopped), are dropped and counted.
    pub fn finish(&self, trace: Box<RequestTrace>) {
        let Some(inner) = &self.inner else {
            return;
        };
        let spans = trace.span_count() as u64;
        let finished = Finished {
            trace,
            end: Instant::now(),
        };
        match inner.tx.try_send(finished) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => inner.dropped("queue_full", spans),
            Err(mpsc::error::TrySendError::Closed(_)) => inner.dropped("stopped", spans),
        }
    }

    /// What became of the spans so far.
    pub fn describe(&self) -> TracesStatus {
        match &self.inner {
            None => TracesStatus {
                off_by: self.off.map(str::to_owned),
                ..TracesStatus::default()
            },
            Some(i) => TracesStatus {
                endpoint: Some(i.endpoint.clone()),
                protocol: Some(i.protocol.to_owned()),
                sampler: Some(i.sampler().name().to_owned()),
                off_by: None,
                exported: i.counters.exported.load(Ordering::Relaxed),
                dropped: i.counters.dropped.load(Ordering::Relaxed),
            },
        }
    }

    /// Sends what is queued if the collector takes it within `grace`, and stops the exporter.
    pub async fn stop(&self, grace: Duration) {
        let Some(inner) = &self.inner else {
            return;
        };
        inner
            .stop
            .send_replace(Some(tokio::time::Instant::now() + grace));
        let task = inner.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task {
            if tokio::time::timeout(grace + Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("span exporter still busy after the stop's grace; cutting it");
                task.abort();
            }
        }
        let d = self.describe();
        tracing::info!(
            exported = d.exported,
            dropped = d.dropped,
            "tracing stopped"
        );
    }
}

impl Inner {
    /// The running configuration's sampler (the start's until [`Traces::follow`]).
    fn sampler(&self) -> Sampler {
        self.published
            .get()
            .and_then(|p| p.current().traces.as_ref().map(|t| t.sampler))
            .unwrap_or(self.sampler)
    }

    fn dropped(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.counters.dropped.fetch_add(n, Ordering::Relaxed);
        self.metrics
            .spans_dropped
            .get_or_create(&Metrics::drop_reason(reason))
            .inc_by(n);
        if let Some(held) = crate::observe::logging::limited::allow("spans-dropped") {
            tracing::warn!(held_back = held, "{n} span(s) dropped ({reason})");
        }
    }
}

/// Resolves once the stop is set (the watch's guard is not held across an await).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<Option<tokio::time::Instant>>) {
    let _ = stop.wait_for(Option::is_some).await;
}

/// The task that batches and sends.
struct Exporter {
    client: Client<crate::otlp::Traces>,
    resource: Vec<(String, String)>,
    /// Weak: the task ends with the handle's last clone, whatever else holds it.
    inner: std::sync::Weak<Inner>,
    metrics: Arc<Metrics>,
}

impl Exporter {
    async fn run(
        self,
        mut rx: mpsc::Receiver<Finished>,
        mut stop: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
    ) {
        let mut batch: Vec<Span> = Vec::new();
        let mut due = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                f = rx.recv() => {
                    let Some(f) = f else { break };
                    if batch.is_empty() {
                        due = tokio::time::Instant::now() + BATCH_EVERY;
                    }
                    batch.extend(f.trace.into_spans(f.end));
                    if batch.len() >= BATCH_SPANS {
                        self.send(std::mem::take(&mut batch)).await;
                    }
                }
                _ = tokio::time::sleep_until(due), if !batch.is_empty() => {
                    self.send(std::mem::take(&mut batch)).await;
                }
            }
        }
        // The stop: what is queued joins the batch, sent within the grace.
        rx.close();
        while let Some(f) = rx.recv().await {
            batch.extend(f.trace.into_spans(f.end));
        }
        let deadline = stop.borrow().unwrap_or_else(tokio::time::Instant::now);
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(BATCH_SPANS));
            let n = batch.len() as u64;
            if tokio::time::timeout_at(deadline, self.send(batch))
                .await
                .is_err()
            {
                self.dropped("stopped", n + rest.len() as u64);
                return;
            }
            batch = rest;
        }
    }

    async fn send(&self, spans: Vec<Span>) {
        let n = spans.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(crate::records::otlp::resource(&self.resource)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        match self.client.export(request).await {
            Ok(accepted) => {
                let taken = n.saturating_sub(accepted.rejected);
                self.metrics.spans_exported.inc_by(taken);
                if let Some(inner) = self.inner.upgrade() {
                    inner.counters.exported.fetch_add(taken, Ordering::Relaxed);
                }
                self.dropped("rejected", accepted.rejected);
            }
            Err(e) => {
                let reason = match e {
                    ExportError::Permanent(_) => "rejected",
                    ExportError::Retryable(_) => "export_failed",
                };
                if let Some(held) = crate::observe::logging::limited::allow("spans-export") {
                    tracing::warn!(held_back = held, error = %e, "span export failed; {n} span(s) dropped");
                }
                self.dropped(reason, n);
            }
        }
    }

    fn dropped(&self, reason: &'static str, n: u64) {
        match self.inner.upgrade() {
            Some(inner) => inner.dropped(reason, n),
            None if n > 0 => {
                self.metrics
                    .spans_dropped
                    .get_or_create(&Metrics::drop_reason(reason))
                    .inc_by(n);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests;
