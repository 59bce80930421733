//! The Python SDK end to end: `sdk/python` installed with pip into a fresh venv, its
//! `examples/wordcount.py` spawned by the real front as `command = "<venv>/bin/python3"`, and
//! requests through real Envoy whose access log shows the plugin's word count from
//! `dynamic_metadata`. Then the plugin is SIGKILLed mid-stream and the replacement's replayed
//! final must still count every word.
//!
//! The venv is made by the test itself (in its temporary directory), so
//! `cargo test -p tests --test it -- python_sdk::` works alone, with `python3` (and its `venv`
//! module) on PATH and PyPI reachable for the build backend.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tests::client::chat;
use tests::envoy::{Envoy, EnvoyOptions};
use tests::front::{metric, FrontProcess};
use tests::upstream::{Params, Upstream};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Runs `cmd` to completion within `limit`, killing it (by pid) if it takes longer; panics with
/// its output unless it succeeds.
fn run_bounded(what: &str, cmd: &mut Command, limit: Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let file = std::fs::File::create(&out).expect("output file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            panic!(
                "{what}: not done within {limit:?}:\n{}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{what}: {status}:\n{}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
}

/// A fresh venv in `dir` with the SDK installed from `sdk/python`; returns its interpreter.
fn venv_with_sdk(dir: &Path) -> PathBuf {
    let venv = dir.join("venv");
    run_bounded(
        "python3 -m venv",
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        Duration::from_secs(120),
    );
    let python = venv.join("bin/python3");
    run_bounded(
        "pip install ./sdk/python",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .arg(repo().join("sdk/python"))
            // The in-tree build leaves build/ and *.egg-info beside the sources; run from the
            // venv so nothing else in the checkout is picked up.
            .current_dir(&venv),
        Duration::from_secs(300),
    );
    python
}

/// The upstream, the front spawning `wordcount.py` with the venv's interpreter, and Envoy
/// logging the `plugvisor.wordcount` namespace.
struct PyStack {
    envoy: Envoy,
    front: FrontProcess,
    _upstream: Upstream,
    dir: tempfile::TempDir,
}

impl PyStack {
    async fn start() -> PyStack {
        tests::init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = Upstream::start().await;
        let (front, envoy) = tokio::task::block_in_place(|| {
            let python = venv_with_sdk(dir.path());
            let script = repo().join("sdk/python/examples/wordcount.py");
            let socket = FrontProcess::runtime_dir_in(dir.path()).join("plugins/wordcount.sock");
            let plugins = format!(
                "[plugins.wordcount]\ncommand = \"{}\"\nargs = [\"{}\", \"--connect\", \"{}\"]\n\
                 final_timeout_ms = 5000\n",
                python.display(),
                script.display(),
                socket.display()
            );
            let front = FrontProcess::start(dir.path(), &plugins, &["wordcount"]);
            let envoy = Envoy::start_edited(
                dir.path(),
                &EnvoyOptions {
                    ext_proc: front.ext_proc.clone(),
                    upstream_port: upstream.port,
                    extra_namespaces: vec!["plugvisor.wordcount".into()],
                    ..EnvoyOptions::default()
                },
                |yaml| {
                    let at = "                  test_order: \"%DYNAMIC_METADATA(plugvisor.test-order)%\"\n";
                    assert!(yaml.contains(at), "examples/envoy.yaml lost `{at}`");
                    yaml.replace(
                        at,
                        &format!("{at}                  wordcount: \"%DYNAMIC_METADATA(plugvisor.wordcount)%\"\n"),
                    )
                },
            );
            (front, envoy)
        });
        PyStack {
            envoy,
            front,
            _upstream: upstream,
            dir,
        }
    }

    fn log_for(&self, rid: &str) -> serde_json::Value {
        tokio::task::block_in_place(|| self.envoy.access_log_for(rid, Duration::from_secs(10)))
    }
}

/// What wordcount must report for `params`: the whitespace-separated words of the streamed
/// content, deltas joined.
fn words(params: &Params) -> f64 {
    params.text().split_whitespace().count() as f64
}

fn assert_counted(line: &serde_json::Value, params: &Params) {
    assert_eq!(line["wordcount"]["words"], words(params), "{line}");
    assert!(line["wordcount"]["gaps"].is_null(), "{line}");
    assert!(line["wordcount"]["partial"].is_null(), "{line}");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_s_word_count_reaches_envoy_and_survives_a_sigkill_mid_stream() {
    let stack = PyStack::start().await;
    let log =
        || std::fs::read_to_string(stack.dir.path().join("plugvisor.log")).unwrap_or_default();

    // Whole streams: words that run across deltas ("tok0 xxxxxxxxxxx" + "tok1 ..."), events
    // split by the upstream's pacing, and a non-streamed answer (no SSE: no words).
    let streamed = Params {
        chunks: 12,
        delay: Duration::from_millis(3),
        ..Params::default()
    };
    let got = chat(stack.envoy.port, &streamed, "py-streamed").await;
    assert_eq!(got.error, None);
    assert_eq!(got.body(), streamed.body());
    let line = stack.log_for("py-streamed");
    assert_counted(&line, &streamed);
    assert_eq!(line["wordcount"]["words"], 13.0, "{line}");

    // The plugin's stderr reached the front's log as its own records (the supervised form).
    let front_log = log();
    assert!(
        front_log.contains("connected to the front"),
        "no plugin record in the front's log:\n{front_log}"
    );

    // SIGKILL while a long stream is in flight: the front replays the stream's journal to the
    // replacement process, whose final counts every word, neither partial nor gapped.
    let pid = stack
        .front
        .plugin_status("wordcount")
        .await
        .pid
        .expect("pid");
    let long = Params {
        chunks: 40,
        delay: Duration::from_millis(25),
        ..Params::default()
    };
    let port = stack.envoy.port;
    let request = {
        let long = long.clone();
        tokio::spawn(async move { chat(port, &long, "py-killed").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the plugin");
    let got = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .expect("the request ends")
        .expect("the request task");
    assert_eq!(got.error, None);
    assert_eq!(got.body(), long.body());
    let line = stack.log_for("py-killed");
    assert_counted(&line, &long);

    let status = stack.front.plugin_status("wordcount").await;
    assert_ne!(status.pid, Some(pid), "{status:?}");
    let metrics = stack.front.metrics();
    assert!(
        metric(
            &metrics,
            "plugvisor_plugin_events_replayed_total{plugin=\"wordcount\"}"
        ) > 0.0,
        "{metrics}\n{}",
        log()
    );
}
