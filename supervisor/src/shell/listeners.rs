//! The start-up phase that gets the front its listeners: from the old front in an upgrade, else
//! from systemd's socket activation, else bound here from the configuration; and the ext_proc
//! server over them.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::config::{Config, Listen};
use crate::data_path::ext_proc::Front;
use crate::observe::metrics;
use crate::observe::probe::{ProbeAnswerer, Watched};
use crate::quiet_socket;
use crate::shell::front::RunError;
use crate::shell::{systemd, upgrade};

/// The listeners an upgrade passes from the old front.
#[derive(Debug)]
pub struct Passed {
    /// The ext_proc listener.
    pub ext_proc: OwnedFd,
    /// The admin listener, if the old front had one.
    pub admin: Option<OwnedFd>,
    /// The ext_proc socket's file belongs to the service manager.
    pub keep_listen_file: bool,
}

/// The ext_proc listener and what the front may do with its file.
pub struct ExtProc {
    /// Where it listens (the bound port when the config said port 0).
    pub listen: Listen,
    /// The listener.
    pub listener: systemd::ExtProcListener,
    /// The socket's file is this front's to remove at stop.
    pub remove_listen_file: bool,
    /// The socket's file belongs to systemd (or the old front's systemd): a next front keeps it.
    pub keep_for_next: bool,
}

/// The ext_proc listener: the old front's after an upgrade, else socket activation's `extproc`
/// fd when systemd passed one, else `listen` bound here.
pub async fn ext_proc(config: &Config, passed: Option<&Passed>) -> Result<ExtProc, RunError> {
    let Some(passed) = passed else {
        let (listen, listener, activated) = systemd::bind_ext_proc(&config.listen).await?;
        return Ok(ExtProc {
            listen,
            listener,
            remove_listen_file: !activated,
            keep_for_next: activated,
        });
    };
    let failed = |source| RunError::Listen {
        key: "upgrade",
        addr: "the ext_proc listener passed by the old front".to_owned(),
        source,
    };
    let fd = passed.ext_proc.try_clone().map_err(failed)?;
    let activated = systemd::listening_socket(fd).map_err(|e| failed(std::io::Error::other(e)))?;
    let (listen, listener) = systemd::serve_passed(activated).map_err(failed)?;
    if listen != config.listen {
        tracing::warn!(inherited = %listen, configured = %config.listen, "the config's `listen` differs from the listener taken over; keeping the listener (a new address needs a restart)");
    }
    // Not this front's to remove until it serves it (see `Running::open_accept`).
    Ok(ExtProc {
        listen,
        listener,
        remove_listen_file: false,
        keep_for_next: passed.keep_listen_file,
    })
}

/// The admin listener for `admin_listen`: the old front's when it listens where the config says
/// (port 0: the port the old front was given), else bound here. Its copy for a next upgrade goes
/// into `copies`.
pub async fn admin(
    addr: Option<SocketAddr>,
    passed: Option<&Passed>,
    copies: &mut upgrade::Listeners,
) -> Result<Option<tokio::net::TcpListener>, RunError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let failed = |source| RunError::Listen {
        key: "admin_listen",
        addr: addr.to_string(),
        source,
    };
    let inherited = match passed.and_then(|p| p.admin.as_ref()) {
        Some(fd) => {
            let l = std::net::TcpListener::from(fd.try_clone().map_err(failed)?);
            match l.local_addr() {
                Ok(a) if a == addr || (addr.port() == 0 && a.ip() == addr.ip()) => {
                    l.set_nonblocking(true).map_err(failed)?;
                    Some(tokio::net::TcpListener::from_std(l).map_err(failed)?)
                }
                _ => None,
            }
        }
        None => None,
    };
    let listener = match inherited {
        Some(l) => l,
        None => metrics::bind_admin(addr).await.map_err(failed)?,
    };
    copies
        .set_admin(listener.as_fd())
        .map_err(|source| RunError::Setup {
            what: "a copy of the admin listener for upgrades".into(),
            source,
        })?;
    Ok(Some(listener))
}

/// Serves ext_proc on `listener` once `gate` opens, until `shutdown` resolves. The accept stream
/// answers the watchdog's probe whenever the server polls it.
pub fn serve_ext_proc(
    listener: systemd::ExtProcListener,
    service: ExternalProcessorServer<Front>,
    mut gate: watch::Receiver<bool>,
    answerer: ProbeAnswerer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    tokio::spawn(async move {
        if gate.wait_for(|open| *open).await.is_err() {
            return Ok(());
        }
        let server = tonic::transport::Server::builder().add_service(service);
        match listener {
            systemd::ExtProcListener::Tcp(l) => {
                let incoming = Watched::new(nodelay_incoming(l), answerer);
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            systemd::ExtProcListener::Unix(l) => {
                let incoming = Watched::new(quiet_incoming(l), answerer);
                server
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        }
    })
}

/// The accepted connections of a Unix listener, each as a [`quiet_socket::Stream`]: the front is
/// not woken each time Envoy reads one of its replies.
pub fn quiet_incoming(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<quiet_socket::Stream>> {
    use tokio_stream::StreamExt as _;
    UnixListenerStream::new(listener).map(|accepted| quiet_socket::Stream::new(accepted?))
}

/// The accepted connections of a TCP listener, each with `TCP_NODELAY` set.
///
/// `Server::tcp_nodelay` applies only to listeners tonic binds itself, not to an incoming stream
/// handed to it. Without it, a reply written as two small segments (gRPC headers, then the
/// message) waits for the delayed ACK of the first: 40 ms on every ext_proc message over TCP.
pub fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on an ext_proc connection");
        }
        Ok(stream)
    })
}
