//! Starting a plugin process: command line, process title, and its output turned into log records.
//!
//! Until supervision lands (restarts, backoff, parent-death signal) the front starts each plugin
//! once; [`spawn_plugin`] is the one place that knows how, so the supervisor can call it again.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::PluginConfig;

/// The name of the plugin host binary, looked up next to the running executable.
pub const PLUGIN_HOST: &str = "plugvisor-plugin";

/// Could not start a plugin.
#[derive(Debug, thiserror::Error)]
#[error("cannot start plugin `{plugin}` ({command})")]
pub struct SpawnError {
    /// The plugin.
    pub plugin: String,
    /// The program that was tried.
    pub command: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// The program that runs `plugin`: its `command`, else `plugvisor-plugin` beside this executable.
pub fn plugin_command(plugin: &PluginConfig) -> PathBuf {
    if let Some(c) = &plugin.command {
        return c.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(PLUGIN_HOST)))
        .unwrap_or_else(|| PathBuf::from(PLUGIN_HOST))
}

/// The arguments: `args`, else `<name> --connect <socket>`.
pub fn plugin_args(plugin: &PluginConfig, socket: &Path) -> Vec<String> {
    plugin.args.clone().unwrap_or_else(|| {
        vec![
            plugin.name.clone(),
            "--connect".to_owned(),
            socket.display().to_string(),
        ]
    })
}

/// Starts the plugin's process with the title `plugvisor-plugin: <name>`, its stdout and stderr
/// forwarded to the log tagged with plugin and pid. The child is killed if its handle is dropped.
pub fn spawn_plugin(plugin: &PluginConfig, socket: &Path) -> Result<Child, SpawnError> {
    let program = plugin_command(plugin);
    let mut cmd = Command::new(&program);
    cmd.arg0(format!("{PLUGIN_HOST}: {}", plugin.name))
        .args(plugin_args(plugin, socket))
        .envs(&plugin.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| SpawnError {
        plugin: plugin.name.clone(),
        command: program.display().to_string(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(plugin = %plugin.name, pid, command = %program.display(), "plugin started");
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward(out, plugin.name.clone(), pid, "stdout"));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward(err, plugin.name.clone(), pid, "stderr"));
    }
    Ok(child)
}

async fn forward(
    stream: impl tokio::io::AsyncRead + Unpin,
    plugin: String,
    pid: u32,
    fd: &'static str,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "plugvisor::plugin", plugin = %plugin, pid, fd, "{line}");
    }
}
