//! Starting a plugin process: command line, process title, process group, parent-death signal,
//! and its output turned into log records. The one module of the supervisor that needs `unsafe`.
//!
//! Every plugin process is started
//! - in its own process group, so a hung plugin and anything it forked die with one `killpg`;
//! - with `PR_SET_PDEATHSIG = SIGKILL`, so it dies with the front even when the front is
//!   SIGKILLed and the plugin never reads its socket's end-of-file;
//! - with `argv[0]` set to `plugvisor-plugin: <name>`, so `ps` and `pgrep -f` show which plugin a
//!   process serves;
//! - with stdout and stderr piped and each line logged, tagged with the plugin and its pid.
//!
//! The kernel delivers the parent-death signal when the *thread* that forked the child exits, not
//! the process. Tokio's worker and blocking threads come and go, so every fork happens on one
//! dedicated [`Spawner`] thread that lives as long as the supervisor.
#![allow(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc as std_mpsc;
use std::thread;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::config::{CpuScheduling, PluginConfig};

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

type Request = (Command, oneshot::Sender<io::Result<Child>>);

/// Forks plugin processes from one long-lived thread (see the module docs for why).
///
/// Clones send to the same thread, which ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Spawner {
    requests: std_mpsc::Sender<Request>,
}

impl Spawner {
    /// Starts the spawner thread. Must be called inside a tokio runtime: children are registered
    /// with it so they can be awaited and reaped asynchronously.
    pub fn start() -> io::Result<Spawner> {
        let runtime = tokio::runtime::Handle::current();
        let (tx, rx) = std_mpsc::channel::<Request>();
        thread::Builder::new()
            .name("plugvisor-spawner".into())
            .spawn(move || {
                let _entered = runtime.enter();
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        Ok(Spawner { requests: tx })
    }

    /// Starts the plugin's process with the title `plugvisor-plugin: <name>` in its own process
    /// group, its stdout and stderr forwarded to the log tagged with plugin and pid. The child is
    /// killed if its handle is dropped.
    pub async fn spawn_plugin(
        &self,
        plugin: &PluginConfig,
        socket: &Path,
    ) -> Result<Child, SpawnError> {
        let program = plugin_command(plugin);
        let error = |source| SpawnError {
            plugin: plugin.name.clone(),
            command: program.display().to_string(),
            source,
        };
        let mut cmd = Command::new(&program);
        cmd.arg0(format!("{PLUGIN_HOST}: {}", plugin.name))
            .args(plugin_args(plugin, socket))
            .envs(&plugin.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        set_parent_death_signal_and_policy(&mut cmd, plugin.cpu_scheduling);
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((cmd, tx))
            .map_err(|_| error(io::Error::other("the spawner thread is gone")))?;
        let mut child = rx
            .await
            .map_err(|_| error(io::Error::other("the spawner thread dropped the request")))?
            .map_err(error)?;
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
}

/// Arranges for the child to get SIGKILL when the spawning thread (the [`Spawner`]'s, which lives
/// as long as the supervisor) ends, and to run under its configured scheduling policy.
fn set_parent_death_signal_and_policy(cmd: &mut Command, scheduling: CpuScheduling) {
    let parent = nix::unistd::getpid();
    let policy = match scheduling {
        CpuScheduling::Normal => None,
        CpuScheduling::Batch => Some(libc::SCHED_BATCH),
        CpuScheduling::Idle => Some(libc::SCHED_IDLE),
    };
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // work is allowed (another thread of the front may have held the allocator's lock at fork).
    // It makes raw syscalls (prctl and getppid through nix, sched_setscheduler through libc with
    // a parameter on its own stack) and builds its errors from plain errno values: nothing
    // allocates, nothing takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(io::Error::from)?;
            // The supervisor may have died between fork and prctl; then no signal would come.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from(nix::errno::Errno::ESRCH));
            }
            if let Some(policy) = policy {
                let param = libc::sched_param { sched_priority: 0 };
                if libc::sched_setscheduler(0, policy, &param) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Spawns plugin `p`, a `sleep 5` shell, with `extra` lines added to its config table.
    async fn spawn_sleeper(extra: &str) -> Child {
        let config = Config::parse(
            &format!("[plugins.p]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"sleep 5\"]\n{extra}"),
            "t",
        )
        .unwrap();
        Spawner::start()
            .unwrap()
            .spawn_plugin(&config.plugins[0], Path::new("/nonexistent.sock"))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plugin_leads_its_own_process_group_under_its_title() {
        let mut child = spawn_sleeper("").await;
        let pid = child.id().unwrap() as i32;
        let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
        assert_eq!(pgid.as_raw(), pid);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            cmdline.starts_with(b"plugvisor-plugin: p\0"),
            "{}",
            String::from_utf8_lossy(&cmdline)
        );
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cpu_scheduling_idle_puts_the_plugin_under_sched_idle() {
        let mut child = spawn_sleeper("cpu_scheduling = \"idle\"\n").await;
        let pid = child.id().unwrap();
        // Field 41 of /proc/<pid>/stat is the policy; fields after the command's ')' start at 3.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = stat.rsplit(')').next().unwrap();
        let policy: i32 = after
            .split_whitespace()
            .nth(41 - 3)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(policy, libc::SCHED_IDLE, "{stat}");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error_naming_it() {
        let config = Config::parse("[plugins.p]\ncommand = \"/nonexistent/bin\"\n", "t").unwrap();
        let spawner = Spawner::start().unwrap();
        let err = spawner
            .spawn_plugin(&config.plugins[0], Path::new("/x.sock"))
            .await
            .unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("/nonexistent/bin"), "{err}");
    }
}
