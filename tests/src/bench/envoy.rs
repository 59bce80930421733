//! Envoy for the benchmark: `examples/envoy.yaml` with this run's ports, an access log in the run
//! directory, and either an ext_proc server (a Unix socket) or, for the floor, no ext_proc filter
//! at all. Same flags as the test suite (`--concurrency 2`, no hot restart); killed by pid on drop.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::envoy::{example_config, http_get};
use crate::free_port;

/// Envoy 1.40's own usage extraction, observe-only, for every route (the bench's upstream is
/// OpenAI chat, which it detects from the response).
const NATIVE_USAGE_FILTER: &str = "          - name: envoy.filters.http.ai_protocol_manager
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ai_protocol_manager.v3.AiProtocolManager
              response_handling:
                token_usage:
                  include_unconfigured_routes: true
";

/// A running Envoy.
pub struct BenchEnvoy {
    child: Child,
    /// The client-facing port.
    pub port: u16,
}

impl BenchEnvoy {
    /// Starts Envoy in `dir` in front of `upstream_port`; `ext_proc` is `Some(unix socket path)`
    /// or `None` for Envoy without the ext_proc filter (see [`BenchEnvoy::start_at`] for TCP). `namespaces` are added to the accepted
    /// metadata namespaces.
    pub fn start(
        dir: &Path,
        ext_proc: Option<&Path>,
        upstream_port: u16,
        namespaces: &[&str],
    ) -> BenchEnvoy {
        let ext_proc = ext_proc.map(|p| format!("unix:{}", p.display()));
        BenchEnvoy::start_at(dir, ext_proc.as_deref(), upstream_port, namespaces)
    }

    /// Envoy without ext_proc and with its own in-process usage extraction instead: the AI
    /// Protocol Manager filter (Envoy 1.40) with `response_handling.token_usage` on every route,
    /// publishing typed metadata under `envoy.ai.token_usage` (what a user who needs usage alone
    /// would run; `tests/tests/it/usage_envoy.rs` checks its numbers against the plugin's).
    pub fn start_native(dir: &Path, upstream_port: u16) -> BenchEnvoy {
        BenchEnvoy::start_with(dir, None, upstream_port, &[], true)
    }

    /// [`BenchEnvoy::start`] with the ext_proc server at `unix:/path` or `ip:port`.
    pub fn start_at(
        dir: &Path,
        ext_proc: Option<&str>,
        upstream_port: u16,
        namespaces: &[&str],
    ) -> BenchEnvoy {
        BenchEnvoy::start_with(dir, ext_proc, upstream_port, namespaces, false)
    }

    fn start_with(
        dir: &Path,
        ext_proc: Option<&str>,
        upstream_port: u16,
        namespaces: &[&str],
        native_usage: bool,
    ) -> BenchEnvoy {
        std::fs::create_dir_all(dir).expect("envoy dir");
        let port = free_port();
        let admin = free_port();
        let mut yaml = example_config();
        fn swap(yaml: &mut String, from: &str, to: &str) {
            assert!(yaml.contains(from), "examples/envoy.yaml lost `{from}`");
            *yaml = yaml.replacen(from, to, 1);
        }
        swap(
            &mut yaml,
            "port_value: 9901",
            &format!("port_value: {admin}"),
        );
        swap(
            &mut yaml,
            "port_value: 10000",
            &format!("port_value: {port}"),
        );
        swap(
            &mut yaml,
            "port_value: 8000",
            &format!("port_value: {upstream_port}"),
        );
        swap(
            &mut yaml,
            "/tmp/plugvisor-access.log",
            &dir.join("access.log").display().to_string(),
        );
        let extra: String = namespaces
            .iter()
            .map(|ns| format!("                  - {ns}\n"))
            .collect();
        swap(
            &mut yaml,
            "                  - plugvisor.test-order\n",
            &format!("                  - plugvisor.test-order\n{extra}"),
        );
        match ext_proc {
            Some(at) => {
                let address = match at.strip_prefix("unix:") {
                    Some(path) => format!("pipe: {{ path: {path} }}"),
                    None => {
                        let (host, port) = at.rsplit_once(':').expect("unix:/path or host:port");
                        format!("socket_address: {{ address: {host}, port_value: {port} }}")
                    }
                };
                swap(
                    &mut yaml,
                    "pipe: { path: /run/plugvisor/extproc.sock }",
                    &address,
                )
            }
            None => {
                let from = yaml
                    .find("          - name: envoy.filters.http.ext_proc")
                    .expect("ext_proc filter in the example");
                let to = yaml
                    .find("          - name: envoy.filters.http.router")
                    .expect("router filter in the example");
                yaml.replace_range(from..to, "");
                // The plugvisor cluster stays, pointing nowhere; nothing uses it.
                swap(
                    &mut yaml,
                    "pipe: { path: /run/plugvisor/extproc.sock }",
                    &format!("pipe: {{ path: {} }}", dir.join("unused.sock").display()),
                );
            }
        }
        if native_usage {
            let router = yaml
                .find("          - name: envoy.filters.http.router")
                .expect("router filter in the example");
            yaml.insert_str(router, NATIVE_USAGE_FILTER);
        }
        // Access logs are not read here: flush them rarely.
        let child = crate::envoy::spawn(dir, &yaml, 1000);
        let mut envoy = BenchEnvoy { child, port };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!(
                    "envoy exited with {status}: {}",
                    std::fs::read_to_string(dir.join("envoy.log")).unwrap_or_default()
                );
            }
            if http_get(admin, "/ready").is_ok_and(|b| b.trim() == "LIVE") {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "envoy not live");
            std::thread::sleep(Duration::from_millis(50));
        }
        envoy
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BenchEnvoy {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// SIGTERM, up to 3 s, then SIGKILL; always reaped.
pub fn stop_child(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
