//! plugvisor as a `Type=notify` service under a real systemd 252, booted with `systemd-nspawn`
//! (see `tests::nspawn`) and installed with `scripts/install` (`tests::service`): readiness and
//! the STATUS line, socket activation serving a real Envoy, plugins restarted by plugvisor
//! without systemd noticing, a plugin run as its own template unit, the watchdog, reload, and
//! journald.
//!
//! Each test boots its own container with the container's `/run/plugvisor` bound to a host
//! directory, so Envoy (on the host) reaches the socket systemd activated inside. The containers
//! are powered off when the test ends, also when it fails. Needs root, systemd-container and the
//! binaries built first (`cargo build --workspace --bins`; scripts/test does both).

use std::time::{Duration, Instant};

use tests::client::chat;
use tests::nspawn;
use tests::service::{Service, SERVICE};
use tests::upstream::{Params, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_service_is_ready_serves_envoy_and_restarts_a_killed_plugin_itself() {
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("notify", "tests/systemd/spawned.toml");
        s.start();
        s
    });
    // `systemctl start` returned, so READY=1 arrived; `usage` is required, so it was up by then.
    assert_eq!(s.prop("ActiveState"), "active");
    assert_eq!(s.prop("SubState"), "running");
    let status = s.prop("StatusText");
    assert!(
        status.starts_with("serving; plugins ") && !status.contains("down: usage"),
        "{status}"
    );
    let status = s.wait_status("2/2 up", Duration::from_secs(10), |t| {
        t == "serving; plugins 2/2 up; restarts 0"
    });
    let shown = s.c.systemctl_ok(&["status", "--lines=0", SERVICE]).unwrap();
    assert!(shown.contains(&format!("Status: \"{status}\"")), "{shown}");
    let main_pid = s.prop("MainPID");

    // Envoy on the host, through the socket systemd holds; plugvisor ignored the config's
    // `listen` (`s.listen`) in favour of it.
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| s.envoy(dir.path(), &upstream));
    let params = Params::default();
    let got = chat(envoy.port, &params, "activated-1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body(), params.body());
    let line =
        tokio::task::block_in_place(|| envoy.access_log_for("activated-1", Duration::from_secs(5)));
    assert_eq!(line["usage"]["completion_tokens"], 5.0, "{line}");
    assert!(line["latency"]["ttft_ms"].as_f64().is_some(), "{line}");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );

    tokio::task::block_in_place(|| {
        // kill -9 a plugin: plugvisor restarts it, systemd sees nothing.
        let old = s.wait_plugin_pid("usage", None);
        s.c.exec_ok(&["kill", "-9", &old.to_string()]).unwrap();
        let new = s.wait_plugin_pid("usage", Some(old));
        assert_ne!(new, old);
        s.wait_status("counts the restart", Duration::from_secs(15), |t| {
            t == "serving; plugins 2/2 up; restarts 1"
        });
        assert_eq!(s.prop("ActiveState"), "active");
        assert_eq!(s.prop("NRestarts"), "0");
        assert_eq!(s.prop("MainPID"), main_pid);

        // The new plugin's own records, under its own pid and its name.
        let own =
            s.c.journalctl(&[&format!("_PID={new}"), "-o", "verbose"])
                .unwrap();
        assert!(own.contains("PLUGVISOR_PLUGIN=usage"), "{own}");
        assert!(own.contains("SYSLOG_IDENTIFIER=plugvisor-plugin"), "{own}");
        let by_name = s.c.journalctl(&["PLUGVISOR_PLUGIN=latency"]).unwrap();
        assert!(!by_name.trim().is_empty(), "no records for latency");
        // The front's own records are in the journal natively too.
        let front = s.c.journalctl(&[&format!("_PID={main_pid}")]).unwrap();
        assert!(front.contains("ready"), "{front}");
    });

    let got = chat(envoy.port, &params, "after-restart").await;
    assert_eq!(got.status, 200);
    let line = tokio::task::block_in_place(|| {
        envoy.access_log_for("after-restart", Duration::from_secs(5))
    });
    assert_eq!(line["usage"]["completion_tokens"], 5.0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_an_external_plugin_unit_restarts_only_that_plugin_while_streams_flow() {
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("external", "tests/systemd/external.toml");
        s.start();
        s.c.systemctl_ok(&["start", "plugvisor-plugin@latency.service"])
            .unwrap();
        s.wait_status("2/2 up", Duration::from_secs(15), |t| {
            t == "serving; plugins 2/2 up; restarts 0"
        });
        s
    });
    let main_pid = s.prop("MainPID");
    let usage = s.wait_plugin_pid("usage", None);
    let latency_unit_pid =
        s.c.show_property("plugvisor-plugin@latency.service", "MainPID")
            .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| s.envoy(dir.path(), &upstream));
    let slow = Params {
        chunks: 20,
        delay: Duration::from_millis(25),
        ..Params::default()
    };
    // Streams run before, during and after the restart; every one completes intact.
    let port = envoy.port;
    let traffic = tokio::spawn({
        let slow = slow.clone();
        async move {
            let mut statuses = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(4);
            let mut n = 0;
            while Instant::now() < deadline {
                let batch: Vec<_> = (0..3)
                    .map(|i| {
                        let slow = slow.clone();
                        let id = format!("flow-{n}-{i}");
                        tokio::spawn(async move { (chat(port, &slow, &id).await, slow.body()) })
                    })
                    .collect();
                for b in batch {
                    let (got, want) = b.await.unwrap();
                    statuses.push((got.status, got.body() == want));
                }
                n += 1;
            }
            statuses
        }
    });
    // Restarted in the middle of the traffic, not before it starts: the timing is the test.
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| {
        s.c.systemctl_ok(&["restart", "plugvisor-plugin@latency.service"])
            .unwrap();
    });
    let statuses = traffic.await.unwrap();
    assert!(statuses.len() >= 6, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|(code, intact)| *code == 200 && *intact),
        "{statuses:?}"
    );

    tokio::task::block_in_place(|| {
        let new_unit_pid =
            s.c.show_property("plugvisor-plugin@latency.service", "MainPID")
                .unwrap();
        assert_ne!(new_unit_pid, latency_unit_pid);
        s.wait_status("2/2 up again", Duration::from_secs(15), |t| {
            t == "serving; plugins 2/2 up; restarts 0"
        });
        assert_eq!(s.prop("MainPID"), main_pid, "plugvisor itself restarted");
        assert_eq!(s.prop("NRestarts"), "0");
        assert_eq!(
            s.plugin_pid("usage"),
            Some(usage),
            "usage was restarted too"
        );
        // The template unit's records carry its own pid and the plugin's name.
        let own =
            s.c.journalctl(&[&format!("_PID={new_unit_pid}"), "-o", "verbose"])
                .unwrap();
        assert!(own.contains("PLUGVISOR_PLUGIN=latency"), "{own}");
    });
    let got = chat(envoy.port, &Params::default(), "after-unit-restart").await;
    assert_eq!(got.status, 200);
    let line = tokio::task::block_in_place(|| {
        envoy.access_log_for("after-unit-restart", Duration::from_secs(5))
    });
    assert!(line["latency"]["ttft_ms"].as_f64().is_some(), "{line}");
}

#[test]
fn a_stopped_front_misses_the_watchdog_and_systemd_restarts_it() {
    let s = Service::boot("watchdog", "tests/systemd/spawned.toml");
    // A short watchdog keeps the test quick; no core file from the SIGABRT.
    s.short_watchdog();
    s.start();
    let first = s.prop("MainPID");
    // Pings keep a healthy front alive well past the watchdog interval.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(s.prop("MainPID"), first);
    assert_eq!(s.prop("NRestarts"), "0");

    s.c.exec_ok(&["kill", "-STOP", &first]).unwrap();
    let restarted = nspawn::poll(Duration::from_secs(20), || {
        let pid = s.prop("MainPID");
        Ok((s.prop("NRestarts") == "1"
            && s.prop("ActiveState") == "active"
            && pid != "0"
            && pid != first)
            .then_some(pid))
    })
    .unwrap();
    assert!(restarted.is_some(), "{}", s.c.describe_unit(SERVICE));
    let journal = s.c.journalctl(&["-u", SERVICE]).unwrap();
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    s.wait_status("2/2 up after the restart", Duration::from_secs(15), |t| {
        t == "serving; plugins 2/2 up; restarts 0"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_starts_added_plugins_restarts_changed_ones_and_rejects_a_broken_config() {
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("reload", "tests/systemd/spawned.toml");
        s.start();
        s.wait_status("2/2 up", Duration::from_secs(10), |t| {
            t == "serving; plugins 2/2 up; restarts 0"
        });
        s
    });
    let main_pid = s.prop("MainPID");
    let usage = s.wait_plugin_pid("usage", None);
    let latency = s.wait_plugin_pid("latency", None);
    let config = "/etc/plugvisor/plugvisor.toml";
    let original = s.c.exec_ok(&["cat", config]).unwrap();
    let write = |text: &str| {
        let staged = s.c.scratch().join("next.toml");
        std::fs::write(&staged, text).unwrap();
        s.c.exec_ok(&["cp", staged.to_str().unwrap(), config])
            .unwrap();
    };

    // Added: test-order starts; the others keep their processes.
    write(&format!("{original}\n[plugins.test-order]\n"));
    tokio::task::block_in_place(|| {
        s.c.systemctl_ok(&["reload", SERVICE]).unwrap();
        s.wait_status("3/3 up", Duration::from_secs(15), |t| {
            t == "serving; plugins 3/3 up; restarts 0"
        });
    });
    let order = s.wait_plugin_pid("test-order", None);
    assert_eq!(s.plugin_pid("usage"), Some(usage));
    assert_eq!(s.plugin_pid("latency"), Some(latency));

    // New streams carry the added plugin's metadata.
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| s.envoy(dir.path(), &upstream));
    let params = Params::default();
    let got = chat(envoy.port, &params, "after-reload").await;
    assert_eq!(got.status, 200);
    let line = tokio::task::block_in_place(|| {
        envoy.access_log_for("after-reload", Duration::from_secs(5))
    });
    assert_eq!(line["test_order"]["out_of_order"], 0.0, "{line}");
    assert_eq!(line["usage"]["completion_tokens"], 5.0, "{line}");

    tokio::task::block_in_place(|| {
        // A broken file: `systemctl reload` fails on check-config and plugvisor is not signalled.
        write("listen = 5\n");
        let failed = s.c.systemctl(&["reload", SERVICE]).unwrap();
        assert!(
            !failed.status.success(),
            "reload of a broken config succeeded"
        );
        // Signalled anyway: plugvisor itself rejects it and keeps serving the old config.
        s.c.systemctl_ok(&["kill", "--kill-who=main", "--signal=HUP", SERVICE])
            .unwrap();
        let status = s.wait_status("reports the rejection", Duration::from_secs(10), |t| {
            t.contains("reload rejected")
        });
        assert!(status.starts_with("serving; plugins 3/3 up"), "{status}");
        assert_eq!(s.prop("ActiveState"), "active");
        let journal = s.c.journalctl(&["-u", SERVICE]).unwrap();
        assert!(journal.contains("reload rejected"), "{journal}");

        // Changed (usage: what its process is started with) restarts by handover, removed
        // (latency) stops, unchanged (test-order) stays.
        write(&format!(
            "{}\n[plugins.test-order]\n",
            original.replace("[plugins.latency]\n", "").replace(
                "required = true\n",
                "required = true\nenv = { PLUGVISOR_RELOADED = \"1\" }\n"
            )
        ));
        s.c.systemctl_ok(&["reload", SERVICE]).unwrap();
        s.wait_status("2/2 up without latency", Duration::from_secs(15), |t| {
            t == "serving; plugins 2/2 up; restarts 0"
        });
        let new_usage = s.wait_plugin_pid("usage", Some(usage));
        assert_ne!(new_usage, usage);
        let gone = nspawn::poll(Duration::from_secs(10), || {
            Ok(s.plugin_pid("latency").is_none().then_some(()))
        })
        .unwrap();
        assert!(gone.is_some(), "latency still runs after its removal");
        assert_eq!(s.plugin_pid("test-order"), Some(order));
        assert_eq!(s.prop("MainPID"), main_pid);
        assert_eq!(s.prop("NRestarts"), "0");
    });
    let got = chat(envoy.port, &params, "after-second-reload").await;
    assert_eq!(got.status, 200);
    let line = tokio::task::block_in_place(|| {
        envoy.access_log_for("after-second-reload", Duration::from_secs(5))
    });
    assert_eq!(line["usage"]["completion_tokens"], 5.0, "{line}");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );
}

#[test]
fn ready_waits_for_a_required_plugin_then_names_it_when_the_wait_runs_out() {
    // latency runs as its own unit, which is wrong to make required (it starts only after
    // READY): plugvisor waits ready_timeout_ms for it, then reports ready and says why.
    let s = Service::boot_with("readiness", "tests/systemd/external.toml", |t| {
        t.replace("spawn = false\n", "spawn = false\nrequired = true\n")
            .replace(
                "[plugins.usage]\n",
                "ready_timeout_ms = 3000\n\n[plugins.usage]\n",
            )
    });
    let asked = Instant::now();
    s.c.systemctl_ok(&["start", "--no-block", "plugvisor.socket", SERVICE])
        .unwrap();
    // Half the ready timeout: still activating then is what is checked, nothing to wait for.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.prop("ActiveState"), "activating", "active before READY");
    s.c.wait_for_property(SERVICE, "ActiveState", "active", Duration::from_secs(10))
        .unwrap();
    assert!(
        asked.elapsed() >= Duration::from_millis(2500),
        "READY came after {:?}, before ready_timeout_ms",
        asked.elapsed()
    );
    let status = s.prop("StatusText");
    assert_eq!(
        status,
        "serving; plugins 1/2 up (down: latency); restarts 0; \
         required not up after 3000ms: latency"
    );
    // Once the plugin connects the line says so, and the note about readiness goes.
    s.c.systemctl_ok(&["start", "plugvisor-plugin@latency.service"])
        .unwrap();
    s.wait_status("2/2 up", Duration::from_secs(10), |t| {
        t == "serving; plugins 2/2 up; restarts 0"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_socket_from_systemd_serves_envoy_too() {
    let port = tests::free_port();
    // The sequence docs/systemd.md gives for moving a running install's listener.
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/systemd.md"),
    )
    .unwrap();
    let sequence = docs
        .lines()
        .find(|l| l.starts_with("sudo systemctl stop plugvisor.service && "))
        .expect("docs/systemd.md gives the sequence")
        .replace("sudo ", "");
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("tcp", "tests/systemd/spawned.toml");
        // A running install on the Unix socket ...
        s.start();
        // ... gets the drop-in an operator writes with `systemctl edit plugvisor.socket` (or
        // `scripts/install --listen`), then the documented restarts, as written.
        s.c.sh(&format!(
            "mkdir -p /etc/systemd/system/plugvisor.socket.d && \
             printf '[Socket]\\nListenStream=\\nListenStream=127.0.0.1:{port}\\n' \
               > /etc/systemd/system/plugvisor.socket.d/tcp.conf && \
             systemctl daemon-reload && {sequence}"
        ))
        .unwrap_or_else(|e| panic!("{sequence}: {e}"));
        s
    });
    let journal = s.c.journalctl(&["-u", SERVICE]).unwrap();
    assert!(
        journal.contains("ext_proc listener passed by systemd"),
        "{journal}"
    );
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| {
        s.envoy_with(dir.path(), &upstream, format!("127.0.0.1:{port}"), false)
    });
    let params = Params::default();
    let got = chat(envoy.port, &params, "over-tcp").await;
    assert_eq!(got.status, 200);
    let line =
        tokio::task::block_in_place(|| envoy.access_log_for("over-tcp", Duration::from_secs(5)));
    assert_eq!(line["usage"]["completion_tokens"], 5.0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemctl_stop_drains_in_flight_streams_and_says_so() {
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("stop", "tests/systemd/spawned.toml");
        s.start();
        s
    });
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| s.envoy(dir.path(), &upstream));
    // About 2 s of streaming, well inside shutdown_grace_ms (5 s).
    let slow = Params {
        chunks: 40,
        delay: Duration::from_millis(50),
        ..Params::default()
    };
    // A second one ends about 1 s earlier, so the count must go down while draining.
    let short = Params {
        chunks: 20,
        delay: Duration::from_millis(50),
        ..Params::default()
    };
    let port = envoy.port;
    let stream = tokio::spawn({
        let slow = slow.clone();
        async move { chat(port, &slow, "draining").await }
    });
    let short_stream = tokio::spawn({
        let short = short.clone();
        async move { chat(port, &short, "draining-short").await }
    });
    // Stopped with both streams in flight: the timing is the test.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| {
        s.c.systemctl_ok(&["stop", "--no-block", SERVICE]).unwrap();
        let status = s.wait_status("stopping", Duration::from_secs(5), |t| {
            t.starts_with("stopping;")
        });
        assert!(status.ends_with("draining 2 stream(s)"), "{status}");
        assert_eq!(s.prop("ActiveState"), "deactivating");
        // Updated as streams finish, not frozen at the count the stop began with.
        s.wait_status("draining 1", Duration::from_secs(3), |t| {
            t.ends_with("draining 1 stream(s)")
        });
    });
    let got = short_stream.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.body(),
        short.body(),
        "the short stream was cut by the stop"
    );
    let got = stream.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body(), slow.body(), "the stream was cut by the stop");
    tokio::task::block_in_place(|| {
        s.c.wait_for_property(SERVICE, "ActiveState", "inactive", Duration::from_secs(15))
            .unwrap();
        assert_eq!(s.prop("Result"), "success");
        // The unit's last STATUS= is what it says after the stop, not a stale drain count.
        let status = s.prop("StatusText");
        assert!(status.starts_with("stopped"), "{status}");
    });
}
