//! The control socket: how `plugvisor status|start|stop|restart|upgrade` talk to a running front.
//!
//! A Unix socket at `<runtime_dir>/control.sock`, mode 0600, that only the front's own uid (or
//! root) may use; the peer is checked with `SO_PEERCRED` as well, so a permissive directory does
//! not open it up. One request per connection, one JSON object per line each way, so an operator
//! can also talk to it with `socat - UNIX-CONNECT:/run/plugvisor/control.sock` and
//! `{"op":"status"}`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::plugin::registry::Plugins;
use crate::plugin::supervise::{Command, PluginStatus};
use crate::records::{Records, RecordsStatus};
use crate::shell::upgrade;
use crate::traces::{Traces, TracesStatus};

/// The longest request line accepted.
pub(crate) const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client has to send its request.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for an upgrade's answer: the front bounds it itself (its
/// `ready_timeout_ms` and a start margin), this only guards against a front that never answers.
const UPGRADE_ANSWER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A request to the running front.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Every plugin's status.
    Status,
    /// Start a stopped or failed plugin.
    Start {
        /// The plugin.
        plugin: String,
    },
    /// Stop a plugin and keep it stopped (its socket accepts a hand-started instance).
    Stop {
        /// The plugin.
        plugin: String,
    },
    /// Restart a plugin (or start it if it is not running).
    Restart {
        /// The plugin.
        plugin: String,
    },
    /// Hand the listeners to the binary now on disk and drain ([`crate::shell::upgrade`]); answered
    /// once the new front serves, or with why it does not.
    Upgrade,
    /// Read the config file again and apply it, as SIGHUP ([`crate::shell::reload`]); answered
    /// with what was applied and which changed keys need a restart or an upgrade.
    Reload,
}

/// The front's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// What was done, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`: every plugin, in config order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Vec<PluginStatus>>,
    /// For `status`: where the usage records go and what became of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<RecordsStatus>,
    /// For `status`: whether spans are exported, where, and what became of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traces: Option<TracesStatus>,
}

impl Response {
    fn error(message: String) -> Response {
        Response {
            ok: false,
            error: Some(message),
            ..Response::default()
        }
    }
}

/// Binds the control socket (a stale socket is replaced, any other file refused), mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    crate::shell::instance::prepare_socket_path(path)?;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves control requests until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    plugins: Arc<Plugins>,
    upgrades: upgrade::Requests,
    records: Records,
    traces: Traces,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let plugins = plugins.clone();
                let upgrades = upgrades.clone();
                let records = records.clone();
                let traces = traces.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, plugins, upgrades, records, traces).await {
                        tracing::debug!(error = %e, "control connection failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    stream: UnixStream,
    plugins: Arc<Plugins>,
    upgrades: upgrade::Requests,
    records: Records,
    traces: Traces,
) -> std::io::Result<()> {
    let own = nix::unistd::getuid().as_raw();
    let peer = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let response = if peer != own && peer != 0 {
        tracing::warn!(uid = peer, "control request from another uid refused");
        Response::error(format!(
            "uid {peer} may not control this plugvisor (runs as uid {own})"
        ))
    } else {
        let mut line = String::new();
        let read = tokio::time::timeout(
            REQUEST_TIMEOUT,
            BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line),
        )
        .await;
        match read {
            Err(_) => Response::error("no request received in time".into()),
            Ok(Err(e)) => Response::error(format!("cannot read the request: {e}")),
            Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(request) => dispatch(request, &plugins, &upgrades, &records, &traces).await,
                Err(e) => Response::error(format!(
                    "bad request `{}`: {e}; expected e.g. {{\"op\":\"status\"}}",
                    line.trim()
                )),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

async fn dispatch(
    request: Request,
    plugins: &Plugins,
    upgrades: &upgrade::Requests,
    records: &Records,
    traces: &Traces,
) -> Response {
    let (plugin, command) = match request {
        Request::Upgrade => {
            tracing::info!("control request: upgrade");
            return match upgrades.upgrade().await {
                Ok(message) => Response {
                    ok: true,
                    message: Some(message),
                    ..Response::default()
                },
                Err(e) => Response::error(e),
            };
        }
        Request::Reload => {
            tracing::info!("control request: reload");
            return match upgrades.reload().await {
                Ok(message) => Response {
                    ok: true,
                    message: Some(message),
                    ..Response::default()
                },
                Err(e) => Response::error(e),
            };
        }
        Request::Status => {
            return Response {
                ok: true,
                plugins: Some(plugins.status()),
                records: Some(records.describe()),
                traces: Some(traces.describe()),
                ..Response::default()
            }
        }
        Request::Start { plugin } => (plugin, Command::Start),
        Request::Stop { plugin } => (plugin, Command::Stop),
        Request::Restart { plugin } => (plugin, Command::Restart),
    };
    tracing::info!(plugin = %plugin, ?command, "control request");
    match plugins.command(&plugin, command).await {
        Ok(message) => Response {
            ok: true,
            message: Some(message),
            ..Response::default()
        },
        Err(e) => Response::error(e),
    }
}

/// Could not talk to the front.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is not there or refuses connections.
    #[error("cannot reach plugvisor's control socket {path}; is plugvisor running with this runtime directory? (--config or --control)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("control request failed")]
    Io(#[from] std::io::Error),
    /// The answer was not understood.
    #[error("unexpected answer from plugvisor: {0}")]
    BadAnswer(String),
}

/// Sends one request to the front listening on `path`.
pub async fn request(path: &Path, request: &Request) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut answer = String::new();
    // Restarts wait for the old process to stop: allow for the stop grace period.
    let limit = match request {
        Request::Upgrade => UPGRADE_ANSWER_TIMEOUT,
        _ => Duration::from_secs(60),
    };
    tokio::time::timeout(
        limit,
        BufReader::new(stream.take(16 * 1024 * 1024)).read_line(&mut answer),
    )
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", limit.as_secs()),
        )
    })??;
    serde_json::from_str(answer.trim())
        .map_err(|e| ClientError::BadAnswer(format!("{e}: {answer}")))
}

/// The status table `plugvisor status` prints.
pub fn render_status(plugins: &[PluginStatus]) -> String {
    let mut rows = vec![[
        "PLUGIN".to_owned(),
        "STATE".to_owned(),
        "PID".to_owned(),
        "UPTIME".to_owned(),
        "RESTARTS".to_owned(),
        "LAST EXIT".to_owned(),
        "QUEUE".to_owned(),
        "DROPPED".to_owned(),
    ]];
    for p in plugins {
        let state = match (p.state.as_str(), p.connected, p.retry_in_ms) {
            ("external", false, _) => "external (not connected)".to_owned(),
            ("backoff", _, Some(ms)) => format!("backoff ({ms} ms)"),
            ("failed", _, Some(ms)) => format!("failed (retry in {ms} ms)"),
            (s, _, _) => s.to_owned(),
        };
        let state = match p.stuck_lanes {
            0 => state,
            n => format!("{state} ({n} stuck)"),
        };
        rows.push([
            p.name.clone(),
            state,
            p.pid.map_or("-".into(), |p| p.to_string()),
            p.uptime_secs.map_or("-".into(), format_uptime),
            p.restarts.to_string(),
            p.last_exit.clone().unwrap_or_else(|| "-".into()),
            p.queue_depth.to_string(),
            p.dropped_events.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for p in plugins {
        if let Some(error) = &p.last_error {
            out.push_str(&format!("{}: last error: {error}\n", p.name));
        }
        for d in &p.draining {
            let grace = d
                .grace_left_ms
                .map_or_else(String::new, |ms| format!(", {ms} ms of its drain left"));
            out.push_str(&format!(
                "{}: replaced process {} finishing {} stream(s){grace}\n",
                p.name, d.pid, d.streams
            ));
        }
    }
    out
}

fn format_uptime(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{secs:.1}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_object_with_an_op() {
        assert_eq!(
            serde_json::to_string(&Request::Restart {
                plugin: "usage".into()
            })
            .unwrap(),
            r#"{"op":"restart","plugin":"usage"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"status"}"#).unwrap(),
            Request::Status
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn status_table_lines_up_and_explains_states() {
        let table = render_status(&[
            PluginStatus {
                name: "usage".into(),
                state: "up".into(),
                spawned: true,
                connected: true,
                pid: Some(1234),
                uptime_secs: Some(75.0),
                restarts: 1,
                last_exit: Some("signal 9 (SIGKILL)".into()),
                last_error: Some(
                    "invalid config for plugin `usage`: costs[0].key is missing".into(),
                ),
                queue_depth: 0,
                dropped_events: 3,
                retry_in_ms: None,
                stuck_lanes: 0,
                draining: Vec::new(),
            },
            PluginStatus {
                name: "audit".into(),
                state: "external".into(),
                spawned: false,
                connected: false,
                pid: None,
                uptime_secs: None,
                restarts: 0,
                last_exit: None,
                last_error: None,
                queue_depth: 0,
                dropped_events: 0,
                retry_in_ms: None,
                stuck_lanes: 0,
                draining: Vec::new(),
            },
        ]);
        assert!(
            table.contains(
                "usage: last error: invalid config for plugin `usage`: costs[0].key is missing\n"
            ),
            "{table}"
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("PLUGIN"));
        assert!(lines[1].contains("1m15s") && lines[1].contains("signal 9 (SIGKILL)"));
        assert!(lines[2].contains("external (not connected)"));
        // Columns line up: STATE starts at the same offset on every line.
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][col..col + 2], "up");
    }
}
