//! Starting a plugin process: command line, process title, process group, parent-death signal,
//! and its output turned into log records. The one module of the supervisor that needs `unsafe`.
//!
//! Every plugin process is started
//! - in its own process group, so a hung plugin and anything it forked die with one `killpg`;
//! - with `PR_SET_PDEATHSIG = SIGKILL`, so it dies with the front even when the front is
//!   SIGKILLed and the plugin never reads its socket's end-of-file;
//! - a built-in (the front's own executable as `plugvisor plugin <name>`) with `argv[0]` set to
//!   `plugvisor-plugin: <name>`, so `ps` and `pgrep -f` show which plugin a process serves; any
//!   other `command` exactly as a shell would start it, `argv[0]` included (an interpreter in a
//!   virtualenv finds its environment from it), with `PLUGVISOR_CONNECT` naming its socket and
//!   `{socket}` and `{name}` in its `args` replaced;
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

/// The process title's prefix (`plugvisor-plugin: <name>`), and the name of the standalone host
/// of the built-in plugins (for plugins run as their own systemd units, or in gdb).
pub const PLUGIN_HOST: &str = "plugvisor-plugin";

/// The hidden subcommand of `plugvisor` that hosts a built-in plugin:
/// `plugvisor plugin <name> --connect <socket>`, the command line of `plugvisor-plugin`.
pub const PLUGIN_SUBCOMMAND: &str = "plugin";

/// The front's own executable as the kernel holds it open. Spawning it (rather than the path it
/// was started from) means a binary replaced on disk by an upgrade is not picked up half-way: every
/// plugin restart runs the same build as the front until the front itself is restarted.
pub const SELF_EXE: &str = "/proc/self/exe";

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

/// The program that runs `plugin`: its `command`, else this executable (see [`SELF_EXE`]).
pub fn plugin_command(plugin: &PluginConfig) -> PathBuf {
    plugin
        .process
        .command
        .clone()
        .unwrap_or_else(|| PathBuf::from(SELF_EXE))
}

/// The arguments: `args` with `{socket}` and `{name}` replaced by the plugin's socket path and
/// name, else `<name> --connect <socket>`; without a `command`, preceded by
/// [`PLUGIN_SUBCOMMAND`], since the program is then `plugvisor` itself.
pub fn plugin_args(plugin: &PluginConfig, socket: &Path) -> Vec<String> {
    let socket_text = socket.display().to_string();
    let placed = plugin.process.args.as_ref().map(|args| {
        args.iter()
            .map(|a| {
                a.replace("{socket}", &socket_text)
                    .replace("{name}", &plugin.name)
            })
            .collect()
    });
    let own = placed.unwrap_or_else(|| {
        vec![
            plugin.name.clone(),
            "--connect".to_owned(),
            socket.display().to_string(),
        ]
    });
    match plugin.process.command {
        Some(_) => own,
        None => std::iter::once(PLUGIN_SUBCOMMAND.to_owned())
            .chain(own)
            .collect(),
    }
}

/// Why `plugin`'s configured `command` cannot be run, and what to build or set, or `None` when
/// it resolves to an executable file (or is not set: the front runs the built-ins itself).
/// The front says it once at start, so the reason is not lost among the restarts that follow.
pub fn command_problem(plugin: &PluginConfig) -> Option<String> {
    let command = plugin.process.command.as_ref()?;
    let path_var = plugin
        .process
        .env
        .get("PATH")
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    let problem = match resolve_command(command, &path_var) {
        Ok(_) => return None,
        Err(problem) => problem,
    };
    let table = format!("[plugins.{}]", plugin.name);
    let key = format!("{table} command");
    let hint = if command.file_name().is_some_and(|f| f == PLUGIN_HOST) {
        format!(
            "build it with `cargo build --release -p plugin-runner` (it lands in target/release/), \
             or remove `command` from {table} and plugvisor runs its built-in plugins itself"
        )
    } else {
        format!("build or install it, or set {key} to the path of an executable")
    };
    Some(format!(
        "plugin `{}`: {key} = \"{}\" {problem}; {hint}",
        plugin.name,
        command.display()
    ))
}

/// Where `command` is found the way `execvp` would find it: as a path when it has a `/`, else in
/// `path_var`. The error is a fragment: `is not found in PATH`, `is not executable`, ...
pub(crate) fn resolve_command(
    command: &Path,
    path_var: &std::ffi::OsStr,
) -> Result<PathBuf, String> {
    use nix::unistd::{access, AccessFlags};
    let executable = |p: &Path| p.is_file() && access(p, AccessFlags::X_OK).is_ok();
    if command.components().count() > 1 || command.is_absolute() {
        return match std::fs::metadata(command) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err("does not exist".into()),
            Err(e) => Err(format!("cannot be read ({e})")),
            Ok(m) if !m.is_file() => Err("is not a file".into()),
            Ok(_) if !executable(command) => Err("is not executable".into()),
            Ok(_) => Ok(command.to_path_buf()),
        };
    }
    std::env::split_paths(path_var)
        .map(|dir| dir.join(command))
        .find(|p| executable(p))
        .ok_or_else(|| "is not found in PATH".into())
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
        // The title is only for the front's own host of the built-ins: any other program starts
        // exactly as from a shell, since interpreters (Python in a virtualenv, a shebang script,
        // a wrapper) locate themselves and their packages from argv[0].
        if plugin.process.command.is_none() {
            cmd.arg0(format!("{PLUGIN_HOST}: {}", plugin.name));
        }
        cmd.args(plugin_args(plugin, socket))
            .env(plugin_runner::cli::CONNECT_ENV, socket)
            // The plugin host then writes compact stderr lines that `forward` reads back into
            // records of their own level; a plugin's own `env` may still turn it off.
            .env(plugin_runner::logging::SUPERVISED_ENV, "1")
            .envs(&plugin.process.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        set_parent_death_signal_and_policy(&mut cmd, plugin.process.cpu_scheduling);
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
/// (`LEVEL target: message key=value ...`) becomes a record of that level without the level
/// word, its message alone as the message, and the plugin's target and fields as fields of
/// their own (`plugin_target`, `plugin_fields`), so the JSON log and the journal carry them apart;
/// the front's own timestamp is the only one. Anything else is logged at INFO as it is.
fn log_plugin_line(plugin: &str, pid: u32, fd: &'static str, line: &str) {
    use tracing::Level;
    let parsed = if fd == "stderr" {
        plugin_runner::logging::parse_supervised(line)
    } else {
        None
    };
    let (level, target, message, fields) = match parsed {
        Some((level, rest)) => {
            let (target, message, fields) = plugin_runner::logging::split_record(rest);
            (level, target, message, fields)
        }
        None => (Level::INFO, "", line, ""),
    };
    // Empty parts are left out rather than logged empty.
    let target = (!target.is_empty()).then_some(target);
    let fields = (!fields.is_empty()).then_some(fields);
    // The macros take the level as a constant.
    macro_rules! record {
        ($macro:ident) => {
            tracing::$macro!(target: "plugvisor::plugin", plugin = %plugin, pid, fd, plugin_target = target, plugin_fields = fields, "{message}")
        };
    }
    match level {
        Level::ERROR => record!(error),
        Level::WARN => record!(warn),
        Level::INFO => record!(info),
        Level::DEBUG => record!(debug),
        Level::TRACE => record!(trace),
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

    /// Spawns plugin `p`, a `sleep 5` shell, with `extra` lines added to its config table (its
    /// own `args` replacing the sleep's).
    /// The spawner is returned too: when its thread ends the child gets its parent-death
    /// SIGKILL, which would race the test's look at it.
    async fn spawn_sleeper(extra: &str) -> (Spawner, Child) {
        let args = if extra.contains("args") {
            ""
        } else {
            "args = [\"-c\", \"sleep 5\"]\n"
        };
        let config = Config::parse(
            &format!("[plugins.p]\ncommand = \"/bin/sh\"\n{args}{extra}"),
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
    async fn a_command_leads_its_own_process_group_started_as_from_a_shell() {
        let (_spawner, mut child) =
            spawn_sleeper("args = [\"-c\", \"sleep 5; :\", \"{name}\", \"{socket}\"]\n").await;
        let pid = child.id().unwrap() as i32;
        let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
        assert_eq!(pgid.as_raw(), pid);
        // The spawn returns once forked; argv is the exec'd program's, so wait for the exec
        // (bounded) before reading it.
        let expected: &[u8] = b"/bin/sh\0-c\0sleep 5; :\0p\0/nonexistent.sock\0";
        let start = std::time::Instant::now();
        let cmdline = loop {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            if cmdline == expected || start.elapsed() > std::time::Duration::from_secs(5) {
                break cmdline;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(
            String::from_utf8_lossy(&cmdline),
            String::from_utf8_lossy(expected),
            "argv[0] is the command, placeholders are replaced"
        );
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            environ
                .split(|b| *b == 0)
                .any(|v| v == b"PLUGVISOR_CONNECT=/nonexistent.sock"),
            "PLUGVISOR_CONNECT names the socket"
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

    #[test]
    fn without_a_command_the_front_runs_itself_as_the_plugin_host() {
        let config = Config::parse(
            "[plugins.usage]\n[plugins.own]\ncommand = \"/bin/own\"\n",
            "t",
        )
        .unwrap();
        let (builtin, own) = (&config.plugins[0], &config.plugins[1]);
        assert_eq!(plugin_command(builtin), PathBuf::from(SELF_EXE));
        assert_eq!(
            plugin_args(builtin, Path::new("/r/usage.sock")),
            ["plugin", "usage", "--connect", "/r/usage.sock"]
        );
        assert_eq!(plugin_command(own), PathBuf::from("/bin/own"));
        assert_eq!(
            plugin_args(own, Path::new("/r/own.sock")),
            ["own", "--connect", "/r/own.sock"]
        );
    }

    #[test]
    fn a_command_that_cannot_run_says_what_to_build_or_set() {
        let problem = |toml: &str| command_problem(&Config::parse(toml, "t").unwrap().plugins[0]);
        assert_eq!(problem("[plugins.usage]\n"), None);
        assert_eq!(problem("[plugins.p]\ncommand = \"/bin/sh\"\n"), None);
        assert_eq!(problem("[plugins.p]\ncommand = \"sh\"\n"), None);
        let host = problem("[plugins.usage]\ncommand = \"/nowhere/plugvisor-plugin\"\n").unwrap();
        assert!(host.contains("does not exist"), "{host}");
        assert!(
            host.contains("cargo build --release -p plugin-runner"),
            "{host}"
        );
        assert!(host.contains("[plugins.usage] command"), "{host}");
        let other = problem("[plugins.p]\ncommand = \"no-such-plugin-binary\"\n").unwrap();
        assert!(other.contains("not found in PATH"), "{other}");
        let dir = problem("[plugins.p]\ncommand = \"/tmp\"\n").unwrap();
        assert!(dir.contains("is not a file"), "{dir}");
    }
}
