//! Front upgrade by handover: the running front starts the binary now on disk, passes it its
//! listeners, and drains once the new front serves, so neither long streams nor new requests
//! notice.
//!
//! The steps, old front (O) and new front (N):
//! 1. O (on `plugvisor upgrade`, or SIGUSR2) hard-links its plugin and control sockets into
//!    `<runtime_dir>/.upgrade-<pid>/` (so a failed N can be undone), binds `handover.sock` there,
//!    and runs its own executable path again with the same arguments and [`LAUNCH_ENV`]: that
//!    process ([`launch_main`]) starts the real N, prints its pid and exits, so N is re-parented
//!    to the service manager (systemd then sees N's exit like any main process's).
//! 2. N connects to [`SOCKET_ENV`]; O checks it is that pid (`SO_PEERCRED`) and sends an
//!    [`Message::Offer`] carrying, by `SCM_RIGHTS`, the instance lock's open file, the ext_proc
//!    listener and the admin listener.
//! 3. N starts with those (its own plugins on the same socket paths, which it rebinds; its
//!    control socket), without accepting yet. If the offer named followers (plugins run by
//!    someone else that follow `Reconnect`), N says [`Message::Listening`] and O asks each of
//!    them to reconnect: their next connection reaches N. N answers [`Message::Ready`] once
//!    every plugin it spawns is connected (and the followers, or `ready_timeout_ms` passed for
//!    them), or [`Message::NotReady`] at `ready_timeout_ms`.
//! 4. O says [`Message::Go`]; N accepts on the shared listeners and answers
//!    [`Message::Serving`]; O makes N systemd's main process (`MAINPID=`), stops accepting,
//!    sends GOAWAY on its connections (tonic's graceful shutdown) and says [`Message::Main`];
//!    N sends `READY=1` and feeds the watchdog from then on.
//! 5. O finishes its in-flight streams with its own plugins and exits once the last ends, or at
//!    `upgrade_drain_ms`.
//!
//! A new front that exits, is not ready within `ready_timeout_ms` plus [`START_MARGIN`], or says
//! it is not ready is killed; O restores its socket paths from the links and serves on as if
//! nothing happened, and the command fails with the reason.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Set for the process that starts the new front ([`launch_main`]).
pub const LAUNCH_ENV: &str = "PLUGVISOR_UPGRADE_LAUNCH";
/// The handover socket a new front connects to; set only for a front started by an upgrade.
pub const SOCKET_ENV: &str = "PLUGVISOR_UPGRADE_SOCKET";
/// What the new front gets on top of `ready_timeout_ms` to exec, bind and spawn its plugins.
pub const START_MARGIN: Duration = Duration::from_secs(5);
/// How long the new front waits for each of the old front's answers once it is ready.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest handover message.
const MAX_MESSAGE: usize = 64 * 1024;

/// Why an upgrade did not happen. The old front keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The handover directory or socket could not be set up.
    #[error("cannot prepare the handover in {dir}")]
    Prepare {
        /// `<runtime_dir>/.upgrade-<pid>`.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The executable could not be started.
    #[error("cannot start the new binary {exe}")]
    Spawn {
        /// The path run.
        exe: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The executable ended before it started a front.
    #[error("the new binary {exe} {what} before it started a front; check that it runs (`{exe} --version`)")]
    Launch {
        /// The path run.
        exe: PathBuf,
        /// What it did instead (`exited with exit status: 3`).
        what: String,
    },
    /// The new front exited before it was ready.
    #[error("the new front (pid {pid}) exited before it was ready; its own log lines say why")]
    Exited {
        /// Its pid.
        pid: u32,
    },
    /// The new front did not get ready in time.
    #[error("the new front{} was not ready within {}ms (ready_timeout_ms plus {}s to start); it was killed", .pid.map_or(String::new(), |p| format!(" (pid {p})")), .waited.as_millis(), START_MARGIN.as_secs())]
    Timeout {
        /// Its pid, once known.
        pid: Option<u32>,
        /// How long it had.
        waited: Duration,
    },
    /// The new front said it cannot serve.
    #[error("the new front (pid {pid}) is not ready: {reason}; it was stopped")]
    NotReady {
        /// Its pid.
        pid: u32,
        /// Its reason.
        reason: String,
    },
    /// Someone else connected to the handover socket.
    #[error(
        "pid {got} connected to the handover socket instead of the new front (pid {expected})"
    )]
    WrongPeer {
        /// The new front.
        expected: u32,
        /// The peer.
        got: i32,
    },
    /// The handover exchange failed.
    #[error("the handover with the new front failed")]
    Exchange(#[source] io::Error),
    /// This front already handed over.
    #[error("this front (pid {pid}) already handed over to pid {to} and is draining; run the command against the serving front")]
    AlreadyHandedOver {
        /// This front.
        pid: u32,
        /// The front it handed over to.
        to: u32,
    },
    /// The front runs without the service loop that drives upgrades.
    #[error("this front does not take upgrades (it was not started as `plugvisor` serving)")]
    NotAvailable,
}

/// One line of the handover conversation (JSON), in the order they are sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Message {
    /// Old → new, with the fds `[instance lock, ext_proc listener, admin listener if any]`.
    Offer {
        /// The old front.
        from_pid: u32,
        /// Whether an admin listener is among the fds.
        admin: bool,
        /// The ext_proc socket's file is not the fronts' to remove (systemd's socket unit owns
        /// it).
        keep_listen_file: bool,
        /// The service's `WATCHDOG_USEC`, which the new front feeds once it is the main process.
        watchdog_usec: Option<u64>,
        /// The old fronts still draining, the sender last: stopped with the new front.
        draining: Vec<u32>,
        /// Plugins run by someone else, connected to the old front, that follow `Reconnect`:
        /// the new front says [`Message::Listening`] once their sockets are its own, the old
        /// front then asks them over, and the new front waits for them before it is ready.
        /// (Absent from an older front: none.)
        #[serde(default)]
        followers: Vec<String>,
    },
    /// New → old, only when the offer named followers: its plugin sockets are bound, so a
    /// plugin that connects to one now reaches the new front.
    Listening {
        /// The new front.
        pid: u32,
    },
    /// New → old: every plugin it spawns is connected; it accepts once told to.
    Ready {
        /// The new front.
        pid: u32,
    },
    /// New → old: it cannot serve (and exits).
    NotReady {
        /// Why.
        reason: String,
    },
    /// Old → new: accept on the listeners.
    Go,
    /// New → old: accepting.
    Serving,
    /// Old → new: the old front stopped accepting and made the new one the service's main
    /// process; it sends nothing more to the service manager.
    Main,
}

/// One end of the handover socket: JSON lines, the first one with fds.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, message: &Message) -> io::Result<()> {
        self.stream.write_all(&line(message)?).await
    }

    async fn send_with_fds(&mut self, message: &Message, fds: &[RawFd]) -> io::Result<()> {
        let bytes = line(message)?;
        let fd = self.stream.as_raw_fd();
        // The fds ride on the first byte sent; the rest of a short write follows plainly.
        let sent = self
            .stream
            .async_io(Interest::WRITABLE, || {
                let iov = [io::IoSlice::new(&bytes)];
                let cmsg = [ControlMessage::ScmRights(fds)];
                sendmsg::<UnixAddr>(fd, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            })
            .await?;
        self.stream.write_all(&bytes[sent..]).await
    }

    /// The next message and any fds that came with it; `None` at a clean end.
    async fn recv_with_fds(&mut self) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut fds = Vec::new();
        loop {
            if let Some(message) = self.take_line()? {
                return Ok(Some((message, fds)));
            }
            let fd = self.stream.as_raw_fd();
            let mut chunk = [0u8; 4096];
            let (n, received) = self
                .stream
                .async_io(Interest::READABLE, || {
                    let mut iov = [io::IoSliceMut::new(&mut chunk)];
                    let mut space = nix::cmsg_space!([RawFd; 4]);
                    let msg = recvmsg::<UnixAddr>(
                        fd,
                        &mut iov,
                        Some(&mut space),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let mut received = Vec::new();
                    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            received.extend(raw);
                        }
                    }
                    Ok((msg.bytes, received))
                })
                .await?;
            fds.extend(crate::shell::systemd::adopt_received_fds(received));
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the handover socket closed in the middle of a message",
                    ))
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next message; `None` at a clean end. Fds sent with it are not expected and are
    /// closed.
    async fn recv(&mut self) -> io::Result<Option<Message>> {
        Ok(self.recv_with_fds().await?.map(|(message, _fds)| message))
    }

    fn take_line(&mut self) -> io::Result<Option<Message>> {
        let Some(end) = self.buf.iter().position(|b| *b == b'\n') else {
            if self.buf.len() > MAX_MESSAGE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("handover message longer than {MAX_MESSAGE} bytes"),
                ));
            }
            return Ok(None);
        };
        let line: Vec<u8> = self.buf.drain(..=end).collect();
        serde_json::from_slice(&line[..end])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

fn line(message: &Message) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// What the control socket asks the service loop for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// An upgrade: answered once the new front serves, or with why not.
    Upgrade,
    /// A reload of the config file, as SIGHUP: answered with what it applied and what not.
    Reload,
}

/// A request from the control socket: answered with what happened.
#[derive(Debug)]
pub struct Ask {
    /// What is asked.
    pub what: Asked,
    /// `Ok(message)` once done, else why not.
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// The control socket's way to ask the service loop for an upgrade or a reload.
#[derive(Debug, Clone)]
pub struct Requests {
    tx: mpsc::Sender<Ask>,
    /// Set once the service loop took the receiving end: a front run without it (a test's
    /// [`crate::start`]) refuses at once instead of leaving the request unanswered.
    served: Arc<AtomicBool>,
}

/// The service loop's end of [`Requests`].
#[derive(Debug)]
pub struct Receiver {
    rx: mpsc::Receiver<Ask>,
    served: Arc<AtomicBool>,
}

impl Receiver {
    /// The receiving end, for the loop that carries upgrades out.
    pub fn serve(self) -> mpsc::Receiver<Ask> {
        self.served.store(true, Ordering::SeqCst);
        self.rx
    }
}

impl Requests {
    /// A handle and the receiving end the service loop reads.
    pub fn channel() -> (Requests, Receiver) {
        let (tx, rx) = mpsc::channel(4);
        let served = Arc::new(AtomicBool::new(false));
        (
            Requests {
                tx,
                served: served.clone(),
            },
            Receiver { rx, served },
        )
    }

    /// Asks for an upgrade and waits for its outcome.
    pub async fn upgrade(&self) -> Result<String, String> {
        self.ask(Asked::Upgrade, || UpgradeError::NotAvailable.to_string())
            .await
    }

    /// Asks for a reload of the config file and waits for what it did.
    pub async fn reload(&self) -> Result<String, String> {
        self.ask(Asked::Reload, || {
            "no service loop carries reloads out in this front (started as a library)".to_owned()
        })
        .await
    }

    async fn ask(&self, what: Asked, unavailable: impl Fn() -> String) -> Result<String, String> {
        if !self.served.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Ask { what, reply }).await.is_err() {
            return Err(unavailable());
        }
        answer.await.unwrap_or_else(|_| Err(unavailable()))
    }
}

/// What a front keeps to hand its listeners over: its own copies of the fds (the servers own
/// the listeners themselves).
#[derive(Debug)]
pub struct Listeners {
    ext_proc: Option<OwnedFd>,
    admin: Option<OwnedFd>,
    keep_listen_file: bool,
}

impl Listeners {
    /// Copies of the listeners' fds (close-on-exec). `keep_listen_file`: the ext_proc socket's
    /// file belongs to the service manager.
    pub fn new(
        ext_proc: BorrowedFd<'_>,
        admin: Option<BorrowedFd<'_>>,
        keep_listen_file: bool,
    ) -> io::Result<Listeners> {
        Ok(Listeners {
            ext_proc: Some(ext_proc.try_clone_to_owned()?),
            admin: admin.map(|a| a.try_clone_to_owned()).transpose()?,
            keep_listen_file,
        })
    }

    /// Adds the admin listener (bound after the ext_proc one).
    pub fn set_admin(&mut self, admin: BorrowedFd<'_>) -> io::Result<()> {
        self.admin = Some(admin.try_clone_to_owned()?);
        Ok(())
    }

    /// Whether the ext_proc socket's file belongs to the service manager.
    pub fn keeps_listen_file(&self) -> bool {
        self.keep_listen_file
    }

    /// Closes this front's copies once another front serves them, so the listeners close when
    /// that front stops even while this one still drains.
    pub fn release(&mut self) {
        self.ext_proc = None;
        self.admin = None;
    }
}

/// What the old front hands over.
pub struct Plan<'a> {
    /// The runtime directory.
    pub runtime_dir: std::path::PathBuf,
    /// Socket paths the new front rebinds (plugins, control), restored if it fails.
    pub sockets: Vec<PathBuf>,
    /// The instance lock's open file.
    pub lock: BorrowedFd<'a>,
    /// The listeners.
    pub listeners: &'a Listeners,
    /// The service's watchdog period.
    pub watchdog_usec: Option<u64>,
    /// Older fronts still draining.
    pub draining: Vec<u32>,
    /// `ready_timeout_ms` of the running config.
    pub ready_timeout: Duration,
    /// Plugins run by someone else that follow `Reconnect`: asked over to the new front once it
    /// listens.
    pub followers: Vec<Arc<crate::plugin::link::PluginLink>>,
}

/// A new front started and ready, not yet serving. Dropped without [`Attempt::commit`], it is
/// killed and the socket paths it took are given back to the old front.
pub struct Attempt {
    dir: PathBuf,
    /// (link in the handover directory, the path it backs up).
    backups: Vec<(PathBuf, PathBuf)>,
    pid: Option<u32>,
    conn: Option<Conn>,
    committed: bool,
    /// Followers asked to reconnect: if the attempt fails, the old connection is again their
    /// only one.
    asked: Vec<Arc<crate::plugin::link::PluginLink>>,
}

impl Attempt {
    /// The new front.
    pub fn pid(&self) -> u32 {
        self.pid.unwrap_or_default()
    }

    /// Lets the new front accept; returns once it does. Then the caller makes it the main
    /// process, stops accepting, and calls [`Attempt::finish`].
    pub async fn go(&mut self) -> Result<(), UpgradeError> {
        let pid = self.pid();
        let conn = self.conn.as_mut().ok_or(UpgradeError::Exited { pid })?;
        conn.send(&Message::Go)
            .await
            .map_err(UpgradeError::Exchange)?;
        match tokio::time::timeout(ANSWER_TIMEOUT, conn.recv()).await {
            Ok(Ok(Some(Message::Serving))) => Ok(()),
            Ok(Ok(None)) => Err(UpgradeError::Exited { pid }),
            Ok(Ok(Some(other))) => Err(UpgradeError::Exchange(unexpected(&other))),
            Ok(Err(e)) => Err(UpgradeError::Exchange(e)),
            Err(_) => Err(UpgradeError::Timeout {
                pid: Some(pid),
                waited: ANSWER_TIMEOUT,
            }),
        }
    }

    /// Tells the new front it is the main process now, and forgets the backups: the new front
    /// owns the paths.
    pub async fn finish(mut self) {
        self.committed = true;
        if let Some(conn) = self.conn.as_mut() {
            if let Err(e) = conn.send(&Message::Main).await {
                tracing::warn!(error = %e, "cannot tell the new front it is the main process");
            }
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.committed {
            if let Some(pid) = self.pid {
                kill_and_wait(pid, Duration::from_secs(5));
            }
            for link in &self.asked {
                link.cancel_reconnect();
            }
            // The new front is gone, so nothing removes these paths after they are restored.
            for (backup, path) in &self.backups {
                if let Err(e) = std::fs::rename(backup, path) {
                    tracing::error!(path = %path.display(), error = %e, "cannot restore a socket path after the failed upgrade; restart the plugin or the front");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the new front and waits until it is ready to serve.
pub async fn start_successor(plan: Plan<'_>) -> Result<Attempt, UpgradeError> {
    let dir = plan
        .runtime_dir
        .join(format!(".upgrade-{}", std::process::id()));
    let prepare = |source| UpgradeError::Prepare {
        dir: dir.clone(),
        source,
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(prepare)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(prepare)?;
    let mut attempt = Attempt {
        dir: dir.clone(),
        backups: Vec::new(),
        pid: None,
        conn: None,
        committed: false,
        asked: Vec::new(),
    };
    for (i, path) in plan.sockets.iter().enumerate() {
        let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
        if !is_socket {
            continue;
        }
        // A second name for the same socket: connecting to either reaches this front, and
        // renaming it back undoes the new front's bind atomically.
        let backup = dir.join(format!("{i}.sock"));
        std::fs::hard_link(path, &backup).map_err(|e| {
            prepare(io::Error::new(
                e.kind(),
                format!(
                    "cannot link {} to {}: {e}",
                    path.display(),
                    backup.display()
                ),
            ))
        })?;
        attempt.backups.push((backup, path.clone()));
    }
    let socket = dir.join("handover.sock");
    let listener = UnixListener::bind(&socket).map_err(prepare)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(prepare)?;

    let waited = plan.ready_timeout + START_MARGIN;
    let deadline = Instant::now() + waited;
    let timeout = |pid| UpgradeError::Timeout { pid, waited };
    let exe = new_binary().map_err(|source| UpgradeError::Spawn {
        exe: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let pid = launch(&exe, &socket, deadline)
        .await?
        .ok_or_else(|| timeout(None))?;
    attempt.pid = Some(pid);
    tracing::info!(pid, exe = %exe.display(), "new front started; waiting until it is ready");

    let stream = tokio::select! {
        accepted = listener.accept() => accepted.map_err(UpgradeError::Exchange)?.0,
        () = gone(pid) => return Err(UpgradeError::Exited { pid }),
        () = tokio::time::sleep_until(deadline) => return Err(timeout(Some(pid))),
    };
    let peer = stream.peer_cred().map_err(UpgradeError::Exchange)?;
    if peer.pid() != Some(pid as i32) {
        return Err(UpgradeError::WrongPeer {
            expected: pid,
            got: peer.pid().unwrap_or(-1),
        });
    }
    let mut conn = Conn::new(stream);
    let mut fds = vec![plan.lock.as_raw_fd()];
    let ext_proc = plan
        .listeners
        .ext_proc
        .as_ref()
        .ok_or(UpgradeError::NotAvailable)?;
    fds.push(ext_proc.as_raw_fd());
    if let Some(admin) = &plan.listeners.admin {
        fds.push(admin.as_raw_fd());
    }
    let mut draining = plan.draining.clone();
    draining.push(std::process::id());
    let offer = Message::Offer {
        from_pid: std::process::id(),
        admin: plan.listeners.admin.is_some(),
        keep_listen_file: plan.listeners.keep_listen_file,
        watchdog_usec: plan.watchdog_usec,
        draining,
        followers: plan.followers.iter().map(|l| l.name().to_owned()).collect(),
    };
    conn.send_with_fds(&offer, &fds)
        .await
        .map_err(UpgradeError::Exchange)?;
    loop {
        let answer = tokio::select! {
            answer = conn.recv() => answer.map_err(UpgradeError::Exchange)?,
            () = tokio::time::sleep_until(deadline) => return Err(timeout(Some(pid))),
        };
        match answer {
            Some(Message::Listening { .. }) if attempt.asked.is_empty() => {
                let why = format!("front upgrade to pid {pid}");
                for link in &plan.followers {
                    if link.ask_reconnect(&why) {
                        attempt.asked.push(link.clone());
                    }
                }
            }
            Some(Message::Ready { .. }) => {
                attempt.conn = Some(conn);
                return Ok(attempt);
            }
            Some(Message::NotReady { reason }) => {
                return Err(UpgradeError::NotReady { pid, reason })
            }
            Some(other) => return Err(UpgradeError::Exchange(unexpected(&other))),
            None => return Err(UpgradeError::Exited { pid }),
        }
    }
}

fn unexpected(message: &Message) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected handover message {message:?}"),
    )
}

/// The executable this process was started from, as the path names it now: after a package
/// manager replaced the file, that is the new binary.
fn new_binary() -> io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let bytes = exe.as_os_str().as_bytes();
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(path) => PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        None => exe,
    })
}

/// Runs `exe` as the launcher of the new front and reads the pid it prints; `None` when it says
/// nothing by `deadline` (it is then killed).
async fn launch(exe: &Path, socket: &Path, deadline: Instant) -> Result<Option<u32>, UpgradeError> {
    let mut launcher = tokio::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(LAUNCH_ENV, "1")
        .env(SOCKET_ENV, socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            exe: exe.to_owned(),
            source,
        })?;
    let mut out = launcher.stdout.take().expect("stdout is piped");
    let said = async {
        let mut text = Vec::new();
        let _ = (&mut out).take(256).read_to_end(&mut text).await;
        let status = launcher.wait().await;
        (text, status)
    };
    let Ok((text, status)) = tokio::time::timeout_at(deadline, said).await else {
        return Ok(None);
    };
    let failed = |what: String| UpgradeError::Launch {
        exe: exe.to_owned(),
        what,
    };
    let status = status.map_err(|e| failed(format!("could not be waited for ({e})")))?;
    if !status.success() {
        return Err(failed(format!("exited with {status}")));
    }
    let text = String::from_utf8_lossy(&text);
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| failed(format!("printed `{}` instead of a pid", text.trim())))
}

/// `plugvisor` run with [`LAUNCH_ENV`]: starts the new front (this executable, same arguments,
/// stdout joined to stderr), prints its pid, and exits at once, so the new front is re-parented
/// to the service manager rather than staying a child of the old front.
pub fn launch_main() -> ! {
    use std::os::fd::AsFd;
    let exe = match new_binary() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("plugvisor: upgrade: cannot find this executable: {e}");
            std::process::exit(1);
        }
    };
    let stdout = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::process::Stdio::from)
        .unwrap_or_else(|_| std::process::Stdio::null());
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match std::process::Command::new(&exe)
        .args(args)
        .env_remove(LAUNCH_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .spawn()
    {
        Ok(child) => {
            println!("{}", child.id());
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("plugvisor: upgrade: cannot start {}: {e}", exe.display());
            std::process::exit(1);
        }
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Resolves once `pid` is gone.
async fn gone(pid: u32) {
    while alive(pid) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL, then wait up to `limit` for the process to be gone.
fn kill_and_wait(pid: u32, limit: Duration) {
    use nix::sys::signal::{kill, Signal};
    let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
    let start = std::time::Instant::now();
    while alive(pid) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The new front's side: the old front it took over from, and what it passed.
pub struct Predecessor {
    conn: Conn,
    /// The old front.
    pub from_pid: u32,
    /// The instance lock's open file.
    pub lock: OwnedFd,
    /// The ext_proc listener.
    pub ext_proc: OwnedFd,
    /// The admin listener.
    pub admin: Option<OwnedFd>,
    /// The ext_proc socket's file is the service manager's.
    pub keep_listen_file: bool,
    /// The service's watchdog period.
    pub watchdog_usec: Option<u64>,
    /// Old fronts still draining.
    pub draining: Vec<u32>,
    /// Plugins run by someone else that the old front asks over once this one listens.
    pub followers: Vec<String>,
}

impl Predecessor {
    /// Connects to the old front's handover socket and takes what it offers.
    pub async fn connect(path: &Path) -> io::Result<Predecessor> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot reach the old front at {}: {e}", path.display()),
            )
        })?;
        let mut conn = Conn::new(stream);
        let (message, fds) = tokio::time::timeout(ANSWER_TIMEOUT, conn.recv_with_fds())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no offer from the old front"))??
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the old front hung up"))?;
        let Message::Offer {
            from_pid,
            admin,
            keep_listen_file,
            watchdog_usec,
            draining,
            followers,
        } = message
        else {
            return Err(unexpected(&message));
        };
        let expected = 2 + usize::from(admin);
        if fds.len() != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the old front passed {} fds, expected {expected}",
                    fds.len()
                ),
            ));
        }
        let mut fds = fds.into_iter();
        let lock = fds.next().expect("counted");
        let ext_proc = fds.next().expect("counted");
        Ok(Predecessor {
            conn,
            from_pid,
            lock,
            ext_proc,
            admin: fds.next(),
            keep_listen_file,
            watchdog_usec,
            draining,
            followers,
        })
    }

    /// Says this front's plugin sockets are bound, so the old front asks the followers over.
    pub async fn listening(&mut self) -> io::Result<()> {
        self.conn
            .send(&Message::Listening {
                pid: std::process::id(),
            })
            .await
    }

    /// Says this front is ready and waits for the word to accept. An error: the old front is
    /// gone or gave up (then this front must exit without serving).
    pub async fn ready(&mut self) -> io::Result<()> {
        self.conn
            .send(&Message::Ready {
                pid: std::process::id(),
            })
            .await?;
        // The old front decides within its own deadline; it kills this front past it.
        match self.conn.recv().await? {
            Some(Message::Go) => Ok(()),
            Some(other) => Err(unexpected(&other)),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the old front hung up before it let this one serve",
            )),
        }
    }

    /// Says this front cannot serve.
    pub async fn not_ready(&mut self, reason: String) {
        let _ = self.conn.send(&Message::NotReady { reason }).await;
    }

    /// Says this front accepts, and waits until the old one made it the main process (true) or
    /// hung up without saying so (false).
    pub async fn serving(&mut self) -> bool {
        if self.conn.send(&Message::Serving).await.is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(ANSWER_TIMEOUT, self.conn.recv()).await,
            Ok(Ok(Some(Message::Main)))
        )
    }
}

/// Asks the older fronts still draining to cut their drain to `shutdown_grace_ms` (SIGTERM), when
/// this front stops: a service stop must not wait for their `upgrade_drain_ms`. Only processes
/// still running this front's command line are signalled (a pid may have been reused).
pub fn stop_draining(pids: &[u32]) -> Vec<u32> {
    use nix::sys::signal::{kill, Signal};
    let own = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    pids.iter()
        .copied()
        .filter(|pid| alive(*pid))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == own))
        .filter(|pid| kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGTERM).is_ok())
        .collect()
}

/// Waits up to `limit` until none of `pids` is alive.
pub async fn wait_gone(pids: &[u32], limit: Duration) {
    let all = async {
        for pid in pids {
            gone(*pid).await;
        }
    };
    let _ = tokio::time::timeout(limit, all).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_lines() {
        let m = Message::Offer {
            from_pid: 7,
            admin: true,
            keep_listen_file: false,
            watchdog_usec: Some(10_000_000),
            draining: vec![5, 7],
            followers: vec!["latency".into()],
        };
        let bytes = line(&m).unwrap();
        assert!(bytes.ends_with(b"\n"));
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(r#"{"msg":"offer","from_pid":7"#), "{text}");
        assert_eq!(
            serde_json::from_str::<Message>(text.trim()).unwrap(),
            m,
            "round trip"
        );
        assert_eq!(line(&Message::Go).unwrap(), b"{\"msg\":\"go\"}\n");
        // An older front's offer names no followers: the new front says no `Listening`.
        let older = r#"{"msg":"offer","from_pid":7,"admin":false,"keep_listen_file":false,"watchdog_usec":null,"draining":[7]}"#;
        match serde_json::from_str::<Message>(older).unwrap() {
            Message::Offer { followers, .. } => assert!(followers.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn fds_and_lines_cross_the_handover_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut old, mut new) = (Conn::new(a), Conn::new(b));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        use std::os::fd::AsFd;
        old.send_with_fds(&Message::Go, &[listener.as_fd().as_raw_fd()])
            .await
            .unwrap();
        old.send(&Message::Main).await.unwrap();
        let (message, fds) = new.recv_with_fds().await.unwrap().unwrap();
        assert_eq!(message, Message::Go);
        assert_eq!(fds.len(), 1);
        let passed = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(passed.local_addr().unwrap(), addr, "the same socket");
        assert_eq!(new.recv().await.unwrap(), Some(Message::Main));
        drop(old);
        assert_eq!(new.recv().await.unwrap(), None, "a clean end");
    }

    #[tokio::test]
    async fn a_message_past_the_limit_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut new = Conn::new(b);
        let mut a = a;
        let writer = tokio::spawn(async move {
            let _ = a.write_all(&vec![b'x'; MAX_MESSAGE + 4096 + 1]).await;
            a
        });
        let err = new.recv().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        drop(writer.await);
    }

    #[tokio::test]
    async fn an_upgrade_request_is_refused_at_once_where_no_loop_serves_it() {
        let (requests, receiver) = Requests::channel();
        let refused = requests.upgrade().await.unwrap_err();
        assert!(refused.contains("does not take upgrades"), "{refused}");
        let mut rx = receiver.serve();
        let asked = tokio::spawn(async move { requests.upgrade().await });
        let ask = rx.recv().await.expect("the loop gets the request");
        ask.reply.send(Ok("upgraded".into())).unwrap();
        assert_eq!(asked.await.unwrap(), Ok("upgraded".to_owned()));
    }

    #[test]
    fn liveness_reads_the_process_state() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie counts as gone.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!alive(pid));
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
