//! Operating plugvisor under a real systemd 252 (`tests::nspawn`) the way an operator does, with a
//! real Envoy on the host counting what it got: every response byte-identical to what the
//! upstream sent and every plugin's metadata whole (issue 15). The sequences:
//! - restarts, socket activations and a watchdog restart, ten starts within a minute: the socket
//!   never fails and every stream, the activating ones included, gets whole metadata;
//! - a crash loop stops being retried while the listener stays (Envoy's `failure_mode_allow`
//!   passes traffic), and `systemctl restart` after the fix serves again;
//! - `systemctl restart plugvisor` and `restart plugvisor-plugin@latency` during streams: plugvisor
//!   drains before the external plugin unit stops, and nothing loses metadata;
//! - a TCP listener from `scripts/install --listen`, which a rerun keeps, units a mask can reach,
//!   and plain journal records.
//!
//! Needs root, systemd-container and the binaries built first (scripts/test does both).

use std::path::Path;
use std::time::Duration;

use tests::client::chat;
use tests::envoy::Envoy;
use tests::nspawn;
use tests::service::{repo, Service, SERVICE, SOCKET};
use tests::upstream::{Params, Upstream};

/// Whether every plugin's metadata in this access-log line is whole: usage counted every one of
/// the `tokens` the upstream sent, latency measured, no plugin missing, no gap and no `partial`.
fn whole(line: &serde_json::Value, plugins: &[&str], tokens: usize) -> bool {
    let clean = |ns: &serde_json::Value| ns.get("partial").is_none() && ns.get("gaps").is_none();
    line["plugvisor"]["missing"] == serde_json::json!([])
        && plugins.iter().all(|p| clean(&line[*p]))
        && (!plugins.contains(&"usage") || line["usage"]["completion_tokens"] == tokens as f64)
        && (!plugins.contains(&"latency") || line["latency"]["ttft_ms"].as_f64().is_some())
}

/// One request through Envoy: (status 200, body byte-identical, metadata whole).
async fn one(envoy: &Envoy, params: &Params, id: &str, plugins: &[&str]) -> (bool, bool, bool) {
    let got = chat(envoy.port, params, id).await;
    let line = tokio::task::block_in_place(|| envoy.access_log_for(id, Duration::from_secs(10)));
    let meta = whole(&line, plugins, params.chunks);
    if !meta {
        eprintln!("{id}: metadata not whole: {line}");
    }
    (got.status == 200, got.body() == params.body(), meta)
}

/// `n` concurrent slow streams started now; resolves to how many were (200, intact, whole).
fn streams(
    envoy: &Envoy,
    n: usize,
    params: &Params,
    tag: &str,
    plugins: &'static [&'static str],
) -> tokio::task::JoinHandle<Vec<(bool, bool, bool)>> {
    let port = envoy.port;
    let log = envoy.access_log.clone();
    let params = params.clone();
    let tag = tag.to_owned();
    tokio::spawn(async move {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let params = params.clone();
                let id = format!("{tag}-{i}");
                tokio::spawn(async move {
                    let got = chat(port, &params, &id).await;
                    (id, got.status == 200, got.body() == params.body())
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            let (id, ok, intact) = h.await.unwrap();
            let line = tokio::task::block_in_place(|| access_line(&log, &id));
            let meta = whole(&line, plugins, params.chunks);
            if !meta {
                eprintln!("{id}: metadata not whole: {line}");
            }
            out.push((ok, intact, meta));
        }
        out
    })
}

fn access_line(log: &Path, id: &str) -> serde_json::Value {
    let found = nspawn::poll(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| {
                l["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with(&format!("test-id={id}")))
            }))
    })
    .unwrap();
    found.unwrap_or_else(|| panic!("no access log line for {id}"))
}

fn count(results: &[(bool, bool, bool)]) -> (usize, usize, usize) {
    (
        results.iter().filter(|r| r.0).count(),
        results.iter().filter(|r| r.1).count(),
        results.iter().filter(|r| r.2).count(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_activations_and_a_watchdog_restart_never_fail_the_socket_nor_lose_metadata() {
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("starts", "tests/systemd/spawned.toml");
        s.short_watchdog();
        // Only the socket: the first request activates plugvisor.
        s.ok(&["start", SOCKET]);
        assert_eq!(s.prop("ActiveState"), "inactive");
        s
    });
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| s.envoy(dir.path(), &upstream));
    let params = Params::default();
    let plugins = &["usage", "latency"];
    let mut results = Vec::new();

    // 1. The stream that socket-activates plugvisor.
    results.push(one(&envoy, &params, "activating-1", plugins).await);
    let first = s.prop("MainPID");
    // 2. A watchdog restart (the front stopped), then a stream.
    tokio::task::block_in_place(|| {
        s.c.exec_ok(&["kill", "-STOP", &first]).unwrap();
        let back = nspawn::poll(Duration::from_secs(20), || {
            let pid = s.prop("MainPID");
            Ok((s.prop("ActiveState") == "active" && pid != "0" && pid != first).then_some(()))
        })
        .unwrap();
        assert!(back.is_some(), "{}", s.c.describe_unit(SERVICE));
    });
    results.push(one(&envoy, &params, "after-watchdog", plugins).await);
    // 3. Two more activations: stop, then the next stream starts plugvisor again.
    for i in 0..2 {
        tokio::task::block_in_place(|| s.ok(&["stop", SERVICE]));
        results.push(one(&envoy, &params, &format!("activating-{}", i + 2), plugins).await);
    }
    // 4. Seven restarts in a row, a stream after each.
    for i in 0..7 {
        tokio::task::block_in_place(|| s.ok(&["restart", SERVICE]));
        results.push(one(&envoy, &params, &format!("restart-{i}"), plugins).await);
    }
    // Eleven starts well within a minute: nothing failed, no limit was hit.
    assert_eq!(count(&results), (11, 11, 11), "{results:?}");
    tokio::task::block_in_place(|| {
        assert_eq!(s.unit_prop(SOCKET, "ActiveState"), "active");
        assert_eq!(s.unit_prop(SOCKET, "Result"), "success");
        assert_eq!(s.prop("ActiveState"), "active");
        assert!(s.prop("StatusText").starts_with("serving;"));
        let journal = s.c.journalctl(&["-u", SERVICE, "-u", SOCKET]).unwrap();
        assert!(!journal.contains("repeated too quickly"), "{journal}");
        assert!(journal.contains("Watchdog timeout"), "{journal}");

        // Journal records: plain values, the plugin named in the message text.
        let verbose = s.c.journalctl(&["-u", SERVICE, "-o", "verbose"]).unwrap();
        assert!(!verbose.contains("=Some("), "{verbose}");
        assert!(verbose.contains("PLUGVISOR_PLUGIN=usage"), "{verbose}");
        let short = s.c.journalctl(&["-u", SERVICE, "-o", "cat"]).unwrap();
        assert!(short.contains("plugin up (plugin=usage)"), "{short}");
        assert!(short.contains("plugin up (plugin=latency)"), "{short}");
        // The config's listen is not where plugvisor serves: it says so.
        let ignoring = format!(
            "ignoring listen = \"{}\": systemd passed the ext_proc socket unix:/run/plugvisor/extproc.sock",
            s.listen
        );
        assert!(short.contains(&ignoring), "{short}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_stops_retrying_says_so_and_ends_by_itself_once_the_config_is_fixed() {
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("crashloop", "tests/systemd/spawned.toml");
        // Broken, but its admin address still readable: /healthz can say why.
        s.c.sh(
            "cp /etc/plugvisor/plugvisor.toml /etc/plugvisor/good.toml && \
             grep '^admin_listen' /etc/plugvisor/good.toml > /etc/plugvisor/plugvisor.toml && \
             echo 'listen = 5' >> /etc/plugvisor/plugvisor.toml",
        )
        .unwrap();
        s.ok(&["start", SOCKET]);
        s.ok(&["start", "--no-block", SERVICE]);
        s
    });
    // Five failed starts (exit 78, restarted after 1 s each), then the sixth holds.
    let status = tokio::task::block_in_place(|| {
        s.wait_status("a crash loop", Duration::from_secs(30), |t| {
            t.starts_with("crash loop:")
        })
    });
    assert!(
        status.starts_with("crash loop: 5 failed starts within 60s; not serving"),
        "{status}"
    );
    tokio::task::block_in_place(|| {
        assert_eq!(s.prop("NRestarts"), "5");
        assert_eq!(s.prop("ActiveState"), "active");
        assert_eq!(s.unit_prop(SOCKET, "ActiveState"), "active");
    });
    let held_pid = s.prop("MainPID");

    // Envoy with failure_mode_allow: the held listener closes each connection at once, so
    // traffic passes without metadata instead of failing or waiting.
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy =
        tokio::task::block_in_place(|| s.envoy_with(dir.path(), &upstream, s.ext_proc(), true));
    let params = Params::default();
    let mut passed = 0;
    for i in 0..5 {
        let got = chat(envoy.port, &params, &format!("held-{i}")).await;
        if got.status == 200 && got.body() == params.body() {
            passed += 1;
        }
    }
    assert_eq!(passed, 5);
    tokio::task::block_in_place(|| {
        // Not retried: the same held process, no further restarts, the socket still there.
        assert_eq!(s.prop("MainPID"), held_pid);
        assert_eq!(s.prop("NRestarts"), "5");
        assert_eq!(s.unit_prop(SOCKET, "ActiveState"), "active");
        // Monitoring sees the hold: /healthz is 503 with the reason, /metrics has the gauge,
        // and `plugvisor status` says held.
        let admin: u16 = s
            .c
            .sh("sed -n 's/^admin_listen = \"127.0.0.1:\\([0-9]*\\)\"/\\1/p' /etc/plugvisor/good.toml")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let health =
            s.c.sh(&format!(
                "curl -s -w ' %{{http_code}}' http://127.0.0.1:{admin}/healthz"
            ))
            .unwrap();
        assert!(
            health.starts_with("crash loop: 5 failed starts")
                && health.trim_end().ends_with(" 503"),
            "{health}"
        );
        let metrics =
            s.c.sh(&format!("curl -s http://127.0.0.1:{admin}/metrics"))
                .unwrap();
        assert!(metrics.contains("plugvisor_crash_loop_held 1"), "{metrics}");
        let status = s.c.sh("plugvisor status 2>&1; true").unwrap();
        assert!(status.contains("held: crash loop"), "{status}");
        // The fix alone ends the hold: no `systemctl restart` needed.
        s.c.sh("cp /etc/plugvisor/good.toml /etc/plugvisor/plugvisor.toml")
            .unwrap();
        s.wait_status("serving again", Duration::from_secs(30), |t| {
            t.starts_with("serving;")
        });
        assert_ne!(s.prop("MainPID"), held_pid);
        assert_eq!(s.prop("NRestarts"), "6");
    });
    let got = one(&envoy, &params, "after-fix", &["usage", "latency"]).await;
    assert_eq!(got, (true, true, true));
}

/// A crash loop whose cause is not the configuration: another process holds the admin address,
/// so every start fails. The hold says so and, once that process lets the address go, ends by
/// itself: no `systemctl restart` needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_over_a_taken_admin_address_ends_by_itself_once_it_is_free() {
    tokio::task::block_in_place(|| {
        let s = Service::boot("busyport", "tests/systemd/spawned.toml");
        let admin: u16 = s
            .c
            .sh("sed -n 's/^admin_listen = \"127.0.0.1:\\([0-9]*\\)\"/\\1/p' /etc/plugvisor/plugvisor.toml")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Another service squats on the admin port.
        s.c.sh(&format!(
            "systemd-run --unit=squatter python3 -c \"import socket, time; \
             l = socket.socket(); l.bind(('127.0.0.1', {admin})); l.listen(); time.sleep(3600)\""
        ))
        .unwrap();
        // systemd-run returns once the unit started, not once python listens: the front must
        // not get there first (containers share the host's network, so the test can look).
        tests::eventually("the squatter listening", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", admin)).map(drop)
        });
        s.ok(&["start", SOCKET]);
        s.ok(&["start", "--no-block", SERVICE]);
        let status = s.wait_status("a crash loop", Duration::from_secs(40), |t| {
            t.starts_with("crash loop:")
        });
        assert!(
            status.starts_with("crash loop: 5 failed starts"),
            "{status}"
        );
        let held_pid = s.prop("MainPID");
        // The squatter goes: the hold notices and a fresh front starts.
        s.c.sh("systemctl stop squatter").unwrap();
        s.wait_status("serving again", Duration::from_secs(30), |t| {
            t.starts_with("serving;")
        });
        assert_ne!(s.prop("MainPID"), held_pid);
        assert_eq!(s.prop("NRestarts"), "6");
        let health =
            s.c.sh(&format!(
                "curl -s -w ' %{{http_code}}' http://127.0.0.1:{admin}/healthz"
            ))
            .unwrap();
        assert!(health.trim_end().ends_with(" 200"), "{health}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugvisor_drains_before_an_external_plugin_unit_stops_and_a_unit_restart_loses_nothing() {
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("drain-order", "tests/systemd/external.toml");
        // The unit starts before plugvisor and waits for its socket, so READY may wait for it.
        s.c.sh("sed -i 's/^spawn = false$/spawn = false\\nrequired = true/' /etc/plugvisor/plugvisor.toml")
            .unwrap();
        s.ok(&["enable", "plugvisor-plugin@latency.service"]);
        s.start();
        assert_eq!(s.prop("StatusText"), "serving; plugins 2/2 up; restarts 0");
        s
    });
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| s.envoy(dir.path(), &upstream));
    // About 1.5 s each, well inside shutdown_grace_ms (5 s).
    let slow = Params {
        chunks: 30,
        delay: Duration::from_millis(50),
        ..Params::default()
    };
    const PLUGINS: &[&str] = &["usage", "latency"];
    const N: usize = 20;

    // systemctl restart plugvisor with N streams in flight: all drain with both plugins' metadata.
    let flight = streams(&envoy, N, &slow, "restart-front", PLUGINS);
    // With the streams in flight, not before they start: the timing is the test.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let unit_pid = s.unit_prop("plugvisor-plugin@latency.service", "MainPID");
    tokio::task::block_in_place(|| s.ok(&["restart", SERVICE]));
    let results = flight.await.unwrap();
    assert_eq!(count(&results), (N, N, N), "{results:?}");
    tokio::task::block_in_place(|| {
        // The unit was stopped (after the drain) and started again with plugvisor.
        assert_ne!(
            s.unit_prop("plugvisor-plugin@latency.service", "MainPID"),
            unit_pid
        );
        s.wait_status("2/2 up", Duration::from_secs(30), |t| {
            t == "serving; plugins 2/2 up; restarts 0"
        });
    });

    // systemctl restart plugvisor-plugin@latency with N streams in flight: handed over, replayed.
    let flight = streams(&envoy, N, &slow, "restart-unit", PLUGINS);
    // With the streams in flight, not before they start: the timing is the test.
    tokio::time::sleep(Duration::from_millis(400)).await;
    tokio::task::block_in_place(|| s.ok(&["restart", "plugvisor-plugin@latency.service"]));
    let results = flight.await.unwrap();
    assert_eq!(count(&results), (N, N, N), "{results:?}");

    // systemctl stop plugvisor with N streams in flight: the same, then both units are down.
    let flight = streams(&envoy, N, &slow, "stop", PLUGINS);
    // With the streams in flight, not before they start: the timing is the test.
    tokio::time::sleep(Duration::from_millis(400)).await;
    tokio::task::block_in_place(|| s.ok(&["stop", SERVICE]));
    let results = flight.await.unwrap();
    assert_eq!(count(&results), (N, N, N), "{results:?}");
    tokio::task::block_in_place(|| {
        assert_eq!(s.prop("ActiveState"), "inactive");
        s.wait_unit_prop(
            "plugvisor-plugin@latency.service",
            "ActiveState",
            "inactive",
        );
        // The order, from systemd's own clock: the plugin unit left `active` only after
        // plugvisor had begun to stop (it drains, then closes the plugin's socket, on which the
        // plugin exits; the counts above show the drain had the plugin). Before the fix systemd
        // stopped the plugin unit first.
        let mono = |unit: &str, prop: &str| s.unit_prop(unit, prop).parse::<u64>().unwrap();
        let front_stopping = mono(SERVICE, "ActiveExitTimestampMonotonic");
        let plugin_stopping = mono(
            "plugvisor-plugin@latency.service",
            "ActiveExitTimestampMonotonic",
        );
        assert!(
            front_stopping <= plugin_stopping,
            "plugin unit stopped at {plugin_stopping}, before plugvisor began at {front_stopping}"
        );
    });
}

/// `systemctl reload plugvisor` with a changed table for a plugin run as its own unit, then
/// `plugvisor upgrade`, each under streams: the unit's process follows `Reconnect` both times, so
/// it is never restarted and every stream, those that began in between included, carries its
/// whole metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_and_an_upgrade_move_an_external_unit_without_restarting_it() {
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("follow", "tests/systemd/external.toml");
        s.ok(&["enable", "plugvisor-plugin@latency.service"]);
        s.start();
        s.wait_status("2/2 up", Duration::from_secs(30), |t| {
            t == "serving; plugins 2/2 up; restarts 0"
        });
        s
    });
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| s.envoy(dir.path(), &upstream));
    let slow = Params {
        chunks: 30,
        delay: Duration::from_millis(50),
        ..Params::default()
    };
    const PLUGINS: &[&str] = &["usage", "latency"];
    const N: usize = 20;
    const UNIT: &str = "plugvisor-plugin@latency.service";
    let unit_pid = s.unit_prop(UNIT, "MainPID");
    // The unit's process is the one it started with, and its journal has the reason it was
    // asked to reconnect.
    let same_process_asked_because = |reason: &str| {
        assert_eq!(
            s.unit_prop(UNIT, "MainPID"),
            unit_pid,
            "the unit was not restarted"
        );
        assert_eq!(s.unit_prop(UNIT, "NRestarts"), "0");
        let journal = s.c.journalctl(&["-u", UNIT, "-o", "verbose"]).unwrap();
        assert!(journal.contains(reason), "{journal}");
    };

    // A process key of the external plugin (its window, sent in Welcome) changes: a handover.
    let flight = streams(&envoy, N, &slow, "reload", PLUGINS);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let later = streams(&envoy, N, &slow, "reload-later", PLUGINS);
    tokio::task::block_in_place(|| {
        s.c.sh("sed -i 's/^spawn = false$/spawn = false\\nbudget_bytes = 4194304/' /etc/plugvisor/plugvisor.toml")
            .unwrap();
        s.ok(&["reload", SERVICE]);
    });
    let after = streams(&envoy, N, &slow, "after-reload", PLUGINS);
    for flight in [flight, later, after] {
        let results = flight.await.unwrap();
        assert_eq!(count(&results), (N, N, N), "{results:?}");
    }
    tokio::task::block_in_place(|| same_process_asked_because("config changed"));

    // An upgrade (the binary on disk is the same; the handover is what is tested).
    let flight = streams(&envoy, N, &slow, "upgrade", PLUGINS);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let upgraded = tokio::task::block_in_place(|| {
        s.c.exec_ok(&[
            "/usr/local/bin/plugvisor",
            "--config",
            "/etc/plugvisor/plugvisor.toml",
            "upgrade",
        ])
        .unwrap_or_else(|e| panic!("{e}\n{}", s.c.describe_unit(SERVICE)))
    });
    let after = streams(&envoy, N, &slow, "after-upgrade", PLUGINS);
    for flight in [flight, after] {
        let results = flight.await.unwrap();
        assert_eq!(count(&results), (N, N, N), "{upgraded}\n{results:?}");
    }
    tokio::task::block_in_place(|| same_process_asked_because("front upgrade to pid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_from_install_serves_survives_a_reinstall_and_masks_still_work() {
    let port = tests::free_port();
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot("tcp-install", "tests/systemd/spawned.toml");
        let install = repo().join("scripts/install");
        let bins = nspawn::built_binaries_dir().unwrap();
        let out =
            s.c.exec_ok(&[
                install.to_str().unwrap(),
                "--from",
                bins.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .unwrap();
        assert!(out.contains("plugvisor.socket.d/listen.conf"), "{out}");
        // An upgrade: the same script without --listen keeps the operator's listener.
        s.c.exec_ok(&[install.to_str().unwrap(), "--from", bins.to_str().unwrap()])
            .unwrap();
        // Units live outside /etc/systemd/system, so the mask docs/systemd.md names works.
        s.ok(&["mask", SOCKET]);
        s.ok(&["unmask", SOCKET]);
        s.start();
        assert_eq!(
            s.unit_prop(SOCKET, "Listen"),
            format!("127.0.0.1:{port} (Stream)")
        );
        assert_eq!(
            s.prop("FragmentPath"),
            "/usr/local/lib/systemd/system/plugvisor.service"
        );
        s
    });
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| {
        s.envoy_with(dir.path(), &upstream, format!("127.0.0.1:{port}"), false)
    });
    let params = Params::default();
    let plugins = &["usage", "latency"];
    let mut results = vec![one(&envoy, &params, "tcp-1", plugins).await];
    tokio::task::block_in_place(|| s.ok(&["restart", SERVICE]));
    results.push(one(&envoy, &params, "tcp-after-restart", plugins).await);
    assert_eq!(count(&results), (2, 2, 2), "{results:?}");
}
