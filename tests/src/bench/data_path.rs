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

/// A front running the embedded default config on a Unix socket, in `dir/<name>`; with
/// `replay_off`, every plugin has `replay_bytes = 0`.
fn default_front(dir: &std::path::Path, name: &str, replay_off: bool) -> FrontProcess {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("dir");
    let mut cfg = super::default_config::render(
        &FrontProcess::runtime_dir_in(&d),
        Some(&d.join("ext_proc.sock")),
    );
    if replay_off {
        cfg.text = super::journal::replay_off(&cfg.plugins, &cfg.text);
    }
    let expect: Vec<&str> = cfg.plugins.iter().map(String::as_str).collect();
    tokio::task::block_in_place(|| {
        FrontProcess::start_config(&d, &cfg.text, &cfg.listen, cfg.admin_port, &expect)
    })
}

/// Opens `streams` idle streams (over 10 connections) to a front running the embedded default
/// config.
pub async fn idle_cost(dir: &std::path::Path, streams: usize) -> IdleCost {
    let front = default_front(dir, "idle", false);
    let before_kib = crate::idle::rss_kib(front.pid());
    let open = crate::idle::open(&front.ext_proc, 10, streams / 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_kib = crate::idle::rss_kib(front.pid());
    IdleCost {
        streams: open.len(),
        before_kib,
        after_kib,
    }
}

/// The in-flight-stream measurement: streams in the middle of a response.
#[derive(Debug, Clone)]
pub struct InFlightCost {
    /// Streams opened.
    pub streams: usize,
    /// Body messages each stream sent (and got answered) before it went quiet.
    pub chunks: usize,
    /// Bytes per body message.
    pub size: usize,
    /// The plugins of the default config (each journals every event of the stream).
    pub plugins: usize,
    /// Front RSS before, KiB.
    pub before_kib: u64,
    /// Front RSS with the streams open, KiB.
    pub after_kib: u64,
    /// `plugvisor_plugin_events_sent_total`, summed over the plugins, while they were opened:
    /// the events really handed on (and journaled).
    pub events_sent: f64,
}

impl InFlightCost {
    /// Bytes per in-flight stream.
    pub fn per_stream(&self) -> u64 {
        self.after_kib.saturating_sub(self.before_kib) * 1024 / self.streams.max(1) as u64
    }
}

/// Opens `streams` streams (over 10 connections) to a front running the embedded default config
/// (`replay_off`: with `replay_bytes = 0`), each with its response headers and `chunks` body
/// messages of `size` bytes sent, and holds them open: what a stream costs while its response
/// streams (the journal included).
pub async fn in_flight_cost(
    dir: &std::path::Path,
    streams: usize,
    chunks: usize,
    size: usize,
    replay_off: bool,
) -> InFlightCost {
    let name = if replay_off {
        "in-flight-replay-off"
    } else {
        "in-flight"
    };
    let front = default_front(dir, name, replay_off);
    let plugins = super::default_config::render(dir, None).plugins;
    let sent = |m: &str| -> f64 {
        plugins
            .iter()
            .map(|p| {
                super::counted(
                    m,
                    &format!("plugvisor_plugin_events_sent_total{{plugin=\"{p}\"}}"),
                )
            })
            .sum()
    };
    let sent0 = sent(&front.metrics());
    let before_kib = crate::idle::rss_kib(front.pid());
    let open = crate::idle::open_in_flight(&front.ext_proc, 10, streams / 10, chunks, size).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_kib = crate::idle::rss_kib(front.pid());
    let events_sent = sent(&front.metrics()) - sent0;
    InFlightCost {
        streams: open.len(),
        chunks,
        size,
        plugins: plugins.len(),
        before_kib,
        after_kib,
        events_sent,
    }
}
