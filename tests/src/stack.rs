//! The whole data path for end-to-end tests: the OpenAI-like [`Upstream`], the `plugvisor`
//! binary as a [`FrontProcess`] with the given plugins, and a real [`Envoy`] running
//! `examples/envoy.yaml` between them, all in one temporary directory.

use std::path::Path;
use std::time::Duration;

use crate::envoy::{Envoy, EnvoyOptions};
use crate::front::FrontProcess;
use crate::upstream::{Params, Upstream};
use sha2::{Digest, Sha256};

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
        Stack::with_front(body_mode, |dir| {
            let toml = plugins_toml.replace(
                "__RUN__",
                &FrontProcess::runtime_dir_in(dir).display().to_string(),
            );
            FrontProcess::start(dir, &toml, expect)
        })
        .await
    }

    /// The upstream, the front `start_front` starts in the test's directory (e.g. from another
    /// binary, [`FrontProcess::start_from`]), and Envoy failing closed in `body_mode` in front
    /// of it.
    pub async fn with_front(
        body_mode: &'static str,
        start_front: impl FnOnce(&Path) -> FrontProcess,
    ) -> Stack {
        crate::init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let upstream = Upstream::start().await;
        let (front, envoy) = tokio::task::block_in_place(|| {
            let front = start_front(dir.path());
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
        self.front
            .plugin_status(name)
            .await
            .pid
            .unwrap_or_else(|| panic!("{name} has no pid"))
    }

    /// Envoy's access-log line for the request with this test id (waits up to 5 s for it).
    pub fn log_for(&self, rid: &str) -> serde_json::Value {
        tokio::task::block_in_place(|| self.envoy.access_log_for(rid, Duration::from_secs(5)))
    }
}

/// Asserts that `line`, the access-log line of a request for `params` through usage and
/// test-order, has whole metadata: the front lists no plugin missing or partial, usage counted
/// every completion token, and test-order saw the upstream's body byte for byte with no gap.
pub fn assert_whole(line: &serde_json::Value, params: &Params) {
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );
    assert!(line["plugvisor"]["partial"].is_null(), "{line}");
    assert_eq!(
        line["usage"]["completion_tokens"], params.chunks as f64,
        "{line}"
    );
    assert_eq!(
        line["test_order"]["sha256"],
        hex::encode(Sha256::digest(params.body())),
        "{line}"
    );
    assert_eq!(line["test_order"]["gaps"], 0.0, "{line}");
}
