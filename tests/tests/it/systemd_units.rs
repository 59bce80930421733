//! The unit files in `systemd/` and `scripts/install`, checked by systemd itself: `systemd-analyze
//! verify` on the host, and an install into a real systemd 252 booted with `systemd-nspawn`.
//!
//! These run as root with systemd-container installed (scripts/test installs it) and need the
//! binaries built (`cargo build --workspace --bins`, which scripts/test does first).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::nspawn::{self, Container};
use tests::service;

const UNITS: [&str; 3] = [
    "plugvisor.service",
    "plugvisor.socket",
    "plugvisor-plugin@.service",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_owned()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    // verify insists that every ExecStart= binary exists, so check copies of the units whose
    // /usr/local/bin/ paths point at the binaries this test run was built with.
    let bin_dir = nspawn::built_binaries_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for unit in UNITS {
        let text = fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        assert!(
            !unit.ends_with(".service") || text.contains("ExecStart=/usr/local/bin/plugvisor"),
            "{unit} no longer runs /usr/local/bin/plugvisor*; update this test and scripts/install"
        );
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        fs::write(dir.path().join(unit), text).unwrap();
    }
    // A template is verified through an instance; its file is found next to the named path.
    let names = [
        "plugvisor.service",
        "plugvisor.socket",
        "plugvisor-plugin@usage.service",
    ];
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(names.iter().map(|n| dir.path().join(n)))
        .output()
        .expect("systemd-analyze runs (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys and bad values are only warnings to verify: any line about our units fails.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("plugvisor")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns:\n{}",
        ours.join("\n")
    );
}

#[test]
fn install_script_puts_units_in_place_under_real_systemd() {
    let repo = repo();
    let bin_dir = nspawn::built_binaries_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, _) =
        service::config_on_free_ports(dir.path(), "tests/systemd/spawned.toml", |t| t);
    let c = Container::builder("install")
        .boot_installed(&repo, &bin_dir, &config)
        .unwrap();
    // What the install was given, as the container sees it (boot_installed copied it there).
    let config = c.scratch().join("plugvisor.toml");

    // Idempotent: a second run succeeds and keeps the config in place.
    let install = repo.join("scripts/install");
    let again = c
        .exec_ok(&[
            install.to_str().unwrap(),
            "--from",
            bin_dir.to_str().unwrap(),
            "--config",
            "/nonexistent.toml",
        ])
        .unwrap();
    assert!(again.contains("kept the existing"), "{again}");
    c.exec_ok(&["id", "plugvisor"]).unwrap();
    c.exec_ok(&[
        "cmp",
        config.to_str().unwrap(),
        "/etc/plugvisor/plugvisor.toml",
    ])
    .unwrap();

    // The installed units, with their real ExecStart= paths, as systemd sees them.
    let verify = c
        .exec(&[
            "systemd-analyze",
            "verify",
            "--man=no",
            "/usr/local/lib/systemd/system/plugvisor.service",
            "/usr/local/lib/systemd/system/plugvisor.socket",
            "/usr/local/lib/systemd/system/plugvisor-plugin@usage.service",
        ])
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "verify inside: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(
        c.show_property("plugvisor.service", "Type").unwrap(),
        "notify"
    );
    assert_eq!(
        c.show_property("plugvisor.service", "User").unwrap(),
        "plugvisor"
    );
    assert_eq!(
        c.show_property("plugvisor-plugin@usage.service", "User")
            .unwrap(),
        "plugvisor"
    );
    assert_eq!(
        c.show_property("plugvisor-plugin@usage.service", "PartOf")
            .unwrap(),
        "plugvisor.service"
    );

    // The listener: Envoy's group may connect, nobody else.
    c.systemctl_ok(&["start", "plugvisor.socket"]).unwrap();
    let socket = "/run/plugvisor/extproc.sock";
    let stat = |path: &str| c.exec_ok(&["stat", "-c", "%A %U %G", path]).unwrap();
    assert_eq!(stat(socket).trim(), "srw-rw---- root envoy");
    assert_eq!(
        stat("/run/plugvisor").trim(),
        "drwxr-xr-x plugvisor plugvisor"
    );

    // Starting the service applies RuntimeDirectory=, whose recursive chown must not reach the
    // socket; stopping it must not remove the socket either (RuntimeDirectoryPreserve=yes).
    // Whether the program itself comes up is for the service tests: this only waits until systemd
    // has executed it, which is after the runtime directory was set up.
    c.systemctl_ok(&["start", "--no-block", "plugvisor.service"])
        .unwrap();
    let executed = nspawn::poll(Duration::from_secs(30), || {
        let state = c.show_property("plugvisor.service", "ActiveState")?;
        let restarts = c.show_property("plugvisor.service", "NRestarts")?;
        let main = c.show_property("plugvisor.service", "MainPID")?;
        // Until execve the forked child is called "(plugvisor)".
        let comm = c.exec(&["cat", &format!("/proc/{main}/comm")])?;
        let exec_done = main != "0" && String::from_utf8_lossy(&comm.stdout).trim() == "plugvisor";
        Ok(
            (exec_done || restarts != "0" || matches!(state.as_str(), "active" | "failed"))
                .then_some(()),
        )
    })
    .unwrap();
    assert!(
        executed.is_some(),
        "{}",
        c.describe_unit("plugvisor.service")
    );
    assert_eq!(stat(socket).trim(), "srw-rw---- root envoy");
    c.systemctl_ok(&["stop", "plugvisor.service"]).unwrap();
    assert_eq!(stat(socket).trim(), "srw-rw---- root envoy");
    assert_eq!(
        c.show_property("plugvisor.socket", "ActiveState").unwrap(),
        "active"
    );

    let (took, status) = c.poweroff().unwrap();
    assert!(status.success(), "container exited with {status}");
    assert!(took < nspawn::POWEROFF_TIMEOUT, "poweroff took {took:?}");
}

#[test]
fn only_envoys_group_reaches_the_activated_socket_while_plugvisor_runs() {
    let repo = repo();
    let bin_dir = nspawn::built_binaries_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, _) =
        service::config_on_free_ports(dir.path(), "tests/systemd/spawned.toml", |t| t);
    let c = Container::builder("socket-access")
        .boot_installed(&repo, &bin_dir, &config)
        .unwrap();
    c.systemctl_ok(&["start", "plugvisor.socket"]).unwrap();
    c.systemctl_ok(&["start", "--no-block", "plugvisor.service"])
        .unwrap();
    // Once plugvisor has created its plugin sockets it has also set up the runtime directory.
    let up = nspawn::poll(Duration::from_secs(30), || {
        Ok(
            c.exec(&["test", "-S", "/run/plugvisor/plugins/usage.sock"])?
                .status
                .success()
                .then_some(()),
        )
    })
    .unwrap();
    assert!(up.is_some(), "{}", c.describe_unit("plugvisor.service"));

    let envoy_gid = c.exec_ok(&["getent", "group", "envoy"]).unwrap();
    let envoy_gid = envoy_gid.split(':').nth(2).unwrap().trim().to_owned();
    // connect(2) as an unprivileged uid with only the given group: exit 0 when it connects.
    let connect_as = |gid: &str| {
        c.exec(&[
            "setpriv",
            "--reuid=65534",
            &format!("--regid={gid}"),
            "--clear-groups",
            "python3",
            "-c",
            "import socket; socket.socket(socket.AF_UNIX).connect('/run/plugvisor/extproc.sock')",
        ])
        .unwrap()
    };
    let as_envoy = connect_as(&envoy_gid);
    assert!(
        as_envoy.status.success(),
        "a member of group envoy cannot connect (is /run/plugvisor still traversable?): {}\n{}",
        String::from_utf8_lossy(&as_envoy.stderr),
        c.exec_ok(&["ls", "-la", "/run/plugvisor"]).unwrap()
    );
    let as_other = connect_as("65534");
    assert!(
        !as_other.status.success(),
        "a uid outside group envoy connected to the ext_proc socket"
    );
}
