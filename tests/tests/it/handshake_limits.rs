//! What a peer on a plugin socket can cost the front before it is welcomed, with the real
//! `plugvisor` process: a peer of another uid is refused from its credentials before a byte it
//! sent is read, and peers of the permitted uid announcing 16 MiB frames are cut off at the small
//! `Hello` limit without the front's memory growing, while the configured plugin keeps serving.
//!
//! The other-uid peer is this test binary run again as uid 65534 (`foreign_peer`, ignored in
//! normal runs); that test needs root for it, and says so and returns when not root.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipc_protocol::{FrameReader, RefuseCode, ToPlugin};
use sha2::{Digest, Sha256};
use tests::client::chat;
use tests::front::{metric, try_metric, FrontProcess};
use tests::stack::Stack;
use tests::upstream::Params;

/// A length prefix announcing a 16 MiB payload (the protocol's default maximum frame).
const HUGE_PREFIX: [u8; 4] = (16u32 * 1024 * 1024).to_le_bytes();

/// Set for the re-run of this binary that plays the other-uid peer: the socket to call.
const PEER_SOCKET_ENV: &str = "PLUGVISOR_TEST_FOREIGN_PEER_SOCKET";

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: needs root to run a peer as another uid");
    false
}

/// The front's resident memory (`None` once it is gone).
fn rss_bytes(pid: u32) -> Option<u64> {
    Some(tests::bench::procfs::rss_bytes(pid)).filter(|b| *b > 0)
}

/// Decodes what the front wrote before closing: the one `ToPlugin` frame of a refusal.
fn decode(answer: &[u8]) -> Option<ToPlugin> {
    // On a thread of its own: the async test's runtime cannot be blocked on.
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(FrameReader::new(answer).read()).ok().flatten()
        })
        .join()
        .unwrap()
    })
}

/// Connects, sends `bytes`, and reads until the front closes (or `limit` passes). Write errors are
/// expected (the front may close while we write) and ignored.
fn send_and_read(socket: &Path, bytes: &[u8], limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut s = UnixStream::connect(socket).expect("connect to the plugin socket");
    s.set_read_timeout(Some(limit)).unwrap();
    s.set_write_timeout(Some(limit)).unwrap();
    let _ = s.write_all(bytes);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    (answer, start.elapsed())
}

/// The other-uid peer: run by `a_peer_of_another_uid_is_refused_before_its_first_frame_is_read`
/// as uid 65534; prints what the front answered and how long that took.
#[test]
#[ignore = "the peer half of another test, run by it as another uid"]
fn foreign_peer() {
    let socket = std::env::var(PEER_SOCKET_ENV).expect("run by the other test");
    let (answer, took) = send_and_read(Path::new(&socket), &HUGE_PREFIX, Duration::from_secs(8));
    println!(
        "PEER uid={} ms={} answer={}",
        nix::unistd::getuid(),
        took.as_millis(),
        hex::encode(answer)
    );
}

#[test]
fn a_peer_of_another_uid_is_refused_before_its_first_frame_is_read() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // group = "root": the socket is 0660 root:root, so uid 65534 in group root gets through the
    // file mode and meets the SO_PEERCRED check itself.
    let front = FrontProcess::start(
        dir.path(),
        "[plugins.test-order]\nspawn = false\ngroup = \"root\"\n",
        &[],
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
    let socket = front.runtime_dir.join("plugins/test-order.sock");

    let out = Command::new(std::env::current_exe().unwrap())
        // Its name in the one test binary of tests/tests/it.
        .args([
            "--ignored",
            "--exact",
            "handshake_limits::foreign_peer",
            "--nocapture",
        ])
        .env(PEER_SOCKET_ENV, &socket)
        .uid(65534)
        .gid(0)
        .stdin(Stdio::null())
        .output()
        .expect("run the peer as uid 65534");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("PEER "))
        .unwrap_or_else(|| panic!("peer printed no result: {out:?}"));
    let field = |name: &str| {
        line.split(' ')
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("uid="), "65534", "{line}");
    let answer = decode(&hex::decode(field("answer=")).unwrap());
    match answer {
        Some(ToPlugin::Refuse(r)) => {
            assert_eq!(r.code, RefuseCode::NotAllowed, "{r:?}");
            assert!(r.reason.contains("peer uid 65534"), "{}", r.reason);
        }
        other => panic!("expected a refusal, got {other:?}\n{}", front.log()),
    }
    // Refused at once: the front never waited for the 16 MiB the prefix announced (it would have
    // waited for the Hello timeout, 5 s).
    let ms: u64 = field("ms=").parse().unwrap();
    assert!(ms < 2000, "refusal took {ms} ms");
    let log = front.log();
    assert!(log.contains("peer uid 65534"), "{log}");
    assert!(
        !log.contains("bad first frame"),
        "the frame was read: {log}"
    );
    assert_eq!(
        metric(
            &front.metrics(),
            "plugvisor_plugin_handshakes_refused_total{plugin=\"test-order\",reason=\"NotAllowed\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_frames_from_permitted_peers_cost_the_front_nothing_and_the_plugin_keeps_serving() {
    // An operator-started plugin host, so that connections from this test's own pid pass the
    // credential check and reach the frame limit.
    let setup = Stack::start("[plugins.test-order]\nspawn = false\n", &[]).await;
    let socket = setup.front.runtime_dir.join("plugins/test-order.sock");
    let _plugin = Killed(
        Command::new(tests::bins::plugvisor_plugin())
            .arg("test-order")
            .arg("--connect")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the plugin host"),
    );
    let connected = "plugvisor_plugin_connected{plugin=\"test-order\"}";
    tests::eventually_async(
        "the plugin connected",
        Duration::from_secs(10),
        async || {
            let m = setup.front.metrics();
            (try_metric(&m, connected) == Some(1.0))
                .then_some(())
                .ok_or(m)
        },
    )
    .await;
    let front_pid = setup.front.pid();
    let before = rss_bytes(front_pid).expect("the front runs");

    // 24 peers, each announcing 16 MiB and sending 2 MiB of it: a front that reserved and read
    // the announced frames would hold 48 MiB more.
    const PEERS: usize = 24;
    let mut bytes = HUGE_PREFIX.to_vec();
    bytes.resize(4 + 2 * 1024 * 1024, 0xab);
    let bytes = std::sync::Arc::new(bytes);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                let now = rss_bytes(front_pid).unwrap_or(0);
                peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let peers: Vec<_> = (0..PEERS)
        .map(|_| {
            let (socket, bytes) = (socket.clone(), bytes.clone());
            std::thread::spawn(move || send_and_read(&socket, &bytes, Duration::from_secs(8)))
        })
        .collect();
    for peer in peers {
        let (answer, took) = peer.join().unwrap();
        match decode(&answer) {
            Some(ToPlugin::Refuse(r)) => {
                assert_eq!(r.code, RefuseCode::BadHandshake, "{r:?}");
                assert!(
                    r.reason.contains("16777216") && r.reason.contains("65536"),
                    "the reason names the size and the limit: {}",
                    r.reason
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
    }
    sampler.join().unwrap();
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    eprintln!("front RSS {before} bytes before, peak growth {grew} bytes with {PEERS} peers");
    assert!(
        grew < 32 * 1024 * 1024,
        "the front's memory grew by {grew} bytes"
    );
    let metrics = setup.front.metrics();
    assert_eq!(
        metric(
            &metrics,
            "plugvisor_plugin_handshakes_refused_total{plugin=\"test-order\",reason=\"BadHandshake\"}"
        ),
        PEERS as f64
    );

    // The configured plugin never noticed: still connected, and it answers for a request.
    assert_eq!(metric(&metrics, connected), 1.0);
    let params = Params {
        chunks: 4,
        ..Params::default()
    };
    chat(setup.envoy.port, &params, "after-huge-frames").await;
    let line = setup.log_for("after-huge-frames");
    assert_eq!(
        line["test_order"]["sha256"],
        hex::encode(Sha256::digest(params.body())),
        "{line}"
    );
}

/// A process this test started, killed by pid and reaped when dropped (also on a failed assert).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }
}

/// Connects to `socket` as a `test-order` plugin and sends its `Hello`.
async fn say_hello(
    socket: &Path,
) -> (
    FrameReader<tokio::net::unix::OwnedReadHalf>,
    ipc_protocol::FrameWriter<tokio::net::unix::OwnedWriteHalf>,
) {
    use ipc_protocol::{FrameWriter, FromPlugin, Hello, Subscriptions, PROTOCOL_VERSION};
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (r, w) = stream.into_split();
    let reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    writer
        .send(&FromPlugin::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            plugin: "test-order".to_owned(),
            pid: std::process::id(),
            subscriptions: Subscriptions::ALL,
            capabilities: vec![],
        }))
        .await
        .unwrap();
    (reader, writer)
}

/// Welcomes a hand-made `test-order` plugin on `socket`, sends one frame announcing `len` payload
/// bytes (and sends them), and waits up to 5 s for the front to close the connection.
async fn welcomed_then_send_frame(socket: &Path, len: usize) {
    use tokio::io::AsyncWriteExt;
    let (mut reader, mut writer) = say_hello(socket).await;
    let answer = reader.read::<ToPlugin>().await.unwrap();
    assert!(matches!(answer, Some(ToPlugin::Welcome(_))), "{answer:?}");
    let mut frame = (len as u32).to_le_bytes().to_vec();
    frame.resize(4 + len, 0xff);
    let _ = writer.get_mut().write_all(&frame).await;
    // Our write half stays open: the close must come from the front. Pings may arrive first.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = reader.read::<ToPlugin>().await {}
    })
    .await;
    assert!(closed.is_ok(), "the front kept the connection open");
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcomed_plugin_may_send_frames_up_to_its_metadata_cap_plus_the_margin() {
    let dir = tempfile::tempdir().unwrap();
    let front = tokio::task::block_in_place(|| {
        FrontProcess::start(
            dir.path(),
            "[plugins.test-order]\nspawn = false\nmetadata_max_bytes = 1024\n",
            &[],
        )
    });
    let socket = front.runtime_dir.join("plugins/test-order.sock");
    // metadata_max_bytes + 64 KiB.
    let limit = 1024 + 64 * 1024;
    let wait_log = |needle: String| {
        tests::eventually(
            &format!("`{needle}` in the log"),
            Duration::from_secs(5),
            || {
                let log = front.log();
                log.contains(&needle).then_some(()).ok_or(log)
            },
        )
    };

    // At the limit the frame is read (and, being garbage, fails to decode).
    welcomed_then_send_frame(&socket, limit).await;
    wait_log("protocol error: undecodable frame payload".to_owned());
    // One byte more is refused from its length prefix, naming the size and the limit.
    welcomed_then_send_frame(&socket, limit + 1).await;
    wait_log(format!(
        "protocol error: frame of {} bytes exceeds the maximum of {limit} bytes",
        limit + 1
    ));
    // Only that connection was affected: the next plugin is welcomed.
    welcomed_then_send_frame(&socket, 0).await;
}

/// At most `MAX_HANDSHAKES` handshakes run at once on a plugin socket: with that many silent peers
/// connected, the next peer waits in the listen backlog (no answer), and is welcomed as soon as
/// one of them goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_limit_wait_in_the_backlog_until_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let front = tokio::task::block_in_place(|| {
        FrontProcess::start(dir.path(), "[plugins.test-order]\nspawn = false\n", &[])
    });
    let socket = front.runtime_dir.join("plugins/test-order.sock");
    let mut silent = Vec::new();
    for _ in 0..supervisor::plugin::accept::MAX_HANDSHAKES {
        silent.push(tokio::net::UnixStream::connect(&socket).await.unwrap());
    }
    let (mut reader, _writer) = say_hello(&socket).await;
    let early = tokio::time::timeout(Duration::from_millis(1000), reader.read::<ToPlugin>()).await;
    assert!(early.is_err(), "answered past the limit: {early:?}");
    drop(silent.pop());
    let answer = tokio::time::timeout(Duration::from_secs(3), reader.read::<ToPlugin>())
        .await
        .expect("answered once a handshake slot was free")
        .unwrap();
    assert!(matches!(answer, Some(ToPlugin::Welcome(_))), "{answer:?}");
}

/// A flood of idle connections from the front's own uid on a spawned plugin's socket (other
/// processes than the one the front spawned) is refused at accept: it holds no handshake slot, so
/// a replacement of the killed plugin connects as soon as it starts, and the refusals reach the
/// log at a limited rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_never_keeps_the_spawned_plugin_out() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(dir.path(), "[plugins.latency]\n", &["latency"]);
    let socket = FrontProcess::runtime_dir_in(dir.path()).join("plugins/latency.sock");
    // 1000 connections that never say a word (this test process is not the spawned plugin).
    let flood: Vec<UnixStream> = (0..1000)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    assert!(flood.len() >= 900, "only {} connections", flood.len());
    let old = front
        .plugin_status("latency")
        .await
        .pid
        .expect("latency runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Its replacement starts after the 50 ms backoff and is welcomed at once: the flood's
    // connections were refused when accepted and hold nothing. (Before, 16 handshake slots
    // taken by idle strangers kept it out for their 5 s Hello timeouts, flood after flood.)
    tests::eventually_async(
        "a new latency process up",
        Duration::from_secs(4),
        async || {
            let s = front.plugin_status("latency").await;
            match s.pid {
                Some(pid) if pid != old && s.connected => Ok(()),
                _ => Err(format!("{s:?}")),
            }
        },
    )
    .await;
    drop(flood);
    let refused = front.log().matches("plugin handshake refused").count();
    assert!(
        (1..=30).contains(&refused),
        "{refused} refusal lines for ~1000 refusals"
    );
    let counted = metric(
        &front.metrics(),
        "plugvisor_plugin_handshakes_refused_total{plugin=\"latency\",reason=\"NotAllowed\"}",
    );
    assert!(counted >= 900.0, "{counted} refusals counted");
}

#[test]
fn a_refusal_repeats_at_most_64_bytes_of_a_peer_supplied_name() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(dir.path(), "[plugins.ext]\nspawn = false\n", &[]);
    let socket = FrontProcess::runtime_dir_in(dir.path()).join("plugins/ext.sock");
    let name = "n".repeat(60_000);
    let hello =
        ipc_protocol::codec::encode(&ipc_protocol::FromPlugin::Hello(ipc_protocol::Hello {
            protocol_version: ipc_protocol::PROTOCOL_VERSION,
            plugin: name,
            pid: std::process::id(),
            subscriptions: ipc_protocol::Subscriptions::ALL,
            capabilities: vec![],
        }))
        .unwrap();
    let mut frame = (hello.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&hello);
    let (answer, _) = send_and_read(&socket, &frame, Duration::from_secs(5));
    match decode(&answer) {
        Some(ToPlugin::Refuse(r)) => {
            assert_eq!(r.code, RefuseCode::UnknownPlugin);
            assert!(r.reason.len() < 300, "{} bytes of reason", r.reason.len());
            assert!(r.reason.contains("(60000 bytes)"), "{}", r.reason);
        }
        other => panic!("{other:?}"),
    }
    let log = front.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a log line of {longest} bytes");
}
