//! plugvisor installed with `scripts/install` in a container running a real systemd 252
//! ([`crate::nspawn`]), the container's `/run/plugvisor` bound to a host directory so Envoy (on
//! the host) reaches the socket systemd activates inside: the [`Service`] the systemd tests
//! operate. Needs root, systemd-container and the binaries built first.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::envoy::{Envoy, EnvoyOptions};
use crate::nspawn::{self, Container};
use crate::upstream::Upstream;

/// The front's unit.
pub const SERVICE: &str = "plugvisor.service";
/// The ext_proc socket's unit.
pub const SOCKET: &str = "plugvisor.socket";

/// The repository's root (the parent of `tests/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_owned()
}

/// `config` (a path in the repository) passed through `edit`, with its `listen` and
/// `admin_listen` (the default's 127.0.0.1:9002 and :9003, which the files under tests/systemd
/// name) moved to free ports, written to `dir/plugvisor.toml`: containers share the host's
/// network, so a container's front on the default ports would take them from an operator's
/// plugvisor on the host, and from the other containers. Returns the file and its `listen`.
pub fn config_on_free_ports(
    dir: &Path,
    config: &str,
    edit: impl FnOnce(String) -> String,
) -> (PathBuf, String) {
    let text = edit(std::fs::read_to_string(repo().join(config)).unwrap());
    let listen = format!("127.0.0.1:{}", crate::free_port());
    let mut moved = text.clone();
    for (key, from, to) in [
        ("listen", "127.0.0.1:9002", listen.clone()),
        (
            "admin_listen",
            "127.0.0.1:9003",
            format!("127.0.0.1:{}", crate::free_port()),
        ),
    ] {
        let line = format!("\n{key} = \"{from}\"\n");
        assert!(
            moved.contains(&line),
            "{config} must set {key} = \"{from}\" for the test to move it"
        );
        moved = moved.replace(&line, &format!("\n{key} = \"{to}\"\n"));
    }
    let path = dir.join("plugvisor.toml");
    std::fs::write(&path, moved).unwrap();
    (path, listen)
}

/// A container with plugvisor installed with a config, its `/run/plugvisor` visible on the host.
/// Powered off when dropped (by [`Container`]).
pub struct Service {
    /// The container.
    pub c: Container,
    /// The host side of the container's /run/plugvisor.
    pub run_dir: tempfile::TempDir,
    /// The config's `listen` (a free port: not where it serves when socket-activated).
    pub listen: String,
}

impl Service {
    /// Boots container `name` and installs plugvisor with `config` (a path in the repository);
    /// nothing is started yet.
    pub fn boot(name: &str, config: &str) -> Service {
        Service::boot_with(name, config, |t| t)
    }

    /// Like [`Service::boot`], with the config text passed through `edit` first.
    pub fn boot_with(name: &str, config: &str, edit: impl FnOnce(String) -> String) -> Service {
        let run_dir = tempfile::tempdir().expect("tempdir for /run/plugvisor");
        let repo = repo();
        let (config, listen) = config_on_free_ports(run_dir.path(), config, edit);
        let c = Container::builder(name)
            .bind(run_dir.path(), "/run/plugvisor")
            .boot_installed(
                &repo,
                &nspawn::built_binaries_dir().expect("built binaries"),
                &config,
            )
            .expect("boot and install");
        Service { c, run_dir, listen }
    }

    /// `systemctl <args>`; panics with the front unit's state when it fails.
    pub fn ok(&self, args: &[&str]) {
        self.c
            .systemctl_ok(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.c.describe_unit(SERVICE)));
    }

    /// `systemctl start plugvisor.socket plugvisor.service`, which returns once plugvisor sent
    /// READY=1 (`Type=notify`).
    pub fn start(&self) {
        self.ok(&["start", SOCKET, SERVICE]);
    }

    /// A 2 s watchdog for the front (and no core file from its SIGABRT), as a drop-in; systemd
    /// reloaded.
    pub fn short_watchdog(&self) {
        self.c
            .sh("mkdir -p /etc/systemd/system/plugvisor.service.d && \
                 printf '[Service]\\nWatchdogSec=2s\\nLimitCORE=0\\n' \
                   > /etc/systemd/system/plugvisor.service.d/watchdog.conf && \
                 systemctl daemon-reload")
            .unwrap();
    }

    /// A property of plugvisor.service.
    pub fn prop(&self, prop: &str) -> String {
        self.unit_prop(SERVICE, prop)
    }

    /// A property of `unit`.
    pub fn unit_prop(&self, unit: &str, prop: &str) -> String {
        self.c.show_property(unit, prop).unwrap()
    }

    /// Waits up to 20 s for `unit`'s `prop` to be `want`.
    pub fn wait_unit_prop(&self, unit: &str, prop: &str, want: &str) {
        self.c
            .wait_for_property(unit, prop, want, Duration::from_secs(20))
            .unwrap();
    }

    /// Polls the StatusText until `pred` holds; returns it, or panics with the unit's state.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let mut last = String::new();
        let found = nspawn::poll(timeout, || {
            last = self.prop("StatusText");
            Ok(pred(&last).then(|| last.clone()))
        })
        .unwrap();
        found.unwrap_or_else(|| {
            panic!(
                "StatusText never {what} within {timeout:?}; last {last:?}\n{}",
                self.c.describe_unit(SERVICE)
            )
        })
    }

    /// The pid (inside the container) of the process serving `plugin`.
    pub fn plugin_pid(&self, plugin: &str) -> Option<u32> {
        let out = self
            .c
            .exec(&["pgrep", "-f", &format!("^plugvisor-plugin: {plugin}")])
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
    }

    /// Waits up to 15 s for a process serving `plugin` other than `not`; its pid.
    pub fn wait_plugin_pid(&self, plugin: &str, not: Option<u32>) -> u32 {
        let found = nspawn::poll(Duration::from_secs(15), || {
            Ok(self.plugin_pid(plugin).filter(|p| Some(*p) != not))
        })
        .unwrap();
        found.unwrap_or_else(|| {
            panic!(
                "no process for plugin {plugin} (other than {not:?})\n{}",
                self.c.describe_unit(SERVICE)
            )
        })
    }

    /// The activated ext_proc socket as the host sees it.
    pub fn ext_proc(&self) -> String {
        format!(
            "unix:{}",
            self.run_dir.path().join("extproc.sock").display()
        )
    }

    /// Envoy in `dir` in front of `upstream`, failing closed on the activated socket.
    pub fn envoy(&self, dir: &Path, upstream: &Upstream) -> Envoy {
        self.envoy_with(dir, upstream, self.ext_proc(), false)
    }

    /// Envoy in `dir` in front of `upstream` on `ext_proc`, passing traffic when it cannot
    /// reach it if `failure_mode_allow`.
    pub fn envoy_with(
        &self,
        dir: &Path,
        upstream: &Upstream,
        ext_proc: String,
        failure_mode_allow: bool,
    ) -> Envoy {
        Envoy::start(
            dir,
            &EnvoyOptions {
                ext_proc,
                upstream_port: upstream.port,
                failure_mode_allow,
                ..EnvoyOptions::default()
            },
        )
    }
}
