//! `plugvisor conformance` as a plugin author runs it: the real binary against real plugin
//! processes. Every plugin this repository ships passes every case (hello-plugin, the built-ins,
//! the Python SDK's wordcount, and both SDKs' conformance plugins with the SDK cases); each
//! deliberately broken plugin fails with the case it breaks named, and the kit exits 1.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tests::bins;

/// Runs the kit with `kit_args`, then `--`, then the plugin's command line.
fn kit<S: AsRef<OsStr>>(kit_args: &[&str], plugin: &[S]) -> Output {
    let mut cmd = Command::new(bins::plugvisor());
    cmd.arg("conformance").args(kit_args).arg("--").args(plugin);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plugvisor conformance starts");
    // Bounded: the kit's own cases are, but a broken kit must not hang the suite.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(180));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    });
    let out = child.wait_with_output().expect("the kit ends");
    drop(watchdog);
    out
}

fn lines(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every case passed, and these cases were among them.
fn assert_all_pass(out: &Output, cases: &[&str]) {
    let text = lines(out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    for case in cases {
        assert!(
            text.lines()
                .any(|l| l == format!("PASS {case}") || l.starts_with(&format!("PASS {case} ("))),
            "no PASS line for {case}:\n{text}"
        );
    }
}

const PROTOCOL_CASES: &[&str] = &[
    "handshake",
    "refused_exits_78",
    "ping_pong",
    "pong_while_busy",
    "finals_answered",
    "metadata_within_limits",
    "credit",
    "replayed",
    "abort",
    "aborted_final",
    "reconnect",
    "trace",
    "shutdown",
    "eof",
];

const SDK_CASES: &[&str] = &[
    "sdk_order",
    "sdk_parallel",
    "sdk_gaps",
    "sdk_partial",
    "sdk_replays",
    "sdk_hook_throws",
    "sdk_aborted_final",
    "sdk_trace",
];

fn example(name: &str) -> PathBuf {
    bins::require(&format!("examples/{name}"))
}

#[test]
fn the_rust_sdk_s_conformance_plugin_passes_every_case() {
    let out = kit(
        &[],
        &[
            example("conformance").as_os_str(),
            OsStr::new("--connect"),
            OsStr::new("{socket}"),
        ],
    );
    assert_all_pass(&out, PROTOCOL_CASES);
    assert_all_pass(&out, SDK_CASES);
}

#[test]
fn hello_plugin_and_the_built_ins_pass_every_protocol_case() {
    let hello = bins::require("hello-plugin");
    let out = kit(&["--name", "hello"], &[hello.as_os_str()]);
    assert_all_pass(&out, PROTOCOL_CASES);
    assert!(!lines(&out).contains("sdk_"), "SDK cases only for --sdk");
    for builtin in ["usage", "latency"] {
        let host = bins::plugvisor();
        let out = kit(
            &["--name", builtin],
            &[
                host.as_os_str(),
                OsStr::new("plugin"),
                OsStr::new(builtin),
                OsStr::new("--connect"),
                OsStr::new("{socket}"),
            ],
        );
        assert_all_pass(&out, PROTOCOL_CASES);
    }
}

#[test]
fn the_python_sdk_s_plugins_pass_every_case() {
    let python = tests::python::shared_venv();
    let examples = tests::python::repo().join("sdk/python/examples");
    let out = kit(
        &[],
        &[
            python.as_os_str(),
            examples.join("conformance.py").as_os_str(),
        ],
    );
    assert_all_pass(&out, PROTOCOL_CASES);
    assert_all_pass(&out, SDK_CASES);
    let out = kit(
        &["--name", "wordcount"],
        &[
            python.as_os_str(),
            examples.join("wordcount.py").as_os_str(),
            OsStr::new("--connect"),
            OsStr::new("{socket}"),
        ],
    );
    assert_all_pass(&out, PROTOCOL_CASES);
}

#[test]
fn an_sdk_that_times_its_spans_on_another_clock_fails_sdk_trace() {
    // The Python SDK's conformance plugin, with the SDK's span clock swapped for the wall clock:
    // what an SDK that took `time.time_ns()` for `CLOCK_MONOTONIC` would send.
    let python = tests::python::shared_venv();
    let example = tests::python::repo().join("sdk/python/examples/conformance.py");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("wall_clock_spans.py");
    std::fs::write(
        &script,
        format!(
            "import runpy, time, types\n\
             import plugvisor.trace\n\
             plugvisor.trace.time = types.SimpleNamespace(monotonic_ns=time.time_ns)\n\
             runpy.run_path({example:?}, run_name='__main__')\n"
        ),
    )
    .unwrap();
    let out = kit(&[], &[python.as_os_str(), script.as_os_str()]);
    let text = lines(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let fails: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert_eq!(fails.len(), 1, "only sdk_trace fails:\n{text}");
    assert!(
        fails[0].starts_with("FAIL sdk_trace: stream 1: span `conformance.final` from ")
            && fails[0].contains("outside the kit's exchange"),
        "{text}"
    );
}

#[test]
fn each_broken_plugin_fails_the_case_it_breaks() {
    let broken = bins::require("broken-plugin");
    let grant = ["--name", "broken", "--namespace", "plugvisor.test-order"];
    let good = kit(&grant, &[broken.as_os_str(), OsStr::new("good")]);
    assert_all_pass(&good, PROTOCOL_CASES);
    for (mode, case, why) in [
        ("no-credit", "credit", "the plugin owes Credit"),
        ("no-pong", "ping_pong", "no Pong for Ping"),
        ("wrong-stream", "finals_answered", "names stream"),
        ("ignore-shutdown", "shutdown", "still running"),
    ] {
        let out = kit(&grant, &[broken.as_os_str(), OsStr::new(mode)]);
        let text = lines(&out);
        assert_eq!(out.status.code(), Some(1), "{mode}: {text}");
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("FAIL {case}: ")))
            .unwrap_or_else(|| panic!("{mode}: no FAIL {case}:\n{text}"));
        assert!(line.contains(why), "{mode}: {line}");
    }
    // Without the grant, a plugin writing another namespace fails the metadata case.
    let out = kit(
        &["--name", "broken"],
        &[broken.as_os_str(), OsStr::new("good")],
    );
    let text = lines(&out);
    assert!(
        text.contains("FAIL metadata_within_limits: it writes namespace `plugvisor.test-order`"),
        "{text}"
    );
    // --json: one array of {case, pass, detail}.
    let out = kit(
        &[
            "--json",
            "--name",
            "broken",
            "--namespace",
            "plugvisor.test-order",
        ],
        &[broken.as_os_str(), OsStr::new("ignore-shutdown")],
    );
    let cases: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let shutdown = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"] == "shutdown")
        .expect("the shutdown case");
    assert_eq!(shutdown["pass"], false, "{cases}");
}

#[test]
fn a_plugin_that_never_connects_or_names_itself_wrong_fails_the_handshake() {
    let out = kit(
        &[],
        &["/bin/sh", "-c", "echo 'no socket for me' >&2; exit 3"],
    );
    let text = lines(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL handshake: the plugin exited"), "{text}");
    assert!(
        text.contains("no socket for me"),
        "the plugin's output explains: {text}"
    );
    let broken = bins::require("broken-plugin");
    let out = kit(
        &["--name", "someone-else"],
        &[broken.as_os_str(), OsStr::new("good")],
    );
    assert!(
        lines(&out)
            .contains("FAIL handshake: Hello names plugin `broken`, expected `someone-else`"),
        "{}",
        lines(&out)
    );
}
