//! Starting a plugin process: command line, process title, process group, parent-death signal,
//! and its output turned into log records. The one module of the supervisor that needs `unsafe`.
//!
//! Every plugin process is started
//! - in its own process group, so a hung plugin and anything it forked die with one `killpg`;
//! - with `PR_SET_PDEATHSIG = SIGKILL`, so it dies with the front even when the front is
//!   SIGKILLed and the plugin never reads its socket's end-of-file;
//! - with `argv[0]` set to `plugvisor-plugin: <name>`, so `ps` and `pgrep -f` show which plugin a
//!   process serves;
//! - with stdout and stderr piped and each line logged, tagged with the plugin and its pid; the
//!   pipes are read until end-of-file whatever comes through them ([`forward_lines`]), so odd
//!   output can neither end the forwarding (and kill the plugin with SIGPIPE) nor grow memory.
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
            // The plugin host then writes compact stderr lines that `forward` reads back into
            // records of their own level; a plugin's own `env` may still turn it off.
            .env(plugin_runner::logging::SUPERVISED_ENV, "1")
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

/// The longest line of plugin output logged as it is; the rest of a longer line is discarded and
/// counted.
pub const MAX_OUTPUT_LINE: usize = 16 * 1024;

async fn forward(
    stream: impl tokio::io::AsyncRead + Unpin,
    plugin: String,
    pid: u32,
    fd: &'static str,
) {
    let result = forward_lines(stream, MAX_OUTPUT_LINE, |line| {
        log_plugin_line(&plugin, pid, fd, line)
    })
    .await;
    if let Err(e) = result {
        // Only the pipe itself failing ends the forwarding; the plugin's next write to it will
        // fail too, and say so in its own way.
        tracing::warn!(plugin = %plugin, pid, fd, error = %e, "cannot read plugin output");
    }
}

/// Logs one line of plugin output. A stderr line in the plugin host's supervised form
/// (`LEVEL target: message`) becomes a record of that level without the level word; the front's
/// own timestamp is the only one. Anything else is logged at INFO as it is.
fn log_plugin_line(plugin: &str, pid: u32, fd: &'static str, line: &str) {
    use tracing::Level;
    let parsed = if fd == "stderr" {
        plugin_runner::logging::parse_supervised(line)
    } else {
        None
    };
    let (level, message) = parsed.unwrap_or((Level::INFO, line));
    // The macros take the level as a constant.
    match level {
        Level::ERROR => {
            tracing::error!(target: "plugvisor::plugin", plugin = %plugin, pid, fd, "{message}")
        }
        Level::WARN => {
            tracing::warn!(target: "plugvisor::plugin", plugin = %plugin, pid, fd, "{message}")
        }
        Level::INFO => {
            tracing::info!(target: "plugvisor::plugin", plugin = %plugin, pid, fd, "{message}")
        }
        Level::DEBUG => {
            tracing::debug!(target: "plugvisor::plugin", plugin = %plugin, pid, fd, "{message}")
        }
        Level::TRACE => {
            tracing::trace!(target: "plugvisor::plugin", plugin = %plugin, pid, fd, "{message}")
        }
    }
}

/// Reads `stream` until end-of-file and calls `emit` once per line, whatever the bytes are:
/// - a line is what comes before `\n` (a trailing `\r` is dropped), or before end-of-file;
/// - bytes that are not UTF-8 are shown as U+FFFD, so output in any encoding is logged and never
///   ends the reading (which would close the pipe and kill the plugin with SIGPIPE later);
/// - a line longer than `max` bytes is emitted as soon as `max` bytes have come, marked
///   `[line continues]`; the rest of it is read and thrown away, and when it ends one more line
///   says `[truncated N bytes]`. Memory stays at `max` plus the read buffer however long the line.
///
/// Returns early only if reading fails.
pub async fn forward_lines(
    stream: impl tokio::io::AsyncRead + Unpin,
    max: usize,
    mut emit: impl FnMut(&str),
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(8 * 1024, stream);
    let mut line: Vec<u8> = Vec::new();
    // Bytes of the current line thrown away past `max`; `Some` once the line went over.
    let mut discarded: Option<u64> = None;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            if !line.is_empty() || discarded.is_some() {
                end_line(&mut line, &mut discarded, &mut emit);
            }
            return Ok(());
        }
        let (piece, ends_line) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], true),
            None => (buf, false),
        };
        let used = piece.len() + usize::from(ends_line);
        match &mut discarded {
            Some(n) => *n += piece.len() as u64,
            None => {
                let room = max - line.len();
                if piece.len() <= room {
                    line.extend_from_slice(piece);
                } else {
                    line.extend_from_slice(&piece[..room]);
                    emit(&format!(
                        "{} [line continues]",
                        String::from_utf8_lossy(&line)
                    ));
                    line.clear();
                    discarded = Some((piece.len() - room) as u64);
                }
            }
        }
        reader.consume(used);
        if ends_line {
            end_line(&mut line, &mut discarded, &mut emit);
        }
    }
}

/// Emits the line that just ended (or its truncation marker) and starts the next one.
fn end_line(line: &mut Vec<u8>, discarded: &mut Option<u64>, emit: &mut impl FnMut(&str)) {
    match discarded.take() {
        Some(n) => emit(&format!("[truncated {n} bytes]")),
        None => {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            emit(&String::from_utf8_lossy(line));
        }
    }
    line.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Spawns plugin `p`, a `sleep 5` shell, with `extra` lines added to its config table.
    /// The spawner is returned too: when its thread ends the child gets its parent-death
    /// SIGKILL, which would race the test's look at it.
    async fn spawn_sleeper(extra: &str) -> (Spawner, Child) {
        let config = Config::parse(
            &format!("[plugins.p]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"sleep 5\"]\n{extra}"),
            "t",
        )
        .unwrap();
        let spawner = Spawner::start().unwrap();
        let child = spawner
            .spawn_plugin(&config.plugins[0], Path::new("/nonexistent.sock"))
            .await
            .unwrap();
        (spawner, child)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plugin_leads_its_own_process_group_under_its_title() {
        let (_spawner, mut child) = spawn_sleeper("").await;
        let pid = child.id().unwrap() as i32;
        let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
        assert_eq!(pgid.as_raw(), pid);
        // The spawn returns once forked; the title is the exec'd program's argv[0], so wait for
        // the exec (bounded) before reading it.
        let start = std::time::Instant::now();
        let cmdline = loop {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            if cmdline.starts_with(b"plugvisor-plugin: p\0")
                || start.elapsed() > std::time::Duration::from_secs(5)
            {
                break cmdline;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
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
        let (_spawner, mut child) = spawn_sleeper("cpu_scheduling = \"idle\"\n").await;
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

    async fn lines_of(input: &[u8], max: usize) -> Vec<String> {
        let mut out = Vec::new();
        forward_lines(input, max, |l| out.push(l.to_owned()))
            .await
            .unwrap();
        out
    }

    #[tokio::test]
    async fn output_that_is_not_utf8_is_logged_with_replacement_characters() {
        let out = lines_of(b"ok\r\nbad \xff\xfe end\nlast without newline", 64).await;
        assert_eq!(
            out,
            ["ok", "bad \u{fffd}\u{fffd} end", "last without newline"]
        );
    }

    #[tokio::test]
    async fn a_line_at_the_cap_is_whole_and_one_byte_more_is_truncated() {
        let mut input = vec![b'a'; 10];
        input.push(b'\n');
        input.extend([b'b'; 11]);
        input.extend(b"\nnext\n");
        let out = lines_of(&input, 10).await;
        assert_eq!(
            out,
            [
                "aaaaaaaaaa",
                "bbbbbbbbbb [line continues]",
                "[truncated 1 bytes]",
                "next"
            ]
        );
    }

    #[tokio::test]
    async fn a_long_line_is_read_to_its_end_and_what_follows_is_kept() {
        // Far longer than the reader's buffer: the discarding spans many reads.
        let mut input = vec![b'x'; 1 << 20];
        input.extend(b"\nafter\n");
        input.extend([b'y'; 100]);
        let out = lines_of(&input, 16).await;
        assert_eq!(
            out,
            [
                "xxxxxxxxxxxxxxxx [line continues]".to_owned(),
                format!("[truncated {} bytes]", (1 << 20) - 16),
                "after".to_owned(),
                "yyyyyyyyyyyyyyyy [line continues]".to_owned(),
                "[truncated 84 bytes]".to_owned(),
            ]
        );
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
