//! Measurement 5, the data path's seams: when the last bytes of a response reach the client if a
//! plugin never answers its final (HTTP/2 upstream whose last DATA frame carries tokens, so the
//! end-of-stream message has content), and what an idle ext_proc stream costs the front.

use std::time::Duration;

use super::stats::{summarize, Summary};
use crate::envoy::{Envoy, EnvoyOptions};
use crate::fake_plugin::{Behaviour, FakePlugin};
use crate::front::FrontProcess;
use crate::upstream::{Params, Upstream};

/// The last-bytes measurement.
pub struct LastBytes {
    /// Requests per configuration.
    pub requests: usize,
    /// The hanging plugin's `final_timeout_ms`.
    pub final_timeout_ms: u64,
    /// Time to the last body byte, no plugins, µs.
    pub plain_last: Summary,
    /// Time to the last body byte, a plugin that never answers its final, µs.
    pub hang_last: Summary,
    /// Time to the end of the response, no plugins, µs.
    pub plain_end: Summary,
    /// Time to the end of the response with the hanging plugin, µs.
    pub hang_end: Summary,
}

/// `requests` sequential streams of 20 events every 5 ms through each of two fronts (no plugins;
/// one plugin that never answers its final), interleaved.
pub async fn last_bytes(dir: &std::path::Path, requests: usize) -> LastBytes {
    const FINAL_TIMEOUT_MS: u64 = 500;
    let upstream = Upstream::start_h2().await;
    let start = |name: &str, plugins: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("dir");
        let front = FrontProcess::start(&d, plugins, &[]);
        let envoy = Envoy::start(
            &d,
            &EnvoyOptions {
                ext_proc: front.ext_proc.clone(),
                upstream_port: upstream.port,
                upstream_h2: true,
                ..EnvoyOptions::default()
            },
        );
        (front, envoy)
    };
    let (plain_front, plain) = tokio::task::block_in_place(|| start("plain", ""));
    let (hang_front, hang) = tokio::task::block_in_place(|| {
        start(
            "hang",
            &format!("[plugins.hang]\nspawn = false\nfinal_timeout_ms = {FINAL_TIMEOUT_MS}\n"),
        )
    });
    let _fake = FakePlugin::welcome(
        &hang_front.runtime_dir.join("plugins/hang.sock"),
        "hang",
        Behaviour {
            hang_finals: true,
            ..Behaviour::default()
        },
    )
    .await;
    let params = Params {
        chunks: 20,
        size: 64,
        delay: Duration::from_millis(5),
        ..Params::default()
    };
    let mut samples = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for i in 0..requests {
        for (which, envoy) in [(0, &plain), (1, &hang)] {
            let got = crate::client::chat(envoy.port, &params, &format!("last-{which}-{i}")).await;
            if got.error.is_some() || got.body() != params.body() {
                continue;
            }
            let last = got.chunks.last().map_or(Duration::ZERO, |c| c.0);
            samples[which].push(last.as_secs_f64() * 1e6);
            samples[2 + which].push(got.total.as_secs_f64() * 1e6);
        }
    }
    drop((plain, hang, plain_front, hang_front));
    let [mut pl, mut hl, mut pe, mut he] = samples;
    LastBytes {
        requests,
        final_timeout_ms: FINAL_TIMEOUT_MS,
        plain_last: summarize(&mut pl),
        hang_last: summarize(&mut hl),
        plain_end: summarize(&mut pe),
        hang_end: summarize(&mut he),
    }
}

/// The idle-stream measurement.
pub struct IdleCost {
    /// Streams opened.
    pub streams: usize,
    /// Front RSS before, KiB.
    pub before_kib: u64,
    /// Front RSS with the streams open, KiB.
    pub after_kib: u64,
}

impl IdleCost {
    /// Bytes per idle stream.
    pub fn per_stream(&self) -> u64 {
        self.after_kib.saturating_sub(self.before_kib) * 1024 / self.streams.max(1) as u64
    }
}

/// Opens 10,000 idle streams (10 connections) to a front running the default plugins.
pub async fn idle_cost(dir: &std::path::Path) -> IdleCost {
    let d = dir.join("idle");
    std::fs::create_dir_all(&d).expect("dir");
    let front = tokio::task::block_in_place(|| {
        FrontProcess::start(
            &d,
            "[plugins.usage]\n[plugins.latency]\n",
            &["usage", "latency"],
        )
    });
    let before_kib = crate::idle::rss_kib(front.pid());
    let streams = crate::idle::open(&front.ext_proc, 10, 1000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_kib = crate::idle::rss_kib(front.pid());
    IdleCost {
        streams: streams.len(),
        before_kib,
        after_kib,
    }
}
