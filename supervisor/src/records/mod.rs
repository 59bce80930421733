//! Usage records: one [`Record`] per request the front saw, written to a JSON Lines file and
//! exported as OpenTelemetry log records, with an on-disk spool so that a collector that is down,
//! a front restart or an upgrade loses none of them (docs/records.md).
//!
//! [`Records`] is the handle the data path submits to: [`Records::submit`] never waits; it puts
//! the record on each sink's bounded queue. Each sink is a task of its own:
//! - `jsonl`: the file, appended in batches and rotated by size;
//! - `export`: OTLP over `otlp`'s transports (HTTP/protobuf or gRPC), batching, retrying with
//!   backoff, and spooling to `spool` (per-front files, claimed by rename) what the collector
//!   does not take, to send it, oldest first, once it does.
//!
//! A sink's full queue never holds a stream up: for OTLP the record goes straight to the spool;
//! for the file it is dropped, counted in `plugvisor_records_dropped_total` and warned about at
//! a limited rate. [`Records::stop`] flushes the file and sends or spools what is left.

mod export;
mod jsonl;
pub(crate) mod otlp;
mod record;
mod spool;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::RecordsConfig;
use crate::observe::metrics::Metrics;

pub use export::backoff;
pub use otlp::EVENT_NAME;
pub use record::{rfc3339, Record, RecordStatus};

/// The records could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// The JSON Lines file cannot be opened.
    #[error("cannot open the records file {path} (records.path)")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The spool directory cannot be used.
    #[error("cannot use the records spool {dir} (records.otlp.spool_dir)")]
    Spool {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The OTLP client cannot be built from its settings.
    #[error("records.otlp: {0}")]
    Otlp(String),
}

/// The handle to the records' sinks; cheap to clone, every clone submits to the same sinks.
#[derive(Clone)]
pub struct Records {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("instance", &self.shared.instance)
            .finish_non_exhaustive()
    }
}

/// What the sinks share with the handle.
pub(crate) struct Shared {
    instance: String,
    pid: u32,
    omit: Arc<Vec<String>>,
    file: Option<(PathBuf, mpsc::Sender<Arc<Record>>)>,
    otlp: Option<OtlpSide>,
    metrics: Arc<Metrics>,
    counters: Counters,
    /// Whether the exporter is sending from the spool (the collector was down).
    spooling: AtomicBool,
    stop: watch::Sender<Option<std::time::Instant>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct OtlpSide {
    tx: mpsc::Sender<Arc<Record>>,
    spool: Arc<spool::Spool>,
    endpoint: String,
    protocol: &'static str,
    spool_max_bytes: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    written_file: AtomicU64,
    exported: AtomicU64,
    spooled: AtomicU64,
    retried: AtomicU64,
    dropped: AtomicU64,
}

/// What `plugvisor status --json` shows of the records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordsStatus {
    /// This front's instance id: the first part of every `record_id` it writes.
    pub instance: String,
    /// The JSON Lines file, if records are written to one.
    pub file: Option<PathBuf>,
    /// The OTLP export, if on.
    pub otlp: Option<OtlpStatus>,
    /// Records submitted by the streams.
    pub submitted: u64,
    /// Records written to the file.
    pub written_file: u64,
    /// Records the collector took.
    pub exported: u64,
    /// Records written to the spool.
    pub spooled: u64,
    /// Records sent again after a failed export.
    pub retried: u64,
    /// Records lost (see `plugvisor_records_dropped_total` for why).
    pub dropped: u64,
}

/// The OTLP side of [`RecordsStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtlpStatus {
    /// Where records go.
    pub endpoint: String,
    /// `http/protobuf` or `grpc`.
    pub protocol: String,
    /// The spool directory.
    pub spool_dir: PathBuf,
    /// Bytes in the spool (all fronts' files).
    pub spool_bytes: u64,
    /// Its bound.
    pub spool_max_bytes: u64,
    /// True while records go to the spool (the collector did not take the last try).
    pub spooling: bool,
}

impl RecordsStatus {
    /// One line for `plugvisor status`.
    pub fn line(&self) -> String {
        let file = self
            .file
            .as_ref()
            .map_or("no file".to_owned(), |p| p.display().to_string());
        let otlp = match &self.otlp {
            None => "OTLP off".to_owned(),
            Some(o) => format!(
                "OTLP {} {} ({}; spool {} of {} bytes)",
                o.protocol,
                o.endpoint,
                if o.spooling { "spooling" } else { "live" },
                o.spool_bytes,
                o.spool_max_bytes
            ),
        };
        format!(
            "records: {file}; {otlp}; {} submitted, {} written, {} exported, {} dropped",
            self.submitted, self.written_file, self.exported, self.dropped
        )
    }
}

/// A sink's task, spawned once the state it shares with the handle exists.
type SpawnSink = Box<dyn FnOnce(Arc<Shared>) -> JoinHandle<()> + Send>;

/// A random id for this front process: 16 hex digits.
fn instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Records {
    /// Starts the sinks `config` turns on (the file, OTLP), each a task on the current runtime.
    /// A spool left by an earlier front is sent once the collector takes records.
    pub fn start(config: &RecordsConfig, metrics: Arc<Metrics>) -> Result<Records, RecordsError> {
        let instance = instance_id();
        let (stop, stop_rx) = watch::channel(None);
        let omit = Arc::new(config.omit.clone());
        let mut pending_tasks: Vec<SpawnSink> = Vec::new();
        let file = match &config.path {
            None => None,
            Some(path) => {
                let mut sink = jsonl::FileSink::new(path.clone(), config.rotate_bytes, config.keep);
                // Opened now, so a file that cannot be written fails the start, not the first
                // record.
                sink.write_lines(&[]).map_err(|source| RecordsError::File {
                    path: path.clone(),
                    source,
                })?;
                let (tx, rx) = mpsc::channel(config.queue_records);
                let omit = omit.clone();
                let stop = stop_rx.clone();
                pending_tasks.push(Box::new(move |shared| {
                    tokio::spawn(jsonl::run(sink, omit, rx, stop, shared))
                }));
                Some((path.clone(), tx))
            }
        };
        let otlp = match &config.otlp {
            None => None,
            Some(o) => {
                let spool = Arc::new(
                    spool::Spool::open(&o.spool_dir, &instance, o.spool_max_bytes).map_err(
                        |source| RecordsError::Spool {
                            dir: o.spool_dir.clone(),
                            source,
                        },
                    )?,
                );
                let client = crate::otlp::Client::<crate::otlp::Logs>::new(&o.transport())
                    .map_err(RecordsError::Otlp)?;
                let (tx, rx) = mpsc::channel(config.queue_records);
                let (omit, stop, resource, s) = (
                    omit.clone(),
                    stop_rx.clone(),
                    o.resource.clone(),
                    spool.clone(),
                );
                pending_tasks.push(Box::new(move |shared| {
                    let exporter = export::Exporter::new(client, resource, s, omit, shared, stop);
                    tokio::spawn(exporter.run(rx))
                }));
                Some(OtlpSide {
                    tx,
                    spool,
                    endpoint: o.endpoint.clone(),
                    protocol: o.protocol.as_str(),
                    spool_max_bytes: o.spool_max_bytes,
                })
            }
        };
        let shared = Arc::new(Shared {
            instance,
            pid: std::process::id(),
            omit,
            file,
            otlp,
            metrics,
            counters: Counters::default(),
            spooling: AtomicBool::new(false),
            stop,
            tasks: Mutex::new(Vec::new()),
        });
        if let Some(o) = &shared.otlp {
            shared.update_spool_gauge(&o.spool);
        }
        let tasks = pending_tasks
            .into_iter()
            .map(|spawn| spawn(shared.clone()))
            .collect();
        *shared.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        Ok(Records { shared })
    }

    /// A handle with no sink: records are counted as submitted and go nowhere.
    pub fn off(metrics: Arc<Metrics>) -> Records {
        let config = RecordsConfig {
            path: None,
            rotate_bytes: crate::config::records::DEFAULT_ROTATE_BYTES,
            keep: 0,
            omit: Vec::new(),
            queue_records: 1,
            otlp: None,
        };
        Records::start(&config, metrics).expect("no sink cannot fail")
    }

    /// This front's instance id (16 hex digits, new at every start of the process).
    pub fn instance_id(&self) -> &str {
        &self.shared.instance
    }

    /// The `record_id` of stream `stream_id` of this front: `<instance id>-<stream_id>`.
    pub fn record_id(&self, stream_id: u64) -> String {
        format!("{}-{stream_id}", self.shared.instance)
    }

    /// A record for stream `stream_id` with its identity filled in (`record_id`, `stream_id`,
    /// `front_pid`, `started_at`), `ended_at` now and status `complete`; the caller sets the
    /// rest.
    pub fn new_record(&self, stream_id: u64, started_at: SystemTime) -> Record {
        Record {
            record_id: self.record_id(stream_id),
            request_id: None,
            stream_id,
            front_pid: self.shared.pid,
            method: None,
            path: None,
            authority: None,
            started_at,
            ended_at: SystemTime::now(),
            status: RecordStatus::Complete,
            cause: None,
            http_status: None,
            plugins: Default::default(),
            missing: Vec::new(),
            reasons: Default::default(),
        }
    }

    /// Hands `record` to every sink without waiting: each sink's queue takes it, or, when that
    /// queue is full, OTLP's record goes to the spool at once and the file's is dropped (counted,
    /// warned about at a limited rate). After [`Records::stop`] records are dropped and counted.
    pub fn submit(&self, record: Record) {
        let s = &self.shared;
        s.counters.submitted.fetch_add(1, Ordering::Relaxed);
        s.metrics.records_submitted.inc();
        let record = Arc::new(record);
        if let Some((_, tx)) = &s.file {
            match tx.try_send(record.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.dropped("file", "queue_full", 1, "the records file's queue is full")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    s.dropped("file", "stopped", 1, "a record submitted after the stop")
                }
            }
        }
        if let Some(o) = &s.otlp {
            match o.tx.try_send(record) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(record)) => {
                    // The exporter is behind: the spool keeps the record (a write to the page
                    // cache, no fsync, under the spool's lock).
                    let line = serde_json::to_string(&record::redacted(&record, &s.omit))
                        .expect("a JSON object serializes");
                    s.spool_lines(&o.spool, &[line]);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    s.dropped("otlp", "stopped", 1, "a record submitted after the stop")
                }
            }
        }
    }

    /// The attributes `record` gives its request's span: those of its log record (the same
    /// mapping, from the record redacted by `omit`), without `event.name`.
    pub fn span_attributes(
        &self,
        record: &Record,
    ) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
        otlp::attributes(&record::redacted(record, &self.shared.omit))
    }

    /// Where the records go and what became of them so far.
    pub fn describe(&self) -> RecordsStatus {
        let s = &self.shared;
        let c = &s.counters;
        RecordsStatus {
            instance: s.instance.clone(),
            file: s.file.as_ref().map(|(p, _)| p.clone()),
            otlp: s.otlp.as_ref().map(|o| OtlpStatus {
                endpoint: o.endpoint.clone(),
                protocol: o.protocol.to_owned(),
                spool_dir: o.spool.dir().to_owned(),
                spool_bytes: o.spool.bytes(),
                spool_max_bytes: o.spool_max_bytes,
                spooling: s.spooling.load(Ordering::Relaxed),
            }),
            submitted: c.submitted.load(Ordering::Relaxed),
            written_file: c.written_file.load(Ordering::Relaxed),
            exported: c.exported.load(Ordering::Relaxed),
            spooled: c.spooled.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    /// Stops the sinks: the file gets what is queued; OTLP sends what is queued if the collector
    /// takes it within `grace`, and spools the rest; the spool's open file is sealed for the
    /// next front. Returns once both are done (a sink still busy after `grace` and a second is
    /// cut short: its spool file is then sealed by the next front). Every clone sees the stop.
    pub async fn stop(self, grace: Duration) {
        let s = &self.shared;
        s.stop.send_replace(Some(std::time::Instant::now() + grace));
        let tasks: Vec<_> = std::mem::take(&mut *s.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let limit = grace + Duration::from_secs(1);
        for mut task in tasks {
            if tokio::time::timeout(limit, &mut task).await.is_err() {
                tracing::warn!("records sink still busy after the stop's grace; cutting it");
                task.abort();
            }
        }
        let d = self.describe();
        tracing::info!(
            submitted = d.submitted,
            written = d.written_file,
            exported = d.exported,
            spooled = d.spooled,
            dropped = d.dropped,
            "usage records stopped"
        );
    }
}

impl Shared {
    fn counted_written_file(&self, n: u64) {
        self.counters.written_file.fetch_add(n, Ordering::Relaxed);
        self.metrics
            .records_written
            .get_or_create(&Metrics::sink("file"))
            .inc_by(n);
    }

    fn counted_exported(&self, n: u64) {
        self.counters.exported.fetch_add(n, Ordering::Relaxed);
        self.metrics
            .records_written
            .get_or_create(&Metrics::sink("otlp"))
            .inc_by(n);
    }

    /// `n` records lost by `sink` for `reason`: counted, and warned about at a limited rate.
    fn dropped(&self, sink: &'static str, reason: &'static str, n: u64, detail: &str) {
        self.counters.dropped.fetch_add(n, Ordering::Relaxed);
        self.metrics
            .records_dropped
            .get_or_create(&Metrics::sink_reason(sink, reason))
            .inc_by(n);
        self.warn_limited(
            "records-dropped",
            &format!("{n} usage record(s) dropped by the {sink} sink ({reason}): {detail}"),
        );
    }

    fn warn_limited(&self, kind: &'static str, message: &str) {
        if let Some(held) = crate::observe::logging::limited::allow(kind) {
            tracing::warn!(held_back = held, "{message}");
        }
    }

    /// Writes lines to the spool, or counts them dropped when it is full or failing.
    fn spool_lines(&self, spool: &spool::Spool, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let n = lines.len() as u64;
        match spool.append(lines) {
            Ok(()) => {
                self.counters.spooled.fetch_add(n, Ordering::Relaxed);
                self.metrics.records_spooled.inc_by(n);
            }
            Err(spool::SpoolError::Full {
                accepted, refused, ..
            }) => {
                self.counters
                    .spooled
                    .fetch_add(accepted as u64, Ordering::Relaxed);
                self.metrics.records_spooled.inc_by(accepted as u64);
                self.dropped(
                    "otlp",
                    "spool_full",
                    refused as u64,
                    &format!(
                        "the spool {} is full (spool_max_bytes); the newest records are dropped",
                        spool.dir().display()
                    ),
                )
            }
            Err(e) => self.dropped(
                "otlp",
                "spool_error",
                n,
                &crate::observe::logging::error_chain(&e),
            ),
        }
        self.update_spool_gauge(spool);
    }

    fn update_spool_gauge(&self, spool: &spool::Spool) {
        self.metrics
            .records_spool_bytes
            .set(spool.bytes().min(i64::MAX as u64) as i64);
    }
}

#[cfg(test)]
mod tests;
