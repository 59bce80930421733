//! The records' sinks end to end in one process: the file, and OTLP/HTTP against a collector
//! played here that can be told to answer 503.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;

use super::*;
use crate::config::{OtlpConfig, OtlpProtocol, RecordsConfig};

/// A collector: takes `POST /v1/logs`, keeps each record's `plugvisor.record_id`, or answers
/// 503 while `failing`.
struct Collector {
    addr: SocketAddr,
    ids: Arc<Mutex<Vec<String>>>,
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ids = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (i, f, r) = (ids.clone(), failing.clone(), refused.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (i, f, r) = (i.clone(), f.clone(), r.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (i, f, r) = (i.clone(), f.clone(), r.clone());
                            async move {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                if f.load(Ordering::SeqCst) {
                                    r.fetch_add(1, Ordering::SeqCst);
                                    return Ok::<_, std::convert::Infallible>(
                                        hyper::Response::builder()
                                            .status(503)
                                            .body(Full::new(Bytes::from_static(b"down")))
                                            .unwrap(),
                                    );
                                }
                                let request = ExportLogsServiceRequest::decode(body).unwrap();
                                let mut got = i.lock().unwrap();
                                for rl in request.resource_logs {
                                    for sl in rl.scope_logs {
                                        for lr in sl.log_records {
                                            let id = lr
                                                .attributes
                                                .iter()
                                                .find(|a| a.key == "plugvisor.record_id")
                                                .and_then(|a| {
                                                    match a.value.as_ref()?.value.as_ref()? {
                                                        any_value::Value::StringValue(s) => {
                                                            Some(s.clone())
                                                        }
                                                        _ => None,
                                                    }
                                                })
                                                .unwrap();
                                            got.push(id);
                                        }
                                    }
                                }
                                Ok(hyper::Response::new(Full::new(Bytes::new())))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            ids,
            failing,
            refused,
            task,
        }
    }

    fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(file: Option<std::path::PathBuf>, otlp: Option<OtlpConfig>) -> RecordsConfig {
    RecordsConfig {
        path: file,
        rotate_bytes: 64 << 20,
        keep: 5,
        omit: Vec::new(),
        queue_records: 8192,
        otlp,
    }
}

fn otlp(endpoint: String, spool: &std::path::Path, max: u64) -> OtlpConfig {
    OtlpConfig {
        endpoint,
        protocol: OtlpProtocol::HttpProtobuf,
        headers: Vec::new(),
        timeout: Duration::from_millis(500),
        spool_dir: spool.to_owned(),
        spool_max_bytes: max,
        resource: vec![("service.name".into(), "plugvisor".into())],
    }
}

fn record(records: &Records, stream: u64) -> Record {
    let mut r = records.new_record(stream, SystemTime::now());
    r.request_id = Some(format!("req-{stream}"));
    r.http_status = Some(200);
    r.plugins = BTreeMap::from([(
        "plugvisor.usage".to_owned(),
        serde_json::json!({"input_tokens": stream, "output_tokens": 2 * stream}),
    )]);
    r
}

async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn unique(ids: &[String]) -> std::collections::BTreeSet<String> {
    ids.iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_submitted_record_is_a_line_of_the_file_after_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/records.jsonl");
    let metrics = Arc::new(Metrics::new());
    let records = Records::start(&config(Some(path.clone()), None), metrics.clone()).unwrap();
    let n = 20_000u64;
    let started = Instant::now();
    for i in 0..n {
        records.submit(record(&records, i));
        if i % 4000 == 3999 {
            // Bursts below the queue's bound, each written before the next: the rate the sink
            // sustains.
            let r = records.clone();
            until("the burst written", Duration::from_secs(10), move || {
                r.describe().written_file > i - 256
            })
            .await;
        }
    }
    records.clone().stop(Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let d = records.describe();
    assert_eq!(d.submitted, n);
    assert_eq!(lines.len() as u64 + d.dropped, n, "{d:?}");
    assert_eq!(d.written_file, lines.len() as u64);
    assert_eq!(d.dropped, 0, "the queue kept up: {d:?}");
    assert_eq!(lines[5]["request_id"], "req-5");
    assert_eq!(lines[5]["plugins"]["plugvisor.usage"]["input_tokens"], 5);
    let ids = unique(
        &lines
            .iter()
            .map(|l| l["record_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
    );
    assert_eq!(ids.len() as u64, n);
    eprintln!(
        "file sink: {n} records in {elapsed:?} ({:.0} records/s, {} bytes/record)",
        n as f64 / elapsed.as_secs_f64(),
        text.len() as u64 / n
    );
    // A record after the stop is counted, not lost silently.
    records.submit(record(&records, n));
    assert_eq!(records.describe().dropped, 1);
    assert!(metrics
        .encode()
        .contains("plugvisor_records_dropped_total{sink=\"file\",reason=\"stopped\"} 1"));
}

#[tokio::test]
async fn a_full_file_queue_drops_and_counts_instead_of_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records.jsonl");
    let metrics = Arc::new(Metrics::new());
    let mut c = config(Some(path.clone()), None);
    c.queue_records = 4;
    let records = Records::start(&c, metrics.clone()).unwrap();
    let started = Instant::now();
    for i in 0..1000 {
        records.submit(record(&records, i));
    }
    // Submitting never waited on the file.
    assert!(started.elapsed() < Duration::from_secs(1));
    records.clone().stop(Duration::from_secs(5)).await;
    let d = records.describe();
    let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
    assert!(d.dropped > 0, "{d:?}");
    assert_eq!(lines + d.dropped, 1000, "{d:?}");
    let text = metrics.encode();
    assert!(
        text.contains(&format!(
            "plugvisor_records_dropped_total{{sink=\"file\",reason=\"queue_full\"}} {}",
            d.dropped
        )),
        "{text}"
    );
}

#[tokio::test]
async fn a_collector_down_for_a_while_gets_every_record_once_back() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start().await;
    collector.failing.store(true, Ordering::SeqCst);
    let metrics = Arc::new(Metrics::new());
    let endpoint = format!("http://{}/v1/logs", collector.addr);
    let records = Records::start(
        &config(
            None,
            Some(otlp(endpoint, &dir.path().join("spool"), 1 << 30)),
        ),
        metrics.clone(),
    )
    .unwrap();
    for i in 0..300 {
        records.submit(record(&records, i));
    }
    until("records spooled", Duration::from_secs(5), || {
        records.describe().spooled == 300
    })
    .await;
    let d = records.describe();
    assert!(d.otlp.as_ref().unwrap().spooling, "{d:?}");
    assert!(d.otlp.as_ref().unwrap().spool_bytes > 0);
    assert!(d.retried > 0);
    // More arrive while it is down: spooled behind the others.
    for i in 300..400 {
        records.submit(record(&records, i));
    }
    collector.failing.store(false, Ordering::SeqCst);
    until("every record exported", Duration::from_secs(15), || {
        collector.ids().len() >= 400
    })
    .await;
    let ids = collector.ids();
    assert_eq!(unique(&ids).len(), 400);
    assert_eq!(ids.len(), 400, "none twice");
    until("spool empty", Duration::from_secs(5), || {
        !records.describe().otlp.unwrap().spooling
    })
    .await;
    assert_eq!(records.describe().otlp.unwrap().spool_bytes, 0);
    assert!(collector.refused.load(Ordering::SeqCst) > 0);
    records.stop(Duration::from_secs(2)).await;
    let text = metrics.encode();
    assert!(
        text.contains("plugvisor_records_written_total{sink=\"otlp\"} 400"),
        "{text}"
    );
    assert!(
        text.contains("plugvisor_records_spooled_total 400"),
        "{text}"
    );
}

#[tokio::test]
async fn a_spool_left_by_a_front_is_sent_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    // No collector listens here: the first front spools everything.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let first = Records::start(
        &config(
            None,
            Some(otlp(
                format!("http://{closed}/v1/logs"),
                &spool_dir,
                1 << 30,
            )),
        ),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    for i in 0..50 {
        first.submit(record(&first, i));
    }
    let first_ids: Vec<String> = (0..50).map(|i| first.record_id(i)).collect();
    first.clone().stop(Duration::from_millis(300)).await;
    assert_eq!(first.describe().spooled, 50, "{:?}", first.describe());
    let files: Vec<_> = std::fs::read_dir(&spool_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(files.iter().all(|f| f.ends_with(".seg")), "{files:?}");

    // The next front, with the collector up.
    let collector = Collector::start().await;
    let next = Records::start(
        &config(
            None,
            Some(otlp(
                format!("http://{}/v1/logs", collector.addr),
                &spool_dir,
                1 << 30,
            )),
        ),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    next.submit(record(&next, 0));
    until(
        "the old front's records sent",
        Duration::from_secs(10),
        || collector.ids().len() >= 51,
    )
    .await;
    let got = unique(&collector.ids());
    assert!(first_ids.iter().all(|id| got.contains(id)));
    assert!(got.contains(&next.record_id(0)));
    assert_eq!(collector.ids().len(), 51);
    next.stop(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_full_spool_keeps_what_it_has_and_counts_the_newest_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let metrics = Arc::new(Metrics::new());
    let max = 20_000;
    let records = Records::start(
        &config(
            None,
            Some(otlp(
                format!("http://{closed}/v1/logs"),
                &dir.path().join("spool"),
                max,
            )),
        ),
        metrics.clone(),
    )
    .unwrap();
    for i in 0..1000 {
        records.submit(record(&records, i));
    }
    until(
        "every record spooled or dropped",
        Duration::from_secs(10),
        || {
            let d = records.describe();
            d.spooled + d.dropped == 1000
        },
    )
    .await;
    let d = records.describe();
    assert!(d.dropped > 0 && d.spooled > 0, "{d:?}");
    let bytes = d.otlp.as_ref().unwrap().spool_bytes;
    assert!(bytes <= max, "{bytes} > {max}");
    // Within one record of the bound: it filled up before refusing.
    assert!(bytes > max - 1000, "{bytes}");
    let text = metrics.encode();
    assert!(
        text.contains(&format!(
            "plugvisor_records_dropped_total{{sink=\"otlp\",reason=\"spool_full\"}} {}",
            d.dropped
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("plugvisor_records_spool_bytes {bytes}")),
        "{text}"
    );
    records.stop(Duration::from_millis(200)).await;
}
