//! The plugin sockets: one listening Unix socket per configured plugin under
//! `<runtime_dir>/plugins/<name>.sock`, and the handshake run on every connection.
//!
//! The checks come in this order, and each one that fails sends a `Refuse` with its reason and
//! closes the connection; nothing else is affected:
//! 1. peer credentials (`SO_PEERCRED`), before a single byte is read: the front's uid or the
//!    plugin's configured `uid`, and for a spawned plugin the pid the front spawned;
//! 2. the first frame, read with a small limit ([`HELLO_MAX_FRAME`]) within [`HELLO_TIMEOUT`],
//!    must be a `Hello` naming this socket's plugin;
//! 3. no other live connection;
//! 4. the protocol version ([`ipc_protocol::handshake::answer_hello`]).
//!
//! So a stranger costs one accepted socket and a `Refuse`, and a permitted peer announcing a
//! huge frame costs at most [`HELLO_MAX_FRAME`] bytes of buffer. Once welcomed, the connection's
//! reader accepts frames up to [`live_max_frame`]: the plugin's `metadata_max_bytes` plus room for
//! the rest of a reply. A larger frame is a protocol error for that connection only.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipc_protocol::handshake::answer_hello;
use ipc_protocol::{FrameReader, FrameWriter, FromPlugin, Hello, Refuse, RefuseCode, ToPlugin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::config::PluginConfig;
use crate::observe::metrics::Metrics;
use crate::plugin::link::PluginLink;
use crate::quiet_socket;

/// How long a connected peer has to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection refused on its credentials is kept open, reading into a small fixed
/// buffer, so that the peer can finish writing its `Hello` and read the refusal.
const REFUSED_LINGER: Duration = Duration::from_millis(500);

/// The largest frame read before the peer is welcomed. A `Hello` is a few dozen bytes (a name,
/// a pid, a version, subscriptions); this leaves room for a long plugin name and for growth of the
/// message, while a forged length prefix can make the front hold no more than this per
/// connection.
pub const HELLO_MAX_FRAME: usize = 64 * 1024;

/// Room in a welcomed plugin's frames for everything besides its metadata: the frame's other
/// fields (call id, outcome, an error message) and the encoding's overhead.
pub const REPLY_FRAME_MARGIN: usize = 64 * 1024;

/// The largest frame a welcomed plugin may send: its largest useful answer (a final reply with
/// `metadata_max_bytes` of metadata) plus [`REPLY_FRAME_MARGIN`].
pub fn live_max_frame(plugin: &PluginConfig) -> usize {
    plugin
        .process
        .metadata_max_bytes
        .saturating_add(REPLY_FRAME_MARGIN)
}

/// Creates `dir` (mode 0750) if needed.
pub fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
}

/// Binds a plugin's socket: replaces a stale socket (never another kind of file), binds, sets
/// mode 0600 (0660 and the group's ownership when a group is configured). The group is looked up
/// first, so a missing group leaves no socket behind.
pub fn bind_plugin_socket(path: &Path, group: Option<&str>) -> Result<UnixListener, String> {
    let gid = match group {
        None => None,
        Some(group) => Some(
            nix::unistd::Group::from_name(group)
                .map_err(|e| format!("cannot look up group `{group}`: {e}"))?
                .ok_or_else(|| format!("group `{group}` does not exist"))?
                .gid,
        ),
    };
    crate::shell::instance::prepare_socket_path(path).map_err(|e| e.to_string())?;
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    if let (Some(group), Some(gid)) = (group, gid) {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| format!("cannot give {} to group `{group}`: {e}", path.display()))?;
    }
    Ok(listener)
}

/// Handshakes in progress at once on one plugin socket. Each is bounded in memory and time
/// ([`HELLO_MAX_FRAME`], [`HELLO_TIMEOUT`]); this bounds their number. Only peers whose
/// credentials may serve the plugin take one: a spawned plugin's socket admits the pid the front
/// spawned alone, so a flood of other processes is refused at accept and never keeps the real
/// plugin waiting.
pub const MAX_HANDSHAKES: usize = 16;

/// Refused connections kept open at once for [`REFUSED_LINGER`] so their peers can read why;
/// past it, a refused connection is closed at once (the refusal is still counted and logged).
const MAX_LINGERING: usize = 64;

/// The most bytes of peer-supplied text (a plugin name) a refusal repeats.
const PEER_TEXT_MAX: usize = 64;

/// Accepts connections for `link` until the task is dropped. Every connection's credentials are
/// checked as it is accepted; those allowed run their handshake, at most [`MAX_HANDSHAKES`] at
/// once (the others wait their turn in a task).
pub async fn accept_loop(listener: UnixListener, link: Arc<PluginLink>, metrics: Arc<Metrics>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let lingering = Arc::new(tokio::sync::Semaphore::new(MAX_LINGERING));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(plugin = %link.name(), error = %e, "plugin socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Who is calling is known from the socket alone: a peer that may not connect is refused
        // before anything it sent is read, and before it can hold a handshake slot.
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(plugin = %link.name(), error = %e, "cannot read peer credentials");
                continue;
            }
        };
        let (link, metrics) = (link.clone(), metrics.clone());
        match check_peer(&link, cred.uid(), cred.pid()) {
            Peer::Refused(refuse) => refuse_at_accept(stream, link, metrics, refuse, &lingering),
            Peer::Allowed => {
                // Taken in accept order: allowed peers past the limit wait in the backlog.
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                tokio::spawn(async move {
                    handshake(stream, cred.pid(), link, metrics).await;
                    drop(permit);
                });
            }
            Peer::Pending => {
                // The front is spawning the plugin and does not know its pid yet: hold the peer
                // (without a slot) until it does, then judge it.
                let (handshakes, lingering) = (handshakes.clone(), lingering.clone());
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + PENDING_WAIT;
                    let verdict = loop {
                        match check_peer(&link, cred.uid(), cred.pid()) {
                            Peer::Pending if tokio::time::Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Peer::Pending => {
                                break Err(Refuse {
                                    code: RefuseCode::NotAllowed,
                                    reason: format!(
                                        "the front is starting its own process for `{}`",
                                        link.name()
                                    ),
                                })
                            }
                            Peer::Allowed => break Ok(()),
                            Peer::Refused(r) => break Err(r),
                        }
                    };
                    match verdict {
                        Err(refuse) => refuse_at_accept(stream, link, metrics, refuse, &lingering),
                        Ok(()) => {
                            let Ok(_permit) = handshakes.acquire_owned().await else {
                                return;
                            };
                            handshake(stream, cred.pid(), link, metrics).await;
                        }
                    }
                });
            }
        }
    }
}

/// How long a peer is held while the front has spawned the plugin but does not know its pid.
const PENDING_WAIT: Duration = Duration::from_secs(1);

/// Refuses a peer from its credentials: sends the refusal and lets it read it (while fewer
/// than [`MAX_LINGERING`] do), else closes at once. Counted and logged either way.
fn refuse_at_accept(
    stream: UnixStream,
    link: Arc<PluginLink>,
    metrics: Arc<Metrics>,
    refuse: Refuse,
    lingering: &Arc<tokio::sync::Semaphore>,
) {
    let Ok((read, write)) = quiet_socket::split(stream) else {
        return count_refusal(&link, &metrics, &refuse);
    };
    let mut writer = FrameWriter::new(write);
    match lingering.clone().try_acquire_owned() {
        Ok(permit) => {
            tokio::spawn(async move {
                refuse_peer(&link, &metrics, &mut writer, refuse).await;
                discard_until_closed(read, writer).await;
                drop(permit);
            });
        }
        // A flood: count it, and close without waiting for the peer to read.
        Err(_) => count_refusal(&link, &metrics, &refuse),
    }
}

async fn handshake(
    stream: UnixStream,
    peer_pid: Option<i32>,
    link: Arc<PluginLink>,
    metrics: Arc<Metrics>,
) {
    let (read, write) = match quiet_socket::split(stream) {
        Ok(halves) => halves,
        Err(e) => {
            tracing::warn!(plugin = %link.name(), error = %e, "cannot take over the connection");
            return;
        }
    };
    // This writer carries the connection's events once welcomed: one Envoy body message per
    // frame, up to `max_message_bytes`, which stays under the protocol's ceiling.
    let mut writer = FrameWriter::with_max_frame(write, ipc_protocol::codec::MAX_FRAME_CEILING);
    let mut reader = FrameReader::with_max_frame(read, HELLO_MAX_FRAME);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.read::<FromPlugin>()).await {
        Ok(Ok(Some(FromPlugin::Hello(h)))) => Ok(h),
        Ok(Ok(Some(other))) => Err(format!("first frame was {}, not Hello", other.kind())),
        Ok(Ok(None)) => Err("closed before Hello".to_owned()),
        Ok(Err(e)) => Err(format!("bad first frame: {e}")),
        Err(_) => Err(format!("no Hello within {HELLO_TIMEOUT:?}")),
    };
    let verdict = match hello {
        Err(reason) => Err(Refuse {
            code: RefuseCode::BadHandshake,
            reason,
        }),
        Ok(hello) => check_hello(&link, &hello).map(|w| (hello, w)),
    };
    match verdict {
        Ok((hello, welcome)) => {
            if let Err(e) = writer.send(&ToPlugin::Welcome(welcome.clone())).await {
                tracing::warn!(plugin = %link.name(), error = %e, "cannot send Welcome");
                return;
            }
            reader.set_max_frame(live_max_frame(&link.config()));
            let pid = peer_pid.map_or(hello.pid, |p| p as u32);
            // Checked again under the link's own lock: two plugins racing through the handshake
            // must not both attach.
            if link
                .attach(pid, hello.subscriptions, &welcome, reader, writer)
                .is_none()
            {
                tracing::warn!(plugin = %link.name(), pid, "second connection lost the race; closed");
            }
        }
        Err(refuse) => refuse_peer(&link, &metrics, &mut writer, refuse).await,
    }
}

/// Counts a refusal and logs it, at a limited rate (a flood of strangers must not flood the log).
fn count_refusal(link: &PluginLink, metrics: &Metrics, refuse: &Refuse) {
    link.note_error(&format!(
        "handshake refused ({:?}): {}",
        refuse.code, refuse.reason
    ));
    metrics
        .handshakes_refused
        .get_or_create(&Metrics::reason(link.name(), &format!("{:?}", refuse.code)))
        .inc();
    if let Some(held) = crate::observe::logging::limited::allow("plugin handshake refused") {
        tracing::warn!(plugin = %link.name(), code = ?refuse.code, reason = %refuse.reason, held_back = held, "plugin handshake refused");
    }
}

/// A peer-supplied text as a refusal repeats it: at most [`PEER_TEXT_MAX`] bytes, and said so.
fn peer_text(text: &str) -> String {
    if text.len() <= PEER_TEXT_MAX {
        return text.to_owned();
    }
    let mut end = PEER_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// Logs and counts a refusal, sends it, and (by dropping the connection afterwards) closes.
async fn refuse_peer(
    link: &PluginLink,
    metrics: &Metrics,
    writer: &mut FrameWriter<quiet_socket::WriteHalf>,
    refuse: Refuse,
) {
    count_refusal(link, metrics, &refuse);
    // A Refuse is a few hundred bytes: it fits the socket's buffer even when the peer never
    // reads, so this does not wait on the peer.
    let _ = writer.send(&ToPlugin::Refuse(refuse)).await;
}

/// Ends a connection refused before its first frame was read: shuts our side (the peer reads the
/// `Refuse`, then end-of-file) and throws away what the peer still sends, into a fixed buffer,
/// until it closes or [`REFUSED_LINGER`] passes. Closing at once instead would make a plugin that
/// has not yet written its `Hello` fail on that write (EPIPE) and never see why it was refused.
async fn discard_until_closed(
    mut read: quiet_socket::ReadHalf,
    mut writer: FrameWriter<quiet_socket::WriteHalf>,
) {
    let _ = writer.get_mut().shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSED_LINGER, async {
        while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// What the peer's credentials say.
enum Peer {
    /// It may go on to its `Hello`.
    Allowed,
    /// It may not.
    Refused(Refuse),
    /// The front is starting the plugin's process and does not know its pid yet.
    Pending,
}

/// The checks that need nothing but the peer's credentials.
fn check_peer(link: &PluginLink, uid: u32, pid: Option<i32>) -> Peer {
    let own_uid = nix::unistd::getuid().as_raw();
    if uid != own_uid && Some(uid) != link.config().process.uid {
        return Peer::Refused(Refuse {
            code: RefuseCode::NotAllowed,
            reason: format!(
                "peer uid {uid} is neither the front's ({own_uid}) nor plugins.{}.uid",
                link.name()
            ),
        });
    }
    match (link.spawned_pid(), pid) {
        (Some(spawned), Some(pid)) if spawned != pid as u32 => Peer::Refused(Refuse {
            code: RefuseCode::NotAllowed,
            reason: format!(
                "pid {pid} is not the process the front spawned for `{}` (pid {spawned}); \
                 set spawn = false to run it yourself",
                link.name()
            ),
        }),
        // A spawned plugin whose own process is on its way (starting, or in its backoff) takes
        // only that process; a stopped one takes a hand-started instance.
        (None, _)
            if link.config().process.spawn
                && matches!(
                    link.expected(),
                    crate::plugin::link::Expected::Coming { .. }
                ) =>
        {
            Peer::Pending
        }
        _ => Peer::Allowed,
    }
}

/// The checks on a `Hello` from a peer that passed [`check_peer`].
fn check_hello(link: &PluginLink, hello: &Hello) -> Result<ipc_protocol::Welcome, Refuse> {
    if hello.plugin != link.name() {
        return Err(Refuse {
            code: RefuseCode::UnknownPlugin,
            reason: format!(
                "this socket serves plugin `{}`, not `{}`",
                link.name(),
                peer_text(&hello.plugin)
            ),
        });
    }
    if link.is_connected() {
        return Err(Refuse {
            code: RefuseCode::AlreadyConnected,
            reason: format!(
                "plugin `{}` already has a live connection (pid {}); stop that process first",
                link.name(),
                link.connection().map_or(0, |c| c.pid())
            ),
        });
    }
    answer_hello(
        hello,
        link.config().process.config.clone(),
        ipc_protocol::Limits {
            budget_bytes: link.config().process.budget_bytes as u64,
            metadata_max_bytes: link.config().process.metadata_max_bytes as u64,
        },
    )
}
