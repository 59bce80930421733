//! A fake front for integration tests: listens on a real Unix socket, spawns the real
//! `plugvisor-plugin` binary against it (or serves a plugin defined in the test in this process,
//! [`serve_in_process`]), and speaks the protocol with it. Every child is killed
//! by pid when its `Front` is dropped (tokio's `kill_on_drop`), and every wait is bounded.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipc_protocol::{FrameReader, FrameWriter, FromPlugin, Hello, ToPlugin, Value, Welcome};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique directory for one test's socket, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "pvr-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The front's end of one plugin connection.
pub struct Front {
    /// The plugin process; `None` when the plugin is served in this process.
    child: Option<Child>,
    /// The in-process host's task ([`serve_in_process`]).
    host: Option<tokio::task::JoinHandle<plugin_runner::Exit>>,
    pub hello: Hello,
    reader: Option<FrameReader<OwnedReadHalf>>,
    writer: FrameWriter<OwnedWriteHalf>,
    incoming: Option<mpsc::UnboundedReceiver<FromPlugin>>,
    /// The largest `Credit.consumed` received (credits are not handed to `recv`).
    credited: Arc<AtomicU64>,
    /// Counted bytes of the events written so far.
    written: u64,
    /// The socket the plugin connects to, kept for its next connections ([`Front::accept_next`]).
    listener: Arc<UnixListener>,
    _dir: Arc<TempDir>,
}

/// The window a plain [`Front::welcome`] gives: the front's default.
pub const BUDGET: u64 = 8 << 20;

/// Spawns `plugvisor-plugin <plugin> --connect <sock> <extra...>` and accepts its connection.
pub async fn spawn(plugin: &str, extra: &[&str], stderr: Stdio) -> Front {
    let dir = TempDir::new();
    let sock = dir.0.join("plugin.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // Set by cargo only in a crate with that binary (`plugvisor-builtins`, which includes this
    // file); `plugin-runner`'s own tests serve their plugins in process and never get here.
    #[allow(clippy::option_env_unwrap)]
    let exe = option_env!("CARGO_BIN_EXE_plugvisor-plugin")
        .expect("spawn is for the tests of plugvisor-builtins, which builds plugvisor-plugin");
    let child = Command::new(exe)
        .arg(plugin)
        .arg("--connect")
        .arg(&sock)
        .args(extra)
        .stdin(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    accept(Arc::new(listener), Arc::new(dir), Some(child), None).await
}

/// Serves `plugin` with `workers` worker threads in this process (a task running
/// [`plugin_runner::serve`]) and accepts its connection: for plugins defined in a test.
pub async fn serve_in_process<P: plugin_runner::Plugin + Clone>(
    plugin: P,
    workers: usize,
) -> Front {
    let dir = TempDir::new();
    let sock = dir.0.join("plugin.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut opts = plugin_runner::HostOptions::new(plugin.name().to_owned(), &sock);
    opts.workers = workers;
    let host = tokio::spawn(plugin_runner::serve(plugin, opts));
    accept(Arc::new(listener), Arc::new(dir), None, Some(host)).await
}

async fn accept(
    listener: Arc<UnixListener>,
    dir: Arc<TempDir>,
    child: Option<Child>,
    host: Option<tokio::task::JoinHandle<plugin_runner::Exit>>,
) -> Front {
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("plugin connects")
        .unwrap();
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    let hello = match tokio::time::timeout(WAIT, reader.read::<FromPlugin>())
        .await
        .unwrap()
        .unwrap()
    {
        Some(FromPlugin::Hello(h)) => h,
        other => panic!("expected Hello, got {other:?}"),
    };
    Front {
        child,
        host,
        hello,
        reader: Some(reader),
        // As the front's: any frame the protocol allows.
        writer: FrameWriter::with_max_frame(wr, ipc_protocol::codec::MAX_FRAME_CEILING),
        incoming: None,
        credited: Arc::new(AtomicU64::new(0)),
        written: 0,
        listener,
        _dir: dir,
    }
}

impl Front {
    /// The plugin's next connection on the same socket (after a `Reconnect`), with its `Hello`
    /// read, within [`WAIT`]. The process (or in-process host) stays with the first `Front`.
    pub async fn accept_next(&self) -> Front {
        accept(self.listener.clone(), self._dir.clone(), None, None).await
    }

    /// Whether the plugin opens another connection within `wait`.
    pub async fn connects_within(&self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.listener.accept())
            .await
            .is_ok()
    }

    /// Whether the in-process host ([`serve_in_process`]) has returned.
    pub fn host_finished(&self) -> bool {
        self.host
            .as_ref()
            .expect("a plugin served in process")
            .is_finished()
    }

    /// Answers the `Hello` with a `Refuse`.
    pub async fn refuse(&mut self, code: ipc_protocol::RefuseCode, reason: &str) {
        self.send_now(ToPlugin::Refuse(ipc_protocol::Refuse {
            code,
            reason: reason.into(),
        }))
        .await;
    }

    /// The plugin process (not for [`serve_in_process`]).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("a spawned plugin process")
    }

    /// How the in-process host ended ([`serve_in_process`]), within [`WAIT`].
    pub async fn host_exit(&mut self) -> plugin_runner::Exit {
        let host = self.host.as_mut().expect("a plugin served in process");
        tokio::time::timeout(WAIT, host)
            .await
            .expect("host ends in time")
            .expect("host task did not panic")
    }

    /// Sends `Welcome` with `config` and the front's default limits, and starts collecting what
    /// the plugin sends.
    pub async fn welcome(&mut self, config: Value) {
        self.welcome_with(config, BUDGET, 16 << 10).await
    }

    /// [`Front::welcome`] with a window of `budget_bytes` and a metadata cap.
    pub async fn welcome_with(
        &mut self,
        config: Value,
        budget_bytes: u64,
        metadata_max_bytes: u64,
    ) {
        self.welcome_full(config, budget_bytes, metadata_max_bytes, &["replayed"])
            .await
    }

    /// [`Front::welcome`] agreeing on `capabilities` (whatever the `Hello` said).
    pub async fn welcome_caps(&mut self, config: Value, capabilities: &[&str]) {
        self.welcome_full(config, BUDGET, 16 << 10, capabilities)
            .await
    }

    /// Sends `Welcome` with every field given, and starts collecting what the plugin sends.
    pub async fn welcome_full(
        &mut self,
        config: Value,
        budget_bytes: u64,
        metadata_max_bytes: u64,
        capabilities: &[&str],
    ) {
        self.send_now(ToPlugin::Welcome(Welcome {
            protocol_version: ipc_protocol::PROTOCOL_VERSION,
            config,
            budget_bytes,
            metadata_max_bytes,
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        }))
        .await;
        let mut reader = self.reader.take().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let credited = self.credited.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = reader.read::<FromPlugin>().await {
                if let FromPlugin::Credit(c) = msg {
                    let before = credited.fetch_max(c.consumed, Ordering::SeqCst);
                    assert!(
                        c.consumed > before,
                        "credit went backwards: {before} then {}",
                        c.consumed
                    );
                    continue;
                }
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        self.incoming = Some(rx);
    }

    /// Queues a message; written at the next [`Front::flush`].
    pub fn feed(&mut self, msg: ToPlugin) {
        let len = ipc_protocol::codec::encoded_len(&msg).unwrap() + ipc_protocol::frame::PREFIX_LEN;
        self.written += msg.flow_bytes(len);
        self.writer.feed(&msg).unwrap();
    }

    /// Counted bytes of the events sent so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The largest credit the plugin has returned.
    pub fn credited(&self) -> u64 {
        self.credited.load(Ordering::SeqCst)
    }

    /// Waits (within [`WAIT`]) until the plugin has credited `bytes`.
    pub async fn wait_credited(&self, bytes: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.credited() < bytes {
            assert!(
                tokio::time::Instant::now() < deadline,
                "credited {} of {bytes}",
                self.credited()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes everything fed.
    pub async fn flush(&mut self) {
        self.writer.flush().await.unwrap();
    }

    /// Feeds and flushes one message.
    pub async fn send_now(&mut self, msg: ToPlugin) {
        self.feed(msg);
        self.flush().await;
    }

    /// The next message from the plugin, within [`WAIT`].
    pub async fn recv(&mut self) -> FromPlugin {
        let rx = self.incoming.as_mut().expect("welcome first");
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("plugin answers in time")
            .expect("plugin connection open")
    }

    /// The next message, or `None` if nothing arrives within `wait`.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<FromPlugin> {
        let rx = self.incoming.as_mut().expect("welcome first");
        tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
    }

    /// Closes the front's end of the socket (the plugin reads EOF).
    pub async fn close(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(self.writer.get_mut()).await;
    }

    /// Waits for the plugin process to exit, within [`WAIT`].
    pub async fn exit_status(&mut self) -> ExitStatus {
        tokio::time::timeout(WAIT, self.child().wait())
            .await
            .expect("plugin exits in time")
            .unwrap()
    }

    /// Everything the plugin wrote to stderr (spawned with `Stdio::piped()`), once it exited.
    pub async fn stderr(&mut self) -> String {
        let mut stderr = String::new();
        tokio::io::AsyncReadExt::read_to_string(
            self.child().stderr.as_mut().expect("stderr was piped"),
            &mut stderr,
        )
        .await
        .unwrap();
        stderr
    }
}
