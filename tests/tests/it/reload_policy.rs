//! A reload of the real `plugvisor` applies front-side keys without a restart: the restart policy
//! judges the next exit, `max_streams` bounds the next streams; and a `restart` of a plugin that
//! is still starting answers at once instead of waiting out a grace for a connection that does not
//! exist yet.

use std::time::{Duration, Instant};

use supervisor::shell::control::{self, Request};
use tests::front::{metric, FrontProcess};

/// `plugvisor reload` against the running front: its exit status and what it printed.
fn plugvisor_reload(front: &FrontProcess) -> (bool, String) {
    let out = std::process::Command::new(tests::bins::plugvisor())
        .arg("reload")
        .arg("--control")
        .arg(front.control_socket())
        .output()
        .expect("run plugvisor reload");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_max_streams_bounds_the_next_streams() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("unix:{}", dir.path().join("ext_proc.sock").display());
    let front = FrontProcess::start_from(
        &tests::bins::plugvisor(),
        dir.path(),
        &listen,
        "max_streams = 100",
        "[plugins.latency]\n",
        &["latency"],
    );
    let before = tests::idle::open(&listen, 1, 3).await;
    assert_eq!(
        metric(&front.metrics(), "plugvisor_streams_shed_total"),
        0.0
    );

    front.set_top_level("max_streams", "4");
    // A key only a restart applies, changed in the same reload, is named in the answer.
    front.set_top_level("listen", "\"127.0.0.1:1\"");
    let (ok, answer) = plugvisor_reload(&front);
    assert!(ok, "{answer}");
    assert!(answer.contains("applied max_streams"), "{answer}");
    assert!(
        answer.contains("NOT applied: listen needs a restart of plugvisor"),
        "{answer}"
    );
    assert!(
        front.log().contains("NOT applied: listen"),
        "{}",
        front.log()
    );
    // Three streams hold places; of three more, one fits under the new bound of 4.
    let after = tests::idle::open(&listen, 1, 3).await;
    assert_eq!(before.len() + after.len(), 6);
    assert_eq!(
        metric(&front.metrics(), "plugvisor_streams_shed_total"),
        2.0,
        "{}",
        front.metrics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_the_restart_policy_judges_the_next_exit() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(dir.path(), "[plugins.latency]\n", &["latency"]);
    let plugins = "[plugins.latency]\nrestart = \"temporary\"\n";
    front.reloaded(|| front.reload(plugins));
    assert!(
        front.log().contains("updated in place latency"),
        "{}",
        front.log()
    );
    let pid = front
        .plugin_status("latency")
        .await
        .pid
        .expect("latency runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // `temporary`: never restarted. Under the old policy (`permanent`) it would be back within
    // its 50 ms backoff.
    tests::eventually_async("latency stopped", Duration::from_secs(10), async || {
        let s = front.plugin_status("latency").await;
        if s.state == "stopped" {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    // The thing under test is that nothing happens: give a restart time to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = front.plugin_status("latency").await;
    assert_eq!(
        (s.state.as_str(), s.pid, s.restarts),
        ("stopped", None, 0),
        "{s:?}"
    );
    assert!(
        !front.log().contains("restarting plugin after backoff"),
        "{}",
        front.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_starting_answers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A process that never connects: the plugin stays `starting` for its whole start timeout.
    let front = FrontProcess::start(
        dir.path(),
        "[plugins.slow]\ncommand = \"/bin/sleep\"\nargs = [\"600\"]\nstart_timeout_ms = 600000\n",
        &[],
    );
    let first = front.plugin_status("slow").await;
    assert_eq!(first.state, "starting", "{first:?}");
    let asked = Instant::now();
    let answer = control::request(
        &front.control_socket(),
        &Request::Restart {
            plugin: "slow".into(),
        },
    )
    .await
    .unwrap();
    let took = asked.elapsed();
    assert!(answer.ok, "{answer:?}");
    // The grace (shutdown_grace_ms, 5 s by default) is not waited for: nothing to drain.
    assert!(
        took < Duration::from_secs(2),
        "restart while starting took {took:?}"
    );
    tests::eventually_async(
        "a new process starting",
        Duration::from_secs(10),
        async || {
            let s = front.plugin_status("slow").await;
            if s.state == "starting" && s.pid.is_some() && s.pid != first.pid {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    let log = front.log();
    assert!(!log.contains("exited unexpectedly"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_the_file_refuses_keeps_the_running_configuration_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(dir.path(), "[plugins.latency]\n", &["latency"]);
    let before = front.plugin_status("latency").await;
    let config = std::fs::read_to_string(front.config_path()).unwrap();
    std::fs::write(
        front.config_path(),
        config.replace("[plugins.latency]", "[plugins.latency]\nqueue_events = 0"),
    )
    .unwrap();
    let (ok, answer) = plugvisor_reload(&front);
    assert!(!ok, "{answer}");
    assert!(
        answer.contains("reload rejected") && answer.contains("queue_events"),
        "{answer}"
    );
    let after = front.plugin_status("latency").await;
    assert_eq!((after.pid, after.restarts), (before.pid, before.restarts));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_process_and_its_drain_show_in_status_until_the_drain_ends() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("unix:{}", dir.path().join("ext_proc.sock").display());
    let front = FrontProcess::start_listening(
        dir.path(),
        &listen,
        "[plugins.latency]\ndrain_grace_ms = 1500\n",
        &["latency"],
    );
    // Two streams in the middle of a response, bound to the running process.
    let streams = tests::idle::open_in_flight(&listen, 1, 2, 2, 64).await;
    let old = front
        .plugin_status("latency")
        .await
        .pid
        .expect("latency runs");
    let answer = control::request(
        &front.control_socket(),
        &Request::Restart {
            plugin: "latency".into(),
        },
    )
    .await
    .unwrap();
    assert!(answer.ok, "{answer:?}");
    let s = front.plugin_status("latency").await;
    let draining = s
        .draining
        .iter()
        .find(|d| d.pid == old)
        .unwrap_or_else(|| panic!("the replaced process is not listed: {s:?}"));
    assert_eq!(draining.streams, 2, "{s:?}");
    assert!(draining.grace_left_ms.is_some_and(|ms| ms <= 1500), "{s:?}");
    let table = std::process::Command::new(tests::bins::plugvisor())
        .args(["status", "--control"])
        .arg(front.control_socket())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!(
            "latency: replaced process {old} finishing 2 stream(s)"
        )),
        "{table}"
    );
    // The owner ends the drain on time: the streams move on, the old process is reaped.
    tests::eventually_async("the drain over", Duration::from_secs(15), async || {
        let s = front.plugin_status("latency").await;
        if s.draining.is_empty() {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    assert!(
        front
            .log()
            .contains("replaced process still serving streams after drain_grace_ms"),
        "{}",
        front.log()
    );
    drop(streams);
}
