//! The front started in-process (its library's `start`), between a real Envoy and fake plugins that
//! connect as external plugins (`spawn = false`): for tests that drive the data path and read the
//! front's metrics and links directly.

use std::time::Duration;

use supervisor::{Config, Running};

use crate::envoy::{Envoy, EnvoyOptions};
use crate::fake_plugin::{Behaviour, FakePlugin};
use crate::upstream::Upstream;

/// How to set up an [`InProc`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Envoy's `response_body_mode`.
    pub body_mode: &'static str,
    /// Top-level TOML lines added to the front's config.
    pub top: String,
    /// Fake plugins: name, extra lines of its `[plugins.<name>]` table, behaviour.
    pub plugins: Vec<(String, String, Behaviour)>,
    /// Serve the upstream over HTTP/2.
    pub upstream_h2: bool,
    /// Envoy's per-connection buffer limit.
    pub buffer_limit_bytes: Option<u32>,
    /// Namespaces Envoy must accept besides the example's.
    pub extra_namespaces: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            body_mode: "FULL_DUPLEX_STREAMED",
            top: String::new(),
            plugins: Vec::new(),
            upstream_h2: false,
            buffer_limit_bytes: None,
            extra_namespaces: Vec::new(),
        }
    }
}

/// A running in-process front with its fake plugins, upstream and Envoy.
pub struct InProc {
    /// Envoy, whose `port` the client talks to.
    pub envoy: Envoy,
    /// The front.
    pub front: Running,
    /// The fake plugins, in config order.
    pub plugins: Vec<FakePlugin>,
    /// The upstream.
    pub upstream: Upstream,
    /// Holds the configs, sockets and logs.
    pub dir: tempfile::TempDir,
}

impl InProc {
    /// Fake plugins with default options but the body mode.
    pub async fn new(body_mode: &'static str, plugins: &[(&str, &str, Behaviour)]) -> InProc {
        InProc::start(Options {
            body_mode,
            plugins: plugins
                .iter()
                .map(|(n, e, b)| (n.to_string(), e.to_string(), b.clone()))
                .collect(),
            ..Options::default()
        })
        .await
    }

    /// Starts the front, connects the fake plugins, then the upstream and Envoy.
    pub async fn start(opts: Options) -> InProc {
        crate::init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("ext_proc.sock");
        let mut toml = format!(
            "listen = \"unix:{}\"\nadmin_listen = \"127.0.0.1:0\"\nruntime_dir = \"{}\"\nconnect_timeout_ms = 1\nshutdown_grace_ms = 300\n{}\n",
            sock.display(),
            dir.path().join("run").display(),
            opts.top,
        );
        for (name, extra, _) in &opts.plugins {
            // The fake answers under `plugvisor.test-order` whatever its name: grant it, unless
            // the test grants namespaces itself.
            let grant = if extra.contains("namespaces") {
                ""
            } else {
                "namespaces = [\"plugvisor.test-order\"]\n"
            };
            toml.push_str(&format!(
                "[plugins.{name}]\nspawn = false\n{grant}{extra}\n"
            ));
        }
        // The usage records in the test's directory, not in the home.
        toml.push_str(&format!(
            "[records]\npath = \"{}\"\n",
            dir.path().join("records.jsonl").display()
        ));
        let config = Config::parse(&toml, "test").expect("test config");
        let front = supervisor::start(config.clone())
            .await
            .expect("front starts");
        let mut fakes = Vec::new();
        for (name, _, behaviour) in &opts.plugins {
            fakes.push(
                FakePlugin::welcome(&config.plugin_socket(name), name, behaviour.clone()).await,
            );
        }
        assert!(front.wait_connected(Duration::from_secs(5)).await);
        let upstream = if opts.upstream_h2 {
            Upstream::start_h2().await
        } else {
            Upstream::start().await
        };
        let envoy_opts = EnvoyOptions {
            ext_proc: format!("unix:{}", sock.display()),
            upstream_port: upstream.port,
            body_mode: opts.body_mode,
            extra_namespaces: opts.extra_namespaces,
            failure_mode_allow: false,
            upstream_h2: opts.upstream_h2,
            buffer_limit_bytes: opts.buffer_limit_bytes,
        };
        let envoy = tokio::task::block_in_place(|| Envoy::start(dir.path(), &envoy_opts));
        InProc {
            envoy,
            front,
            plugins: fakes,
            upstream,
            dir,
        }
    }

    /// Envoy's access-log line for the request with this test id (waits up to 5 s for it).
    pub fn log_for(&self, rid: &str) -> serde_json::Value {
        tokio::task::block_in_place(|| self.envoy.access_log_for(rid, Duration::from_secs(5)))
    }

    /// Stops Envoy, then the front.
    pub async fn stop(mut self) {
        drop(self.envoy);
        self.front.stop().await;
        drop(self.dir);
    }
}
