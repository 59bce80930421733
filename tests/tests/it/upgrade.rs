//! `plugvisor upgrade` through real Envoy with the real front and plugin processes: long streams
//! running across the handover and a steady trickle of new requests around it. Every body must
//! arrive byte for byte, every stream's metadata whole, no request may fail (Envoy runs with
//! `failure_mode_allow: false`, so a refused ext_proc stream would be a 500), and every request
//! started after the command returned must be served by the new front (`plugvisor.front_pid`).
//! A broken new binary must leave the old front serving as if nothing happened.
//!
//! The front runs from a copy of `plugvisor` in the test's directory, so a test can replace "the
//! binary on disk" without touching the one other tests run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::bins;
use tests::client::{chat, Received};
use tests::front::FrontProcess;
use tests::stack::{self, Stack};
use tests::upstream::{Params, Upstream};

/// usage and test-order (which hashes every byte it saw, in order), with finals allowed to wait.
const PLUGINS: &str = r#"
[plugins.usage]
final_timeout_ms = 5000
[plugins.test-order]
final_timeout_ms = 5000
"#;

/// A new front that is not ready within this (plus the 5 s start margin) is given up.
const HEADER: &str = "ready_timeout_ms = 3000\n";

fn long() -> Params {
    Params {
        chunks: 30,
        delay: Duration::from_millis(150),
        ..Params::default()
    }
}

fn short() -> Params {
    Params {
        chunks: 5,
        delay: Duration::from_millis(10),
        ..Params::default()
    }
}

/// Stops fronts that are no longer the test harness's children (a new front is re-parented away
/// from the old one) by pid, when the test ends however it ends.
struct Pids(Vec<u32>);

impl Drop for Pids {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        for pid in &self.0 {
            let _ = kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGTERM);
        }
        tests::within(Duration::from_secs(8), || {
            (!self.0.iter().any(|p| running(*p))).then_some(())
        });
        for pid in &self.0 {
            let _ = kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().next() != Some("Z"))
        })
        .unwrap_or(false)
}

/// Upstream, a front run from `dir/bin/plugvisor` (a copy), and Envoy failing closed; and that
/// binary's path.
async fn start(extra_header: &str) -> (Stack, PathBuf) {
    start_with(extra_header, PLUGINS, &["usage", "test-order"]).await
}

/// [`start`] with other plugins, waiting for those in `expect`.
async fn start_with(extra_header: &str, plugins: &str, expect: &[&str]) -> (Stack, PathBuf) {
    let header = format!("{HEADER}{extra_header}");
    let stack = Stack::with_front("FULL_DUPLEX_STREAMED", |dir| {
        let binary = install(dir, &std::fs::read(bins::plugvisor()).unwrap());
        let listen = format!("unix:{}", dir.join("ext_proc.sock").display());
        FrontProcess::start_from(&binary, dir, &listen, &header, plugins, expect)
    })
    .await;
    let binary = installed(stack.dir.path());
    (stack, binary)
}

/// Puts `contents` at `dir/bin/plugvisor` the way a package manager does: a new file renamed
/// over the old one (a running process keeps its own, now unlinked, executable).
fn install(dir: &Path, contents: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let tmp = bin.join(".plugvisor.new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = installed(dir);
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Where [`install`] puts the binary.
fn installed(dir: &Path) -> PathBuf {
    dir.join("bin/plugvisor")
}

/// `plugvisor upgrade` against the running front (run from the build, whatever is installed):
/// exit success, and stdout or stderr.
async fn upgrade(stack: &Stack) -> (bool, String) {
    let out = tokio::process::Command::new(bins::plugvisor())
        .arg("--config")
        .arg(stack.front.config_path())
        .arg("upgrade")
        .output()
        .await
        .expect("run plugvisor upgrade");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The new front's pid from the command's answer (`upgraded: pid N serves; ...`).
fn new_pid(answer: &str) -> u32 {
    answer
        .split("upgraded: pid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in `{answer}`"))
}

/// One request: its id, what it asked for, when it started, and what came back.
type Done = (String, Params, Instant, Received);

/// Requests started every 50 ms until `stop` is set.
fn trickle(
    port: u16,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Done>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let id = format!("{tag}-{i}");
            i += 1;
            tasks.push(tokio::spawn(async move {
                let p = short();
                let started = Instant::now();
                let got = chat(port, &p, &id).await;
                (id, p, started, got)
            }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        done
    })
}

/// `n` long streams, 20 ms apart.
async fn batch(port: u16, tag: &str, n: usize) -> Vec<tokio::task::JoinHandle<Done>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        tasks.push(tokio::spawn(async move {
            let p = long();
            let started = Instant::now();
            let got = chat(port, &p, &id).await;
            (id, p, started, got)
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks
}

/// Checks each request's body and metadata; returns each one's start and serving front.
fn check(stack: &Stack, done: &[Done]) -> Vec<(Instant, u32)> {
    let mut served = Vec::new();
    for (id, p, started, got) in done {
        assert_eq!(got.status, 200, "{id}");
        assert_eq!(got.error, None, "{id}");
        assert!(got.body() == p.body(), "{id}: body differs");
        let line = stack.log_for(id);
        stack::assert_whole(&line, p);
        let pid = line["plugvisor"]["front_pid"]
            .as_f64()
            .unwrap_or_else(|| panic!("{id}: no front_pid: {line}")) as u32;
        served.push((*started, pid));
    }
    served
}

async fn join(tasks: Vec<tokio::task::JoinHandle<Done>>) -> Vec<Done> {
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_mid_batch_breaks_no_stream_and_new_requests_reach_the_new_front() {
    let (mut stack, _) = start("").await;
    let old = stack.front.pid();
    let port = stack.envoy.port;
    let stop = Arc::new(AtomicBool::new(false));
    let small = trickle(port, "trickle", stop.clone());
    let long_streams = batch(port, "long", 50).await;

    let (ok, answer) = upgrade(&stack).await;
    let upgraded_at = Instant::now();
    assert!(ok, "upgrade failed: {answer}\n{}", stack.front.log());
    let new = new_pid(&answer);
    let _guard = Pids(vec![new]);
    assert_ne!(new, old);

    // New requests keep coming for a while after the upgrade: they are what is checked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let long_done = join(long_streams).await;
    let small_done = small.await.unwrap();

    for (_, pid) in check(&stack, &long_done) {
        assert_eq!(
            pid, old,
            "a stream started before the upgrade stays on the old front"
        );
    }
    let served = check(&stack, &small_done);
    let after: Vec<u32> = served
        .iter()
        .filter(|(started, _)| *started > upgraded_at)
        .map(|(_, pid)| *pid)
        .collect();
    assert!(
        after.len() >= 20,
        "only {} requests after the upgrade",
        after.len()
    );
    assert!(
        after.iter().all(|pid| *pid == new),
        "requests started after the upgrade returned were served by {after:?}, not only {new}"
    );

    // The old front exits by itself once its last stream ended.
    let status = tokio::task::block_in_place(|| stack.front.wait_exit(Duration::from_secs(20)));
    assert!(
        status.is_some_and(|s| s.success()),
        "old front: {status:?}\n{}",
        stack.front.log()
    );
    // The new front serves on, with its own plugins, and answers the control socket.
    let status = stack.front.plugin_status("usage").await;
    assert_eq!(status.state, "up");
    let p = short();
    let got = chat(port, &p, "after-exit").await;
    assert!(got.body() == p.body());
    assert_eq!(
        stack.log_for("after-exit")["plugvisor"]["front_pid"],
        f64::from(new)
    );

    // Both fronts wrote their usage records to the one file: every request exactly once, by
    // the front that served it, with the numbers Envoy logged.
    let ids: Vec<&str> = long_done
        .iter()
        .chain(&small_done)
        .map(|(id, ..)| id.as_str())
        .chain(["after-exit"])
        .collect();
    let path = stack.dir.path().join("state/records.jsonl");
    let records = tests::eventually("every request's record", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let records: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if ids
            .iter()
            .all(|id| records.iter().any(|r| r["request_id"] == *id))
        {
            Ok(records)
        } else {
            Err(format!(
                "{} records for {} requests",
                records.len(),
                ids.len()
            ))
        }
    });
    for id in &ids {
        let mine: Vec<&serde_json::Value> =
            records.iter().filter(|r| r["request_id"] == *id).collect();
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        let logged = stack.log_for(id);
        assert_eq!(
            mine[0]["front_pid"].as_f64(),
            logged["plugvisor"]["front_pid"].as_f64(),
            "{id}"
        );
        assert_eq!(mine[0]["status"], "complete", "{id}: {}", mine[0]);
        assert_eq!(
            mine[0]["plugins"]["plugvisor.usage"]["completion_tokens"].as_f64(),
            logged["usage"]["completion_tokens"].as_f64(),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_binary_leaves_the_old_front_serving() {
    let (stack, binary) = start("").await;
    let real = std::fs::read(&binary).unwrap();
    let old = stack.front.pid();
    let port = stack.envoy.port;
    let stop = Arc::new(AtomicBool::new(false));
    let small = trickle(port, "trickle", stop.clone());
    let long_streams = batch(port, "long", 10).await;

    // Exits at once.
    install(stack.dir.path(), b"#!/bin/sh\nexit 3\n");
    let (ok, answer) = upgrade(&stack).await;
    assert!(!ok, "{answer}");
    assert!(answer.contains("exit status: 3"), "{answer}");
    assert!(
        answer.contains(&format!("still serving as pid {old}")),
        "{answer}"
    );

    // Starts a front that exits before it is ready (bad arguments).
    let bad_front = format!(
        "#!/bin/sh\nexec {} --config /nonexistent/plugvisor.toml\n",
        bins::plugvisor().display()
    );
    install(stack.dir.path(), bad_front.as_bytes());
    let (ok, answer) = upgrade(&stack).await;
    assert!(!ok, "{answer}");
    assert!(answer.contains("exited before it was ready"), "{answer}");

    // Never says a word: killed after ready_timeout_ms plus the start margin.
    install(stack.dir.path(), b"#!/bin/sh\nexec sleep 60\n");
    let before = Instant::now();
    let (ok, answer) = upgrade(&stack).await;
    assert!(!ok, "{answer}");
    assert!(answer.contains("not ready within 8000ms"), "{answer}");
    assert!(before.elapsed() < Duration::from_secs(12));

    stop.store(true, Ordering::SeqCst);
    let long_done = join(long_streams).await;
    let small_done = small.await.unwrap();
    for (_, pid) in check(&stack, &long_done)
        .into_iter()
        .chain(check(&stack, &small_done))
    {
        assert_eq!(pid, old);
    }

    // The socket paths a failed new front took are the old front's again: the control socket
    // answers, and a restarted plugin reconnects through its socket.
    let usage = stack.plugin_pid("usage").await;
    let answer = supervisor::shell::control::request(
        &stack.front.control_socket(),
        &supervisor::shell::control::Request::Restart {
            plugin: "usage".into(),
        },
    )
    .await
    .expect("control socket answers");
    assert!(answer.ok, "{answer:?}");
    tests::eventually_async(
        "the restarted plugin connected through the restored socket path",
        Duration::from_secs(10),
        async || {
            let s = stack.front.plugin_status("usage").await;
            if s.pid.is_some_and(|p| p != usage) && s.state == "up" {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    let p = short();
    let got = chat(port, &p, "after").await;
    assert!(got.body() == p.body());
    assert_eq!(
        stack.log_for("after")["plugvisor"]["missing"],
        serde_json::json!([])
    );

    // With the real binary back, the upgrade goes through.
    install(stack.dir.path(), &real);
    let (ok, answer) = upgrade(&stack).await;
    assert!(ok, "{answer}");
    let _guard = Pids(vec![new_pid(&answer)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upgrade_while_the_first_drains_loses_nothing() {
    let (mut stack, _) = start("").await;
    let first = stack.front.pid();
    let port = stack.envoy.port;
    let stop = Arc::new(AtomicBool::new(false));
    let small = trickle(port, "trickle", stop.clone());
    let mut long_streams = batch(port, "gen0", 20).await;

    let (ok, answer) = upgrade(&stack).await;
    assert!(ok, "{answer}");
    let second = new_pid(&answer);
    let mut guard = Pids(vec![second]);
    long_streams.extend(batch(port, "gen1", 20).await);

    // The first front still drains its streams.
    assert!(running(first));
    let (ok, answer) = upgrade(&stack).await;
    assert!(ok, "{answer}");
    let upgraded_at = Instant::now();
    let third = new_pid(&answer);
    guard.0.push(third);
    assert!(
        running(first) && running(second),
        "both older fronts drain at once"
    );

    // New requests keep coming for a while after the upgrade: they are what is checked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let long_done = join(long_streams).await;
    let small_done = small.await.unwrap();
    for ((id, ..), (_, pid)) in long_done.iter().zip(check(&stack, &long_done)) {
        let expected = if id.starts_with("gen0") {
            first
        } else {
            second
        };
        assert_eq!(pid, expected, "{id}");
    }
    for (started, pid) in check(&stack, &small_done) {
        if started > upgraded_at {
            assert_eq!(pid, third);
        }
    }
    let status = tokio::task::block_in_place(|| stack.front.wait_exit(Duration::from_secs(20)));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    tests::eventually_async(
        "the second front to exit once drained",
        Duration::from_secs(20),
        async || !running(second),
    )
    .await;
    assert!(running(third));
}

/// Under a real systemd 252 (nspawn, installed with `scripts/install`, socket-activated,
/// `NotifyAccess=main` as shipped): `plugvisor upgrade` makes the new front the unit's main pid,
/// the old one drains inside the unit's cgroup, the watchdog follows the new front, and streams
/// through the activated socket survive. Needs root and systemd-container, as
/// tests/tests/it/systemd_service.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_new_front_becomes_the_main_pid_and_streams_survive() {
    use tests::nspawn;
    use tests::service::{Service, SERVICE};
    let s = tokio::task::block_in_place(|| {
        let s = Service::boot_with("upgrade-svc", "tests/systemd/spawned.toml", |text| {
            // Finals may wait (a debug build on a shared machine, two fronts at once): this test
            // pins the handover, not the plugins' deadline.
            text.replace(
                "[plugins.usage]\n",
                "[plugins.usage]\nfinal_timeout_ms = 5000\n",
            )
            .replace(
                "[plugins.latency]\n",
                "[plugins.latency]\nfinal_timeout_ms = 5000\n",
            )
        });
        // A short watchdog: a new front that did not take it over would be killed within 2 s.
        s.short_watchdog();
        s.start();
        s
    });
    let c = &s.c;
    let prop = |p: &str| s.prop(p);
    let in_unit = |pid: &str| {
        c.sh(&format!("cat /proc/{pid}/cgroup 2>/dev/null || true"))
            .unwrap_or_default()
            .contains("/system.slice/plugvisor.service")
    };
    let old = prop("MainPID");

    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| s.envoy(dir.path(), &upstream));
    let port = envoy.port;
    let stop = Arc::new(AtomicBool::new(false));
    let small = trickle(port, "svc-trickle", stop.clone());
    let long_streams = batch(port, "svc-long", 10).await;

    let answer = tokio::task::block_in_place(|| {
        c.exec_ok(&[
            "/usr/local/bin/plugvisor",
            "--config",
            "/etc/plugvisor/plugvisor.toml",
            "upgrade",
        ])
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.describe_unit(SERVICE)));
    let new = new_pid(&answer).to_string();
    tokio::task::block_in_place(|| {
        assert_eq!(prop("MainPID"), new, "{}", c.describe_unit(SERVICE));
        let shown = c.systemctl_ok(&["status", "--no-pager", SERVICE]).unwrap();
        assert!(shown.contains(&format!("Main PID: {new}")), "{shown}");
        // The old front drains inside the unit's cgroup.
        assert!(in_unit(&old), "{}", c.describe_unit(SERVICE));
    });

    // Past the 2 s watchdog: the new front feeds it, systemd restarted nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let long_done = join(long_streams).await;
    let small_done = small.await.unwrap();
    for (id, p, _, got) in long_done.iter().chain(small_done.iter()) {
        assert_eq!(got.status, 200, "{id}");
        assert_eq!(got.error, None, "{id}");
        assert!(got.body() == p.body(), "{id}: body differs");
        let line = tokio::task::block_in_place(|| envoy.access_log_for(id, Duration::from_secs(5)));
        assert_eq!(
            line["plugvisor"]["missing"],
            serde_json::json!([]),
            "{id}: {line}"
        );
        assert_eq!(
            line["usage"]["completion_tokens"], p.chunks as f64,
            "{id}: {line}"
        );
    }
    tokio::task::block_in_place(|| {
        assert_eq!(prop("NRestarts"), "0");
        assert_eq!(prop("ActiveState"), "active");
        assert_eq!(prop("MainPID"), new);
        let gone = nspawn::poll(Duration::from_secs(20), || {
            Ok((!in_unit(&old)).then_some(()))
        })
        .unwrap();
        assert!(
            gone.is_some(),
            "the old front is still running after its streams ended"
        );
        let status = prop("StatusText");
        assert!(status.starts_with("serving; plugins 2/2 up"), "{status}");
        // A stop is today's drain, and completes.
        c.systemctl_ok(&["stop", SERVICE]).unwrap();
        assert_eq!(prop("ActiveState"), "inactive");
    });
}

/// When `upgrade_drain_ms` runs out, the old front cuts the streams left at once (not after a
/// further `shutdown_grace_ms`), and each cut stream fails where the client sees it rather than
/// arriving as a 200 with chunks missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_drain_cuts_on_time_and_loudly() {
    let (mut stack, _) = start("upgrade_drain_ms = 1000\nshutdown_grace_ms = 30000\n").await;
    let port = stack.envoy.port;
    // 4.5 s streams: all still running when the 1 s drain is over.
    let long_streams = batch(port, "drained", 10).await;
    let (ok, answer) = upgrade(&stack).await;
    assert!(ok, "upgrade failed: {answer}\n{}", stack.front.log());
    let _guard = Pids(vec![new_pid(&answer)]);
    let upgraded = Instant::now();
    // Well under shutdown_grace_ms: the drain's end is the cut, not the start of another wait.
    let status = tokio::task::block_in_place(|| stack.front.wait_exit(Duration::from_secs(15)));
    assert!(
        status.is_some(),
        "old front still running:\n{}",
        stack.front.log()
    );
    assert!(
        upgraded.elapsed() < Duration::from_secs(15),
        "the old front drained again after upgrade_drain_ms"
    );
    let done = join(long_streams).await;
    let mut loud = 0;
    for (id, p, _, got) in &done {
        let whole = got.status == 200 && got.error.is_none() && got.body() == p.body();
        assert!(
            whole || got.status != 200 || got.error.is_some(),
            "{id}: a 200 with {} of {} bytes that nothing marks as failed",
            got.body().len(),
            p.body().len()
        );
        loud += usize::from(!whole);
    }
    assert_eq!(loud, done.len(), "{}", stack.front.log());
}

/// A plugin run by someone else (`spawn = false`) that follows `Reconnect` moves to the new front
/// before it serves: every request started after the upgrade returned carries its whole
/// metadata, from the new front, and the same process serves on once the old front is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_plugin_follows_the_upgrade_at_once() {
    let plugins = "[plugins.usage]\nspawn = false\nfinal_timeout_ms = 5000\n\
                   [plugins.test-order]\nfinal_timeout_ms = 5000\n";
    let (mut stack, _) = start_with("", plugins, &["test-order"]).await;
    let sockets = tests::front::FrontProcess::runtime_dir_in(stack.dir.path()).join("plugins");
    let log = stack.dir.path().join("usage-plugin.log");
    let mut plugin = crate::reconnect::External::start(&sockets.join("usage.sock"), "usage", &log);
    stack
        .front
        .wait_for_plugin("usage", Duration::from_secs(10), |p| p.state == "external")
        .await;
    let old = stack.front.pid();
    let port = stack.envoy.port;
    let stop = Arc::new(AtomicBool::new(false));
    let small = trickle(port, "trickle", stop.clone());
    let long_streams = batch(port, "long", 10).await;

    let (ok, answer) = upgrade(&stack).await;
    let upgraded_at = Instant::now();
    assert!(ok, "upgrade failed: {answer}\n{}", stack.front.log());
    let new = new_pid(&answer);
    let _guard = Pids(vec![new]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let long_done = join(long_streams).await;
    let small_done = small.await.unwrap();

    // `check` asserts every request whole, usage included, wherever it ran.
    for (_, pid) in check(&stack, &long_done) {
        assert_eq!(
            pid, old,
            "a stream started before the upgrade stays on the old front"
        );
    }
    let after: Vec<u32> = check(&stack, &small_done)
        .into_iter()
        .filter(|(started, _)| *started > upgraded_at)
        .map(|(_, pid)| pid)
        .collect();
    assert!(
        after.len() >= 20,
        "only {} requests after the upgrade",
        after.len()
    );
    assert!(after.iter().all(|pid| *pid == new), "{after:?}");

    // The old front ends with its streams; the plugin process does not.
    let status = tokio::task::block_in_place(|| stack.front.wait_exit(Duration::from_secs(20)));
    assert!(
        status.is_some_and(|s| s.success()),
        "old front: {status:?}\n{}",
        stack.front.log()
    );
    assert!(
        plugin.running(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let p = short();
    let got = chat(port, &p, "after-exit").await;
    assert!(got.body() == p.body());
    let line = stack.log_for("after-exit");
    stack::assert_whole(&line, &p);
    assert_eq!(line["plugvisor"]["front_pid"], f64::from(new));
    let plugin_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        plugin_log.contains(&format!("front upgrade to pid {new}")),
        "{plugin_log}"
    );
}
