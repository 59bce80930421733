//! The whole data path for end-to-end tests: the OpenAI-like [`Upstream`], the `plugvisor`
//! binary as a [`FrontProcess`] with the given plugins, and a real [`Envoy`] running
//! `examples/envoy.yaml` between them, all in one temporary directory.

use std::time::Duration;

use crate::envoy::{Envoy, EnvoyOptions};
use crate::front::FrontProcess;
use crate::upstream::Upstream;

/// A running upstream, front and Envoy. Dropping it stops them (Envoy and the front by pid).
pub struct Stack {
    /// Envoy, whose `port` the client talks to.
    pub envoy: Envoy,
    /// The front.
    pub front: FrontProcess,
    /// The upstream.
    pub upstream: Upstream,
    /// Holds every config, socket and log of the test.
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// Starts everything with Envoy in `FULL_DUPLEX_STREAMED` mode and waits until the plugins in
    /// `expect` are connected. In `plugins_toml`, `__RUN__` stands for the front's runtime
    /// directory (for plugins whose `args` name their own socket).
    pub async fn start(plugins_toml: &str, expect: &[&str]) -> Stack {
        Stack::with_mode("FULL_DUPLEX_STREAMED", plugins_toml, expect).await
    }

    /// [`Stack::start`] with another response body mode (`STREAMED`).
    pub async fn with_mode(body_mode: &'static str, plugins_toml: &str, expect: &[&str]) -> Stack {
        crate::init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = plugins_toml.replace(
            "__RUN__",
            &FrontProcess::runtime_dir_in(dir.path())
                .display()
                .to_string(),
        );
        let upstream = Upstream::start().await;
        let (front, envoy) = tokio::task::block_in_place(|| {
            let front = FrontProcess::start(dir.path(), &toml, expect);
            let envoy = Envoy::start(
                dir.path(),
                &EnvoyOptions {
                    ext_proc: front.ext_proc.clone(),
                    upstream_port: upstream.port,
                    body_mode,
                    extra_namespaces: vec![],
                    failure_mode_allow: false,
                    ..EnvoyOptions::default()
                },
            );
            (front, envoy)
        });
        Stack {
            envoy,
            front,
            upstream,
            dir,
        }
    }

    /// The pid of the process serving `name`, as `plugvisor status` reports it.
    pub async fn plugin_pid(&self, name: &str) -> u32 {
        let answer = supervisor::control::request(
            &self.front.control_socket(),
            &supervisor::control::Request::Status,
        )
        .await
        .expect("control socket answers");
        answer
            .plugins
            .expect("status lists plugins")
            .into_iter()
            .find(|p| p.name == name)
            .and_then(|p| p.pid)
            .unwrap_or_else(|| panic!("{name} has no pid"))
    }

    /// Envoy's access-log line for the request with this test id (waits up to 5 s for it).
    pub fn log_for(&self, rid: &str) -> serde_json::Value {
        tokio::task::block_in_place(|| self.envoy.access_log_for(rid, Duration::from_secs(5)))
    }
}
