//! Measurement 2: the IPC limits, each against the raw Unix socket in the same run.
//!
//! - **Event throughput**: the front (in this process, `supervisor::start`) queues body chunks for
//!   one plugin through its own `PluginLink::send_event` (the call the ext_proc stream task makes),
//!   its writer task batches them onto the socket, and a reader thread decodes every frame with
//!   `ipc_protocol::FrameReader` as the plugin host does. The raw figure writes the very same
//!   encoded frames through a socketpair from one thread to another, in 256 KiB writes, and only
//!   counts bytes.
//! - **Final RPC**: three real `plugvisor-plugin test-spin --as spinN` processes (spin 0) answer
//!   the front's `PluginLink::final_call` concurrently, driven from one task of the runtime as
//!   the stream task drives them; against a raw ping-pong of a 64-byte message with a process
//!   that echoes it (one peer, and three at once). Both also with a pause before every round, so
//!   that every peer sleeps between rounds (*asleep*).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipc_protocol::{
    Chunk, Final, FrameReader, FrameWriter, FromPlugin, Hello, Subscriptions, ToPlugin,
    PROTOCOL_VERSION,
};

use super::envoy::stop_child;
use super::stats::{summarize, Summary};

/// Throughput of one chunk size.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Body bytes per event.
    pub size: usize,
    /// Events sent.
    pub events: u64,
    /// Front → plugin, events/s.
    pub front_eps: f64,
    /// Front → plugin, MB/s of body bytes.
    pub front_mbps: f64,
    /// Events the front had to drop (queue full) and sent again.
    pub retries: u64,
    /// Raw socket, events/s (same frames).
    pub raw_eps: f64,
    /// Raw socket, MB/s of body bytes.
    pub raw_mbps: f64,
}

/// Final RPC against ping-pong, µs.
#[derive(Debug, Clone, Copy)]
pub struct RoundTrips {
    /// Final RPC to three plugins.
    pub final3: Summary,
    /// Raw ping-pong, one peer.
    pub raw1: Summary,
    /// Raw ping-pong, three peers at once.
    pub raw3: Summary,
    /// The final RPC with its plugins asleep: one round every [`ASLEEP_PACE`], as at the end of a
    /// paced stream.
    pub final3_asleep: Summary,
    /// Raw ping-pong to three peers at once, one round every [`ASLEEP_PACE`].
    pub raw3_asleep: Summary,
}

/// The pause between the asleep rounds: the paced streams' 10 ms between tokens, long enough
/// for every peer to sleep and its CPU to go idle.
pub const ASLEEP_PACE: Duration = Duration::from_millis(10);

/// Unmeasured rounds first: back to back, or (asleep) a few.
fn warm_rounds(pace: Duration) -> usize {
    if pace.is_zero() {
        100
    } else {
        5
    }
}

fn config(dir: &Path, plugins: &str) -> supervisor::Config {
    let text = format!(
        "listen = \"unix:{}\"\nruntime_dir = \"{}\"\nconnect_timeout_ms = 20000\n\n{plugins}",
        dir.join("ext_proc.sock").display(),
        dir.join("run").display()
    );
    supervisor::Config::parse(&text, "bench").expect("bench config parses")
}

fn chunk(seq: u32, payload: &Bytes) -> ToPlugin {
    ToPlugin::Chunk(Chunk {
        stream_id: 1,
        seq,
        stamp_ns: 1,
        len: payload.len() as u32,
        bytes: payload.clone(),
        end_of_stream: false,
        ack: false,
    })
}

/// A plugin that only reads: handshake, then decode frames until `events` chunks have arrived;
/// returns when the last one did.
fn sink(sock: PathBuf, events: u64) -> std::thread::JoinHandle<Instant> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let stream = tokio::net::UnixStream::connect(&sock)
                .await
                .expect("connect sink");
            let (rd, wr) = stream.into_split();
            let mut reader = FrameReader::new(rd);
            let mut writer = FrameWriter::new(wr);
            writer
                .send(&FromPlugin::Hello(Hello {
                    protocol_version: PROTOCOL_VERSION,
                    plugin: "sink".into(),
                    pid: std::process::id(),
                    subscriptions: Subscriptions::ALL,
                    capabilities: vec![],
                }))
                .await
                .expect("hello");
            let mut got = 0u64;
            // Flow control: return credit like the SDK, at a quarter of the window or when
            // nothing more is buffered.
            let (mut budget, mut consumed, mut reported) = (0u64, 0u64, 0u64);
            loop {
                let msg = match reader.read::<ToPlugin>().await {
                    Ok(Some(msg)) => msg,
                    other => panic!("sink: connection ended early: {other:?}"),
                };
                consumed += msg.flow_bytes(reader.last_frame_len());
                match msg {
                    ToPlugin::Welcome(w) => budget = w.budget_bytes,
                    ToPlugin::Chunk(_) => {
                        got += 1;
                        if got == events {
                            return Instant::now();
                        }
                    }
                    _ => {}
                }
                if consumed > reported
                    && (consumed - reported >= budget / 4 || !reader.has_buffered_frame())
                {
                    reported = consumed;
                    writer
                        .send(&FromPlugin::Credit(ipc_protocol::Credit { consumed }))
                        .await
                        .expect("credit");
                }
            }
        })
    })
}

async fn front_throughput(dir: &Path, size: usize, events: u64) -> (f64, u64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let cfg = config(
        dir,
        "[plugins.sink]\nspawn = false\nqueue_events = 4096\nqueue_bytes = 67108864\n",
    );
    let sock = cfg.plugin_socket("sink");
    let mut running = supervisor::start(cfg).await.expect("front starts");
    let done = sink(sock, events);
    let link = running.links()[0].clone();
    link.wait_connected().await;
    let conn = link.connection().expect("sink connected");
    let payload = Bytes::from(vec![b'x'; size]);
    let mut retries = 0u64;
    let start = Instant::now();
    for seq in 0..events as u32 {
        let msg = chunk(seq, &payload);
        while !link.send_event(Some(&conn), msg.clone()) {
            // The queue is full: give the writer the CPU (this machine has two) rather than spin.
            retries += 1;
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    let end = tokio::task::spawn_blocking(move || done.join().expect("sink thread"))
        .await
        .expect("join");
    running.stop().await;
    ((end - start).as_secs_f64(), retries)
}

fn raw_throughput(size: usize, events: u64) -> f64 {
    // The frame exactly as FrameWriter lays it out: u32 little-endian length, then the payload.
    let payload =
        ipc_protocol::codec::encode(&chunk(0, &Bytes::from(vec![b'x'; size]))).expect("encode");
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&payload);
    let per_batch = (256 * 1024 / frame.len()).max(1);
    let batch: Vec<u8> = frame.repeat(per_batch);
    let total = frame.len() as u64 * events;
    let (mut a, mut b) = StdUnixStream::pair().expect("socketpair");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        while got < total {
            let n = b.read(&mut buf).expect("raw read");
            assert!(n > 0, "raw writer closed early");
            got += n as u64;
        }
        Instant::now()
    });
    let start = Instant::now();
    let mut left = events;
    while left > 0 {
        let n = left.min(per_batch as u64) as usize;
        a.write_all(&batch[..n * frame.len()]).expect("raw write");
        left -= n as u64;
    }
    let end = reader.join().expect("raw reader");
    (end - start).as_secs_f64()
}

/// Event throughput at each size: front and raw alternate `tries` times and the best of each
/// counts (on a shared machine, the best run is the one least disturbed by others).
pub async fn throughput(dir: &Path, sizes: &[(usize, u64)], tries: usize) -> Vec<Throughput> {
    let mut out = Vec::new();
    for &(size, events) in sizes {
        let (mut raw_s, mut front_s, mut retries) = (f64::INFINITY, f64::INFINITY, 0);
        for t in 0..tries {
            let r = tokio::task::spawn_blocking(move || raw_throughput(size, events))
                .await
                .expect("raw");
            raw_s = raw_s.min(r);
            let (f, n) = front_throughput(&dir.join(format!("tp{size}-{t}")), size, events).await;
            if f < front_s {
                (front_s, retries) = (f, n);
            }
        }
        let mb = (size as f64 * events as f64) / 1e6;
        out.push(Throughput {
            size,
            events,
            front_eps: events as f64 / front_s,
            front_mbps: mb / front_s,
            retries,
            raw_eps: events as f64 / raw_s,
            raw_mbps: mb / raw_s,
        });
        eprintln!("bench:   throughput {size} B done");
    }
    out
}

/// A process that echoes every 64-byte message on its socket (this binary with `--pong-server`).
struct PongProcess(Child);

impl Drop for PongProcess {
    fn drop(&mut self) {
        stop_child(&mut self.0);
    }
}

fn pong_peer(dir: &Path, i: usize) -> (PongProcess, StdUnixStream) {
    let sock = dir.join(format!("pong{i}.sock"));
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind pong");
    let child = Command::new(std::env::current_exe().expect("current_exe"))
        .arg("--pong-server")
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("start pong server");
    let (s, _) = listener.accept().expect("pong connects");
    (PongProcess(child), s)
}

/// The pong side: connect to `sock` and echo 64-byte messages until EOF.
pub fn pong_forever(sock: &Path) -> ! {
    let mut s = StdUnixStream::connect(sock).expect("connect to the ping side");
    let mut buf = [0u8; 64];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            break;
        }
    }
    std::process::exit(0)
}

fn raw_pingpong(dir: &Path, peers: usize, iterations: usize, pace: Duration) -> Summary {
    let mut conns: Vec<_> = (0..peers).map(|i| pong_peer(dir, i)).collect();
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let mut samples = Vec::with_capacity(iterations);
    let warm = warm_rounds(pace);
    for i in 0..iterations + warm {
        std::thread::sleep(pace);
        let t = Instant::now();
        for (_, s) in conns.iter_mut() {
            s.write_all(&msg).expect("ping");
        }
        for (_, s) in conns.iter_mut() {
            s.read_exact(&mut buf).expect("pong");
        }
        if i >= warm {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(conns);
    summarize(&mut samples)
}

async fn final_rounds(dir: &Path, iterations: usize, pace: Duration) -> Summary {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let plugin_bin = crate::bins::plugvisor_plugin();
    let plugins: String = (1..=3)
        .map(|i| {
            format!(
                "[plugins.spin{i}]\ncommand = \"{}\"\nargs = [\"test-spin\", \"--as\", \"spin{i}\", \"--connect\", \"{}\"]\nfinal_timeout_ms = 2000\n[plugins.spin{i}.config]\nspin_us = 0\n\n",
                plugin_bin.display(),
                dir.join(format!("run/plugins/spin{i}.sock")).display()
            )
        })
        .collect();
    let mut running = supervisor::start(config(dir, &plugins))
        .await
        .expect("front starts");
    let links: Vec<_> = running.links().to_vec();
    for l in &links {
        l.wait_connected().await;
    }
    // The rounds run in a task of the runtime, as a stream task does in the front: the
    // harness's own thread (`block_on`) is not one of the runtime's workers, and every round would
    // cross to it and back.
    let rounds = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(iterations);
        let warm = warm_rounds(pace);
        for i in 0..iterations + warm {
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            let stream_id = 1_000_000 + i as u64;
            let started = Instant::now();
            // All three at once from this task, as the stream task drives a stream's final
            // calls.
            let calls = links.iter().map(|link| {
                let conn = link.connection();
                let call_id = link.next_call_id();
                let msg = ToPlugin::Final(Final {
                    stream_id,
                    seq: 0,
                    stamp_ns: 1,
                    call_id,
                    len: 0,
                    bytes: Bytes::new(),
                    trailers: vec![],
                });
                link.final_call(conn, call_id, msg, started)
            });
            for answer in futures_util::future::join_all(calls).await {
                answer.expect("final answered");
            }
            if i >= warm {
                samples.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        samples
    });
    let mut samples = rounds.await.expect("final rounds");
    running.stop().await;
    summarize(&mut samples)
}

/// Final RPC and ping-pong round trips, interleaved in thirds: `iterations` back to back, and
/// `asleep` rounds [`ASLEEP_PACE`] apart.
pub async fn round_trips(dir: &Path, iterations: usize, asleep: usize) -> RoundTrips {
    std::fs::create_dir_all(dir).expect("dir");
    let raw = |peers: usize, n: usize, pace: Duration| {
        let d = dir.to_path_buf();
        tokio::task::spawn_blocking(move || raw_pingpong(&d, peers, n, pace))
    };
    let zero = Duration::ZERO;
    let (third, asleep_third) = (iterations / 3, asleep / 3);
    let mut parts: [Vec<Summary>; 5] = Default::default();
    for part in 0..3 {
        parts[1].push(raw(1, third, zero).await.expect("raw"));
        parts[2].push(raw(3, third, zero).await.expect("raw"));
        parts[0].push(final_rounds(&dir.join(format!("final{part}")), third, zero).await);
        parts[4].push(raw(3, asleep_third, ASLEEP_PACE).await.expect("raw"));
        let d = dir.join(format!("asleep{part}"));
        parts[3].push(final_rounds(&d, asleep_third, ASLEEP_PACE).await);
    }
    RoundTrips {
        final3: merge(&parts[0]),
        raw1: merge(&parts[1]),
        raw3: merge(&parts[2]),
        final3_asleep: merge(&parts[3]),
        raw3_asleep: merge(&parts[4]),
    }
}

/// Summaries of equal-sized parts combined: the median of the parts' percentiles (the parts are
/// interleaved repetitions of one measurement).
fn merge(parts: &[Summary]) -> Summary {
    let med = |f: fn(&Summary) -> f64| {
        let mut v: Vec<f64> = parts.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Summary {
        n: parts.iter().map(|s| s.n).sum(),
        p50: med(|s| s.p50),
        p90: med(|s| s.p90),
        p99: med(|s| s.p99),
        max: parts.iter().map(|s| s.max).fold(0.0, f64::max),
        mean: med(|s| s.mean),
    }
}
