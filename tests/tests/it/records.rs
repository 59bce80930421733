//! Usage records against a real OTLP collector (`tests/otlp_receiver.py`, the official protos
//! over HTTP and gRPC): every record delivered, none twice, through a collector that fails, is
//! killed and comes back, and across a front restart; a full spool counted.
//!
//! The records are fed to `Records` in this process (so the sinks are tested apart from Envoy),
//! or left in the spool for the real `plugvisor` process to send; `records_drill.rs` sends real
//! requests through Envoy and reads the records the front wrote for them.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use supervisor::config::{Config, RecordsConfig};
use supervisor::observe::metrics::Metrics;
use supervisor::records::{Record, RecordStatus, Records};
use tests::front::FrontProcess;
use tests::otlp::{Collector, Protocol};
use tests::FileText;

/// `[records]` with the file in `dir` and OTLP at `otlp` (keys of `[records.otlp]`), as a front
/// would load it.
fn records_config(dir: &Path, otlp: &str) -> RecordsConfig {
    let text = format!(
        "[records]\npath = \"{}\"\n[records.otlp]\nspool_dir = \"{}\"\ntimeout_ms = 1000\n{otlp}",
        dir.join("records.jsonl").display(),
        dir.join("spool").display()
    );
    Config::parse(&text, "test")
        .expect("records config")
        .records
}

fn record(records: &Records, stream: u64) -> Record {
    let mut r = records.new_record(stream, SystemTime::now());
    r.request_id = Some(format!("req-{}-{stream}", records.instance_id()));
    r.method = Some("POST".into());
    r.path = Some("/v1/chat/completions".into());
    r.http_status = Some(200);
    r.status = RecordStatus::Complete;
    r.plugins.insert(
        "plugvisor.usage".into(),
        serde_json::json!({"input_tokens": stream, "output_tokens": stream + 1, "model": "m-1"}),
    );
    r
}

/// [`tests::eventually_async`] for a plain condition.
async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    tests::eventually_async(what, limit, async || check()).await
}

fn no_repeats(ids: &[String]) -> BTreeSet<String> {
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(set.len(), ids.len(), "a record delivered twice");
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_a_real_collector_over_http_and_grpc() {
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let dir = tempfile::tempdir().unwrap();
        let collector = Collector::start(dir.path(), protocol);
        let records = Records::start(
            &records_config(dir.path(), &collector.config()),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        for i in 0..40 {
            records.submit(record(&records, i));
        }
        wait_for(
            "40 records at the collector",
            Duration::from_secs(10),
            || collector.record_ids().len() >= 40,
        )
        .await;
        records.clone().stop(Duration::from_secs(2)).await;
        let got = collector.records();
        let ids: Vec<String> = collector.record_ids();
        let set = no_repeats(&ids);
        assert_eq!(set.len(), 40, "{protocol:?}");
        let r = got
            .iter()
            .find(|r| r["attributes"]["plugvisor.record_id"] == records.record_id(7).as_str())
            .expect("record 7");
        assert_eq!(r["event_name"], "plugvisor.usage_record", "{protocol:?}");
        assert_eq!(r["resource"]["service.name"], "plugvisor");
        let a = &r["attributes"];
        assert_eq!(a["gen_ai.usage.input_tokens"], 7);
        assert_eq!(a["gen_ai.usage.output_tokens"], 8);
        assert_eq!(a["gen_ai.response.model"], "m-1");
        assert_eq!(a["plugvisor.status"], "complete");
        assert_eq!(a["http.response.status_code"], 200);
        assert_eq!(
            a["http.request.header.x-request-id"][0],
            format!("req-{}-7", records.instance_id())
        );
        // The body is the record as the file has it.
        let body: serde_json::Value =
            serde_json::from_str(r["body"].as_str().expect("a string body")).unwrap();
        assert_eq!(body["record_id"], records.record_id(7));
        let file = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
        assert_eq!(file.lines().count(), 40);
        let line: serde_json::Value = serde_json::from_str(
            file.lines()
                .find(|l| l.contains(&format!("\"{}\"", records.record_id(7))))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(line, body, "{protocol:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_fails_then_is_killed_and_comes_back_gets_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut collector = Collector::start(dir.path(), Protocol::Grpc);
    let metrics = Arc::new(Metrics::new());
    let records = Records::start(
        &records_config(dir.path(), &collector.config()),
        metrics.clone(),
    )
    .unwrap();
    let mut next = 0u64;
    let mut submit = |n: u64| {
        for _ in 0..n {
            records.submit(record(&records, next));
            next += 1;
        }
    };
    submit(50);
    wait_for("the first 50", Duration::from_secs(10), || {
        collector.record_ids().len() >= 50
    })
    .await;
    // UNAVAILABLE for a while: retried, then spooled.
    collector.fail(true);
    submit(50);
    wait_for("50 spooled", Duration::from_secs(10), || {
        records.describe().spooled >= 50
    })
    .await;
    // Then gone altogether (connection refused), with more records coming.
    collector.stop();
    submit(50);
    wait_for("100 spooled", Duration::from_secs(10), || {
        records.describe().spooled >= 100
    })
    .await;
    assert!(records.describe().otlp.unwrap().spooling);
    // Back on the same port.
    collector.fail(false);
    collector.restart();
    submit(50);
    wait_for("all 200 delivered", Duration::from_secs(30), || {
        collector.record_ids().len() >= 200
    })
    .await;
    wait_for("live again", Duration::from_secs(10), || {
        !records.describe().otlp.unwrap().spooling
    })
    .await;
    let ids = collector.record_ids();
    let set = no_repeats(&ids);
    let expected: BTreeSet<String> = (0..200).map(|i| records.record_id(i)).collect();
    assert_eq!(set, expected);
    let d = records.describe();
    assert!(d.retried > 0, "{d:?}");
    assert_eq!(d.dropped, 0, "{d:?}");
    assert_eq!(d.otlp.as_ref().unwrap().spool_bytes, 0, "{d:?}");
    records.stop(Duration::from_secs(2)).await;
    let text = metrics.encode();
    assert!(
        text.contains("plugvisor_records_written_total{sink=\"otlp\"} 200"),
        "{text}"
    );
    assert!(
        text.contains("plugvisor_records_written_total{sink=\"file\"} 200"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_counts_the_records_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let mut collector = Collector::start(dir.path(), Protocol::Http);
    let otlp = format!("{}spool_max_bytes = 30000\n", collector.config());
    collector.stop();
    let metrics = Arc::new(Metrics::new());
    let records = Records::start(&records_config(dir.path(), &otlp), metrics.clone()).unwrap();
    for i in 0..500 {
        records.submit(record(&records, i));
    }
    wait_for(
        "each record spooled or dropped",
        Duration::from_secs(10),
        || {
            let d = records.describe();
            d.spooled + d.dropped == 500
        },
    )
    .await;
    let d = records.describe();
    assert!(d.dropped > 0 && d.spooled > 0, "{d:?}");
    assert!(d.otlp.as_ref().unwrap().spool_bytes <= 30_000, "{d:?}");
    // The file has every one of them all the same.
    records.clone().stop(Duration::from_millis(200)).await;
    let file = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
    assert_eq!(file.lines().count(), 500);
    let text = metrics.encode();
    assert!(
        text.contains(&format!(
            "plugvisor_records_dropped_total{{sink=\"otlp\",reason=\"spool_full\"}} {}",
            d.dropped
        )),
        "{text}"
    );
    // What the spool kept is delivered once the collector is back.
    collector.restart();
    let next = Records::start(&records_config(dir.path(), &collector.config()), metrics).unwrap();
    wait_for(
        "the spooled records delivered",
        Duration::from_secs(10),
        || collector.record_ids().len() as u64 >= d.spooled,
    )
    .await;
    assert_eq!(no_repeats(&collector.record_ids()).len() as u64, d.spooled);
    next.stop(Duration::from_secs(1)).await;
}

/// The real front: it writes its records file (mode 0640) in `$STATE_DIRECTORY`, sends at start
/// what an earlier front left in the spool, and says so in `plugvisor status --json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_front_sends_what_the_last_one_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut collector = Collector::start(dir.path(), Protocol::Http);
    let otlp_keys = collector.config();
    collector.stop();
    // The earlier front: the collector was down, it spooled, it stopped.
    let old = Records::start(
        &records_config(&state, &otlp_keys),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    for i in 0..30 {
        old.submit(record(&old, i));
    }
    old.clone().stop(Duration::from_millis(300)).await;
    assert_eq!(old.describe().spooled, 30, "{:?}", old.describe());

    collector.restart();
    let plugins = format!(
        "[plugins.usage]\n[records.otlp]\n{otlp_keys}spool_dir = \"{}\"\n",
        state.join("spool").display()
    );
    let front = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || FrontProcess::start(&dir, &plugins, &["usage"])
    })
    .await
    .unwrap();
    wait_for(
        "the old front's records sent",
        Duration::from_secs(15),
        || collector.record_ids().len() >= 30,
    )
    .await;
    let expected: BTreeSet<String> = (0..30).map(|i| old.record_id(i)).collect();
    assert_eq!(no_repeats(&collector.record_ids()), expected);
    let metrics = front.metrics();
    assert!(
        metrics.contains("plugvisor_records_written_total{sink=\"otlp\"} 30"),
        "{metrics}"
    );
    // Its own file, where $STATE_DIRECTORY says.
    let file = state.join("records.jsonl");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777 & !0o640, 0, "mode {mode:o}");
    let answer = supervisor::shell::control::request(
        &front.control_socket(),
        &supervisor::shell::control::Request::Status,
    )
    .await
    .unwrap();
    let status = answer.records.expect("records in status");
    assert_eq!(status.file.as_deref(), Some(file.as_path()));
    let otlp = status.otlp.expect("otlp on");
    assert!(otlp.endpoint.contains(&collector.port.to_string()));
    assert_eq!(otlp.spool_dir, state.join("spool"));
    assert_eq!(status.exported, 30);
    let text = std::process::Command::new(tests::bins::plugvisor())
        .arg("status")
        .arg("--control")
        .arg(front.control_socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("records: ") && l.contains("OTLP http/protobuf")),
        "{text}\n{}",
        FileText(&dir.path().join("plugvisor.log"))
    );
}
