//! Measurement 1: streams through real Envoy, every configuration side by side.
//!
//! Each configuration has its own Envoy (same flags) in front of the one stamped upstream, and its
//! ext_proc server as a process of its own, so its CPU time is read from /proc. The rounds are
//! interleaved: round r runs every configuration once, starting at a different one each round,
//! so a burst of noise on this shared machine spreads over all of them instead of one.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::default_config;
use super::envoy::{stop_child, BenchEnvoy};
use super::procfs;
use super::sse::{self, Ask, Ends};
use super::stats::{bucket_delta, parse_buckets};
use crate::envoy::http_get;
use crate::front::FrontProcess;

/// One configuration under test.
pub struct Target {
    /// Short key: `a`, `n`, `ref`, `b`, `c`, `c-tcp`, `c-1w`, `py`, `d`, `d-idle`, `e`.
    pub key: &'static str,
    /// What it is.
    pub label: &'static str,
    /// Its Envoy.
    pub envoy: BenchEnvoy,
    /// The ext_proc server's pid (none for `a`).
    pub server_pid: Option<u32>,
    /// The front's admin port (plugvisor configurations only).
    pub admin_port: Option<u16>,
    /// The front's plugin processes' pids.
    pub plugin_pids: Vec<u32>,
    _front: Option<FrontProcess>,
    _echo: Option<EchoProcess>,
}

/// The echo reference server, as a process (this binary with `--echo-server`).
pub struct EchoProcess(Child);

impl EchoProcess {
    /// Starts it on `sock` and waits for the socket.
    pub fn start(sock: &Path) -> EchoProcess {
        let child = Command::new(std::env::current_exe().expect("current_exe"))
            .arg("--echo-server")
            .arg(sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("start echo server");
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "echo server not listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        EchoProcess(child)
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        stop_child(&mut self.0);
    }
}

fn spin_toml(dir: &Path, inline: bool, idle: bool) -> String {
    (1..=3)
        .map(|i| {
            let sock = dir.join(format!("run/plugins/spin{i}.sock"));
            let args = format!(
                "\"test-spin\", \"--as\", \"spin{i}\", \"--connect\", \"{}\"",
                sock.display()
            );
            let command = if idle {
                // The same plugin under SCHED_IDLE, so it never preempts Envoy or the front.
                format!("args = [{args}]\ncpu_scheduling = \"idle\"\n")
            } else {
                format!("args = [{args}]\n")
            };
            format!(
                "[plugins.spin{i}]\n{command}{}[plugins.spin{i}.config]\nspin_us = 1000\n\n",
                if inline {
                    "dispatch = \"inline\"\n"
                } else {
                    ""
                }
            )
        })
        .collect()
}

const NAMESPACES: &[&str] = &["plugvisor.spin1", "plugvisor.spin2", "plugvisor.spin3"];

fn front_target(
    root: &Path,
    key: &'static str,
    label: &'static str,
    plugins: &str,
    expect: &[&str],
    upstream: u16,
) -> Target {
    let listen = format!("unix:{}", root.join(key).join("ext_proc.sock").display());
    front_target_at(root, key, label, &listen, plugins, expect, upstream)
}

fn front_target_at(
    root: &Path,
    key: &'static str,
    label: &'static str,
    listen: &str,
    plugins: &str,
    expect: &[&str],
    upstream: u16,
) -> Target {
    let dir = root.join(key);
    std::fs::create_dir_all(&dir).expect("dir");
    let plugins = plugins.replace("<DIR>", &dir.display().to_string());
    let front = FrontProcess::start_listening(&dir, listen, &plugins, expect);
    started_target(key, label, &dir, front, listen, upstream)
}

/// The [`Target`] of a started front: its own Envoy in `dir/envoy`, sending to `listen`.
fn started_target(
    key: &'static str,
    label: &'static str,
    dir: &Path,
    front: FrontProcess,
    listen: &str,
    upstream: u16,
) -> Target {
    let envoy = BenchEnvoy::start_at(&dir.join("envoy"), Some(listen), upstream, NAMESPACES);
    let pid = front.pid();
    Target {
        key,
        label,
        envoy,
        server_pid: Some(pid),
        admin_port: Some(front.admin_port),
        plugin_pids: procfs::children(pid),
        _front: Some(front),
        _echo: None,
    }
}

/// A front running the embedded default config ([`default_config::render`]), on its TCP
/// listener or (`unix`) on a Unix socket, behind its own Envoy.
pub fn default_target(
    root: &Path,
    key: &'static str,
    label: &'static str,
    unix: bool,
    upstream: u16,
) -> Target {
    default_target_with(root, key, label, unix, upstream, |_, text| text.to_owned())
}

/// [`default_target`] with the config text passed through `edit(plugins, text)` first.
pub fn default_target_with(
    root: &Path,
    key: &'static str,
    label: &'static str,
    unix: bool,
    upstream: u16,
    edit: impl Fn(&[String], &str) -> String,
) -> Target {
    let dir = root.join(key);
    std::fs::create_dir_all(&dir).expect("dir");
    let sock = dir.join("ext_proc.sock");
    let cfg = default_config::render(
        &FrontProcess::runtime_dir_in(&dir),
        unix.then_some(sock.as_path()),
    );
    let text = edit(&cfg.plugins, &cfg.text);
    let expect: Vec<&str> = cfg.plugins.iter().map(String::as_str).collect();
    let front = FrontProcess::start_config(&dir, &text, &cfg.listen, cfg.admin_port, &expect);
    started_target(key, label, &dir, front, &cfg.listen, upstream)
}

/// Measurement 1's configurations, by key, in the order they run and are reported.
pub const KEYS: [&str; 11] = [
    "a", "n", "ref", "b", "c", "c-tcp", "c-1w", "py", "d", "d-idle", "e",
];

/// Starts the configurations of measurement 1 that `keep` keeps (by key, [`KEYS`]).
pub fn setup(root: &Path, upstream: u16, keep: impl Fn(&str) -> bool) -> Vec<Target> {
    let spins = ["spin1", "spin2", "spin3"];
    let mut out = Vec::new();
    for key in KEYS.into_iter().filter(|k| keep(k)) {
        out.push(match key {
            "a" => Target {
                key,
                label: "Envoy, no ext_proc (floor)",
                envoy: BenchEnvoy::start(&root.join("a"), None, upstream, &[]),
                server_pid: None,
                admin_port: None,
                plugin_pids: vec![],
                _front: None,
                _echo: None,
            },
            "n" => Target {
                key,
                label: "Envoy's own usage extraction (ai_protocol_manager, in-process), no \
                        ext_proc: the floor for usage alone",
                envoy: BenchEnvoy::start_native(&root.join("n"), upstream),
                server_pid: None,
                admin_port: None,
                plugin_pids: vec![],
                _front: None,
                _echo: None,
            },
            "ref" => {
                let sock = root.join("ref/echo.sock");
                std::fs::create_dir_all(root.join("ref")).expect("dir");
                let echo = EchoProcess::start(&sock);
                Target {
                    key,
                    label: "bare tonic echo ext_proc (reference)",
                    envoy: BenchEnvoy::start(&root.join("ref/envoy"), Some(&sock), upstream, &[]),
                    server_pid: Some(echo.0.id()),
                    admin_port: None,
                    plugin_pids: vec![],
                    _front: None,
                    _echo: Some(echo),
                }
            }
            "b" => front_target(root, key, "plugvisor, no plugins", "", &[], upstream),
            "c" => default_target(
                root,
                key,
                "plugvisor, the embedded default config on a Unix socket",
                true,
                upstream,
            ),
            "c-tcp" => default_target(
                root,
                key,
                "plugvisor, the embedded default config as users run it (TCP 127.0.0.1)",
                false,
                upstream,
            ),
            "c-1w" => default_target_with(
                root,
                key,
                "(c) with `workers = 1`: one runtime worker instead of one per CPU",
                true,
                upstream,
                |_, text| format!("workers = 1\n{text}"),
            ),
            "py" => {
                let python = crate::python::venv_with_sdk(&root.join("py-venv"));
                let wordcount = format!(
                    "[plugins.wordcount]\ncommand = \"{}\"\nargs = [\"{}\", \"--connect\", \"<DIR>/run/plugins/wordcount.sock\"]\n",
                    python.display(),
                    crate::python::repo()
                        .join("sdk/python/examples/wordcount.py")
                        .display()
                );
                front_target(
                    root,
                    key,
                    "plugvisor + the Python SDK's example plugin (sdk/python/examples/wordcount.py)",
                    &wordcount,
                    &["wordcount"],
                    upstream,
                )
            }
            "d" => front_target(
                root,
                key,
                "plugvisor + 3 x test-spin 1 ms, async",
                &spin_toml(&root.join("d"), false, false),
                &spins,
                upstream,
            ),
            "d-idle" => front_target(
                root,
                key,
                "plugvisor + 3 x test-spin 1 ms, async, plugins under SCHED_IDLE",
                &spin_toml(&root.join("d-idle"), false, true),
                &spins,
                upstream,
            ),
            "e" => front_target(
                root,
                key,
                "plugvisor + 3 x test-spin 1 ms, inline",
                &spin_toml(&root.join("e"), true, false),
                &spins,
                upstream,
            ),
            other => unreachable!("configuration `{other}` is in KEYS but not set up"),
        });
    }
    out
}

/// One load shape.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    /// Its name in the report.
    pub name: &'static str,
    /// What each stream asks for.
    pub ask: Ask,
    /// Streams at once.
    pub concurrency: usize,
    /// Interleaved rounds.
    pub rounds: usize,
}

/// What one configuration collected in one phase.
#[derive(Debug, Clone, Default)]
pub struct Acc {
    /// Per-chunk latency samples, µs.
    pub chunk_us: Vec<f64>,
    /// Time to last byte per stream, µs.
    pub ttlb_us: Vec<f64>,
    /// End-of-response latency per stream (upstream's last write → client's body end), µs.
    pub end_us: Vec<f64>,
    /// The ext_proc server's CPU seconds spent in this phase's slots.
    pub server_cpu_s: f64,
    /// The plugin processes' CPU seconds.
    pub plugin_cpu_s: f64,
    /// Content events received.
    pub events: u64,
    /// Streams completed.
    pub streams: u64,
    /// Streams that failed or came back short.
    pub errors: u64,
    /// Wall time of this configuration's slots.
    pub wall_s: f64,
    /// The front's `plugvisor_response_overhead_seconds{message="chunk"}` buckets observed in
    /// this phase (cumulative).
    pub overhead_chunk: Vec<(f64, f64)>,
    /// Same for `message="final"`.
    pub overhead_final: Vec<(f64, f64)>,
    /// Per interleaved round, the range of `chunk_us` its slot added.
    pub rounds: Vec<std::ops::Range<usize>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn slot(target: &Target, ask: Ask, concurrency: usize, ends: &Ends, acc: &mut Acc) {
    let cpu0 = target.server_pid.map_or(0.0, procfs::cpu_seconds);
    let pcpu0: f64 = target
        .plugin_pids
        .iter()
        .map(|p| procfs::cpu_seconds(*p))
        .sum();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let ends = ends.clone();
        let port = target.envoy.port;
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(120), sse::stream(port, ask, id, &ends)).await
        }));
    }
    for t in tasks {
        match t.await {
            Ok(Ok(Ok(r))) if r.status == 200 && r.events as u64 == ask.events => {
                acc.chunk_us.extend_from_slice(&r.chunk_us);
                acc.ttlb_us.push(r.ttlb_us);
                acc.end_us.push(r.end_us);
                acc.events += r.events as u64;
                acc.streams += 1;
            }
            other => {
                acc.errors += 1;
                if acc.errors <= 3 {
                    eprintln!("bench: stream through `{}` failed: {other:?}", target.key);
                }
            }
        }
    }
    acc.wall_s += started.elapsed().as_secs_f64();
    acc.server_cpu_s += target.server_pid.map_or(0.0, procfs::cpu_seconds) - cpu0;
    acc.plugin_cpu_s += target
        .plugin_pids
        .iter()
        .map(|p| procfs::cpu_seconds(*p))
        .sum::<f64>()
        - pcpu0;
}

fn overhead(target: &Target, message: &str) -> Vec<(f64, f64)> {
    target.admin_port.map_or_else(Vec::new, |port| {
        let text = http_get(port, "/metrics").unwrap_or_default();
        parse_buckets(
            &text,
            "plugvisor_response_overhead_seconds",
            &format!("message=\"{message}\""),
        )
    })
}

/// Runs `phase` over every target, interleaved; results in target order.
pub async fn run_phase(targets: &[Target], phase: Phase, ends: &Ends) -> Vec<Acc> {
    let mut accs = vec![Acc::default(); targets.len()];
    let before: Vec<_> = targets
        .iter()
        .map(|t| (overhead(t, "chunk"), overhead(t, "final")))
        .collect();
    for round in 0..phase.rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let start = accs[i].chunk_us.len();
            slot(
                &targets[i],
                phase.ask,
                phase.concurrency,
                ends,
                &mut accs[i],
            )
            .await;
            let end = accs[i].chunk_us.len();
            accs[i].rounds.push(start..end);
        }
        eprintln!(
            "bench:   {} round {}/{} done",
            phase.name,
            round + 1,
            phase.rounds
        );
    }
    for (i, t) in targets.iter().enumerate() {
        accs[i].overhead_chunk = bucket_delta(&before[i].0, &overhead(t, "chunk"));
        accs[i].overhead_final = bucket_delta(&before[i].1, &overhead(t, "final"));
    }
    accs
}

/// A few unmeasured streams through every target, so connections and allocators are warm.
pub async fn warm_up(targets: &[Target], ends: &Ends) {
    let ask = Ask {
        events: 20,
        size: 64,
        delay: Duration::ZERO,
    };
    for t in targets {
        let mut acc = Acc::default();
        slot(t, ask, 4, ends, &mut acc).await;
        assert!(
            acc.errors == 0,
            "warm-up through `{}` failed; see the logs under the run directory",
            t.key
        );
    }
}
