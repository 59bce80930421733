//! The Python SDK end to end: `sdk/python` installed with pip into a fresh venv, its
//! `examples/wordcount.py` spawned by the real front as `command = "<venv>/bin/python3"`, and
//! requests through real Envoy whose access log shows the plugin's word count from
//! `dynamic_metadata`. Then the plugin is SIGKILLed mid-stream and the replacement's replayed
//! final must still count every word.
//!
//! The venv is made by the test process itself ([`tests::python::shared_venv`]), so
//! `cargo test -p tests --test it -- python_sdk::` works alone, with `python3` (and its `venv`
//! module) on PATH and PyPI reachable for the build backend.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tests::client::chat;
use tests::envoy::{Envoy, EnvoyOptions};
use tests::front::{metric, FrontProcess};
use tests::upstream::{Params, Upstream};

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
            let python = tests::python::shared_venv();
            let script = tests::python::repo().join("sdk/python/examples/wordcount.py");
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
