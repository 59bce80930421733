//! SIGHUP reloads of the real `plugvisor` that go wrong in part: a plugin whose launch fails
//! stays configured and visible as failed, is retried by its restart policy, by `plugvisor
//! start` and by a later reload, and a removed plugin's metric series leave `/metrics` with it.

use std::time::Duration;

use supervisor::plugin::supervise::PluginStatus;
use supervisor::shell::control::{self, Request};
use tests::front::FrontProcess;

async fn status(front: &FrontProcess) -> Vec<PluginStatus> {
    let answer = control::request(&front.control_socket(), &Request::Status)
        .await
        .expect("control socket answers");
    answer.plugins.expect("status lists plugins")
}

/// `plugvisor start <plugin>` through the control socket: the answer.
async fn start_plugin(front: &FrontProcess, plugin: &str) -> control::Response {
    control::request(
        &front.control_socket(),
        &Request::Start {
            plugin: plugin.into(),
        },
    )
    .await
    .expect("control socket answers")
}

/// Polls the status until `pred` holds, up to 15 s.
async fn wait_for(
    front: &FrontProcess,
    what: &str,
    pred: impl Fn(&[PluginStatus]) -> bool,
) -> Vec<PluginStatus> {
    tests::eventually_async(what, Duration::from_secs(15), async || {
        let s = status(front).await;
        if pred(&s) {
            Ok(s)
        } else {
            Err(format!("{s:#?}\n{}", front.log()))
        }
    })
    .await
}

fn find<'a>(s: &'a [PluginStatus], name: &str) -> Option<&'a PluginStatus> {
    s.iter().find(|p| p.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_a_reload_could_not_start_stays_failed_until_a_reload_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(
        dir.path(),
        "[plugins.usage]\n[plugins.latency]\n",
        &["usage", "latency"],
    );

    // A mistake in the file (a group that does not exist) is refused whole at reload: the
    // running configuration stays, nothing is added.
    front.reload(
        "[plugins.usage]\n[plugins.latency]\n[plugins.test-order]\ngroup = \"no-such-group-xyz\"\n",
    );
    tests::eventually("the reload rejected", Duration::from_secs(15), || {
        let log = front.log();
        log.contains("reload rejected").then_some(()).ok_or(log)
    });
    assert!(
        front.log().contains("key `plugins.test-order.group`"),
        "{}",
        front.log()
    );
    assert!(find(&status(&front).await, "test-order").is_none());

    // What no check of the file can know: its socket path is taken by a directory.
    let squatter = front.runtime_dir.join("plugins/test-order.sock");
    std::fs::create_dir_all(&squatter).unwrap();
    front.reload("[plugins.usage]\n[plugins.latency]\n[plugins.test-order]\n");
    let s = wait_for(&front, "test-order failed", |s| {
        find(s, "test-order").is_some_and(|p| p.state == "failed")
    })
    .await;
    let names: Vec<&str> = s.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["usage", "latency", "test-order"], "config order");
    let failed = find(&s, "test-order").unwrap();
    assert!(
        failed
            .last_exit
            .as_deref()
            .is_some_and(|e| e.contains("a directory")),
        "{failed:?}"
    );
    assert!(!failed.connected);
    assert!(find(&s, "usage").unwrap().connected && find(&s, "latency").unwrap().connected);
    // The directory is never replaced.
    assert!(squatter.is_dir());
    // The table view says so too.
    let cli = std::process::Command::new(tests::bins::plugvisor())
        .args(["status", "--control"])
        .arg(front.control_socket())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&cli.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("test-order") && l.contains("failed")),
        "{table}"
    );

    // A reload that changes nothing else keeps it, failed, rather than forgetting it.
    front.reload("[plugins.usage]\n[plugins.latency]\n[plugins.test-order]\n");
    // Applied: the second reload that was (the first was rejected).
    tests::eventually("the reload applied", Duration::from_secs(10), || {
        let log = front.log();
        (log.matches("configuration reloaded").count() >= 2)
            .then_some(())
            .ok_or(log)
    });
    let s = status(&front).await;
    assert_eq!(
        find(&s, "test-order").map(|p| p.state.as_str()),
        Some("failed")
    );

    // With the path free it comes up.
    std::fs::remove_dir(&squatter).unwrap();
    front.reload(
        "[plugins.usage]\n[plugins.latency]\n[plugins.test-order]\nfinal_timeout_ms = 300\n",
    );
    wait_for(&front, "test-order up", |s| {
        find(s, "test-order").is_some_and(|p| p.state == "up" && p.connected)
    })
    .await;
    assert!(front
        .metrics()
        .contains("plugvisor_plugin_connected{plugin=\"test-order\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_removed_by_a_reload_takes_its_series_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(
        dir.path(),
        "[plugins.usage]\n[plugins.latency]\n",
        &["usage", "latency"],
    );
    assert!(front.metrics().contains("plugin=\"usage\""));

    front.reload("[plugins.latency]\n");
    wait_for(&front, "without usage", |s| find(s, "usage").is_none()).await;
    // The series go once the reload is applied, which the status shows a moment before.
    let m = tests::eventually("usage's series gone", Duration::from_secs(5), || {
        let m = front.metrics();
        let usage: Vec<&str> = m
            .lines()
            .filter(|l| l.contains("plugin=\"usage\""))
            .collect();
        if usage.is_empty() {
            Ok(m)
        } else {
            Err(usage.join("\n"))
        }
    });
    assert!(
        m.contains("plugvisor_plugin_connected{plugin=\"latency\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_could_not_start_is_retried_by_its_policy_and_by_start() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(dir.path(), "[plugins.usage]\n", &["usage"]);
    let runtime = front.runtime_dir.clone();
    let squat = |name: &str| {
        let path = runtime.join(format!("plugins/{name}.sock"));
        std::fs::create_dir_all(&path).unwrap();
        path
    };
    // `latency` retries every 100..200 ms; `test-order` backs off a minute, so only an
    // operator's `start` brings it up in this test. Both are required: /healthz says so.
    let (latency, order) = (squat("latency"), squat("test-order"));
    front.reload(
        "[plugins.usage]\n\
         [plugins.latency]\nrequired = true\nbackoff_min_ms = 100\nbackoff_max_ms = 200\n\
         [plugins.test-order]\nrequired = true\nbackoff_min_ms = 60000\nbackoff_max_ms = 60000\n",
    );
    let s = wait_for(&front, "both failed", |s| {
        ["latency", "test-order"]
            .iter()
            .all(|n| find(s, n).is_some_and(|p| p.state == "failed"))
    })
    .await;
    assert!(
        find(&s, "test-order")
            .unwrap()
            .retry_in_ms
            .is_some_and(|ms| ms > 1000),
        "{s:#?}"
    );
    let (code, body) = front.healthz();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("latency") && body.contains("test-order"),
        "{body}"
    );

    // Several retries fail while the directory is there; then, freed, it comes up by itself.
    tests::eventually("two failed retries", Duration::from_secs(5), || {
        let log = front.log();
        (log.matches("plugin still cannot be started").count() >= 2)
            .then_some(())
            .ok_or(log)
    });
    std::fs::remove_dir(&latency).unwrap();
    wait_for(&front, "latency up by itself", |s| {
        find(s, "latency").is_some_and(|p| p.state == "up" && p.connected)
    })
    .await;
    assert_eq!(
        find(&status(&front).await, "test-order").map(|p| p.state.clone()),
        Some("failed".into())
    );

    // `start` tries at once: refused with the reason while the cause is there, then up.
    let answer = start_plugin(&front, "test-order").await;
    assert!(
        answer
            .error
            .as_deref()
            .is_some_and(|e| e.contains("a directory")),
        "{answer:?}"
    );
    std::fs::remove_dir(&order).unwrap();
    let answer = start_plugin(&front, "test-order").await;
    assert!(answer.error.is_none(), "{answer:?}");
    let s = wait_for(&front, "test-order up", |s| {
        find(s, "test-order").is_some_and(|p| p.state == "up" && p.connected)
    })
    .await;
    let names: Vec<&str> = s.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["usage", "latency", "test-order"], "config order");
    tests::eventually("/healthz 200", Duration::from_secs(10), || {
        let (code, body) = front.healthz();
        (code == 200)
            .then_some(())
            .ok_or(format!("{code} {body:?}"))
    });
}
