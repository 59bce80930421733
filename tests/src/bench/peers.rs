//! Measurement 8 (`--peers`): a proxy users pick instead, side by side. LiteLLM's proxy
//! (`litellm[proxy]` from PyPI, in a virtualenv the harness makes under `target/bench-peers/`),
//! configured with the stamped upstream as an OpenAI-compatible model, beside Envoy + plugvisor
//! with the embedded default config over its TCP listener and over a Unix socket, and the
//! upstream fetched directly. LiteLLM re-encodes every event, so the client reads the stamp the
//! upstream also puts in each event's content, and the request's parameters travel in the prompt.
//! Per-chunk latency at concurrency 1 and 16, in interleaved rounds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::envoy::stop_child;
use super::procfs;
use super::sse::{self, Ask, Ends};
use super::stats::{summarize, Summary};
use super::streaming;

/// The requirement the virtualenv is made from, pinned so that reruns compare the same proxy.
pub const REQUIREMENT: &str = "litellm[proxy]==1.108.7";

/// One configuration's figures in one phase.
#[derive(Debug, Clone)]
pub struct PeerRow {
    /// Short key.
    pub key: &'static str,
    /// What it is.
    pub label: String,
    /// Per-chunk latency, µs.
    pub chunk: Summary,
    /// Streams completed.
    pub streams: u64,
    /// Streams that failed or came back short, and the first reason.
    pub errors: (u64, String),
}

/// One load.
#[derive(Debug, Clone)]
pub struct PeerPhase {
    /// Streams at once.
    pub concurrency: usize,
    /// Rounds.
    pub rounds: usize,
    /// Rows in the order of [`Peers::keys`].
    pub rows: Vec<PeerRow>,
}

/// What measurement 8 found.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    /// LiteLLM's version, if it ran.
    pub litellm_version: Option<String>,
    /// What was tried and what failed, when LiteLLM could not be installed or run.
    pub litellm_problem: Option<String>,
    /// What each stream asked for.
    pub ask: Option<Ask>,
    /// One per concurrency.
    pub phases: Vec<PeerPhase>,
}

/// The virtualenv's directory.
pub fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-peers/litellm-venv")
}

fn run_logged(cmd: &mut Command, log: &Path, limit: Duration) -> Result<(), String> {
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            if status.success() {
                return Ok(());
            }
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(format!(
                "{cmd:?} failed with {status}: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ));
        }
        if start.elapsed() > limit {
            stop_child(&mut child);
            return Err(format!("{cmd:?} did not finish within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Makes the virtualenv and installs LiteLLM's proxy into it, unless it is there already;
/// returns its `litellm` executable and version.
pub fn install(log_dir: &Path) -> Result<(PathBuf, String), String> {
    let venv = venv_dir();
    let litellm = venv.join("bin/litellm");
    let python = venv.join("bin/python");
    if !litellm.exists() {
        eprintln!(
            "bench: 8. installing {REQUIREMENT} into {} (minutes, once)",
            venv.display()
        );
        std::fs::create_dir_all(venv.parent().expect("parent")).map_err(|e| e.to_string())?;
        run_logged(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            &log_dir.join("venv.log"),
            Duration::from_secs(120),
        )
        .map_err(|e| format!("making the virtualenv: {e}"))?;
        run_logged(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet"])
                .arg(REQUIREMENT),
            &log_dir.join("pip.log"),
            Duration::from_secs(900),
        )
        .map_err(|e| format!("pip install {REQUIREMENT}: {e}"))?;
    }
    let out = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ])
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if version.is_empty() {
        return Err(format!(
            "litellm is not importable in {}: {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((litellm, version))
}

/// A running LiteLLM proxy; stopped by pid (its children too) when dropped.
pub struct LiteLlm {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl LiteLlm {
    /// Starts `litellm` on a free port with the stamped upstream as model `bench` and waits (up to
    /// two minutes: it imports a lot) until it answers its liveness probe.
    pub fn start(litellm: &Path, dir: &Path, upstream: u16) -> Result<LiteLlm, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let port = crate::free_port();
        let config = dir.join("litellm.yaml");
        std::fs::write(
            &config,
            format!(
                "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      api_base: http://127.0.0.1:{upstream}/v1\n      api_key: bench\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let log_path = dir.join("litellm.log");
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let child = Command::new(litellm)
            .arg("--config")
            .arg(&config)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--num_workers", "1"])
            // A master key, as in production (LiteLLM refuses to start without one).
            .env("LITELLM_MASTER_KEY", sse::BENCH_KEY)
            .env("LITELLM_LOG", "ERROR")
            .env("LITELLM_TELEMETRY", "False")
            .env("LITELLM_MODE", "PRODUCTION")
            .env("NO_DOCS", "True")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", litellm.display()))?;
        let mut proxy = LiteLlm { child, port };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!(
                    "litellm exited with {status}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                ));
            }
            if crate::envoy::http_get(port, "/health/liveliness").is_ok_and(|b| b.contains("alive"))
            {
                return Ok(proxy);
            }
            if start.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "litellm did not answer /health/liveliness within 120 s (log: {})",
                    log_path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        let kids = procfs::children(self.child.id());
        stop_child(&mut self.child);
        for k in kids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(k as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(90_000_000);

#[derive(Default)]
struct Acc {
    chunk_us: Vec<f64>,
    streams: u64,
    errors: u64,
    first_error: String,
}

async fn slot(port: u16, ask: Ask, concurrency: usize, ends: &Ends, acc: &mut Acc) {
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let ends = ends.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(120), sse::stream(port, ask, id, &ends))
                    .await
            })
        })
        .collect();
    for t in tasks {
        match t.await {
            Ok(Ok(Ok(r))) if r.status == 200 && r.events as u64 == ask.events => {
                acc.chunk_us.extend_from_slice(&r.chunk_us);
                acc.streams += 1;
            }
            other => {
                acc.errors += 1;
                if acc.first_error.is_empty() {
                    acc.first_error = match other {
                        Ok(Ok(Ok(r))) => format!("status {}, {} events", r.status, r.events),
                        Ok(Ok(Err(e))) => e,
                        Ok(Err(_)) => "no end within 120 s".into(),
                        Err(e) => e.to_string(),
                    };
                }
            }
        }
    }
}

/// Runs measurement 8: `rounds` interleaved rounds at concurrency 1 and 16.
pub async fn run(dir: &Path, upstream: u16, ends: &Ends, rounds: usize) -> Peers {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let ask = Ask {
        events: 200,
        size: 64,
        delay: Duration::from_millis(10),
    };
    let mut peers = Peers {
        ask: Some(ask),
        ..Peers::default()
    };
    let litellm = tokio::task::block_in_place(|| {
        install(dir).and_then(|(exe, version)| {
            LiteLlm::start(&exe, &dir.join("litellm"), upstream).map(|p| (p, version))
        })
    });
    let litellm = match litellm {
        Ok((proxy, version)) => {
            peers.litellm_version = Some(version);
            Some(proxy)
        }
        Err(e) => {
            eprintln!("bench: 8. LiteLLM not measured: {e}");
            peers.litellm_problem = Some(e);
            None
        }
    };
    let targets = tokio::task::block_in_place(|| {
        vec![
            streaming::default_target(
                dir,
                "c",
                "Envoy + plugvisor, default config, Unix socket",
                true,
                upstream,
            ),
            streaming::default_target(
                dir,
                "c-tcp",
                "Envoy + plugvisor, default config, TCP 127.0.0.1",
                false,
                upstream,
            ),
        ]
    });
    let mut ports: Vec<(&'static str, String, u16)> =
        vec![("direct", "the upstream fetched directly".into(), upstream)];
    for t in &targets {
        ports.push((t.key, t.label.to_owned(), t.envoy.port));
    }
    if let (Some(p), Some(v)) = (&litellm, &peers.litellm_version) {
        ports.push(("litellm", format!("LiteLLM proxy {v}"), p.port));
    }
    // Warm-up: connections, Python's imports on the first request.
    for (_, _, port) in &ports {
        let mut acc = Acc::default();
        let warm = Ask {
            events: 20,
            size: 64,
            delay: Duration::ZERO,
        };
        slot(*port, warm, 2, ends, &mut acc).await;
    }
    for concurrency in [1, 16] {
        let mut accs: Vec<Acc> = ports.iter().map(|_| Acc::default()).collect();
        for round in 0..rounds {
            for k in 0..ports.len() {
                let i = (k + round) % ports.len();
                slot(ports[i].2, ask, concurrency, ends, &mut accs[i]).await;
            }
            eprintln!(
                "bench:   peers, concurrency {concurrency} round {}/{rounds} done",
                round + 1
            );
        }
        peers.phases.push(PeerPhase {
            concurrency,
            rounds,
            rows: ports
                .iter()
                .zip(accs)
                .map(|((key, label, _), mut a)| PeerRow {
                    key,
                    label: label.clone(),
                    chunk: summarize(&mut a.chunk_us),
                    streams: a.streams,
                    errors: (a.errors, a.first_error),
                })
                .collect(),
        });
    }
    drop(targets);
    drop(litellm);
    peers
}
