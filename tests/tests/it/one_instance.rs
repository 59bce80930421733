//! One front per runtime directory: a second `plugvisor` started by mistake with the same
//! runtime directory fails at once, names the running one's pid, and leaves it fully working;
//! and no bind ever removes a file that is not a socket.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use supervisor::plugin::supervise::PluginStatus;
use tests::bins;
use tests::front::{try_metric, FrontProcess};

/// Runs `plugvisor --config` on a config written into `dir`, expecting it to exit by itself
/// within 10 s; returns its output (stdout and stderr).
fn run_expecting_exit(dir: &Path, runtime_dir: &Path, plugins_toml: &str) -> Output {
    let config = format!(
        "listen = \"unix:{}\"\nadmin_listen = \"127.0.0.1:{}\"\nruntime_dir = \"{}\"\n\n{plugins_toml}",
        dir.join("ext_proc.sock").display(),
        tests::free_port(),
        runtime_dir.display()
    );
    let path = dir.join("plugvisor.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(bins::plugvisor())
        .arg("--config")
        .arg(&path)
        .env("PLUGVISOR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Not `eventually`: a front that kept running is killed first, and its stderr shown.
    if tests::within(Duration::from_secs(10), || child.try_wait().unwrap()).is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "plugvisor kept running: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

async fn status(front: &FrontProcess, name: &str) -> PluginStatus {
    front.plugin_status(name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_front_on_the_same_runtime_dir_exits_and_leaves_the_first_working() {
    let dir_a = tempfile::tempdir().unwrap();
    let a = FrontProcess::start(
        dir_a.path(),
        "[plugins.latency]\nbackoff_min_ms = 20\n",
        &["latency"],
    );
    let plugin_sock = a.runtime_dir.join("plugins/latency.sock");
    let sockets: Vec<PathBuf> = vec![plugin_sock, a.control_socket()];
    let before: Vec<u64> = sockets.iter().map(|p| inode(p)).collect();
    let first_pid = status(&a, "latency").await.pid.expect("latency runs");

    let dir_b = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = run_expecting_exit(dir_b.path(), &a.runtime_dir, "[plugins.latency]\n");
    let said = text(&out);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "another plugvisor (pid {}) is running with runtime directory {}",
            a.pid(),
            a.runtime_dir.display()
        )),
        "{said}"
    );
    // B bound nothing: not even its own ext_proc socket outside the runtime directory.
    assert!(!dir_b.path().join("ext_proc.sock").exists());
    let after: Vec<u64> = sockets.iter().map(|p| inode(p)).collect();
    assert_eq!(before, after, "a socket of the running front was replaced");

    // A still answers on its control socket, from the command line too.
    let cli = Command::new(bins::plugvisor())
        .args(["status", "--control"])
        .arg(a.control_socket())
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", text(&cli));
    assert!(String::from_utf8_lossy(&cli.stdout).contains("latency"));

    // And its plugin socket still takes connections: a killed plugin comes back and reconnects.
    kill(Pid::from_raw(first_pid as i32), Signal::SIGKILL).unwrap();
    let p = tests::eventually_async("latency back", Duration::from_secs(10), async || {
        let p = status(&a, "latency").await;
        let m = a.metrics();
        if p.connected
            && p.pid.is_some_and(|pid| pid != first_pid)
            && try_metric(&m, "plugvisor_plugin_connected{plugin=\"latency\"}") == Some(1.0)
        {
            Ok(p)
        } else {
            Err(format!("{p:?}\n{}", a.log()))
        }
    })
    .await;
    assert!(p.restarts >= 1, "{p:?}");
}

#[test]
fn a_file_that_is_not_a_socket_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let in_the_way = runtime.join("plugins/latency.sock");
    std::fs::create_dir_all(in_the_way.parent().unwrap()).unwrap();
    std::fs::write(&in_the_way, "precious").unwrap();

    let out = run_expecting_exit(dir.path(), &runtime, "[plugins.latency]\n");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "{} exists and is a regular file, not a socket",
            in_the_way.display()
        )),
        "{said}"
    );
    assert_eq!(std::fs::read_to_string(&in_the_way).unwrap(), "precious");
}

#[test]
fn a_runtime_dir_that_is_a_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::write(&runtime, "not a directory").unwrap();

    let out = run_expecting_exit(dir.path(), &runtime, "[plugins.latency]\n");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "cannot prepare runtime directory {}",
            runtime.display()
        )) && said.contains("it exists and is not a directory"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(&runtime).unwrap(),
        "not a directory"
    );
    assert!(!dir.path().join("ext_proc.sock").exists());
}
