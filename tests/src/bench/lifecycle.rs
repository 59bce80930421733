//! Measurement 6: a plugin's and the front's lifecycle under load, as one picture over time.
//!
//! A `plugvisor` process with the embedded default config (on a Unix socket) behind its own Envoy
//! serves a steady load: `concurrency` streams at all times, each a new request as soon as the
//! last ended. At fixed times the [`Action`]s of [`schedule`] happen to it: a SIGKILL of a
//! plugin's process, a reload (SIGHUP) that changes what that plugin's process is started with,
//! and a front upgrade (`plugvisor upgrade`). Every chunk's one-way latency is kept with the time
//! it arrived, every request's time to its first byte with the time it started, and every
//! stream's metadata (Envoy's access log: `plugvisor.missing`/`partial`, the plugins'
//! namespaces) is judged whole or not, with the time the stream ended.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::envoy::BenchEnvoy;
use super::procfs;
use super::sse::{self, Ask, Ends};
use crate::front::FrontProcess;

/// Something that happens to the running front during the load.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// SIGKILL the plugin's process; the supervisor restarts it and replays its journal.
    Sigkill(&'static str),
    /// Rewrite the config so that the plugin's process key changes (an `env` entry), then
    /// SIGHUP: the plugin is restarted by handover.
    ReloadProcessKey(&'static str),
    /// `plugvisor upgrade`: the front hands its listeners to a new front started from the same
    /// binary and drains its own streams.
    Upgrade,
}

impl Action {
    /// How the picture and the table name it.
    pub fn label(&self) -> String {
        match self {
            Action::Sigkill(p) => format!("SIGKILL {p}"),
            Action::ReloadProcessKey(p) => format!("reload ({p} env changed)"),
            Action::Upgrade => "front upgrade".into(),
        }
    }

    /// Carries the action out; an upgrade returns the new front's pid.
    fn run(&self, front: &FrontProcess, generation: usize) -> Result<Option<u32>, String> {
        match self {
            Action::Sigkill(p) => {
                let pid = procfs::child_with_arg(front.pid(), p)
                    .ok_or_else(|| format!("no process of plugin {p}"))?;
                kill(Pid::from_raw(pid as i32), Signal::SIGKILL).map_err(|e| e.to_string())?;
                Ok(None)
            }
            Action::Upgrade => {
                let out = std::process::Command::new(crate::bins::plugvisor())
                    .arg("upgrade")
                    .arg("--control")
                    .arg(front.control_socket())
                    .output()
                    .map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if !out.status.success() {
                    return Err(format!("{}{}", text, String::from_utf8_lossy(&out.stderr)));
                }
                // `upgraded: pid N serves; ...`
                text.split("pid ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
                    .map(Some)
                    .ok_or_else(|| format!("no new pid in `{text}`"))
            }
            Action::ReloadProcessKey(p) => {
                let path = front.config_path();
                let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
                let table = format!("[plugins.{p}]\n");
                if !text.contains(&table) {
                    return Err(format!("the config has no {table}"));
                }
                let text = text.replacen(
                    &table,
                    &format!("{table}env = {{ PLUGVISOR_BENCH_RELOAD = \"{generation}\" }}\n"),
                    1,
                );
                std::fs::write(path, text).map_err(|e| e.to_string())?;
                kill(Pid::from_raw(front.pid() as i32), Signal::SIGHUP)
                    .map_err(|e| e.to_string())?;
                Ok(None)
            }
        }
    }
}

/// The actions, in order; [`run`] spreads them evenly over the load (the k-th of n at
/// k/(n+1) of it). `plugin` is the default config's first (the one with the billing data). The
/// upgrade comes last: the plugin actions act on the front this harness started.
pub fn schedule(plugin: &'static str) -> Vec<Action> {
    vec![
        Action::Sigkill(plugin),
        Action::ReloadProcessKey(plugin),
        Action::Upgrade,
    ]
}

/// One stream's outcome.
#[derive(Debug, Clone)]
pub struct StreamMark {
    /// When it ended, s since the load started.
    pub end_s: f64,
    /// Its metadata was whole.
    pub whole: bool,
    /// If not, why (the front's `plugvisor` namespace, or what was absent).
    pub why: String,
}

/// What measurement 6 found.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Streams at once.
    pub concurrency: usize,
    /// What each stream asked for.
    pub ask: Option<Ask>,
    /// The load's length, s.
    pub seconds: f64,
    /// The plugins of the config.
    pub plugins: Vec<String>,
    /// (arrival, s since start; one-way latency, µs) of every chunk.
    pub chunks: Vec<(f64, f64)>,
    /// Every stream that ended.
    pub streams: Vec<StreamMark>,
    /// (start, s since the load started; time to the first byte, ms) of every stream that
    /// delivered one.
    pub ttfb: Vec<(f64, f64)>,
    /// Streams that failed at the client (status, short body, timeout).
    pub failed: Vec<(f64, String)>,
    /// (label, s since start, error if the action failed) of every action.
    pub events: Vec<(String, f64, Option<String>)>,
    /// The front's restart and replay counters for the plugin at the end, or just before the
    /// upgrade (a new front starts them over): proof the plugin actions took effect.
    pub counters: Vec<(String, f64)>,
}

/// Runs measurement 6 for `seconds` with `concurrency` streams.
pub async fn run(
    dir: &Path,
    upstream: u16,
    ends: &Ends,
    seconds: f64,
    concurrency: usize,
    ask: Ask,
) -> Timeline {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let cfg = super::default_config::render(
        &FrontProcess::runtime_dir_in(dir),
        Some(&dir.join("ext_proc.sock")),
    );
    let expect: Vec<&str> = cfg.plugins.iter().map(String::as_str).collect();
    let (front, envoy) = tokio::task::block_in_place(|| {
        let front =
            FrontProcess::start_config(dir, &cfg.text, &cfg.listen, cfg.admin_port, &expect);
        let envoy = BenchEnvoy::start_at(&dir.join("envoy"), Some(&cfg.listen), upstream, &[]);
        (front, envoy)
    });
    let plugin: &'static str = Box::leak(cfg.plugins[0].clone().into_boxed_str());
    let t0 = Instant::now();
    let t0_ns = sse::now_ns();
    let stop = Arc::new(AtomicBool::new(false));
    static NEXT: AtomicU64 = AtomicU64::new(50_000_000);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (stop, ends, port) = (stop.clone(), ends.clone(), envoy.port);
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let id = NEXT.fetch_add(1, Ordering::Relaxed);
                let started = t0.elapsed().as_secs_f64();
                let r = tokio::time::timeout(
                    Duration::from_secs(30),
                    sse::stream(port, ask, id, &ends),
                )
                .await;
                out.push((id, started, t0.elapsed().as_secs_f64(), r));
            }
            out
        }));
    }
    let mut events = Vec::new();
    let mut counters = None;
    let mut new_fronts = Vec::new();
    let actions = schedule(plugin);
    let n = actions.len();
    for (generation, action) in actions.into_iter().enumerate() {
        let at = (generation + 1) as f64 / (n + 1) as f64;
        let when = Duration::from_secs_f64(seconds * at);
        tokio::time::sleep(when.saturating_sub(t0.elapsed())).await;
        if matches!(action, Action::Upgrade) {
            counters = Some(plugin_counters(&front, plugin));
        }
        let s = t0.elapsed().as_secs_f64();
        let err = match tokio::task::block_in_place(|| action.run(&front, generation + 1)) {
            Ok(pid) => {
                new_fronts.extend(pid);
                None
            }
            Err(e) => Some(e),
        };
        eprintln!("bench: 6. {} at {s:.2} s", action.label());
        events.push((action.label(), s, err));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds).saturating_sub(t0.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    let mut done = Vec::new();
    for w in workers {
        done.extend(w.await.expect("load worker"));
    }
    // The access log is flushed every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = std::fs::read_to_string(dir.join("envoy/access.log")).unwrap_or_default();
    let lines: std::collections::HashMap<u64, serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let id = v["path"]
                .as_str()?
                .split("bench-id=")
                .nth(1)?
                .parse()
                .ok()?;
            Some((id, v))
        })
        .collect();
    let counters = counters.unwrap_or_else(|| plugin_counters(&front, plugin));
    let mut t = Timeline {
        counters,
        concurrency,
        ask: Some(ask),
        seconds,
        plugins: cfg.plugins.clone(),
        events,
        ..Timeline::default()
    };
    for (id, started, ended, r) in done {
        match r {
            Ok(Ok(r)) if r.status == 200 && r.events as u64 == ask.events => {
                if let Some(first) = r.chunk_at.first() {
                    let at = first.saturating_sub(t0_ns) as f64 / 1e9;
                    t.ttfb.push((started, (at - started) * 1e3));
                }
                for (at, us) in r.chunk_at.iter().zip(&r.chunk_us) {
                    t.chunks.push((at.saturating_sub(t0_ns) as f64 / 1e9, *us));
                }
                let (whole, why) = judge(lines.get(&id), &cfg.plugins, ask.events);
                t.streams.push(StreamMark {
                    end_s: ended,
                    whole,
                    why,
                });
            }
            Ok(Ok(r)) => t.failed.push((
                ended,
                format!("status {} with {} events", r.status, r.events),
            )),
            Ok(Err(e)) => t.failed.push((ended, e)),
            Err(_) => t.failed.push((ended, "no end within 30 s".into())),
        }
    }
    t.streams.sort_by(|a, b| a.end_s.total_cmp(&b.end_s));
    t.chunks.sort_by(|a, b| a.0.total_cmp(&b.0));
    t.ttfb.sort_by(|a, b| a.0.total_cmp(&b.0));
    drop(envoy);
    // The fronts an upgrade started are not this process's children: stopped by pid.
    for pid in new_fronts {
        stop_pid(pid);
    }
    drop(front);
    t
}

/// SIGTERM to `pid`, SIGKILL if it is still there after 10 s.
fn stop_pid(pid: u32) {
    let pid = Pid::from_raw(pid as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while kill(pid, None).is_ok() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// The front's restart, replay and missing-final counters for `plugin`.
fn plugin_counters(front: &FrontProcess, plugin: &str) -> Vec<(String, f64)> {
    let m = front.metrics();
    [
        "plugvisor_plugin_restarts_total",
        "plugvisor_plugin_events_replayed_total",
        "plugvisor_plugin_finals_missing_total",
    ]
    .iter()
    .map(|name| {
        let prefix = format!("{name}{{plugin=\"{plugin}\"");
        let v = m
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            + 0.0; // an empty sum is -0
        (format!("{name}{{plugin=\"{plugin}\"}}"), v)
    })
    .collect()
}

/// Whether a stream's access-log line shows whole metadata: the front lists no plugin as missing
/// or partial, every plugin's namespace is there, and usage (if it runs) counted every event.
fn judge(line: Option<&serde_json::Value>, plugins: &[String], events: u64) -> (bool, String) {
    let Some(line) = line else {
        return (false, "no access-log line".into());
    };
    let front = &line["plugvisor"];
    let missing = front["missing"].as_array().map_or(0, Vec::len);
    if front.is_null() || missing > 0 || !front["partial"].is_null() {
        return (false, front.to_string());
    }
    for p in plugins {
        // The access log has a field per namespace of examples/envoy.yaml.
        let field = p.replace('-', "_");
        if line.get(&field).is_some_and(serde_json::Value::is_null) {
            return (false, format!("no {p} metadata"));
        }
    }
    if plugins.iter().any(|p| p == "usage")
        && line["usage"]["completion_tokens"].as_f64() != Some(events as f64)
    {
        return (
            false,
            format!("usage counted {}", line["usage"]["completion_tokens"]),
        );
    }
    (true, String::new())
}

/// One interval of the timeline between two actions.
#[derive(Debug, Clone)]
pub struct Interval {
    /// Its name (`before SIGKILL usage`, `after …`).
    pub name: String,
    /// Streams that ended in it.
    pub streams: usize,
    /// Of those, with whole metadata.
    pub whole: usize,
    /// The reasons of the others (up to three, deduplicated).
    pub why: Vec<String>,
    /// Chunk latency p50, p99 and max in it, µs.
    pub chunk: super::stats::Summary,
}

impl Timeline {
    /// Time to first byte (ms) of the requests that started before the first action, and of
    /// those that started within `window` s after the action labelled `label`.
    pub fn ttfb_around(&self, label: &str, window: f64) -> Option<(Vec<f64>, Vec<f64>)> {
        let first = self.events.first()?.1;
        let at = self.events.iter().find(|e| e.0 == label)?.1;
        let steady = self
            .ttfb
            .iter()
            .filter(|t| t.0 < first)
            .map(|t| t.1)
            .collect();
        let during = self
            .ttfb
            .iter()
            .filter(|t| t.0 >= at && t.0 < at + window)
            .map(|t| t.1)
            .collect();
        Some((steady, during))
    }

    /// The run cut at each action.
    pub fn intervals(&self) -> Vec<Interval> {
        let mut cuts = vec![(String::from("before any event"), 0.0)];
        for (label, at, _) in &self.events {
            cuts.push((format!("after {label}"), *at));
        }
        let mut out = Vec::new();
        for (i, (name, from)) in cuts.iter().enumerate() {
            let to = cuts.get(i + 1).map_or(f64::INFINITY, |c| c.1);
            let inside = |t: f64| t >= *from && t < to;
            let ended: Vec<&StreamMark> = self.streams.iter().filter(|s| inside(s.end_s)).collect();
            let mut why: Vec<String> = Vec::new();
            for s in ended.iter().filter(|s| !s.whole) {
                if why.len() < 3 && !why.contains(&s.why) {
                    why.push(s.why.clone());
                }
            }
            let mut lat: Vec<f64> = self
                .chunks
                .iter()
                .filter(|c| inside(c.0))
                .map(|c| c.1)
                .collect();
            out.push(Interval {
                name: name.clone(),
                streams: ended.len(),
                whole: ended.iter().filter(|s| s.whole).count(),
                why,
                chunk: super::stats::summarize(&mut lat),
            });
        }
        out
    }
}
