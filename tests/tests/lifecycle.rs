//! Drills of a plugin's lifecycle under 50 concurrent streams through real Envoy, with the real
//! front and plugin processes: what each stream's metadata says after a plugin was killed,
//! restarted or reloaded in the middle of the batch. Counts are asserted, never timings.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tests::client::chat;
use tests::front::metric;
use tests::stack::Stack;
use tests::upstream::Params;

const STREAMS: usize = 50;

/// usage and test-order, with finals allowed to wait for a replacement process.
const PLUGINS: &str = r#"
[plugins.usage]
final_timeout_ms = 5000
[plugins.test-order]
final_timeout_ms = 5000
"#;

fn params() -> Params {
    Params {
        chunks: 30,
        delay: Duration::from_millis(15),
        ..Params::default()
    }
}

/// Runs the batch (streams 10 ms apart), calls `during` once the batch is under way, and returns
/// each stream's access-log line after checking its body.
async fn batch<F, Fut>(setup: &Stack, tag: &str, during: F) -> Vec<serde_json::Value>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let port = setup.envoy.port;
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let id = format!("{tag}-{i}");
        tasks.push(tokio::spawn(async move {
            let got = chat(port, &params(), &id).await;
            (id, got)
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
        if i == STREAMS / 3 {
            // A third of the streams are running, some of them near their end.
            during().await;
            break;
        }
    }
    for i in STREAMS / 3 + 1..STREAMS {
        let id = format!("{tag}-{i}");
        tasks.push(tokio::spawn(async move {
            let got = chat(port, &params(), &id).await;
            (id, got)
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut lines = Vec::new();
    for t in tasks {
        let (id, got) = t.await.unwrap();
        assert_eq!(got.error, None, "{id}");
        assert!(got.body() == params().body(), "{id}: body differs");
        lines.push(setup.log_for(&id));
    }
    lines
}

/// Every stream's metadata is whole: usage has the right totals, test-order saw every byte in
/// order, and the front lists nobody as missing or partial.
fn assert_whole(lines: &[serde_json::Value]) {
    let p = params();
    let sha = hex::encode(Sha256::digest(p.body()));
    for line in lines {
        assert_eq!(
            line["plugvisor"]["missing"],
            serde_json::json!([]),
            "{line}"
        );
        assert!(line["plugvisor"]["partial"].is_null(), "{line}");
        assert_eq!(
            line["usage"]["prompt_tokens"], p.prompt_tokens as f64,
            "{line}"
        );
        assert_eq!(
            line["usage"]["completion_tokens"], p.chunks as f64,
            "{line}"
        );
        assert_eq!(line["test_order"]["sha256"], sha, "{line}");
        assert_eq!(line["test_order"]["gaps"], 0.0, "{line}");
        assert_eq!(line["test_order"]["out_of_order"], 0.0, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_killed_mid_batch_loses_no_stream_s_metadata() {
    let setup = Stack::start(PLUGINS, &["usage", "test-order"]).await;
    let usage = setup.plugin_pid("usage").await;
    let order = setup.plugin_pid("test-order").await;
    let lines = batch(&setup, "kill", || async {
        kill(Pid::from_raw(usage as i32), Signal::SIGKILL).unwrap();
        kill(Pid::from_raw(order as i32), Signal::SIGKILL).unwrap();
    })
    .await;
    assert_whole(&lines);
    let metrics = setup.front.metrics();
    assert_eq!(
        metric(
            &metrics,
            "plugvisor_plugin_restarts_total{plugin=\"usage\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &metrics,
            "plugvisor_plugin_events_replayed_total{plugin=\"test-order\"}"
        ) > 0.0,
        "{metrics}"
    );
    assert_ne!(setup.plugin_pid("usage").await, usage);
}
