//! A real systemd to test against: [`Container`] boots this machine's own root under
//! `systemd-nspawn --directory=/ --volatile=yes --boot` (a tmpfs root, the host's `/usr` read-only,
//! an empty `/etc` and `/var` that systemd populates on first boot), with chosen host directories
//! bound in, runs commands inside through `nsenter`, and powers the container off when dropped —
//! also when the test panics.
//!
//! Facts this relies on (see ../shared/ARCHITECTURE.md, "Testing on this kind of machine"):
//! - the container's PID 1 is a child of the `systemd-nspawn` process, in its own PID namespace;
//!   killing `systemd-nspawn` alone leaves that PID 1 running, so the last resort kills PID 1
//!   (which takes its whole PID namespace with it) before `systemd-nspawn`;
//! - with `--keep-unit --register=no` nspawn puts the container in `payload/` and itself in
//!   `supervisor/` under its *own* cgroup, so two containers started from the same cgroup would
//!   share one; each container therefore gets a fresh cgroup of its own first (a transient scope
//!   when the host runs systemd, a directory in each cgroup hierarchy otherwise). The host's
//!   top-level `payload`/`supervisor` cgroups left by earlier runs are never touched;
//! - `/usr` inside is the host's, read-only: [`Builder::bind_empty`] puts a fresh writable
//!   directory over `/usr/local`, which is what [`Builder::boot_installed`] does before running
//!   `scripts/install` inside.
//!
//! PIDs printed by commands inside (`MainPID`, `journalctl _PID=`) are in the container's PID
//! namespace; [`Container::host_pid`] translates one to the host's.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long [`Container::boot`] waits for `systemctl is-system-running` to say running/degraded.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a command run by [`Container::exec`] may take.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean `systemctl poweroff` may take before the container is killed.
pub const POWEROFF_TIMEOUT: Duration = Duration::from_secs(20);
/// A container still running this long after boot powers itself off, so a test process killed
/// with SIGKILL (no `Drop`) cannot leave it behind for good.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// The most console output kept for error messages.
const CONSOLE_KEEP: usize = 64 * 1024;
/// The `PATH` of commands run inside.
const INNER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A booted container; powered off and cleaned up on drop.
pub struct Container {
    name: String,
    nspawn: Child,
    pid1: u32,
    /// `starttime` of PID 1 from `/proc/<pid>/stat`, so a recycled PID is never signalled.
    pid1_start: u64,
    console: Arc<Mutex<Vec<u8>>>,
    /// Cgroup directories made for this container, removed (when empty) after it stopped.
    cgroups: Vec<PathBuf>,
    scratch: PathBuf,
    boot_time: Duration,
    stopped: bool,
}

/// Options for booting a [`Container`]; from [`Container::builder`].
pub struct Builder {
    prefix: String,
    binds: Vec<(PathBuf, PathBuf, bool)>,
    empty: Vec<PathBuf>,
    args: Vec<String>,
    boot_timeout: Duration,
    max_lifetime: Option<Duration>,
}

impl Builder {
    /// Binds host directory (or file) `host` read-write at `inside`. Both paths must be absolute
    /// and `host` must exist; a mount point under the read-only `/usr` must already exist there.
    pub fn bind(mut self, host: impl AsRef<Path>, inside: impl AsRef<Path>) -> Self {
        self.binds
            .push((host.as_ref().to_owned(), inside.as_ref().to_owned(), false));
        self
    }

    /// Like [`Builder::bind`], read-only.
    pub fn bind_ro(mut self, host: impl AsRef<Path>, inside: impl AsRef<Path>) -> Self {
        self.binds
            .push((host.as_ref().to_owned(), inside.as_ref().to_owned(), true));
        self
    }

    /// Binds a new empty host directory read-write at `inside` (an existing directory, e.g.
    /// `/usr/local` to install into the otherwise read-only `/usr`); removed with the container.
    pub fn bind_empty(mut self, inside: impl AsRef<Path>) -> Self {
        self.empty.push(inside.as_ref().to_owned());
        self
    }

    /// An extra `systemd-nspawn` argument (e.g. `--setenv=X=1`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Overrides [`BOOT_TIMEOUT`].
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// Overrides [`MAX_LIFETIME`]; `None` disables the self-poweroff timer.
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// Boots the container and waits until its systemd reports `running` or `degraded`.
    pub fn boot(self) -> io::Result<Container> {
        preflight()?;
        let name = unique_name(&self.prefix);
        let scratch = std::env::temp_dir().join(format!("plugvisor-nspawn-{name}"));
        fs::create_dir_all(&scratch).map_err(|e| annotate(e, "cannot create the scratch dir"))?;
        self.spawn(name, scratch.clone()).inspect_err(|_| {
            let _ = fs::remove_dir_all(&scratch);
        })
    }

    fn spawn(self, name: String, scratch: PathBuf) -> io::Result<Container> {
        let mut nspawn_args: Vec<String> = [
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--directory=/",
            "--volatile=yes",
            "--boot",
            "--console=pipe",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        nspawn_args.push(format!("--machine={name}"));
        nspawn_args.push(bind_arg(&scratch, &scratch, false)?);
        for (n, inside) in self.empty.iter().enumerate() {
            let host = scratch.join(format!(".empty-{n}"));
            fs::create_dir(&host).map_err(|e| annotate(e, "cannot create a bind directory"))?;
            nspawn_args.push(bind_arg(&host, inside, false)?);
        }
        for (host, inside, ro) in &self.binds {
            nspawn_args.push(bind_arg(host, inside, *ro)?);
        }
        nspawn_args.extend(self.args.iter().cloned());

        let (mut command, cgroups) = own_cgroup_command(&name, &nspawn_args)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .current_dir("/");
        let started = Instant::now();
        let mut nspawn = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                remove_cgroups(&cgroups);
                return Err(annotate(
                    e,
                    "cannot start systemd-nspawn (apt-get install systemd-container)",
                ));
            }
        };
        let console = Arc::new(Mutex::new(Vec::new()));
        collect(nspawn.stdout.take(), &console);
        collect(nspawn.stderr.take(), &console);

        // From here on `Drop` cleans up whatever happens; PID 1 is filled in once found.
        let mut container = Container {
            name,
            nspawn,
            pid1: 0,
            pid1_start: 0,
            console,
            cgroups,
            scratch,
            boot_time: Duration::ZERO,
            stopped: false,
        };
        let deadline = started + self.boot_timeout;
        container.find_pid1(deadline)?;
        container.wait_running(deadline)?;
        container.boot_time = started.elapsed();
        if let Some(lifetime) = self.max_lifetime {
            let on_active = format!("--on-active={}s", lifetime.as_secs().max(1));
            container.exec_ok(&[
                "systemd-run",
                "--quiet",
                "--unit=nspawn-max-lifetime",
                &on_active,
                "--timer-property=AccuracySec=1s",
                "systemctl",
                "poweroff",
            ])?;
        }
        Ok(container)
    }
}

impl Builder {
    /// Boots the container with plugvisor installed the way an operator does it: `repo` and
    /// `bin_dir` (holding the built `plugvisor` and `plugvisor-plugin`) bound read-only at their own
    /// paths, a fresh `/usr/local`, then `scripts/install --from <bin_dir> --config <config>`
    /// inside (units in /usr/local/lib/systemd/system, the user `plugvisor`, the group `envoy`,
    /// daemon-reload).
    /// Nothing is started; `config` becomes /etc/plugvisor/plugvisor.toml.
    pub fn boot_installed(
        self,
        repo: &Path,
        bin_dir: &Path,
        config: &Path,
    ) -> io::Result<Container> {
        let container = self
            .bind_ro(repo, repo)
            .bind_ro(bin_dir, bin_dir)
            .bind_empty("/usr/local")
            .boot()?;
        let mut config_arg = config.to_owned();
        if !config.starts_with(repo) && !config.starts_with(bin_dir) {
            // Make a config from elsewhere (e.g. a test's temp dir) visible inside.
            config_arg = container.scratch().join("plugvisor.toml");
            fs::copy(config, &config_arg)?;
        }
        let script = repo.join("scripts/install");
        container.exec_ok(&[
            script.as_os_str(),
            OsStr::new("--from"),
            bin_dir.as_os_str(),
            OsStr::new("--config"),
            config_arg.as_os_str(),
        ])?;
        Ok(container)
    }
}

/// The directory holding the binaries built with the running test (`target/<profile>`, the
/// parent of the test executable's `deps/`), checked to contain `plugvisor` and `plugvisor-plugin`.
pub fn built_binaries_dir() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "test executable has no target dir")
        })?
        .to_owned();
    for bin in ["plugvisor", "plugvisor-plugin"] {
        if !dir.join(bin).is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is missing: build the binaries first (cargo build --workspace --bins)",
                    dir.join(bin).display()
                ),
            ));
        }
    }
    Ok(dir)
}

impl Container {
    /// Boots a container named after `name` (made unique per process and call) with each
    /// `(host, inside)` directory bound read-write. See [`Container::builder`] for more options.
    pub fn boot(name: &str, binds: &[(&Path, &Path)]) -> io::Result<Container> {
        binds
            .iter()
            .fold(Container::builder(name), |b, (host, inside)| {
                b.bind(host, inside)
            })
            .boot()
    }

    /// Options for booting a container named after `name`.
    pub fn builder(name: &str) -> Builder {
        Builder {
            prefix: name.to_owned(),
            binds: Vec::new(),
            empty: Vec::new(),
            args: Vec::new(),
            boot_timeout: BOOT_TIMEOUT,
            max_lifetime: Some(MAX_LIFETIME),
        }
    }

    /// The machine name (also the container's hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host PID of the container's systemd.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// How long booting took, from starting `systemd-nspawn` to `is-system-running` answering.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// A host directory bound read-write at the same path inside, for exchanging files; removed
    /// after the container stopped.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// Everything the container printed on its console so far (the last 64 KiB).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned()
    }

    /// Runs `args` inside the container (all its namespaces, its root, a clean environment),
    /// killed after [`EXEC_TIMEOUT`]. A non-zero exit is not an error here; see [`Container::exec_ok`].
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> io::Result<Output> {
        self.exec_timeout(args, EXEC_TIMEOUT)
    }

    /// [`Container::exec`] with its own time limit; running over it is an error of kind `TimedOut`.
    pub fn exec_timeout<S: AsRef<OsStr>>(&self, args: &[S], limit: Duration) -> io::Result<Output> {
        if args.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "exec needs a program",
            ));
        }
        let secs = limit.as_secs_f64().max(0.1);
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--target={}", self.pid1))
            .args(["--all", "--root", "--wd", "--"])
            // `timeout` runs inside, so it kills the command itself (nsenter's own child, in the
            // container's PID namespace), not just the nsenter we could kill from here.
            .args(["timeout", "--kill-after=5", &format!("{secs:.1}")])
            .args(args)
            .env_clear()
            .env("PATH", INNER_PATH)
            .env("LANG", "C.UTF-8")
            .env("TERM", "dumb")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_LOG_COLOR", "0")
            .current_dir("/");
        let started = Instant::now();
        let output = run_bounded(command, limit + Duration::from_secs(10))?;
        // 124: timeout(1) ran out; 137: it had to SIGKILL after --kill-after.
        if matches!(output.status.code(), Some(124) | Some(137)) && started.elapsed() >= limit {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("`{}` in {} took over {limit:?}", show_args(args), self.name),
            ));
        }
        Ok(output)
    }

    /// Runs `args` inside and returns its stdout; a non-zero exit is an error carrying both streams.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> io::Result<String> {
        let output = self.exec(args)?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "`{}` in {} failed ({}): {}{}",
                show_args(args),
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs a shell script inside (`sh -c`) and returns its stdout; failure is an error.
    pub fn sh(&self, script: &str) -> io::Result<String> {
        self.exec_ok(&["sh", "-c", script])
    }

    /// `systemctl --no-pager <args>` inside.
    pub fn systemctl(&self, args: &[&str]) -> io::Result<Output> {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// `systemctl --no-pager <args>` inside, stdout on success, an error with both streams otherwise.
    pub fn systemctl_ok(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.exec_ok(&all)
    }

    /// One property of a unit (`systemctl show -P <prop> <unit>`), trimmed.
    pub fn show_property(&self, unit: &str, prop: &str) -> io::Result<String> {
        Ok(self
            .systemctl_ok(&["show", "-P", prop, "--", unit])?
            .trim_end()
            .to_owned())
    }

    /// Polls [`Container::show_property`] until it equals `want`. On timeout the error carries
    /// the last value, `systemctl status` and the unit's last journal lines.
    pub fn wait_for_property(
        &self,
        unit: &str,
        prop: &str,
        want: &str,
        timeout: Duration,
    ) -> io::Result<()> {
        let mut last = String::new();
        let found = poll(timeout, || {
            last = self.show_property(unit, prop)?;
            Ok((last == want).then_some(()))
        })?;
        if found.is_some() {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{unit}: {prop} is {last:?}, not {want:?}, after {timeout:?}\n{}",
                self.describe_unit(unit)
            ),
        ))
    }

    /// `systemctl status` and the last journal lines of `unit`, for failure messages.
    pub fn describe_unit(&self, unit: &str) -> String {
        let status = self
            .systemctl(&["status", "--lines=0", "--", unit])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(systemctl status failed: {e})"));
        let journal = self
            .journalctl(&["-u", unit, "-n", "30"])
            .unwrap_or_else(|e| format!("(journalctl failed: {e})"));
        format!("--- systemctl status {unit}\n{status}--- journalctl -u {unit}\n{journal}")
    }

    /// `journalctl --no-pager -q <args>` inside, after asking journald to write out what it has
    /// received, so lines logged just before the call are there.
    pub fn journalctl(&self, args: &[&str]) -> io::Result<String> {
        self.exec_ok(&["journalctl", "--sync"])?;
        let mut all = vec!["journalctl", "--no-pager", "-q"];
        all.extend_from_slice(args);
        self.exec_ok(&all)
    }

    /// The host PID of the process that is `pid` inside the container.
    pub fn host_pid(&self, pid: u32) -> io::Result<u32> {
        let ns = fs::read_link(format!("/proc/{}/ns/pid", self.pid1))?;
        for entry in fs::read_dir("/proc")? {
            let Some(host) = entry?
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if fs::read_link(format!("/proc/{host}/ns/pid")).ok().as_ref() != Some(&ns) {
                continue;
            }
            let status = fs::read_to_string(format!("/proc/{host}/status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<u32>().ok());
            if inner == Some(pid) {
                return Ok(host);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no process {pid} in container {}", self.name),
        ))
    }

    /// Whether `systemd-nspawn` is still running.
    pub fn is_running(&mut self) -> bool {
        !self.stopped && matches!(self.nspawn.try_wait(), Ok(None))
    }

    /// Powers the container off cleanly (killing it if that takes over [`POWEROFF_TIMEOUT`]) and
    /// returns how long it took and how `systemd-nspawn` exited.
    pub fn poweroff(mut self) -> io::Result<(Duration, ExitStatus)> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<(Duration, ExitStatus)> {
        let started = Instant::now();
        self.stopped = true;
        let mut status = self.nspawn.try_wait()?;
        if status.is_none() && self.pid1 != 0 {
            let asked = self
                .exec_timeout(
                    &["systemctl", "poweroff", "--no-block"],
                    Duration::from_secs(5),
                )
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !asked {
                // nspawn turns SIGTERM into the container's own poweroff signal (SIGRTMIN+3).
                signal(self.nspawn.id(), "TERM");
            }
            status = wait_exit(&mut self.nspawn, POWEROFF_TIMEOUT)?;
        }
        if status.is_none() {
            eprintln!(
                "nspawn: {} did not power off within {POWEROFF_TIMEOUT:?}; killing it",
                self.name
            );
            // Killing the PID namespace's init kills every process in it; nspawn then exits itself.
            if self.pid1 != 0 && start_time(self.pid1) == Some(self.pid1_start) {
                signal(self.pid1, "KILL");
            }
            status = wait_exit(&mut self.nspawn, Duration::from_secs(5))?;
        }
        let status = match status {
            Some(status) => status,
            None => {
                self.nspawn.kill()?;
                self.nspawn.wait()?
            }
        };
        remove_cgroups(&self.cgroups);
        // Dropped only now: the container could have written there until it stopped.
        let _ = fs::remove_dir_all(&self.scratch);
        let _ = fs::remove_dir(format!("/run/systemd/nspawn/propagate/{}", self.name));
        Ok((started.elapsed(), status))
    }

    fn find_pid1(&mut self, deadline: Instant) -> io::Result<()> {
        let own_ns = fs::read_link("/proc/self/ns/pid")?;
        let nspawn = self.nspawn.id();
        loop {
            if let Some(status) = self.nspawn.try_wait()? {
                return Err(self.boot_error(&format!("systemd-nspawn exited early ({status})")));
            }
            for pid in children(nspawn) {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let ns = fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
                if comm.trim_end() == "systemd" && ns.is_some() && ns.as_ref() != Some(&own_ns) {
                    if let Some(start) = start_time(pid) {
                        self.pid1 = pid;
                        self.pid1_start = start;
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(self.boot_error("no systemd appeared under systemd-nspawn"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_running(&mut self, deadline: Instant) -> io::Result<()> {
        let mut last = String::new();
        loop {
            if let Some(status) = self.nspawn.try_wait()? {
                return Err(
                    self.boot_error(&format!("systemd-nspawn exited during boot ({status})"))
                );
            }
            let limit = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(500), Duration::from_secs(10));
            if let Ok(output) = self.exec_timeout(&["systemctl", "is-system-running"], limit) {
                last = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                match String::from_utf8_lossy(&output.stdout).trim() {
                    "running" | "degraded" => return Ok(()),
                    "maintenance" | "stopping" => {
                        return Err(self.boot_error(&format!("boot ended in state {last:?}")));
                    }
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(self.boot_error(&format!(
                    "not running before the boot deadline; is-system-running said {last:?}"
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn boot_error(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "container {}: {what}\n--- console\n{}",
                self.name,
                self.console()
            ),
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if let Err(e) = self.shutdown() {
            eprintln!("nspawn: cleaning up container {} failed: {e}", self.name);
        }
    }
}

/// Calls `f` until it returns `Some`, at most for `timeout`, 50 ms apart. `Ok(None)` on timeout.
pub fn poll<T>(
    timeout: Duration,
    mut f: impl FnMut() -> io::Result<Option<T>>,
) -> io::Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f()? {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether this machine can boot containers, with the reason when not (root and the tools).
pub fn preflight() -> io::Result<()> {
    let status = fs::read_to_string("/proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "booting a systemd-nspawn container needs root",
        ));
    }
    for tool in ["systemd-nspawn", "nsenter"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{tool} not found on PATH (apt-get install systemd-container util-linux)"),
            ));
        }
    }
    Ok(())
}

/// `<prefix>-<pid>-<n>`, cut to a valid machine name.
fn unique_name(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() { "nspawn" } else { clean };
    format!(
        "{clean}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

fn bind_arg(host: &Path, inside: &Path, ro: bool) -> io::Result<String> {
    if !host.is_absolute() || !inside.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "bind paths must be absolute: {} -> {}",
                host.display(),
                inside.display()
            ),
        ));
    }
    if !host.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("bind source {} does not exist", host.display()),
        ));
    }
    // nspawn splits on ':' and reads backslash escapes.
    let escape = |p: &Path| {
        p.to_string_lossy()
            .replace('\\', "\\\\")
            .replace(':', "\\:")
    };
    let flag = if ro { "--bind-ro" } else { "--bind" };
    Ok(format!("{flag}={}:{}", escape(host), escape(inside)))
}

/// The command that starts `systemd-nspawn` in a cgroup of its own, and the cgroups to remove
/// afterwards. With systemd on the host a transient scope does it (and systemd removes it); without,
/// a small shell moves itself into fresh cgroup directories and then execs nspawn, so the
/// nspawn PID is the child's PID either way.
fn own_cgroup_command(name: &str, nspawn_args: &[String]) -> io::Result<(Command, Vec<PathBuf>)> {
    if Path::new("/run/systemd/system").is_dir() && std::process::id() != 1 {
        let mut command = Command::new("systemd-run");
        command
            .args(["--scope", "--quiet", "--collect"])
            .arg(format!("--unit=nspawn-{name}"))
            .arg("--")
            .arg("systemd-nspawn")
            .args(nspawn_args);
        return Ok((command, Vec::new()));
    }
    let mut dirs = Vec::new();
    for parent in own_cgroup_dirs()? {
        let dir = parent.join(format!("nspawn-{name}"));
        if let Err(e) = fs::create_dir(&dir) {
            remove_cgroups(&dirs);
            return Err(annotate(
                e,
                &format!("cannot create cgroup {}", dir.display()),
            ));
        }
        dirs.push(dir);
    }
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; done; shift; exec "$@""#)
        .arg("sh")
        .args(&dirs)
        .arg("--")
        .arg("systemd-nspawn")
        .args(nspawn_args);
    Ok((command, dirs))
}

/// This process's cgroup directory in each hierarchy nspawn uses: the unified (v2) one and, on a
/// hybrid host, the named `name=systemd` v1 one.
fn own_cgroup_dirs() -> io::Result<Vec<PathBuf>> {
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let path_of = |want_v2: bool| {
        own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let hit = if want_v2 {
                id == "0" && controllers.is_empty()
            } else {
                controllers == "name=systemd"
            };
            hit.then(|| path.to_owned())
        })
    };
    let mut dirs = Vec::new();
    let mut seen_v2 = false;
    let mut seen_v1 = false;
    for line in fs::read_to_string("/proc/self/mountinfo")?.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let (root, mount) = (left[3], left[4]);
        let is_v2 = right[0] == "cgroup2" && !seen_v2;
        let is_v1 =
            right[0] == "cgroup" && right[2].split(',').any(|o| o == "name=systemd") && !seen_v1;
        if !(is_v2 || is_v1) {
            continue;
        }
        let Some(path) = path_of(is_v2) else { continue };
        let Some(rel) = path.strip_prefix(root.trim_end_matches('/')) else {
            continue;
        };
        dirs.push(Path::new(mount).join(rel.trim_start_matches('/')));
        if is_v2 {
            seen_v2 = true;
        } else {
            seen_v1 = true;
        }
    }
    if dirs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup hierarchy mounted",
        ));
    }
    Ok(dirs)
}

/// Removes each cgroup directory tree, deepest first. rmdir refuses a cgroup that still has
/// processes, so this can never take a cgroup from under someone.
fn remove_cgroups(dirs: &[PathBuf]) {
    fn remove_tree(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    remove_tree(&entry.path());
                }
            }
        }
        if let Err(e) = fs::remove_dir(dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("nspawn: cannot remove cgroup {}: {e}", dir.display());
            }
        }
    }
    for dir in dirs {
        remove_tree(dir);
    }
}

/// PIDs of the children of every thread of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Field 22 of `/proc/<pid>/stat`: the start time, which tells a process from a later one that
/// got the same PID.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; the fields start after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Sends a signal to one PID with kill(1); std has no kill for a PID that is not our child.
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_exit(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    crate::within(timeout, || child.try_wait().transpose()).transpose()
}

/// Copies a pipe into `sink`, keeping only the last [`CONSOLE_KEEP`] bytes.
fn collect(pipe: Option<impl Read + Send + 'static>, sink: &Arc<Mutex<Vec<u8>>>) {
    let Some(mut pipe) = pipe else { return };
    let sink = Arc::clone(sink);
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            sink.extend_from_slice(&buf[..n]);
            if sink.len() > CONSOLE_KEEP {
                let cut = sink.len() - CONSOLE_KEEP;
                sink.drain(..cut);
            }
        }
    });
}

/// `Command::output` with a deadline: on expiry the child is killed and the call fails. Output
/// still held open by a grandchild after the child exited is given up after a short wait.
fn run_bounded(mut command: Command, limit: Duration) -> io::Result<Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        read_all(child.stdout.take(), &stdout),
        read_all(child.stderr.take(), &stderr),
    ];
    let status = match wait_exit(&mut child, limit)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{command:?} took over {limit:?}"),
            ));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    for reader in readers.into_iter().flatten() {
        while !reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
    let take =
        |b: &Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *b.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Output {
        status,
        stdout: take(&stdout),
        stderr: take(&stderr),
    })
}

fn read_all(
    pipe: Option<impl Read + Send + 'static>,
    sink: &Arc<Mutex<Vec<u8>>>,
) -> Option<thread::JoinHandle<()>> {
    let mut pipe = pipe?;
    let sink = Arc::clone(sink);
    Some(thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    }))
}

fn show_args<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
