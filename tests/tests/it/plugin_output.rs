//! A spawned plugin's stdout and stderr as the real `plugvisor` process forwards them: whatever
//! bytes a plugin writes (not UTF-8, a megabyte without a newline), the front keeps reading its
//! pipes, so the plugin is never killed by SIGPIPE and the front's memory stays flat.
//!
//! The plugin is a shell script that never completes a handshake; a long `start_timeout_ms`
//! keeps the front from killing it during the test.

use std::path::Path;
use std::time::Duration;

use tests::front::FrontProcess;

/// The size of the line the script writes without a newline.
const LONG_LINE: usize = 1024 * 1024;

/// What the plugin writes to stderr, once the test creates `<dir>/go`: invalid UTF-8, a 1 MiB
/// line that stays open for a while, its end, and later lines over time; then it sleeps with
/// its stderr still open.
const SCRIPT: &str = r#"
dir="$1"
echo $$ > "$dir/noisy.pid"
while [ ! -e "$dir/go" ]; do sleep 0.05; done
printf 'invalid utf-8: \377\376 end\n' >&2
head -c 1048576 /dev/zero | tr '\0' x >&2
touch "$dir/long-written"
while [ ! -e "$dir/finish" ]; do sleep 0.05; done
printf '\n' >&2
i=0
while [ $i -lt 10 ]; do
    echo "later line $i" >&2
    sleep 0.05
    i=$((i+1))
done
touch "$dir/all-written"
exec sleep 120
"#;

fn rss_bytes(pid: u32) -> Option<u64> {
    Some(tests::bench::procfs::rss_bytes(pid)).filter(|b| *b > 0)
}

/// Alive and not a zombie (a process killed by SIGPIPE is a zombie until the front reaps it).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim().to_owned()))
        .is_some_and(|r| !r.starts_with('Z'))
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool, front: &FrontProcess) {
    tests::eventually(what, limit, || {
        cond().then_some(()).ok_or(tests::Lazy(|| front.log()))
    })
}

/// Kills the plugin by pid if the test ends early (the front does it on a clean stop).
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn touch(path: &Path) {
    std::fs::write(path, b"").unwrap();
}

#[test]
fn odd_plugin_output_is_logged_and_never_kills_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = d.join("noisy.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    let front = FrontProcess::start(
        d,
        &format!(
            "[plugins.noisy]\ncommand = \"/bin/sh\"\nargs = [\"{}\", \"{}\"]\nstart_timeout_ms = 120000\n",
            script.display(),
            d.display()
        ),
        &[],
    );
    let pid_file = d.join("noisy.pid");
    wait_until(
        "the plugin's pid file",
        Duration::from_secs(10),
        || std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')),
        &front,
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _guard = KillPid(pid);
    let front_pid = front.pid();
    let before = rss_bytes(front_pid).expect("the front runs");
    let mut peak = before;

    touch(&d.join("go"));
    // The first 16 KiB of the long line are logged while the line is still open.
    wait_until(
        "the long line's head in the log",
        Duration::from_secs(10),
        || {
            peak = peak.max(rss_bytes(front_pid).unwrap_or(0));
            d.join("long-written").exists() && front.log().contains("[line continues]")
        },
        &front,
    );
    touch(&d.join("finish"));
    wait_until(
        "the later lines",
        Duration::from_secs(10),
        || {
            peak = peak.max(rss_bytes(front_pid).unwrap_or(0));
            d.join("all-written").exists() && front.log().contains("later line 9")
        },
        &front,
    );
    // Let a SIGPIPE, if there was one, take effect before looking.
    std::thread::sleep(Duration::from_millis(200));

    assert!(alive(pid), "the plugin died:\n{}", front.log());
    let log = front.log();
    assert!(
        log.contains("invalid utf-8: \u{fffd}\u{fffd} end"),
        "invalid bytes are shown as U+FFFD:\n{log}"
    );
    let head = format!("{} [line continues]", "x".repeat(16 * 1024));
    assert!(
        log.contains(&head),
        "the long line's first 16 KiB are logged"
    );
    assert!(
        log.contains(&format!("[truncated {} bytes]", LONG_LINE - 16 * 1024)),
        "the rest is counted:\n{}",
        log.lines()
            .filter(|l| l.len() < 1000)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        !log.contains(&"x".repeat(16 * 1024 + 1)),
        "nothing over 16 KiB"
    );
    for i in 0..10 {
        assert!(log.contains(&format!("later line {i}")), "later line {i}");
    }
    let grew = peak.saturating_sub(before);
    eprintln!("front RSS {before} bytes before, peak growth {grew} bytes");
    assert!(
        grew < 4 * LONG_LINE as u64,
        "the front's memory grew by {grew} bytes for a {LONG_LINE}-byte line"
    );
}

/// In JSON log mode a plugin's record arrives as a record of the front's with the plugin's
/// message as its message and the plugin's target and fields as fields of their own, not folded
/// into the message text.
#[test]
fn in_json_mode_a_plugins_fields_are_fields_not_message_text() {
    use std::io::BufRead;
    tests::bins::plugvisor_plugin();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pv.toml");
    std::fs::write(&config, "[plugins.latency]\n").unwrap();
    let mut child = std::process::Command::new(tests::bins::plugvisor())
        .arg("--config")
        .arg(&config)
        .env("RUNTIME_DIRECTORY", dir.path().join("run"))
        .env(
            "PLUGVISOR_LISTEN",
            format!("127.0.0.1:{}", tests::free_port()),
        )
        .env("PLUGVISOR_ADMIN_LISTEN", "off")
        .env("PLUGVISOR_LOG_FORMAT", "json")
        .env("PLUGVISOR_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("connected to the front") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let line = rx.recv_timeout(std::time::Duration::from_secs(15));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let line = line.expect("the plugin's 'connected' record in the front's log");
    let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    let fields = &record["fields"];
    assert_eq!(fields["message"], "connected to the front", "{line}");
    assert_eq!(fields["plugin"], "latency", "{line}");
    assert!(
        fields["plugin_target"]
            .as_str()
            .is_some_and(|t| t.starts_with("plugin_runner")),
        "{line}"
    );
    let plugin_fields = fields["plugin_fields"].as_str().expect("plugin_fields");
    assert!(
        plugin_fields.contains("workers=") && plugin_fields.contains("budget_bytes="),
        "{line}"
    );
}
