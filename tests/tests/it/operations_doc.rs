//! docs/operations.md as an operator would use it: every command of the blocks marked
//! ```` ```console runnable ```` is run against a live front (the page's `/tmp/ops` paths and pids
//! replaced by this front's), and must succeed, or fail with the `plugvisor: ...` message the
//! page shows. A page whose commands stopped working fails the suite.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::front::FrontProcess;

/// The commands of the runnable blocks: `(command, expected output lines)`.
fn runnable_commands(page: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block && line.trim() == "```console runnable";
            continue;
        }
        if !in_block {
            continue;
        }
        match line.strip_prefix("$ ") {
            Some(cmd) => {
                let cmd = cmd.split("  # ").next().unwrap_or(cmd).trim().to_owned();
                out.push((cmd, Vec::new()));
            }
            None => {
                if let Some((_, expected)) = out.last_mut() {
                    expected.push(line.to_owned());
                }
            }
        }
    }
    out
}

#[test]
fn runnable_blocks_are_found() {
    let page = "```console runnable\n$ a --x  # why\nout\n$ b\n```\n```console\n$ c\n```\n";
    let cmds = runnable_commands(page);
    assert_eq!(
        cmds,
        vec![
            ("a --x".to_owned(), vec!["out".to_owned()]),
            ("b".to_owned(), vec![])
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runnable_commands_of_operations_md_work_against_a_live_front() {
    let page = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .expect("docs/operations.md");
    let commands = runnable_commands(&page);
    assert!(commands.len() >= 5, "{commands:?}");

    let dir = tempfile::tempdir().unwrap();
    let front = tokio::task::block_in_place(|| {
        FrontProcess::start(
            dir.path(),
            "[plugins.usage]\n[plugins.latency]\n[plugins.test-order]\nspawn = false\n",
            &["usage", "latency"],
        )
    });
    // test-order is run by hand, as the page's status shows it.
    let mut external = Command::new(tests::bins::plugvisor())
        .args(["plugin", "test-order", "--connect"])
        .arg(front.runtime_dir.join("plugins/test-order.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start test-order");
    tests::eventually_async(
        "test-order connected",
        Duration::from_secs(10),
        async || front.plugin_status("test-order").await.connected,
    )
    .await;
    let usage = front.plugin_status("usage").await.pid.expect("usage pid");
    let latency = front
        .plugin_status("latency")
        .await
        .pid
        .expect("latency pid");
    let path = format!(
        "{}:{}",
        tests::bins::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let here = |text: &str| {
        text.replace(
            "/tmp/ops/pv.toml",
            &front.config_path().display().to_string(),
        )
        .replace("/tmp/ops", &dir.path().display().to_string())
        .replace("8513", &front.pid().to_string())
        .replace("8518", &usage.to_string())
        .replace("8519", &latency.to_string())
    };
    for (cmd, expected) in &commands {
        let cmd = here(cmd);
        let out = tokio::task::block_in_place(|| {
            Command::new("timeout")
                .args(["20", "sh", "-c", &cmd])
                .env("PATH", &path)
                .stdin(Stdio::null())
                .output()
                .expect("run sh")
        });
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error = expected.first().filter(|l| l.starts_with("plugvisor: "));
        match error {
            Some(message) => {
                assert!(
                    !out.status.success(),
                    "`{cmd}` succeeded; the page says it fails"
                );
                assert_eq!(stderr.trim(), here(message), "`{cmd}`");
            }
            None => {
                assert!(
                    out.status.success(),
                    "`{cmd}` failed ({}):\n{stdout}\n{stderr}",
                    out.status
                );
                // The first line the page shows (a table header, a fixed answer) is what the
                // command prints first.
                if let Some(first) = expected.first() {
                    let first = here(first);
                    let header: Vec<&str> = first.split_whitespace().take(3).collect();
                    let got: Vec<&str> = stdout
                        .lines()
                        .next()
                        .unwrap_or("")
                        .split_whitespace()
                        .take(3)
                        .collect();
                    if first.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                        assert_eq!(got, header, "`{cmd}` printed:\n{stdout}");
                    }
                }
            }
        }
    }
    let _ = external.kill();
    let _ = external.wait();
}
