//! The front run as the real `plugvisor` process with a generated config, for end-to-end tests
//! with the real plugin host; stopped (SIGTERM, then SIGKILL) by pid when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::envoy::http_get;
use crate::{bins, eventually, free_port, within, FileText};

/// A running `plugvisor` process.
pub struct FrontProcess {
    child: Child,
    /// `unix:/path` the ext_proc server listens on.
    pub ext_proc: String,
    /// The admin port serving `/metrics`.
    pub admin_port: u16,
    /// The runtime directory (plugin sockets and `control.sock`).
    pub runtime_dir: PathBuf,
    log_file: PathBuf,
    config_path: PathBuf,
}

impl FrontProcess {
    /// Writes `plugins_toml` (the `[plugins.*]` tables) under a generated header into `dir`,
    /// starts `plugvisor --config`, and waits until every plugin in `expect` is connected.
    pub fn start(dir: &Path, plugins_toml: &str, expect: &[&str]) -> FrontProcess {
        let listen = format!("unix:{}", dir.join("ext_proc.sock").display());
        FrontProcess::start_listening(dir, &listen, plugins_toml, expect)
    }

    /// [`FrontProcess::start`] with the ext_proc server on `listen` (`unix:/path` or `ip:port`,
    /// as the config's `listen`).
    pub fn start_listening(
        dir: &Path,
        listen: &str,
        plugins_toml: &str,
        expect: &[&str],
    ) -> FrontProcess {
        FrontProcess::start_from(&bins::plugvisor(), dir, listen, "", plugins_toml, expect)
    }

    /// [`FrontProcess::start_listening`] running `binary` (e.g. a copy an upgrade test replaces),
    /// with `header` (top-level keys, one per line) added to the generated config.
    pub fn start_from(
        binary: &Path,
        dir: &Path,
        listen: &str,
        header: &str,
        plugins_toml: &str,
        expect: &[&str],
    ) -> FrontProcess {
        let admin_port = free_port();
        let config = format!(
            "listen = \"{listen}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nruntime_dir = \"{}\"\nping_interval_ms = 100\n{header}\n{plugins_toml}",
            FrontProcess::runtime_dir_in(dir).display()
        );
        FrontProcess::run(binary, dir, &config, listen, admin_port, expect)
    }

    /// Starts `plugvisor --config` on `config` written verbatim to `dir/plugvisor.toml` (for a
    /// config as users run it, e.g. the embedded default with only its ports and runtime
    /// directory changed): `listen` and `admin_port` must be the ones `config` names.
    pub fn start_config(
        dir: &Path,
        config: &str,
        listen: &str,
        admin_port: u16,
        expect: &[&str],
    ) -> FrontProcess {
        FrontProcess::run(&bins::plugvisor(), dir, config, listen, admin_port, expect)
    }

    /// Runs `binary --config` on `config` written to `dir/plugvisor.toml`, logging to
    /// `dir/plugvisor.log`, and waits until every plugin in `expect` is connected.
    fn run(
        binary: &Path,
        dir: &Path,
        config: &str,
        listen: &str,
        admin_port: u16,
        expect: &[&str],
    ) -> FrontProcess {
        let path = dir.join("plugvisor.toml");
        std::fs::write(&path, config).expect("write plugvisor.toml");
        let log_file = dir.join("plugvisor.log");
        let log = std::fs::File::create(&log_file).expect("log file");
        // Make sure the plugin host is there before blaming the front for a missing plugin.
        bins::plugvisor_plugin();
        let child = Command::new(binary)
            .arg("--config")
            .arg(&path)
            .env("PLUGVISOR_LOG", "info")
            // The usage records and their spool in the test's directory, not in the home.
            .env("STATE_DIRECTORY", dir.join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start plugvisor");
        let mut front = FrontProcess {
            child,
            ext_proc: listen.to_owned(),
            admin_port,
            runtime_dir: FrontProcess::runtime_dir_in(dir),
            log_file,
            config_path: path,
        };
        front.wait_ready(expect, Duration::from_secs(15));
        front
    }

    fn wait_ready(&mut self, expect: &[&str], limit: Duration) {
        let (child, log_file, admin_port) = (&mut self.child, &self.log_file, self.admin_port);
        eventually(&format!("plugins {expect:?} connected"), limit, move || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("plugvisor exited with {status}:\n{}", FileText(log_file));
            }
            // Serving /metrics at all, then every expected plugin connected.
            let connected = http_get(admin_port, "/metrics").is_ok_and(|metrics| {
                expect.iter().all(|p| {
                    metrics.contains(&format!("plugvisor_plugin_connected{{plugin=\"{p}\"}} 1"))
                })
            });
            connected.then_some(()).ok_or(FileText(log_file))
        })
    }

    /// The front's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// `/metrics` right now.
    pub fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").unwrap_or_default()
    }

    /// Status code and body of `GET /healthz`.
    pub fn healthz(&self) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(
            s,
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        (code, body)
    }

    /// Polls `plugvisor status` until `pred` holds for `name`'s row, up to `limit`.
    pub async fn wait_for_plugin(
        &self,
        name: &str,
        limit: Duration,
        pred: impl Fn(&supervisor::plugin::supervise::PluginStatus) -> bool,
    ) -> supervisor::plugin::supervise::PluginStatus {
        crate::eventually_async(&format!("{name} in status"), limit, async || {
            let p = self.plugin_status(name).await;
            if pred(&p) {
                Ok(p)
            } else {
                Err(format!("{p:?}\n{}", self.log()))
            }
        })
        .await
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `name`'s row of `plugvisor status`.
    pub async fn plugin_status(&self, name: &str) -> supervisor::plugin::supervise::PluginStatus {
        let answer = supervisor::shell::control::request(
            &self.control_socket(),
            &supervisor::shell::control::Request::Status,
        )
        .await
        .expect("control socket answers");
        answer
            .plugins
            .expect("status lists plugins")
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no plugin {name} in status"))
    }

    /// Sets the top-level `key = value` in the running front's file: replaces its line, or adds
    /// it above the first table. Reload with [`FrontProcess::reloaded`].
    pub fn set_top_level(&self, key: &str, value: &str) {
        let text = std::fs::read_to_string(&self.config_path).expect("read the config");
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .map(str::to_owned)
            .collect();
        let first_table = lines
            .iter()
            .position(|l| l.starts_with('['))
            .unwrap_or(lines.len());
        lines.insert(first_table, format!("{key} = {value}"));
        std::fs::write(&self.config_path, lines.join("\n") + "\n").expect("write the config");
    }

    /// Runs `send` (which makes the front reload: SIGHUP, [`FrontProcess::reload`], `plugvisor
    /// reload`) and waits until one more reload is logged.
    pub fn reloaded(&self, send: impl FnOnce()) {
        let count = |log: &str| log.matches("configuration reloaded").count();
        let before = count(&self.log());
        send();
        crate::eventually("the reload logged", Duration::from_secs(15), || {
            let log = self.log();
            if count(&log) > before {
                Ok(())
            } else {
                Err(log)
            }
        });
    }

    /// Sends SIGHUP: the front reads its file again.
    pub fn sighup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("signal the front");
    }

    /// Replaces the `[plugins.*]` tables of the config file and sends SIGHUP (a reload).
    pub fn reload(&self, plugins_toml: &str) {
        let text = std::fs::read_to_string(&self.config_path).expect("read the config");
        let (header, _) = text
            .split_once("\n\n")
            .expect("header, blank line, plugins");
        std::fs::write(&self.config_path, format!("{header}\n\n{plugins_toml}"))
            .expect("write the config");
        self.sighup();
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The runtime directory [`FrontProcess::start`] gives a front started in `dir`.
    pub fn runtime_dir_in(dir: &Path) -> PathBuf {
        dir.join("run")
    }

    /// The control socket (`plugvisor status --control`).
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("control.sock")
    }

    /// Waits up to `limit` for the process to exit and reaps it.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        within(limit, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for FrontProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if within(Duration::from_secs(8), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A metric's value from a text exposition (`name{labels}` exactly as printed). Panics when the
/// series is absent, naming the series of the same metric that are there: a test that reads a
/// series must not pass on a 0 it never saw (see [`try_metric`] for asserting absence).
pub fn metric(text: &str, series: &str) -> f64 {
    try_metric(text, series).unwrap_or_else(|| {
        let name = series.split('{').next().unwrap_or(series);
        let present: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|s| s.split('{').next() == Some(name))
            .collect();
        panic!("no series {series} in the metrics; series of {name}: {present:?}")
    })
}

/// A metric's value from a text exposition (`name{labels}` exactly as printed), `None` if the
/// series is absent.
pub fn try_metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().split(' ').next()?.parse().ok())
    })
}
