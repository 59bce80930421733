//! The plugin sockets: one listening Unix socket per configured plugin under
//! `<runtime_dir>/plugins/<name>.sock`, and the handshake run on every connection.
//!
//! The checks come in this order: peer credentials (`SO_PEERCRED`: the front's uid or the
//! plugin's configured `uid`; for a spawned plugin, the pid the front spawned), the first frame
//! must be a `Hello` naming this socket's plugin, no other live connection, and finally the
//! protocol version ([`ipc_protocol::handshake::answer_hello`]). A refusal is sent with its reason
//! and the connection closed; nothing else is affected.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipc_protocol::handshake::answer_hello;
use ipc_protocol::{FrameReader, FrameWriter, FromPlugin, Hello, Refuse, RefuseCode, ToPlugin};
use tokio::net::{UnixListener, UnixStream};

use crate::link::PluginLink;
use crate::metrics::Metrics;

/// How long a connected peer has to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates `dir` (mode 0750) if needed.
pub fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
}

/// Binds a plugin's socket: removes a stale file, binds, sets mode 0600 (0660 and the group's
/// ownership when a group is configured).
pub fn bind_plugin_socket(path: &Path, group: Option<&str>) -> Result<UnixListener, String> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "cannot remove stale socket {}: {e}",
                path.display()
            ))
        }
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .map_err(|e| format!("cannot look up group `{group}`: {e}"))?
            .ok_or_else(|| format!("group `{group}` does not exist"))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| format!("cannot give {} to group `{group}`: {e}", path.display()))?;
    }
    Ok(listener)
}

/// Accepts connections for `link` until the task is dropped.
pub async fn accept_loop(listener: UnixListener, link: Arc<PluginLink>, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let link = link.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move { handshake(stream, link, metrics).await });
            }
            Err(e) => {
                tracing::warn!(plugin = %link.name(), error = %e, "plugin socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handshake(stream: UnixStream, link: Arc<PluginLink>, metrics: Arc<Metrics>) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(plugin = %link.name(), error = %e, "cannot read peer credentials");
            return;
        }
    };
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::new(read);
    let mut writer = FrameWriter::new(write);
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
        Ok(hello) => check(&link, &hello, cred.uid(), cred.pid()).map(|w| (hello, w)),
    };
    match verdict {
        Ok((hello, welcome)) => {
            if let Err(e) = writer.send(&ToPlugin::Welcome(welcome)).await {
                tracing::warn!(plugin = %link.name(), error = %e, "cannot send Welcome");
                return;
            }
            let pid = cred.pid().map_or(hello.pid, |p| p as u32);
            // Checked again under the link's own lock: two plugins racing through the handshake
            // must not both attach.
            if link
                .attach(pid, hello.subscriptions, reader, writer)
                .is_none()
            {
                tracing::warn!(plugin = %link.name(), pid, "second connection lost the race; closed");
            }
        }
        Err(refuse) => {
            tracing::warn!(plugin = %link.name(), code = ?refuse.code, reason = %refuse.reason, "plugin handshake refused");
            metrics
                .handshakes_refused
                .get_or_create(&Metrics::reason(link.name(), &format!("{:?}", refuse.code)))
                .inc();
            let _ = writer.send(&ToPlugin::Refuse(refuse)).await;
        }
    }
}

fn check(
    link: &PluginLink,
    hello: &Hello,
    uid: u32,
    pid: Option<i32>,
) -> Result<ipc_protocol::Welcome, Refuse> {
    let own_uid = nix::unistd::getuid().as_raw();
    if uid != own_uid && Some(uid) != link.config().uid {
        return Err(Refuse {
            code: RefuseCode::NotAllowed,
            reason: format!(
                "peer uid {uid} is neither the front's ({own_uid}) nor plugins.{}.uid",
                link.name()
            ),
        });
    }
    if let (Some(spawned), Some(pid)) = (link.spawned_pid(), pid) {
        if spawned != pid as u32 {
            return Err(Refuse {
                code: RefuseCode::NotAllowed,
                reason: format!(
                    "pid {pid} is not the process the front spawned for `{}` (pid {spawned}); \
                     set spawn = false to run it yourself",
                    link.name()
                ),
            });
        }
    }
    if hello.plugin != link.name() {
        return Err(Refuse {
            code: RefuseCode::UnknownPlugin,
            reason: format!(
                "this socket serves plugin `{}`, not `{}`",
                link.name(),
                hello.plugin
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
        link.config().config.clone(),
        ipc_protocol::Limits {
            budget_bytes: link.config().budget_bytes as u64,
            metadata_max_bytes: link.config().metadata_max_bytes as u64,
        },
    )
}
