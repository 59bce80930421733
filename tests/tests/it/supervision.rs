//! Supervision with real processes and real signals: the `plugvisor` binary spawning the real
//! `plugvisor-plugin`, a real Envoy in front, and plugins killed, stopped, crashed and impersonated
//! on purpose. Every process is found through `plugvisor status` and signalled by pid.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use supervisor::plugin::supervise::PluginStatus;
use supervisor::shell::control::{self, Request};
use tests::client::chat;
use tests::stack::Stack;
use tests::upstream::Params;

/// The whole data path, plus the control socket's view of the plugins.
struct Setup(Stack);

impl std::ops::Deref for Setup {
    type Target = Stack;
    fn deref(&self) -> &Stack {
        &self.0
    }
}

impl std::ops::DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut Stack {
        &mut self.0
    }
}

impl Setup {
    async fn new(plugins_toml: &str, expect: &[&str]) -> Setup {
        Setup(Stack::start(plugins_toml, expect).await)
    }

    async fn status(&self) -> Vec<PluginStatus> {
        let answer = control::request(&self.front.control_socket(), &Request::Status)
            .await
            .expect("control socket answers");
        assert!(answer.ok, "{answer:?}");
        answer.plugins.expect("status lists plugins")
    }

    async fn plugin(&self, name: &str) -> PluginStatus {
        self.status()
            .await
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no plugin {name} in status"))
    }

    /// Polls the status until `pred` holds for `name`, up to `limit`.
    async fn wait_for(
        &self,
        name: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(&PluginStatus) -> bool,
    ) -> PluginStatus {
        tests::eventually_async(&format!("{name} {what}"), limit, async || {
            let p = self.plugin(name).await;
            if pred(&p) {
                Ok(p)
            } else {
                Err(format!("{p:?}\n{}", self.front.log()))
            }
        })
        .await
    }

    fn plugvisor(&self, args: &[&str]) -> std::process::Output {
        Command::new(tests::bins::plugvisor())
            .args(args)
            .arg("--control")
            .arg(self.front.control_socket())
            .output()
            .expect("run plugvisor")
    }
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only a process that can still run counts as alive.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).expect("signal plugin");
}

const REPORTERS: &str = r#"
[plugins.usage]
[plugins.latency]
backoff_min_ms = 20
# A final that finds latency down waits this long for its replacement.
final_timeout_ms = 3000
[plugins.test-order]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_plugin_restarts_while_streams_continue() {
    let setup = Setup::new(REPORTERS, &["usage", "latency", "test-order"]).await;
    let victim = setup.plugin("latency").await;
    let victim_pid = victim.pid.expect("latency has a pid");
    assert_eq!(victim.state, "up");

    let port = setup.envoy.port;
    let streams: Vec<_> = (0..50usize)
        .map(|i| {
            let params = Params {
                chunks: 20,
                size: 16 + i,
                delay: Duration::from_millis(10),
                ..Params::default()
            };
            tokio::spawn(async move {
                let rid = format!("kill-{i}");
                let got = chat(port, &params, &rid).await;
                (rid, params, got)
            })
        })
        .collect();
    // Killed in the middle of the streams, not before they start: the timing is the test.
    tokio::time::sleep(Duration::from_millis(80)).await;
    signal(victim_pid, Signal::SIGKILL);

    for s in streams {
        let (rid, params, got) = s.await.unwrap();
        assert_eq!(
            got.body(),
            params.body(),
            "{rid}: the client stream was damaged"
        );
        let line = setup.log_for(&rid);
        assert_eq!(line["usage"]["completion_tokens"], 20.0, "{line}");
        assert_eq!(line["test_order"]["gaps"], 0.0, "{line}");
        assert_eq!(line["test_order"]["sha256"], sha(&params.body()), "{line}");
        // The streams the killed process was serving moved to its replacement with their
        // journals: latency's metadata is there and whole on every stream.
        assert_eq!(
            line["plugvisor"]["missing"],
            serde_json::json!([]),
            "{line}"
        );
        assert!(line["plugvisor"]["partial"].is_null(), "{line}");
        assert_ne!(line["latency"]["partial"], true, "{line}");
        assert!(line["latency"]["ttft_ms"].as_f64().is_some(), "{line}");
    }

    let back = setup
        .wait_for("latency", Duration::from_secs(5), "back up", |p| {
            p.state == "up" && p.pid.is_some_and(|pid| pid != victim_pid)
        })
        .await;
    assert_eq!(back.restarts, 1, "{back:?}");
    assert_eq!(back.last_exit.as_deref(), Some("signal 9 (SIGKILL)"));
    assert!(!alive(victim_pid));

    // The replacement serves new streams without an operator.
    let params = Params {
        chunks: 5,
        delay: Duration::from_millis(5),
        ..Params::default()
    };
    chat(port, &params, "after-restart").await;
    let line = setup.log_for("after-restart");
    assert!(line["latency"]["ttft_ms"].as_f64().is_some(), "{line}");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );

    let out = setup.plugvisor(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("latency") && l.contains("signal 9 (SIGKILL)")),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_plugin_times_out_then_the_heartbeat_restarts_it() {
    let setup = Setup::new(
        "[plugins.usage]\n[plugins.test-order]\nhang_timeout_ms = 700\nfinal_timeout_ms = 150\nbackoff_min_ms = 20\n",
        &["usage", "test-order"],
    )
    .await;
    let frozen = setup.plugin("test-order").await.pid.unwrap();
    signal(frozen, Signal::SIGSTOP);
    let params = Params {
        chunks: 5,
        delay: Duration::from_millis(5),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "while-stopped").await;
    assert_eq!(got.body(), params.body());
    let line = setup.log_for("while-stopped");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!(["test-order"]),
        "{line}"
    );
    assert_eq!(line["usage"]["completion_tokens"], 5.0, "{line}");

    let back = setup
        .wait_for("test-order", Duration::from_secs(5), "restarted", |p| {
            p.state == "up" && p.pid.is_some_and(|pid| pid != frozen)
        })
        .await;
    assert_eq!(back.last_exit.as_deref(), Some("signal 9 (SIGKILL)"));
    assert!(!alive(frozen), "the hung process was killed");
    chat(setup.envoy.port, &params, "after-hang").await;
    let line = setup.log_for("after-hang");
    assert_eq!(
        line["test_order"]["events"].as_f64().map(|e| e > 0.0),
        Some(true),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_plugin_backs_off_fails_and_restart_revives_it() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    std::fs::write(&broken, "").unwrap();
    // test-order started through a shell that refuses to run while the flag file exists: a
    // plugin that crashes at start until an operator fixes it. `exec` keeps the spawned pid.
    let plugins = format!(
        r#"
[plugins.usage]
[plugins.test-order]
command = "/bin/sh"
args = ["-c", "test -e {broken} && exit 3; exec {bin} test-order --connect \"$0\"", "{sock}"]
backoff_min_ms = 40
backoff_max_ms = 1000
max_restarts = 3
restart_period_ms = 30000
"#,
        broken = broken.display(),
        bin = tests::bins::plugvisor_plugin().display(),
        sock = "__RUN__/plugins/test-order.sock",
    );
    let setup = Setup::new(&plugins, &["usage"]).await;
    let failed = setup
        .wait_for("test-order", Duration::from_secs(10), "failed", |p| {
            p.state == "failed"
        })
        .await;
    assert_eq!(failed.restarts, 3, "{failed:?}");
    assert_eq!(failed.last_exit.as_deref(), Some("exit status 3"));
    // The backoff grew: 40 ms, then 40..80, then 40..160 (jitter between minimum and step).
    let log = setup.front.log();
    let delays: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("restarting plugin after backoff") && l.contains("test-order"))
        .collect();
    assert_eq!(delays.len(), 3, "{log}");
    assert!(log.contains("plugin failed: too many restarts"), "{log}");

    // The others keep serving.
    let params = Params {
        chunks: 3,
        ..Params::default()
    };
    chat(setup.envoy.port, &params, "while-failed").await;
    let line = setup.log_for("while-failed");
    assert_eq!(line["usage"]["completion_tokens"], 3.0, "{line}");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!(["test-order"]),
        "{line}"
    );

    // Fixed, then revived by the operator.
    std::fs::remove_file(&broken).unwrap();
    let out = setup.plugvisor(&["restart", "test-order"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    setup
        .wait_for("test-order", Duration::from_secs(5), "up", |p| {
            p.state == "up"
        })
        .await;
    chat(setup.envoy.port, &params, "revived").await;
    let line = setup.log_for("revived");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_front_leaves_no_plugin_behind() {
    let mut setup = Setup::new(REPORTERS, &["usage", "latency", "test-order"]).await;
    let pids: Vec<u32> = setup
        .status()
        .await
        .iter()
        .map(|p| p.pid.expect("spawned plugins have pids"))
        .collect();
    assert_eq!(pids.len(), 3);
    signal(setup.front.pid(), Signal::SIGKILL);
    setup.front.wait_exit(Duration::from_secs(2));
    tests::eventually_async(
        "the plugins to end within 1 s of the front",
        Duration::from_secs(1),
        async || {
            let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
            left.is_empty()
                .then_some(())
                .ok_or(format!("still running: {left:?}"))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_then_exits_zero() {
    let mut setup = Setup::new(REPORTERS, &["usage", "latency", "test-order"]).await;
    let pids: Vec<u32> = setup.status().await.iter().filter_map(|p| p.pid).collect();
    let port = setup.envoy.port;
    let streams: Vec<_> = (0..5usize)
        .map(|i| {
            let params = Params {
                chunks: 30,
                delay: Duration::from_millis(20),
                ..Params::default()
            };
            tokio::spawn(async move {
                let rid = format!("drain-{i}");
                let got = chat(port, &params, &rid).await;
                (rid, params, got)
            })
        })
        .collect();
    // SIGTERM in the middle of the streams, not before they start: the timing is the test.
    tokio::time::sleep(Duration::from_millis(150)).await;
    signal(setup.front.pid(), Signal::SIGTERM);
    for s in streams {
        let (rid, params, got) = s.await.unwrap();
        assert_eq!(got.body(), params.body(), "{rid}");
        let line = setup.log_for(&rid);
        assert_eq!(
            line["plugvisor"]["missing"],
            serde_json::json!([]),
            "{line}"
        );
        assert_eq!(line["usage"]["completion_tokens"], 30.0, "{line}");
    }
    let status = tokio::task::block_in_place(|| setup.front.wait_exit(Duration::from_secs(10)))
        .expect("plugvisor exits after draining");
    assert_eq!(status.code(), Some(0), "{}", setup.front.log());
    assert!(pids.iter().all(|&p| !alive(p)), "every plugin stopped");
    assert!(!setup.front.control_socket().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_a_plugin_socket_are_refused_and_the_live_plugin_is_unaffected() {
    // group = "root": the socket is 0660 root:root, so a process of another uid in group root
    // gets through the file mode and must be stopped by the SO_PEERCRED check itself.
    let setup = Setup::new("[plugins.test-order]\ngroup = \"root\"\n", &["test-order"]).await;
    let live = setup.plugin("test-order").await.pid.unwrap();
    let socket = setup.front.runtime_dir.join("plugins/test-order.sock");
    // Let group root through the test's private temporary directory (mode 0700 otherwise).
    std::fs::set_permissions(
        setup.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();

    // 1. Garbage instead of a Hello.
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let refused: Result<Option<ipc_protocol::ToPlugin>, _> =
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(ipc_protocol::FrameReader::new(&answer[..]).read())
            });
        assert!(
            matches!(refused, Ok(Some(ipc_protocol::ToPlugin::Refuse(_)))),
            "{refused:?}"
        );
    }

    // 2. A valid Hello for the plugin that is already connected, from a process the front did
    //    not spawn.
    let out = run_plugin_host(&socket, "test-order", None);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not the process the front spawned"),
        "{stderr}"
    );

    // 3. Another uid.
    let out = run_plugin_host(&socket, "test-order", Some(65534));
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("peer uid 65534"), "{stderr}");

    // Logged and counted, and the live plugin never noticed.
    let log = setup.front.log();
    assert!(log.contains("plugin handshake refused"), "{log}");
    let now = setup.plugin("test-order").await;
    assert_eq!(
        (now.state.as_str(), now.pid, now.restarts),
        ("up", Some(live), 0)
    );
    let params = Params {
        chunks: 4,
        ..Params::default()
    };
    chat(setup.envoy.port, &params, "after-strangers").await;
    let line = setup.log_for("after-strangers");
    assert_eq!(line["test_order"]["sha256"], sha(&params.body()), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_started_plugins_attach_and_their_socket_waits_for_the_next_one() {
    let setup = Setup::new(
        "[plugins.usage]\n[plugins.test-order]\nspawn = false\n",
        &["usage"],
    )
    .await;
    let order_sock = setup.front.runtime_dir.join("plugins/test-order.sock");
    let params = Params {
        chunks: 4,
        ..Params::default()
    };
    for round in 0..2 {
        let mut hand = start_plugin_host(&order_sock, "test-order");
        let st = setup
            .wait_for("test-order", Duration::from_secs(5), "connected", |p| {
                p.connected
            })
            .await;
        assert_eq!((st.state.as_str(), st.pid), ("external", Some(hand.id())));
        let rid = format!("external-{round}");
        chat(setup.envoy.port, &params, &rid).await;
        let line = setup.log_for(&rid);
        assert_eq!(line["test_order"]["sha256"], sha(&params.body()), "{line}");
        hand.kill().unwrap();
        hand.wait().unwrap();
        setup
            .wait_for("test-order", Duration::from_secs(5), "disconnected", |p| {
                !p.connected
            })
            .await;
        assert!(
            order_sock.exists(),
            "the socket waits for the next instance"
        );
    }
    // A spawned plugin stopped by the operator accepts a hand-started instance too.
    let out = setup.plugvisor(&["stop", "usage"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    setup
        .wait_for("usage", Duration::from_secs(5), "stopped", |p| {
            p.state == "stopped"
        })
        .await;
    let usage_sock = setup.front.runtime_dir.join("plugins/usage.sock");
    let mut hand = start_plugin_host(&usage_sock, "usage");
    let st = setup
        .wait_for("usage", Duration::from_secs(5), "attached", |p| p.connected)
        .await;
    assert_eq!((st.state.as_str(), st.pid), ("external", Some(hand.id())));
    hand.kill().unwrap();
    hand.wait().unwrap();
    // `start` hands it back to the supervisor.
    let out = setup.plugvisor(&["start", "usage"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    setup
        .wait_for("usage", Duration::from_secs(5), "up", |p| p.state == "up")
        .await;
}

fn start_plugin_host(socket: &Path, name: &str) -> std::process::Child {
    Command::new(tests::bins::plugvisor_plugin())
        .arg(name)
        .arg("--connect")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start plugvisor-plugin by hand")
}

fn run_plugin_host(socket: &Path, name: &str, uid: Option<u32>) -> std::process::Output {
    let mut cmd = Command::new(tests::bins::plugvisor_plugin());
    cmd.arg(name).arg("--connect").arg(socket);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(0);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run plugvisor-plugin");
    wait_output(child, Duration::from_secs(10))
}

fn wait_output(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    if tests::within(limit, || child.try_wait().ok().flatten()).is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().expect("output")
}

/// A plugin that refuses its config (exit 78, `EX_CONFIG`) is `failed` at once, without going
/// through its restart budget, and `plugvisor status` says why with its last error line; a
/// plugin that crashes says so the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_refuses_its_config_fails_at_once_and_status_says_why() {
    let setup = Setup::new(
        "[plugins.picky]\ncommand = \"/bin/sh\"\n\
         args = [\"-c\", \"echo 'starting {name}' >&2; echo 'config: key `x` is missing' >&2; exit 78\"]\n\
         [plugins.crashy]\ncommand = \"/bin/sh\"\n\
         args = [\"-c\", \"echo 'Traceback (most recent call last):' >&2; echo 'ModuleNotFoundError: No module named plugvisor' >&2; exit 1\"]\n\
         backoff_min_ms = 5000\n",
        &[],
    )
    .await;
    let picky = setup
        .wait_for("picky", Duration::from_secs(10), "failed", |p| {
            p.state == "failed"
        })
        .await;
    assert_eq!(picky.restarts, 0, "{picky:?}");
    assert_eq!(picky.last_exit.as_deref(), Some("exit status 78"));
    assert_eq!(
        picky.last_error.as_deref(),
        Some("config: key `x` is missing"),
        "{picky:?}"
    );
    let crashy = setup
        .wait_for("crashy", Duration::from_secs(10), "in backoff", |p| {
            p.state == "backoff"
        })
        .await;
    assert_eq!(
        crashy.last_error.as_deref(),
        Some("ModuleNotFoundError: No module named plugvisor"),
        "{crashy:?}"
    );
    let out = setup.plugvisor(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("picky: last error: config: key `x` is missing"),
        "{text}"
    );
    // Still failed a while later: no restart churn.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(setup.plugin("picky").await.restarts, 0);
}
