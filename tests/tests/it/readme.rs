//! The README's first command, run as a new user would: on a fresh clone of this repository,
//! exactly as README.md writes it (parsed from its first shell block, so the test follows the
//! README rather than a copy of it), with no configuration. Both default plugins must come up and
//! a stream through real Envoy must get their metadata.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tests::client::chat;
use tests::envoy::{http_get, Envoy, EnvoyOptions};
use tests::upstream::{Params, Upstream};

/// A release build of the whole front in a fresh clone, on 2 cores, from scratch.
const BUILD_AND_START_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The workspace this test was built from.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The first command of README.md's first shell block, split into words.
fn readme_first_command(readme: &str) -> Vec<String> {
    let mut lines = readme.lines();
    lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("```sh"))
        .expect("README.md has a ```sh block");
    let line = lines
        .take_while(|l| !l.trim_start().starts_with("```"))
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .expect("README.md's first shell block has a command");
    assert!(
        !line.contains(['"', '\'', '$', '|', '&', ';', '<', '>', '`', '\\']),
        "README's first command `{line}` needs a shell; this test runs plain words"
    );
    line.split_whitespace().map(str::to_owned).collect()
}

fn git(args: &[&str], dir: &Path) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The README's command in its own process group: `cargo run` and the front it starts (the
/// plugins have groups of their own and end with the front). Dropping it stops the group.
struct ReadmeCommand {
    child: Child,
    log: PathBuf,
}

impl ReadmeCommand {
    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM to the group (the front drains and stops its plugins), then SIGKILL after a grace.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let status = tests::within(Duration::from_secs(15), || {
            self.child.try_wait().ok().flatten()
        });
        let _ = killpg(group, Signal::SIGKILL);
        if status.is_none() {
            let _ = self.child.wait();
        }
        status
    }
}

impl Drop for ReadmeCommand {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

// The default-ports lock is held across awaits on purpose: it keeps whole tests (cli.rs's, on
// another thread) apart, and no other task of this test's runtime ever takes it.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_s_first_command_serves_both_default_plugins_on_a_fresh_clone() {
    let workspace = workspace();
    let readme = std::fs::read_to_string(workspace.join("README.md")).expect("README.md");
    let words = readme_first_command(&readme);

    let tmp = tempfile::tempdir().expect("tempdir");
    let clone = tmp.path().join("plugvisor");
    let head = git(&["rev-parse", "HEAD"], &workspace);
    git(
        &[
            "clone",
            "--quiet",
            "--no-checkout",
            &workspace.display().to_string(),
            &clone.display().to_string(),
        ],
        tmp.path(),
    );
    git(&["checkout", "--quiet", "--detach", &head], &clone);

    // The command runs as written; only its addresses move off the embedded default's fixed
    // ports (through the environment the front honours), so a plugvisor an operator runs by
    // hand, or another test, does not stand in its way.
    let ext_proc = format!("127.0.0.1:{}", tests::free_port());
    let admin_port = tests::free_port();

    // A fresh clone builds from scratch in release mode: minutes on a small machine. Its target
    // directory lives beside this workspace's and survives the clone, so reruns only rebuild
    // the clone's own crates, not every dependency.
    let target = tests::bins::bin_dir()
        .parent()
        .expect("the profile directory sits in a target directory")
        .join("readme-clone");
    let run = tmp.path().join("run");
    let log = tmp.path().join("readme-command.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(&words[0])
        .args(&words[1..])
        .current_dir(&clone)
        .env("CARGO_TARGET_DIR", &target)
        // Config-free, but not in the host's /run/plugvisor, where another front may run: the
        // default runtime directory honours systemd's RUNTIME_DIRECTORY.
        .env("RUNTIME_DIRECTORY", &run)
        .env("PLUGVISOR_LISTEN", &ext_proc)
        .env("PLUGVISOR_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env_remove("PLUGVISOR_CONFIG")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {words:?}: {e}"));
    let mut command = ReadmeCommand { child, log };

    let what = format!("both default plugins up after {words:?}");
    tests::eventually_async(&what, BUILD_AND_START_LIMIT, async || {
        let metrics = http_get(admin_port, "/metrics").unwrap_or_default();
        if metrics.contains("plugvisor_plugin_connected{plugin=\"usage\"} 1")
            && metrics.contains("plugvisor_plugin_connected{plugin=\"latency\"} 1")
        {
            return Ok(());
        }
        if let Ok(Some(status)) = command.child.try_wait() {
            panic!("{words:?} exited with {status}:\n{}", command.log());
        }
        Err(format!("metrics: {metrics}\n{}", command.log()))
    })
    .await;

    let upstream = Upstream::start().await;
    let envoy = tokio::task::block_in_place(|| {
        Envoy::start(
            tmp.path(),
            &EnvoyOptions {
                ext_proc: ext_proc.clone(),
                upstream_port: upstream.port,
                ..EnvoyOptions::default()
            },
        )
    });
    let params = Params::default();
    let got = chat(envoy.port, &params, "readme-1").await;
    assert_eq!(got.body(), params.body());
    let line =
        tokio::task::block_in_place(|| envoy.access_log_for("readme-1", Duration::from_secs(10)));
    assert_eq!(
        line["usage"]["completion_tokens"], params.chunks as f64,
        "{line}"
    );
    assert_eq!(
        line["usage"]["prompt_tokens"], params.prompt_tokens as f64,
        "{line}"
    );
    assert!(line["latency"]["ttft_ms"].as_f64().is_some(), "{line}");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );

    drop(envoy);
    let status = tokio::task::block_in_place(|| command.stop());
    assert!(
        status.is_some_and(|s| s.success()),
        "{words:?} did not stop cleanly on SIGTERM ({status:?}):\n{}",
        command.log()
    );
}

#[test]
fn the_first_command_is_read_from_the_first_shell_block() {
    let readme = "intro\n```\nnot sh\n```\n```sh\n# comment\n\ncargo run --bin x\nnext\n```\n";
    assert_eq!(readme_first_command(readme), ["cargo", "run", "--bin", "x"]);
}
