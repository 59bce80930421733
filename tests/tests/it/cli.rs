//! The `plugvisor` command line: `check-config`, the exit code for a bad config, and serving the
//! embedded default with no arguments at all.

use std::process::{Command, Stdio};
use std::time::Duration;

use tests::bins;
use tests::envoy::http_get;

/// `plugvisor check-config FILE`, its output.
fn check_config(file: &std::path::Path) -> std::process::Output {
    Command::new(bins::plugvisor())
        .arg("check-config")
        .arg(file)
        .output()
        .unwrap()
}

fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn check_config_accepts_the_sample_config() {
    let out = check_config(&repo_file("systemd/plugvisor.toml"));
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok (2 plugins: usage, latency)"),
        "{stdout}"
    );
}

#[test]
fn a_bad_config_is_one_clear_line_and_exit_78_and_a_missing_file_66() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n[plugins.usage]\nfinal_timeout_ms = \"soon\"\n",
    )
    .unwrap();
    for args in [
        vec!["check-config".into(), path.clone()],
        vec!["--config".into(), path.clone()],
    ] {
        let out = Command::new(bins::plugvisor())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("line 3") && stderr.contains("final_timeout_ms"),
            "{stderr}"
        );
    }
    // A file that is not there is no bad configuration: EX_NOINPUT.
    let missing = dir.path().join("missing.toml");
    for args in [
        vec!["check-config".into(), missing.clone()],
        vec!["--config".into(), missing.clone()],
        vec!["--config".into(), missing.clone(), "status".into()],
    ] {
        let out = Command::new(bins::plugvisor())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(66), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot read config file"), "{stderr}");
    }
}

/// Every class of mistake that used to pass `check-config` and then crash-loop at run time: one
/// line on stderr naming the file, the line and the key, exit 78; the front refuses to start on
/// it the same way.
#[test]
fn check_config_refuses_what_would_fail_at_run_time_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[plugins.usage]\n[plugins.usgae]\n", 2, "plugins.usgae", "no built-in plugin is named `usgae`"),
        ("[plugins.usage]\n[plugins.usage.config]\natributes = []\n", 2, "plugins.usage.config", "unknown key `atributes`"),
        (
            "[plugins.usage]\n[[plugins.usage.config.attributes]]\nnamespace = \"envoy.lb\"\nname = \"cost\"\nexpression = \"usage.prompt_tokens +* 2\"\n",
            2,
            "plugins.usage.config",
            "invalid CEL expression",
        ),
        ("[plugins.mine]\ncommand = \"/nonexistent/mine\"\n", 2, "plugins.mine.command", "does not exist"),
        ("[plugins.mine]\ncommand = \"no-such-command-xyz\"\n", 2, "plugins.mine.command", "not found in PATH"),
        ("[plugins.usage]\ngroup = \"no-such-group-xyz\"\n", 2, "plugins.usage.group", "does not exist"),
        ("[plugins.usage]\nuid = 3999999\n", 2, "plugins.usage.uid", "is no user"),
        ("ping_interval_ms = 0\n[plugins.usage]\n", 1, "ping_interval_ms", "at least 1"),
        ("ping_interval_ms = 500\n[plugins.usage]\nhang_timeout_ms = 500\n", 3, "plugins.usage.hang_timeout_ms", "larger than ping_interval_ms"),
        ("[plugins.usage]\ninline_timeout_ms = 0\n", 2, "plugins.usage.inline_timeout_ms", "at least 1"),
        ("max_streams = 10\n\n[plugins.\"a/b\"]\n", 3, "plugins.a/b", "plugin names use"),
    ];
    for (i, (text, line, key, word)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = check_config(&path);
        assert_eq!(out.status.code(), Some(78), "{text:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!("{}: line {line}: key `{key}`: ", path.display());
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&want) && stderr.contains(word),
            "{text:?}: want {want:?} and {word:?} in {stderr}"
        );
    }
    // Starting on such a file fails the same way, before anything is spawned.
    let path = dir.path().join("case0.toml");
    let out = Command::new(bins::plugvisor())
        .env("RUNTIME_DIRECTORY", dir.path().join("run"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("key `plugins.usgae`"));
}

/// A taken port names the key it comes from, so the operator knows which line to change.
#[test]
fn a_busy_port_names_its_key_and_address() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let free = || format!("127.0.0.1:{}", tests::free_port());
    for (key, text) in [
        (
            "admin_listen",
            format!(
                "listen = \"{}\"\nadmin_listen = \"{busy}\"\n[plugins.usage]\n",
                free()
            ),
        ),
        (
            "listen",
            format!(
                "listen = \"{busy}\"\nadmin_listen = \"{}\"\n[plugins.usage]\n",
                free()
            ),
        ),
    ] {
        let path = dir.path().join(format!("{key}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bins::plugvisor())
            .env("RUNTIME_DIRECTORY", dir.path().join(key))
            .env("PLUGVISOR_LOG_FORMAT", "human")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{key}: cannot listen on {busy}")),
            "{stderr}"
        );
        // The failed start leaves none of the sockets it bound behind.
        let socket = dir.path().join(key).join("plugins/usage.sock");
        assert!(!socket.exists(), "{} left behind", socket.display());
    }
}

#[test]
fn no_arguments_serves_the_embedded_default_with_usage_and_latency() {
    bins::plugvisor_plugin();
    // The embedded default, moved off its fixed ports through the environment the front
    // honours, so a plugvisor an operator runs by hand does not stand in its way.
    let admin_port = tests::free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bins::plugvisor())
        .env("RUNTIME_DIRECTORY", dir.path())
        .env(
            "PLUGVISOR_LISTEN",
            format!("127.0.0.1:{}", tests::free_port()),
        )
        .env("PLUGVISOR_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env_remove("PLUGVISOR_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Not `eventually`: the front is stopped before this test fails.
    let mut metrics = String::new();
    let up = tests::within(Duration::from_secs(10), || {
        metrics = http_get(admin_port, "/metrics").unwrap_or_default();
        (metrics.contains("plugvisor_plugin_connected{plugin=\"usage\"} 1")
            && metrics.contains("plugvisor_plugin_connected{plugin=\"latency\"} 1"))
        .then_some(())
    });
    // The plugins show up in ps under readable titles.
    let titles: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            if ppid != child.id() {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some(String::from_utf8_lossy(cmdline.split(|b| *b == 0).next()?).into_owned())
        })
        .collect();
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();
    if up.is_none() {
        panic!("default plugins never connected:\n{metrics}");
    }
    assert!(
        titles.contains(&"plugvisor-plugin: usage".to_owned()),
        "{titles:?}"
    );
    assert!(
        titles.contains(&"plugvisor-plugin: latency".to_owned()),
        "{titles:?}"
    );
    assert!(status.success(), "{status}");
    assert!(!dir.path().join("plugins/usage.sock").exists());
}

#[test]
fn the_demo_streams_text_and_prints_the_plugins_metadata() {
    bins::plugvisor();
    bins::plugvisor_plugin();
    bins::require("demo-upstream");
    // The suite's own (debug) build: the demo would otherwise build release binaries.
    let out = Command::new("bash")
        .arg(repo_file("examples/demo"))
        .env("PLUGVISOR_BIN_DIR", bins::bin_dir())
        .env("ENVOY_BIN", tests::envoy::envoy_bin())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("tok0 tok1 tok2"), "{stdout}");
    assert!(stdout.contains("\"completion_tokens\": 12"), "{stdout}");
    assert!(
        stdout.contains("\"x-gateway-inference-request-cost\": 31"),
        "{stdout}"
    );
    assert!(stdout.contains("\"ttft_ms\""), "{stdout}");
}

#[test]
fn the_environment_overrides_the_addresses_and_is_checked_like_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pv.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:9002\"\n[plugins.usage]\n").unwrap();
    for (key, value, word) in [
        (
            "PLUGVISOR_LISTEN",
            "nowhere",
            "neither ip:port nor unix:/path",
        ),
        (
            "PLUGVISOR_ADMIN_LISTEN",
            "10.1.2.3:9",
            "not a loopback address",
        ),
    ] {
        let out = Command::new(bins::plugvisor())
            .arg("check-config")
            .arg(&file)
            .env(key, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{key}={value}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("key `${key}`")) && stderr.contains(word),
            "{stderr}"
        );
    }
    let out = Command::new(bins::plugvisor())
        .arg("check-config")
        .arg(&file)
        .env("PLUGVISOR_LISTEN", "unix:/tmp/elsewhere.sock")
        .env("PLUGVISOR_ADMIN_LISTEN", "off")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A plugin run as its own unit under a built-in's name (`plugvisor-plugin@usage`) with a config
/// that built-in refuses: plugvisor cannot see the unit's program, so `check-config` passes the
/// file with a warning naming the line, the key and the plugin's own error, and the front says
/// the same when it starts and at each reload.
#[test]
fn a_unit_run_built_in_s_bad_config_is_a_warning_from_check_config_start_and_reload() {
    let unit = "[plugins.usage]\nspawn = false\n\n[plugins.usage.config]\natributes = []\n";
    let warned = "key `plugins.usage.config`: if this plugin's unit runs the built-in `usage` (as \
                  plugvisor-plugin@usage does), the plugin refuses this config and exits 78: ";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unit.toml");
    std::fs::write(&file, unit).unwrap();
    let out = check_config(&file);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok (1 plugin: usage)"),
        "{out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "plugvisor: warning: {}: line 4: {warned}",
            file.display()
        )) && stderr.contains("unknown key `atributes`"),
        "{stderr}"
    );

    let front = tests::front::FrontProcess::start(dir.path(), "[plugins.latency]\n", &["latency"]);
    assert!(!front.log().contains(warned), "{}", front.log());
    front.reload(unit);
    tests::eventually(
        "the reload's warning in the log",
        Duration::from_secs(10),
        || front.log().contains(warned),
    );
    drop(front);
    let front = tests::front::FrontProcess::start(dir.path(), unit, &[]);
    assert!(front.log().contains(warned), "{}", front.log());
}
