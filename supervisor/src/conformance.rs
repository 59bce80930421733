//! `plugvisor conformance`: plays the front's side of the plugin protocol (docs/protocol.md)
//! against any plugin program and says, case by case, whether it keeps the contract.
//!
//! Each case starts the plugin afresh: the command with `{socket}` in its arguments replaced by
//! a socket the kit listens on, and `PLUGVISOR_CONNECT` set to it, as the front starts a plugin.
//! The protocol cases apply to every plugin: the handshake, `Pong` (also while busy), every
//! `Final` answered with its own call and stream id within the deadline, metadata within the
//! announced limits and namespaces, `Credit` as the spec says with the window respected,
//! `Replayed` events (when the plugin announced the capability), `Abort`, `Shutdown` honoured
//! within its grace, end-of-file, and exit 78 after a `Refuse`; with the capabilities
//! `reconnect` and `trace`, a second connection after `Reconnect` served alongside the first,
//! and `Spans` (optional) before a final reply, naming its stream, within the limits. The SDK cases (`--sdk`, on by
//! default for the name `conformance`) need a plugin that keeps the conformance plugin's
//! contract, which each SDK ships: ordering per stream, streams in parallel, gaps, partial
//! streams, replays marked, a hook that throws failing its stream alone, and the trace each
//! final sends (its attributes, and a span timed on the events' clock).
//!
//! The kit is the front as far as the plugin can tell, but it is not the front: it checks what
//! the front would only count or log, and it holds a plugin to the letter of the spec.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ipc_protocol::handshake::capability;
use ipc_protocol::{
    codec, AbortCause, FinalOutcome, FinalReply, FrameReader, FrameWriter, FromPlugin, Hello,
    Metadata, Ping, Reconnect, Refuse, RefuseCode, Shutdown, Spans, Subscriptions, ToPlugin, Value,
    Welcome,
};
use plugin_runner::testing::Stream;
use serde::Serialize;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::time::{timeout, Instant};

use crate::data_path::metadata::{depth, MAX_DEPTH};

/// What to test and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The name the plugin must announce in its `Hello`.
    pub name: String,
    /// The plugin's program and arguments (`{socket}` in them is replaced).
    pub command: Vec<OsString>,
    /// Run the SDK cases (the plugin keeps the conformance plugin's contract).
    pub sdk: bool,
    /// Namespaces the plugin may write besides `plugvisor.<name>` (as `plugins.<name>.namespaces`
    /// grants them).
    pub namespaces: Vec<String>,
    /// The deadline of one final reply, of a `Pong`, of a process exit asked for.
    pub deadline: Duration,
}

/// One case's result.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The case's name.
    pub case: &'static str,
    /// Whether the plugin passed it.
    pub pass: bool,
    /// Why it failed, or what it saw when it passed.
    pub detail: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pass, self.detail.is_empty()) {
            (true, true) => write!(f, "PASS {}", self.case),
            (true, false) => write!(f, "PASS {} ({})", self.case, self.detail),
            (false, _) => write!(f, "FAIL {}: {}", self.case, self.detail),
        }
    }
}

/// The metadata cap the kit announces (the front's default).
const METADATA_MAX: u64 = 16 * 1024;
/// The flow-control window of most cases (the front's default).
const BUDGET: u64 = 8 * 1024 * 1024;
/// The small window of the `credit` case.
const SMALL_BUDGET: u64 = 64 * 1024;
/// The largest frame the kit reads from a welcomed plugin: the front's own limit.
const MAX_FRAME: usize = METADATA_MAX as usize + 64 * 1024;
/// How long a started plugin has to connect and send its `Hello`.
const CONNECT_LIMIT: Duration = Duration::from_secs(20);
/// The plugin output lines kept to explain a failure.
const OUTPUT_LINES: usize = 8;

type CaseResult = Result<String, String>;

/// Runs every case and returns their outcomes in order; `report` sees each as it ends.
pub async fn run(opts: &Options, mut report: impl FnMut(&Outcome)) -> Vec<Outcome> {
    let dir = scratch_dir();
    let mut outcomes = Vec::new();
    let mut record = |case: &'static str, result: CaseResult| {
        let outcome = match result {
            Ok(detail) => Outcome {
                case,
                pass: true,
                detail,
            },
            Err(detail) => Outcome {
                case,
                pass: false,
                detail,
            },
        };
        report(&outcome);
        outcomes.push(outcome);
    };
    // The handshake decides whether anything else can run.
    let kit = Kit { opts, dir: &dir };
    let handshake = kit.case_handshake().await;
    let welcomed = handshake.is_ok();
    record("handshake", handshake);
    if welcomed {
        record("refused_exits_78", kit.case_refused().await);
        record("ping_pong", kit.with_session(BUDGET, case_ping).await);
        record(
            "pong_while_busy",
            kit.with_session(BUDGET, case_pong_while_busy).await,
        );
        let finals = kit
            .with_session(BUDGET, async |s: &mut Session| case_finals(s, opts).await)
            .await;
        record("finals_answered", finals.clone().map(|(d, _)| d));
        record(
            "metadata_within_limits",
            finals.and_then(|(_, replies)| check_metadata(opts, &replies)),
        );
        record("credit", kit.with_session(SMALL_BUDGET, case_credit).await);
        record("replayed", kit.with_session(BUDGET, case_replayed).await);
        record("abort", kit.with_session(BUDGET, case_abort).await);
        record(
            "aborted_final",
            kit.with_session(BUDGET, case_aborted_final).await,
        );
        record(
            "reconnect",
            kit.with_session(BUDGET, async |s: &mut Session| {
                case_reconnect(&kit, s).await
            })
            .await,
        );
        record("trace", kit.with_session(BUDGET, case_trace).await);
        record("shutdown", kit.case_shutdown().await);
        record("eof", kit.case_eof().await);
        if opts.sdk {
            record(
                "sdk_order",
                kit.with_session(BUDGET, async |s: &mut Session| sdk_order(s, opts).await)
                    .await,
            );
            record(
                "sdk_parallel",
                kit.with_session(BUDGET, async |s: &mut Session| sdk_parallel(s, opts).await)
                    .await,
            );
            record(
                "sdk_gaps",
                kit.with_session(BUDGET, async |s: &mut Session| sdk_gaps(s, opts).await)
                    .await,
            );
            record(
                "sdk_partial",
                kit.with_session(BUDGET, async |s: &mut Session| sdk_partial(s, opts).await)
                    .await,
            );
            record(
                "sdk_replays",
                kit.with_session(BUDGET, async |s: &mut Session| sdk_replays(s, opts).await)
                    .await,
            );
            record(
                "sdk_hook_throws",
                kit.with_session(BUDGET, async |s: &mut Session| sdk_throws(s, opts).await)
                    .await,
            );
            record(
                "sdk_aborted_final",
                kit.with_session(BUDGET, async |s: &mut Session| sdk_aborted(s, opts).await)
                    .await,
            );
            record(
                "sdk_trace",
                kit.with_session(BUDGET, async |s: &mut Session| sdk_trace(s, opts).await)
                    .await,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    outcomes
}

/// A directory of its own for the sockets, removed at the end.
fn scratch_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "plugvisor-conformance-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

struct Kit<'a> {
    opts: &'a Options,
    dir: &'a Path,
}

/// A started plugin process with its connection, before or after the handshake.
struct Plugin {
    child: Child,
    output: Arc<Mutex<VecDeque<String>>>,
    /// The tasks reading its stdout and stderr (they end at end-of-file).
    readers: Vec<tokio::task::JoinHandle<()>>,
    stream: Option<UnixStream>,
    listener: UnixListener,
    socket: PathBuf,
}

impl Plugin {
    /// The last lines the plugin wrote, to explain a failure.
    fn output(&self) -> String {
        let lines = self.output.lock().expect("output lock");
        if lines.is_empty() {
            String::new()
        } else {
            format!(
                "; its last output: {}",
                lines.iter().cloned().collect::<Vec<_>>().join(" | ")
            )
        }
    }

    /// Waits up to `limit` for the process to exit.
    async fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        timeout(limit, self.child.wait()).await.ok()?.ok()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // The whole process group: a wrapper script's children too.
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A welcomed connection, as the front holds it.
struct Session {
    /// The process; `None` for a second connection of it (`reconnect`), whose first holds it.
    plugin: Option<Plugin>,
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
    hello: Hello,
    welcome: Welcome,
    /// Counted event bytes written.
    written: u64,
    /// The largest `Credit.consumed` received.
    consumed: u64,
    /// Final replies by call id, in arrival order per call.
    replies: HashMap<u64, Vec<FinalReply>>,
    pongs: BTreeSet<u64>,
    /// What broke the protocol, if anything did.
    violation: Option<String>,
    next_nonce: u64,
    /// Streams whose final call (`Final` or `AbortedFinal`) was sent.
    finals_sent: BTreeSet<u64>,
    /// The `Spans` received, in order.
    spans: Vec<Spans>,
}

impl Kit<'_> {
    /// Starts the plugin and accepts its connection.
    async fn start(&self) -> Result<Plugin, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let socket = self
            .dir
            .join(format!("p{}.sock", N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        let (program, args) = self
            .opts
            .command
            .split_first()
            .ok_or("no plugin command given")?;
        let socket_text = socket.display().to_string();
        let args: Vec<OsString> = args
            .iter()
            .map(|a| match a.to_str() {
                Some(s) => OsString::from(s.replace("{socket}", &socket_text)),
                None => a.clone(),
            })
            .collect();
        let mut child = Command::new(program)
            .args(&args)
            .env(plugin_runner::cli::CONNECT_ENV, &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.to_string_lossy()))?;
        let output = Arc::new(Mutex::new(VecDeque::new()));
        let mut readers = Vec::new();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            readers.push(tokio::spawn(async move {
                let _ = crate::plugin::spawn::forward_lines(pipe, 1024, |line| {
                    let mut lines = output.lock().expect("output lock");
                    if lines.len() == OUTPUT_LINES {
                        lines.pop_front();
                    }
                    lines.push_back(line.to_owned());
                })
                .await;
            }));
        }
        let mut plugin = Plugin {
            child,
            output,
            readers,
            stream: None,
            listener,
            socket,
        };
        let accepted = tokio::select! {
            accepted = timeout(CONNECT_LIMIT, plugin.listener.accept()) => accepted,
            status = plugin.child.wait() => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                // What it wrote before it exited explains why: read it to the end first.
                for reader in std::mem::take(&mut plugin.readers) {
                    let _ = timeout(Duration::from_secs(1), reader).await;
                }
                return Err(format!("the plugin exited ({status}) before it connected{}", plugin.output()));
            }
        };
        match accepted {
            Ok(Ok((stream, _))) => {
                plugin.stream = Some(stream);
                Ok(plugin)
            }
            Ok(Err(e)) => Err(format!("accept failed: {e}")),
            Err(_) => Err(format!(
                "the plugin did not connect to {} within {CONNECT_LIMIT:?} (it reads --connect or PLUGVISOR_CONNECT){}",
                plugin.socket.display(),
                plugin.output()
            )),
        }
    }

    /// Reads the `Hello` on `stream` and checks it: the kit's plugin name, the pid of the
    /// connected process, a supported version.
    async fn read_hello(
        &self,
        stream: UnixStream,
        plugin: &Plugin,
    ) -> Result<
        (
            Hello,
            FrameReader<OwnedReadHalf>,
            FrameWriter<OwnedWriteHalf>,
        ),
        String,
    > {
        let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
        let (read, write) = stream.into_split();
        let mut reader = FrameReader::with_max_frame(read, crate::plugin::accept::HELLO_MAX_FRAME);
        let writer = FrameWriter::new(write);
        let hello = match timeout(self.opts.deadline, reader.read::<FromPlugin>()).await {
            Ok(Ok(Some(FromPlugin::Hello(h)))) => h,
            Ok(Ok(Some(other))) => {
                return Err(format!("the first frame was {}, not Hello", other.kind()))
            }
            Ok(Ok(None)) => {
                return Err(format!(
                    "the plugin closed before its Hello{}",
                    plugin.output()
                ))
            }
            Ok(Err(e)) => return Err(format!("its first frame is not a Hello: {e}")),
            Err(_) => {
                return Err(format!(
                    "no Hello within {:?} of connecting{}",
                    self.opts.deadline,
                    plugin.output()
                ))
            }
        };
        if hello.plugin != self.opts.name {
            return Err(format!(
                "Hello names plugin `{}`, expected `{}` (give its name with --name, or make it announce the configured name)",
                hello.plugin, self.opts.name
            ));
        }
        if let Some(pid) = peer_pid {
            if hello.pid != pid as u32 {
                return Err(format!(
                    "Hello.pid is {}, but the connected process is {pid} (SO_PEERCRED): the front refuses a spawned plugin whose pid it did not start",
                    hello.pid
                ));
            }
        }
        if !ipc_protocol::SUPPORTED_VERSIONS.contains(&hello.protocol_version) {
            return Err(format!(
                "protocol version {} is outside {:?}",
                hello.protocol_version,
                ipc_protocol::SUPPORTED_VERSIONS
            ));
        }
        Ok((hello, reader, writer))
    }

    /// Welcomes a connection whose `Hello` was read, with a window of `budget`.
    async fn welcome(
        &self,
        plugin: Option<Plugin>,
        hello: Hello,
        mut reader: FrameReader<OwnedReadHalf>,
        mut writer: FrameWriter<OwnedWriteHalf>,
        budget: u64,
    ) -> Result<Session, String> {
        let welcome = ipc_protocol::handshake::answer_hello(
            &hello,
            Value::Map(Default::default()),
            ipc_protocol::Limits {
                budget_bytes: budget,
                metadata_max_bytes: METADATA_MAX,
            },
        )
        .map_err(|r| r.reason)?;
        writer
            .send(&ToPlugin::Welcome(welcome.clone()))
            .await
            .map_err(|e| format!("cannot send Welcome: {e}"))?;
        reader.set_max_frame(MAX_FRAME);
        Ok(Session {
            plugin,
            reader,
            writer,
            hello,
            welcome,
            written: 0,
            consumed: 0,
            replies: HashMap::new(),
            pongs: BTreeSet::new(),
            violation: None,
            next_nonce: 1,
            finals_sent: BTreeSet::new(),
            spans: Vec::new(),
        })
    }

    /// Starts the plugin and reads its `Hello`.
    async fn hello(
        &self,
    ) -> Result<
        (
            Plugin,
            Hello,
            FrameReader<OwnedReadHalf>,
            FrameWriter<OwnedWriteHalf>,
        ),
        String,
    > {
        let mut plugin = self.start().await?;
        let stream = plugin.stream.take().expect("accepted");
        let (hello, reader, writer) = self.read_hello(stream, &plugin).await?;
        Ok((plugin, hello, reader, writer))
    }

    /// Starts the plugin and welcomes it with a window of `budget`.
    async fn session(&self, budget: u64) -> Result<Session, String> {
        let (plugin, hello, reader, writer) = self.hello().await?;
        self.welcome(Some(plugin), hello, reader, writer, budget)
            .await
    }

    /// Runs `case` on a fresh session; a protocol violation seen on the way fails it.
    async fn with_session<T, F>(&self, budget: u64, case: F) -> Result<T, String>
    where
        F: AsyncFnOnce(&mut Session) -> Result<T, String>,
    {
        let mut session = self.session(budget).await?;
        let result = case(&mut session).await;
        let result = match (result, session.violation.take()) {
            (_, Some(violation)) => Err(violation),
            (result, None) => result,
        };
        result.map_err(|e| format!("{e}{}", session.output()))
    }

    async fn case_handshake(&self) -> CaseResult {
        let session = self.session(BUDGET).await?;
        let caps = &session.hello.capabilities;
        Ok(format!(
            "protocol {}, capabilities [{}], agreed [{}]",
            session.hello.protocol_version,
            caps.join(", "),
            session.welcome.capabilities.join(", ")
        ))
    }

    async fn case_refused(&self) -> CaseResult {
        let (mut plugin, _, _reader, mut writer) = self.hello().await?;
        writer
            .send(&ToPlugin::Refuse(Refuse {
                code: RefuseCode::UnknownPlugin,
                reason: "the conformance kit refuses this handshake on purpose".into(),
            }))
            .await
            .map_err(|e| format!("cannot send Refuse: {e}"))?;
        match plugin.exit_within(self.opts.deadline).await {
            Some(status) if status.code() == Some(78) => Ok(String::new()),
            Some(status) => Err(format!(
                "after a Refuse it exited {status}, not 78 (EX_CONFIG){}",
                plugin.output()
            )),
            None => Err(format!(
                "still running {:?} after a Refuse (it should exit 78){}",
                self.opts.deadline,
                plugin.output()
            )),
        }
    }

    async fn case_shutdown(&self) -> CaseResult {
        let grace = Duration::from_millis(2000);
        let mut s = self.session(BUDGET).await?;
        let calls = send_streams(&mut s, 100, 4, 3, &[]).await?;
        s.send_control(ToPlugin::Shutdown(Shutdown {
            grace_ms: grace.as_millis() as u64,
        }))
        .await?;
        let until = Instant::now() + grace;
        s.await_replies(&calls, until)
            .await
            .map_err(|e| format!("after Shutdown{{grace_ms: {}}}: {e}", grace.as_millis()))?;
        // Exits on its own within the grace (and a second more for the process to end).
        let Session { plugin, reader, .. } = &mut s;
        let plugin = plugin
            .as_mut()
            .expect("a first connection holds its process");
        let status = tokio::select! {
            status = plugin.exit_within(grace + Duration::from_secs(1)) => status,
            // Keep reading, so a plugin blocked on writing is not stuck on us.
            _ = drain_forever(reader) => None,
        };
        match status {
            Some(status) if status.success() => {
                Ok(format!("{} finals answered, exit 0", calls.len()))
            }
            Some(status) => Err(format!(
                "exited {status} after Shutdown, not 0{}",
                s.output()
            )),
            None => Err(format!(
                "still running {:?} after Shutdown{{grace_ms: {}}}{}",
                grace + Duration::from_secs(1),
                grace.as_millis(),
                s.output()
            )),
        }
    }

    async fn case_eof(&self) -> CaseResult {
        let s = self.session(BUDGET).await?;
        let Session {
            plugin,
            writer,
            reader,
            ..
        } = s;
        let mut plugin = plugin.expect("a first connection holds its process");
        drop(writer);
        drop(reader);
        match plugin.exit_within(self.opts.deadline).await {
            Some(status) if status.success() => Ok(String::new()),
            Some(status) => Err(format!(
                "exited {status} at end-of-file, not 0{}",
                plugin.output()
            )),
            None => Err(format!(
                "still running {:?} after its socket reached end-of-file (a plugin never outlives its front){}",
                self.opts.deadline,
                plugin.output()
            )),
        }
    }
}

impl Session {
    /// The last lines the plugin wrote (from the first connection, which holds the process).
    fn output(&self) -> String {
        self.plugin.as_ref().map(Plugin::output).unwrap_or_default()
    }

    fn subs(&self) -> Subscriptions {
        self.hello.subscriptions
    }

    fn agreed(&self, cap: &str) -> bool {
        self.welcome.capabilities.iter().any(|c| c == cap)
    }

    /// Sends a connection message (never held to the window).
    async fn send_control(&mut self, msg: ToPlugin) -> Result<(), String> {
        self.writer
            .send(&msg)
            .await
            .map_err(|e| format!("cannot write to the plugin: {e}"))
    }

    /// Sends a per-stream event, waiting for credit when the window is full, as the front does.
    async fn send_event(&mut self, msg: &ToPlugin, deadline: Duration) -> Result<(), String> {
        let len = codec::encoded_len(msg).map_err(|e| e.to_string())? as u64;
        let counted = msg.flow_bytes(len as usize + ipc_protocol::frame::PREFIX_LEN);
        let until = Instant::now() + deadline;
        let mut asked = false;
        while self.written > self.consumed
            && self.written - self.consumed + counted > self.welcome.budget_bytes
        {
            if !asked && self.agreed(capability::CREDIT_ON_PING) {
                // As the front does: a plugin on `credit_on_ping` may hold its credit until
                // pinged.
                let nonce = self.next_nonce;
                self.next_nonce += 1;
                self.writer
                    .feed(&ToPlugin::Ping(Ping { nonce }))
                    .map_err(|e| e.to_string())?;
                asked = true;
            }
            self.writer.flush().await.map_err(|e| e.to_string())?;
            self.receive(until).await.map_err(|e| {
                format!(
                    "{e} while the window was full ({} of {} bytes in flight): the plugin owes Credit",
                    self.written - self.consumed,
                    self.welcome.budget_bytes
                )
            })?;
        }
        self.writer.feed_event(msg).map_err(|e| e.to_string())?;
        self.written += counted;
        if let Some((_, stream)) = msg.final_call() {
            self.finals_sent.insert(stream);
        }
        if self.writer.pending_bytes() > 64 * 1024 {
            self.writer.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.writer.flush().await.map_err(|e| e.to_string())
    }

    /// Reads one frame before `until` and books it; a protocol violation is kept.
    async fn receive(&mut self, until: Instant) -> Result<(), String> {
        let msg = match tokio::time::timeout_at(until, self.reader.read::<FromPlugin>()).await {
            Err(_) => return Err("timed out".into()),
            Ok(Err(e)) => return Err(self.violate(format!("undecodable frame: {e}"))),
            Ok(Ok(None)) => return Err(self.violate("the plugin closed the connection".into())),
            Ok(Ok(Some(msg))) => msg,
        };
        match msg {
            FromPlugin::Credit(c) => {
                if c.consumed < self.consumed {
                    return Err(self.violate(format!(
                        "Credit went down from {} to {}",
                        self.consumed, c.consumed
                    )));
                }
                if c.consumed > self.written {
                    return Err(self.violate(format!(
                        "Credit of {} bytes is more than the {} written",
                        c.consumed, self.written
                    )));
                }
                self.consumed = c.consumed;
            }
            FromPlugin::FinalReply(r) => self.replies.entry(r.call_id).or_default().push(r),
            FromPlugin::Pong(p) => {
                self.pongs.insert(p.nonce);
            }
            FromPlugin::Spans(spans) => {
                if let Err(e) = self.check_spans(&spans) {
                    return Err(self.violate(e));
                }
                self.spans.push(spans);
            }
            FromPlugin::Ack(_) => {}
            FromPlugin::Hello(_) => return Err(self.violate("a second Hello".into())),
        }
        Ok(())
    }

    /// What the front requires of a `Spans` (see "Traces" in docs/protocol.md); the front
    /// would drop and count one that breaks it, or (without `trace`) end the connection.
    fn check_spans(&self, spans: &Spans) -> Result<(), String> {
        const MAX: usize = 64;
        let stream = spans.stream_id;
        if !self.agreed(capability::TRACE) {
            return Err(format!(
                "a Spans (stream {stream}) without the capability `trace` agreed: a protocol error for the front"
            ));
        }
        if !self.finals_sent.contains(&stream) {
            return Err(format!(
                "a Spans for stream {stream}, which has no final call: it must name the stream whose final reply follows"
            ));
        }
        if self
            .replies
            .values()
            .flatten()
            .any(|r| r.stream_id == stream)
        {
            return Err(format!(
                "a Spans for stream {stream} after its FinalReply: it must come right before it"
            ));
        }
        if self.spans.iter().any(|s| s.stream_id == stream) {
            return Err(format!(
                "two Spans for stream {stream}: at most one per stream"
            ));
        }
        if spans.spans.len() > MAX {
            return Err(format!(
                "a Spans with {} spans: at most {MAX} (the front drops it)",
                spans.spans.len()
            ));
        }
        if spans.attributes.len() > MAX {
            return Err(format!(
                "a Spans with {} attributes for the final-call span: at most {MAX} (the front drops it)",
                spans.attributes.len()
            ));
        }
        for span in &spans.spans {
            if span.end_ns < span.start_ns {
                return Err(format!(
                    "span `{}` ends ({}) before it starts ({})",
                    span.name, span.end_ns, span.start_ns
                ));
            }
            if span.attributes.len() > MAX {
                return Err(format!(
                    "span `{}` has {} attributes: at most {MAX} (the front drops the Spans)",
                    span.name,
                    span.attributes.len()
                ));
            }
        }
        let size = codec::encoded_len(spans).map_err(|e| e.to_string())? as u64;
        if size > self.welcome.metadata_max_bytes {
            return Err(format!(
                "a Spans of {size} bytes, over Welcome.metadata_max_bytes ({}): the front drops it",
                self.welcome.metadata_max_bytes
            ));
        }
        Ok(())
    }

    fn violate(&mut self, what: String) -> String {
        if self.violation.is_none() {
            self.violation = Some(what.clone());
        }
        what
    }

    /// Sends a `Ping` and waits for its `Pong`; returns how long it took.
    async fn ping(&mut self) -> Result<Duration, String> {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        let sent = Instant::now();
        self.send_control(ToPlugin::Ping(Ping { nonce })).await?;
        let until = sent + Duration::from_secs(2);
        while !self.pongs.contains(&nonce) {
            self.receive(until)
                .await
                .map_err(|e| format!("no Pong for Ping {nonce} within 2 s: {e}"))?;
        }
        Ok(sent.elapsed())
    }

    /// Waits until every call in `calls` has its reply, checking each: its own call id, its
    /// own stream id, one reply per call.
    async fn await_replies(&mut self, calls: &[(u64, u64)], until: Instant) -> Result<(), String> {
        self.flush().await?;
        loop {
            let missing = calls
                .iter()
                .filter(|(call, _)| !self.replies.contains_key(call))
                .count();
            if missing == 0 {
                break;
            }
            self.receive(until)
                .await
                .map_err(|e| format!("{missing} of {} finals unanswered ({e})", calls.len()))?;
        }
        let known: HashMap<u64, u64> = calls.iter().copied().collect();
        for (call, replies) in &self.replies {
            let Some(stream) = known.get(call) else {
                continue;
            };
            if let Some(wrong) = replies.iter().find(|r| r.stream_id != *stream) {
                return Err(format!(
                    "a reply to call {call} names stream {}, the call's is {stream} (the front refuses it)",
                    wrong.stream_id
                ));
            }
            if replies.len() > 1 {
                return Err(format!("call {call} was answered {} times", replies.len()));
            }
        }
        let unknown: Vec<u64> = self
            .replies
            .keys()
            .filter(|c| !known.contains_key(c))
            .copied()
            .collect();
        if !unknown.is_empty() {
            return Err(format!("replies to calls never made: {unknown:?}"));
        }
        Ok(())
    }

    /// The metadata of the reply to `call`, or its error.
    fn reply(&self, call: u64) -> Result<&Metadata, String> {
        match self.replies.get(&call).map(|r| &r[0].outcome) {
            Some(FinalOutcome::Metadata(m)) => Ok(m),
            Some(FinalOutcome::Error(e)) => Err(format!("call {call} answered Error: {e}")),
            None => Err(format!("call {call} unanswered")),
        }
    }
}

/// Reads until the connection ends (for a plugin shutting down), then waits forever.
async fn drain_forever(reader: &mut FrameReader<OwnedReadHalf>) {
    while let Ok(Some(_)) = reader.read::<FromPlugin>().await {}
    std::future::pending::<()>().await
}

/// The call id of stream `id`'s final: never the stream id, so a plugin that mixes them up is
/// caught.
fn call_of(stream: u64) -> u64 {
    stream * 1000 + 7
}

/// An OpenAI-style SSE chunk, so that parsers among the plugins see a real stream.
fn sse(i: usize) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}}}}]}}\n\n"
    ))
}

fn stream_of(id: u64, chunks: usize, headers: &[(&str, &str)]) -> Stream {
    let rid = format!("conformance-{id}");
    let mut request = vec![
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        ("x-request-id", rid.as_str()),
    ];
    request.extend_from_slice(headers);
    let mut s = Stream::new(id)
        .request(&request)
        .response(200, &[("content-type", "text/event-stream")]);
    for i in 0..chunks {
        s = s.chunk(sse(i));
    }
    s.final_(b"data: [DONE]\n\n")
}

/// The messages of `stream` with its final's call id set by [`call_of`].
fn messages(s: &Session, stream: &Stream) -> Vec<ToPlugin> {
    stream
        .messages(&s.subs())
        .into_iter()
        .map(with_call)
        .collect()
}

fn with_call(msg: ToPlugin) -> ToPlugin {
    match msg {
        ToPlugin::Final(mut f) => {
            f.call_id = call_of(f.stream_id);
            ToPlugin::Final(f)
        }
        ToPlugin::Replayed(inner) => ToPlugin::Replayed(Box::new(with_call(*inner))),
        other => other,
    }
}

/// Sends `count` streams from id `first`, their events interleaved round-robin, each with
/// `chunks` chunks; returns their (call id, stream id).
async fn send_streams(
    s: &mut Session,
    first: u64,
    count: u64,
    chunks: usize,
    headers: &[(&str, &str)],
) -> Result<Vec<(u64, u64)>, String> {
    let streams: Vec<Vec<ToPlugin>> = (first..first + count)
        .map(|id| messages(s, &stream_of(id, chunks, headers)))
        .collect();
    send_interleaved(s, streams).await?;
    Ok((first..first + count).map(|id| (call_of(id), id)).collect())
}

async fn send_interleaved(s: &mut Session, streams: Vec<Vec<ToPlugin>>) -> Result<(), String> {
    let deadline = s_deadline();
    let longest = streams.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for events in &streams {
            if let Some(msg) = events.get(i) {
                s.send_event(msg, deadline).await?;
            }
        }
    }
    s.flush().await
}

/// How long the kit waits for credit or a reply it is owed.
fn s_deadline() -> Duration {
    Duration::from_secs(10)
}

async fn case_ping(s: &mut Session) -> CaseResult {
    let took = s.ping().await?;
    Ok(format!("Pong in {} µs", took.as_micros()))
}

async fn case_pong_while_busy(s: &mut Session) -> CaseResult {
    // Many streams whose every hook sleeps (the conformance plugins honour the header; others
    // are busy with the volume), then a Ping at once: the Pong must not wait behind them.
    let streams: Vec<Vec<ToPlugin>> = (1..=64)
        .map(|id| {
            let mut events = messages(s, &stream_of(id, 20, &[("x-conformance-sleep-ms", "50")]));
            events.pop(); // no final: the streams are aborted below
            events
        })
        .collect();
    send_interleaved(s, streams).await?;
    let took = s.ping().await?;
    Ok(format!("Pong in {} ms while busy", took.as_millis()))
}

async fn case_finals(s: &mut Session, opts: &Options) -> Result<(String, Vec<Metadata>), String> {
    let calls = send_streams(s, 1, 24, 5, &[]).await?;
    let until = Instant::now() + opts.deadline;
    let sent = Instant::now();
    s.await_replies(&calls, until).await?;
    let mut replies = Vec::new();
    for (call, _) in &calls {
        replies.push(s.reply(*call)?.clone());
    }
    Ok((
        format!(
            "24 interleaved streams answered in {} ms",
            sent.elapsed().as_millis()
        ),
        replies,
    ))
}

fn check_metadata(opts: &Options, replies: &[Metadata]) -> CaseResult {
    let own = format!("plugvisor.{}", opts.name);
    let mut largest = 0;
    for metadata in replies {
        let size = codec::encoded_len(metadata).map_err(|e| e.to_string())?;
        largest = largest.max(size);
        if size as u64 > METADATA_MAX {
            return Err(format!(
                "a reply's metadata encodes to {size} bytes, over Welcome.metadata_max_bytes ({METADATA_MAX}): it should answer Error instead"
            ));
        }
        for (namespace, value) in metadata {
            if *namespace != own && !opts.namespaces.contains(namespace) {
                return Err(format!(
                    "it writes namespace `{namespace}`: a plugin writes `{own}` and what its config grants (the front would leave it out; grant it with --namespace, as plugins.{}.namespaces does)",
                    opts.name
                ));
            }
            let Value::Map(fields) = value else {
                return Err(format!(
                    "namespace `{namespace}` holds a {}, not a Map",
                    kind(value)
                ));
            };
            if fields.values().any(|v| depth(v) + 1 > MAX_DEPTH) {
                return Err(format!(
                    "namespace `{namespace}` nests deeper than {MAX_DEPTH} levels (the front leaves it out: too_deep)"
                ));
            }
        }
    }
    Ok(format!("largest {largest} bytes"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "Null",
        Value::Bool(_) => "Bool",
        Value::Int(_) => "Int",
        Value::Float(_) => "Float",
        Value::String(_) => "String",
        Value::List(_) => "List",
        Value::Map(_) => "Map",
    }
}

async fn case_credit(s: &mut Session) -> CaseResult {
    // 32 times the window, in 8 KiB chunks over 8 streams: it flows only if Credit does.
    let streams: Vec<Vec<ToPlugin>> = (1..=8)
        .map(|id| {
            let mut stream = Stream::new(id)
                .request(&[("x-request-id", "credit")])
                .response(200, &[]);
            for _ in 0..32 {
                stream = stream.chunk(vec![b'x'; 8 * 1024]);
            }
            messages(s, &stream.final_(b""))
        })
        .collect();
    send_interleaved(s, streams).await?;
    let calls: Vec<(u64, u64)> = (1..=8).map(|id| (call_of(id), id)).collect();
    s.await_replies(&calls, Instant::now() + s_deadline())
        .await?;
    // Idle now: everything it had is done, so it owes no credit; on `credit_on_ping`, once it is
    // asked (its `Credit` comes before its `Pong`).
    if s.agreed(capability::CREDIT_ON_PING) {
        s.ping().await?;
        if s.consumed < s.written {
            return Err(format!(
                "on credit_on_ping and idle, it answered a Ping with {} of {} event bytes not credited: Credit for all it has finished comes before the Pong",
                s.written - s.consumed,
                s.written
            ));
        }
    }
    let until = Instant::now() + Duration::from_secs(2);
    while s.consumed < s.written {
        if s.receive(until).await.is_err() {
            return Err(format!(
                "idle with {} of {} event bytes not credited: a plugin with nothing queued or running sends Credit for all it has finished",
                s.written - s.consumed,
                s.written
            ));
        }
    }
    Ok(format!(
        "{} bytes through a {} byte window",
        s.written, SMALL_BUDGET
    ))
}

async fn case_replayed(s: &mut Session) -> CaseResult {
    if !s.agreed(capability::REPLAYED) {
        return Ok("capability not announced: the front never sends it Replayed".into());
    }
    let stream = stream_of(1, 4, &[]).replayed(4);
    let events = messages(s, &stream);
    send_interleaved(s, vec![events]).await?;
    s.await_replies(&[(call_of(1), 1)], Instant::now() + s_deadline())
        .await?;
    s.reply(call_of(1))?;
    s.ping().await?;
    Ok("4 replayed events, then live ones, answered".into())
}

async fn case_abort(s: &mut Session) -> CaseResult {
    let mut events = messages(s, &stream_of(1, 3, &[]));
    events.pop();
    let abort_seq = events
        .iter()
        .filter_map(|m| m.stream_seq())
        .map(|(_, seq)| seq + 1)
        .max()
        .unwrap_or(0);
    if s.subs().abort {
        events.push(ToPlugin::Abort(ipc_protocol::Abort {
            stream_id: 1,
            seq: abort_seq,
            stamp_ns: ipc_protocol::stamp::monotonic_now_ns(),
            cause: AbortCause::ClientDisconnect,
            detail: "the conformance kit aborts it".into(),
        }));
    }
    send_interleaved(s, vec![events]).await?;
    s.ping().await?;
    if !s.replies.is_empty() {
        return Err("answered a stream that had no Final".into());
    }
    Ok(if s.subs().abort {
        "alive after Abort".into()
    } else {
        "not subscribed to Abort; alive".into()
    })
}

/// A stream of `chunks` chunks that ends, without its response end, in an `AbortedFinal`.
fn aborted_stream(s: &Session, id: u64, chunks: usize) -> Vec<ToPlugin> {
    let mut events = messages(s, &stream_of(id, chunks, &[]));
    let last = events
        .pop()
        .and_then(|m| m.stream_seq())
        .map_or(0, |(_, seq)| seq);
    events.push(ToPlugin::AbortedFinal(ipc_protocol::AbortedFinal {
        stream_id: id,
        seq: last,
        stamp_ns: ipc_protocol::stamp::monotonic_now_ns(),
        call_id: call_of(id),
        cause: AbortCause::ClientDisconnect,
        detail: "the conformance kit: the client left".into(),
    }));
    events
}

async fn case_aborted_final(s: &mut Session) -> CaseResult {
    if !s.agreed(capability::ABORTED_FINAL) {
        return Ok("capability not announced: the front sends it Abort instead".into());
    }
    let streams = (1..=4).map(|id| aborted_stream(s, id, 3)).collect();
    send_interleaved(s, streams).await?;
    let calls: Vec<(u64, u64)> = (1..=4).map(|id| (call_of(id), id)).collect();
    s.await_replies(&calls, Instant::now() + s_deadline())
        .await?;
    for (call, _) in &calls {
        s.reply(*call)?;
    }
    Ok("4 aborted streams' finals answered with their own ids".into())
}

async fn case_reconnect(kit: &Kit<'_>, old: &mut Session) -> CaseResult {
    if !old.agreed(capability::RECONNECT) {
        return Ok("capability not announced: the front never sends it Reconnect".into());
    }
    let deadline = kit.opts.deadline;
    // A stream in flight on the old connection when the front asks for a new one.
    let mut events = messages(old, &stream_of(1, 2, &[]));
    let last = events.pop().expect("a final");
    send_interleaved(old, vec![events]).await?;
    old.send_control(ToPlugin::Reconnect(Reconnect {
        reason: "the conformance kit asks for a new connection".into(),
    }))
    .await?;
    let plugin = old
        .plugin
        .as_ref()
        .expect("a first connection holds its process");
    let stream = match timeout(deadline, plugin.listener.accept()).await {
        Ok(Ok((stream, _))) => stream,
        Ok(Err(e)) => return Err(format!("accept failed: {e}")),
        Err(_) => {
            return Err(format!(
                "no new connection within {deadline:?} of Reconnect (it connects to the path it is connected to)"
            ))
        }
    };
    let (hello, reader, writer) = kit.read_hello(stream, plugin).await?;
    if hello.pid != old.hello.pid {
        return Err(format!(
            "the new connection's Hello says pid {}, the first said {}: the same process reconnects",
            hello.pid, old.hello.pid
        ));
    }
    if hello.subscriptions != old.hello.subscriptions
        || hello.capabilities != old.hello.capabilities
    {
        return Err(format!(
            "the new Hello differs from the first ({hello:?} vs {:?}): it says Hello as at start",
            old.hello
        ));
    }
    let mut new = kit.welcome(None, hello, reader, writer, BUDGET).await?;
    let result = async {
        // The old connection still answers the final of its stream.
        old.send_event(&last, s_deadline()).await?;
        old.await_replies(&[(call_of(1), 1)], Instant::now() + deadline)
            .await
            .map_err(|e| format!("the old connection, after the new one was welcomed: {e}"))?;
        old.reply(call_of(1))?;
        // The front closes the old connection: the new one goes on.
        let _ = tokio::io::AsyncWriteExt::shutdown(old.writer.get_mut()).await;
        new.ping()
            .await
            .map_err(|e| format!("the new connection, after the old one was closed: {e}"))?;
        let calls = send_streams(&mut new, 2, 1, 2, &[]).await?;
        new.await_replies(&calls, Instant::now() + deadline)
            .await
            .map_err(|e| format!("the new connection, after the old one was closed: {e}"))?;
        new.reply(call_of(2))?;
        Ok::<_, String>(())
    }
    .await;
    if let Some(violation) = new.violation.take() {
        return Err(format!("on the new connection: {violation}"));
    }
    result?;
    // Its last connection closed: the process exits 0.
    let _ = tokio::io::AsyncWriteExt::shutdown(new.writer.get_mut()).await;
    let plugin = old
        .plugin
        .as_mut()
        .expect("a first connection holds its process");
    match plugin.exit_within(deadline).await {
        Some(status) if status.success() => Ok(
            "a new connection with the same Hello, served alongside the old one until it closed; exit 0 at the last end-of-file".into(),
        ),
        Some(status) => Err(format!(
            "exited {status} when its last connection closed, not 0"
        )),
        None => Err(format!(
            "still running {deadline:?} after its last connection reached end-of-file"
        )),
    }
}

/// A W3C `traceparent` for the `trace` case's request span.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn case_trace(s: &mut Session) -> CaseResult {
    if !s.agreed(capability::TRACE) {
        return Ok(
            "capability not announced: the front never adds a traceparent nor reads Spans".into(),
        );
    }
    let calls = send_streams(s, 1, 2, 2, &[("traceparent", TRACEPARENT)]).await?;
    s.await_replies(&calls, Instant::now() + s_deadline())
        .await?;
    for (call, _) in &calls {
        s.reply(*call)?;
    }
    // Each Spans was checked as it came (`check_spans`): it named a stream whose final reply
    // had not come yet, and kept the limits.
    Ok(match s.spans.len() {
        0 => "finals answered; no Spans (optional)".into(),
        n => format!(
            "{n} Spans before their final replies, {} spans and {} attributes in all",
            s.spans.iter().map(|x| x.spans.len()).sum::<usize>(),
            s.spans.iter().map(|x| x.attributes.len()).sum::<usize>()
        ),
    })
}

async fn sdk_aborted(s: &mut Session, opts: &Options) -> CaseResult {
    if !s.agreed(capability::ABORTED_FINAL) {
        return Err("the SDK does not announce the capability `aborted_final`".into());
    }
    let events = aborted_stream(s, 1, 3);
    let expected = seqs(&events);
    send_interleaved(s, vec![events]).await?;
    s.await_replies(&[(call_of(1), 1)], Instant::now() + s_deadline())
        .await?;
    let map = own(s.reply(call_of(1))?, opts)?;
    let got = ints(map.get("seqs")).ok_or("no `seqs` list of integers")?;
    if got != expected {
        return Err(format!("ran seqs {got:?}, sent {expected:?}"));
    }
    match map.get("aborted") {
        Some(Value::String(c)) if c == "client_disconnect" => {
            Ok("the aborted final ran in order and knew its cause".into())
        }
        other => Err(format!(
            "the conformance plugin answers an aborted final with aborted: \"client_disconnect\", it said {other:?}"
        )),
    }
}

/// The conformance plugin's own map in `metadata`.
fn own<'m>(
    metadata: &'m Metadata,
    opts: &Options,
) -> Result<&'m std::collections::BTreeMap<String, Value>, String> {
    match metadata.get(&format!("plugvisor.{}", opts.name)) {
        Some(Value::Map(m)) => Ok(m),
        _ => Err(format!(
            "no plugvisor.{} map in its answer: is it a conformance plugin?",
            opts.name
        )),
    }
}

fn ints(v: Option<&Value>) -> Option<Vec<i64>> {
    match v {
        Some(Value::List(l)) => l
            .iter()
            .map(|v| match v {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    }
}

/// The sequence numbers of the events `messages` gives the plugin, in order.
fn seqs(events: &[ToPlugin]) -> Vec<i64> {
    events
        .iter()
        .filter_map(|m| m.stream_seq().map(|(_, seq)| i64::from(seq)))
        .collect()
}

/// The SDK's tracing, through the conformance plugin's contract: each final's `Spans` says how
/// many events the stream's hooks ran (as its `seqs` do), names the request span the SDK found
/// in the `RequestStart` (and none when there was none), and holds one `conformance.final` span
/// whose times fall inside the kit's exchange with the plugin on `CLOCK_MONOTONIC`, the clock of
/// `stamp_ns`.
async fn sdk_trace(s: &mut Session, opts: &Options) -> CaseResult {
    if !s.agreed(capability::TRACE) {
        return Err("the SDK does not announce the capability `trace`".into());
    }
    let sent = ipc_protocol::stamp::monotonic_now_ns();
    let streams = vec![
        messages(s, &stream_of(1, 3, &[("traceparent", TRACEPARENT)])),
        messages(s, &stream_of(2, 3, &[])),
    ];
    send_interleaved(s, streams).await?;
    let calls = [(call_of(1), 1), (call_of(2), 2)];
    s.await_replies(&calls, Instant::now() + s_deadline())
        .await?;
    let answered = ipc_protocol::stamp::monotonic_now_ns();
    for (call, stream) in calls {
        let spans = s.spans.iter().find(|x| x.stream_id == stream);
        let seen = s
            .reply(call)
            .and_then(|m| own(m, opts))
            .and_then(|m| ints(m.get("seqs")).ok_or("no `seqs` list of integers".into()))
            .map(|seqs| seqs.len());
        let traceparent = (stream == 1).then_some(TRACEPARENT);
        check_sdk_spans(stream, spans, seen, traceparent, (sent, answered))?;
    }
    Ok("2 streams, one with a traceparent: each final's Spans counts its events, names the request span it was told of, and times `conformance.final` on CLOCK_MONOTONIC".into())
}

/// What the conformance plugin's contract says of one stream's `Spans` (see [`sdk_trace`]):
/// `seen` events in its `seqs` (or why its answer has none), `traceparent` in its `RequestStart`,
/// and its span between the two `CLOCK_MONOTONIC` readings of `window` (before the kit sent the
/// streams, after their answers came).
fn check_sdk_spans(
    stream: u64,
    spans: Option<&Spans>,
    seen: Result<usize, String>,
    traceparent: Option<&str>,
    window: (u64, u64),
) -> Result<(), String> {
    let spans = spans.ok_or(format!(
        "no Spans for stream {stream}: the conformance plugin records a span in every final"
    ))?;
    let seen = seen?;
    // A later key replaces an earlier one, as on the front's span.
    let attribute = |key: &str| {
        spans
            .attributes
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    };
    match attribute("conformance.events") {
        Some(Value::Int(n)) if usize::try_from(*n) == Ok(seen) => {}
        other => {
            return Err(format!(
                "stream {stream}: attribute conformance.events is {other:?}, but its final reported {seen} seqs"
            ))
        }
    }
    match (attribute("conformance.traceparent"), traceparent) {
        (None, None) => {}
        (Some(Value::String(got)), Some(sent)) if got == sent => {}
        (got, sent) => {
            return Err(format!(
                "stream {stream}: attribute conformance.traceparent is {got:?}, but the RequestStart's traceparent was {sent:?}"
            ))
        }
    }
    let [span] = spans.spans.as_slice() else {
        return Err(format!(
            "stream {stream}: {} spans, where the conformance plugin records one",
            spans.spans.len()
        ));
    };
    if span.name != "conformance.final" {
        return Err(format!(
            "stream {stream}: a span named `{}`, not `conformance.final`",
            span.name
        ));
    }
    if span.end_ns < span.start_ns {
        return Err(format!(
            "stream {stream}: span `conformance.final` ends ({} ns) before it starts ({} ns)",
            span.end_ns, span.start_ns
        ));
    }
    let (from, to) = window;
    if span.start_ns < from || span.end_ns > to {
        return Err(format!(
            "stream {stream}: span `conformance.final` from {} to {} ns, outside the kit's exchange with the plugin ({from} to {to} ns on CLOCK_MONOTONIC): span times must be CLOCK_MONOTONIC nanoseconds, as stamp_ns",
            span.start_ns, span.end_ns
        ));
    }
    Ok(())
}

async fn sdk_order(s: &mut Session, opts: &Options) -> CaseResult {
    let streams: Vec<Vec<ToPlugin>> = (1..=16)
        .map(|id| messages(s, &stream_of(id, 10, &[])))
        .collect();
    let expected: Vec<Vec<i64>> = streams.iter().map(|e| seqs(e)).collect();
    send_interleaved(s, streams).await?;
    let calls: Vec<(u64, u64)> = (1..=16).map(|id| (call_of(id), id)).collect();
    s.await_replies(&calls, Instant::now() + s_deadline())
        .await?;
    for (i, (call, id)) in calls.iter().enumerate() {
        let map = own(s.reply(*call)?, opts)?;
        let got = ints(map.get("seqs")).ok_or("no `seqs` list of integers")?;
        if got != expected[i] {
            return Err(format!(
                "stream {id} ran seqs {got:?}, sent {:?}",
                expected[i]
            ));
        }
    }
    Ok("16 interleaved streams, each in sequence order".into())
}

async fn sdk_parallel(s: &mut Session, opts: &Options) -> CaseResult {
    const SLEEP_MS: u64 = 400;
    let headers = [("x-conformance-sleep-ms", "400")];
    let streams: Vec<Vec<ToPlugin>> = (1..=2)
        .map(|id| messages(s, &stream_of(id, 1, &headers)))
        .collect();
    let hooks = streams[0].len() as u64;
    let started = Instant::now();
    send_interleaved(s, streams).await?;
    let calls = [(call_of(1), 1), (call_of(2), 2)];
    s.await_replies(
        &calls,
        Instant::now() + Duration::from_millis(4 * SLEEP_MS * hooks),
    )
    .await?;
    for (call, _) in calls {
        own(s.reply(call)?, opts)?;
    }
    let took = started.elapsed();
    let serial = Duration::from_millis(2 * SLEEP_MS * hooks);
    if took >= serial.mul_f64(0.8) {
        return Err(format!(
            "two streams of {hooks} hooks sleeping {SLEEP_MS} ms each took {} ms: they ran one after the other ({} ms), not in parallel",
            took.as_millis(),
            serial.as_millis()
        ));
    }
    Ok(format!(
        "{} ms for two streams of {} ms each",
        took.as_millis(),
        SLEEP_MS * hooks
    ))
}

async fn sdk_gaps(s: &mut Session, opts: &Options) -> CaseResult {
    let stream = stream_of(1, 6, &[]).drop_seqs([3, 4]);
    let events = messages(s, &stream);
    let expected = seqs(&events);
    send_interleaved(s, vec![events]).await?;
    s.await_replies(&[(call_of(1), 1)], Instant::now() + s_deadline())
        .await?;
    let map = own(s.reply(call_of(1))?, opts)?;
    let got = ints(map.get("seqs")).ok_or("no `seqs` list of integers")?;
    if got != expected {
        return Err(format!("ran seqs {got:?}, sent {expected:?}"));
    }
    match int(map.get("gaps")) {
        Some(2) => Ok("2 dropped events reported as gaps: 2".into()),
        other => Err(format!(
            "two events were dropped (seq 3 and 4), its namespace says gaps: {other:?}"
        )),
    }
}

async fn sdk_partial(s: &mut Session, opts: &Options) -> CaseResult {
    let stream = stream_of(1, 4, &[]).lose_start(2);
    let events = messages(s, &stream);
    send_interleaved(s, vec![events]).await?;
    s.await_replies(&[(call_of(1), 1)], Instant::now() + s_deadline())
        .await?;
    let map = own(s.reply(call_of(1))?, opts)?;
    match map.get("partial") {
        Some(Value::Bool(true)) => Ok("first seen at seq 2: partial: true".into()),
        other => Err(format!(
            "a stream first seen at seq 2 must say partial: true, it says {other:?}"
        )),
    }
}

async fn sdk_replays(s: &mut Session, opts: &Options) -> CaseResult {
    if !s.agreed(capability::REPLAYED) {
        return Err("the SDK does not announce the capability `replayed`".into());
    }
    let stream = stream_of(1, 4, &[]).replayed(3);
    let events = messages(s, &stream);
    let expected = seqs(&events);
    send_interleaved(s, vec![events]).await?;
    s.await_replies(&[(call_of(1), 1)], Instant::now() + s_deadline())
        .await?;
    let map = own(s.reply(call_of(1))?, opts)?;
    let got = ints(map.get("seqs")).ok_or("no `seqs` list of integers")?;
    if got != expected {
        return Err(format!("ran seqs {got:?}, sent {expected:?}"));
    }
    if map.contains_key("gaps") || map.contains_key("partial") {
        return Err(format!(
            "a stream replayed from seq 0 is whole, it says {map:?}"
        ));
    }
    match int(map.get("replayed")) {
        Some(3) => Ok("3 replayed events marked, the stream whole".into()),
        other => Err(format!("3 events were replayed, it counted {other:?}")),
    }
}

async fn sdk_throws(s: &mut Session, opts: &Options) -> CaseResult {
    let failing = messages(s, &stream_of(1, 3, &[("x-conformance-fail", "chunk")]));
    let fine = messages(s, &stream_of(2, 3, &[]));
    send_interleaved(s, vec![failing, fine]).await?;
    let calls = [(call_of(1), 1), (call_of(2), 2)];
    s.await_replies(&calls, Instant::now() + s_deadline())
        .await?;
    match s.replies.get(&call_of(1)).map(|r| &r[0].outcome) {
        Some(FinalOutcome::Error(e)) if !e.is_empty() => {}
        other => {
            return Err(format!(
                "the stream whose chunk hook threw must answer Error, it answered {other:?}"
            ))
        }
    }
    own(s.reply(call_of(2))?, opts).map_err(|e| format!("the other stream: {e}"))?;
    s.ping().await?;
    Ok("its stream answered Error, the other its metadata, the process lives".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_protocol::PluginSpan;

    fn spans(attributes: Vec<(&str, Value)>, span: Option<(&str, u64, u64)>) -> Spans {
        Spans {
            stream_id: 1,
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            spans: span
                .into_iter()
                .map(|(name, start_ns, end_ns)| PluginSpan {
                    name: name.to_owned(),
                    start_ns,
                    end_ns,
                    attributes: Vec::new(),
                })
                .collect(),
        }
    }

    const WINDOW: (u64, u64) = (1_000, 2_000);

    #[test]
    fn the_conformance_plugin_s_spans_pass_and_each_breach_is_named() {
        let events = ("conformance.events", Value::Int(4));
        let told = ("conformance.traceparent", Value::from(TRACEPARENT));
        let good = spans(
            vec![events.clone(), told.clone()],
            Some(("conformance.final", 1_100, 1_200)),
        );
        assert_eq!(
            check_sdk_spans(1, Some(&good), Ok(4), Some(TRACEPARENT), WINDOW),
            Ok(())
        );
        let untold = spans(
            vec![events.clone()],
            Some(("conformance.final", 1_100, 1_100)),
        );
        assert_eq!(
            check_sdk_spans(2, Some(&untold), Ok(4), None, WINDOW),
            Ok(())
        );

        let fails = |s: &Spans, seen, tp: Option<&str>, what: &str| {
            let e = check_sdk_spans(1, Some(s), Ok(seen), tp, WINDOW).unwrap_err();
            assert!(e.contains(what), "{e}");
        };
        assert!(check_sdk_spans(1, None, Ok(4), None, WINDOW)
            .unwrap_err()
            .contains("no Spans for stream 1"));
        let no_seqs = Err("no `seqs` list of integers".to_owned());
        assert_eq!(
            check_sdk_spans(1, Some(&good), no_seqs, Some(TRACEPARENT), WINDOW),
            Err("no `seqs` list of integers".to_owned())
        );
        // Counted differently from its seqs, or not at all.
        fails(
            &good,
            5,
            Some(TRACEPARENT),
            "conformance.events is Some(Int(4)), but its final reported 5 seqs",
        );
        let uncounted = spans(
            vec![told.clone()],
            Some(("conformance.final", 1_100, 1_200)),
        );
        fails(
            &uncounted,
            4,
            Some(TRACEPARENT),
            "conformance.events is None",
        );
        // A request span invented, lost or garbled.
        fails(&good, 4, None, "conformance.traceparent is Some");
        fails(
            &untold,
            4,
            Some(TRACEPARENT),
            "conformance.traceparent is None",
        );
        let garbled = spans(
            vec![
                events.clone(),
                ("conformance.traceparent", Value::from("00-0-0-01")),
            ],
            Some(("conformance.final", 1_100, 1_200)),
        );
        fails(
            &garbled,
            4,
            Some(TRACEPARENT),
            "but the RequestStart's traceparent was Some",
        );
        // No span, a span misnamed, or timed on another clock (wall-clock nanoseconds).
        fails(&spans(vec![events.clone()], None), 4, None, "0 spans");
        let misnamed = spans(vec![events.clone()], Some(("final", 1_100, 1_200)));
        fails(&misnamed, 4, None, "named `final`");
        let wall = spans(
            vec![events.clone()],
            Some((
                "conformance.final",
                1_700_000_000_000_000_000,
                1_700_000_000_000_000_100,
            )),
        );
        fails(&wall, 4, None, "outside the kit's exchange");
        let early = spans(
            vec![events.clone()],
            Some(("conformance.final", 999, 1_200)),
        );
        fails(&early, 4, None, "outside the kit's exchange");
        let backwards = spans(vec![events], Some(("conformance.final", 1_200, 1_100)));
        fails(
            &backwards,
            4,
            None,
            "ends (1100 ns) before it starts (1200 ns)",
        );
    }
}
