//! The Python SDK as an outsider uses it: `sdk/python` installed with pip into a fresh venv, whose
//! interpreter then runs the SDK's examples (spawned by the front, or by the conformance kit).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Runs `cmd` to completion within `limit`, killing it (by pid) if it takes longer; panics with
/// its output unless it succeeds.
pub fn run_bounded(what: &str, cmd: &mut Command, limit: Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let file = std::fs::File::create(&out).expect("output file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            panic!(
                "{what}: not done within {limit:?}:\n{}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{what}: {status}:\n{}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
}

/// A fresh venv at `venv` with `packages` installed by pip (names from PyPI or paths); returns
/// its interpreter. pip runs from inside the venv, so an in-tree build's leftovers (`build/`,
/// `*.egg-info`) beside a path's sources pick up nothing else of the checkout.
pub fn venv_with(venv: &Path, packages: &[std::ffi::OsString]) -> PathBuf {
    run_bounded(
        "python3 -m venv",
        Command::new("python3").arg("-m").arg("venv").arg(venv),
        Duration::from_secs(120),
    );
    let python = venv.join("bin/python3");
    let names: Vec<String> = packages
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    run_bounded(
        &format!("pip install {}", names.join(" ")),
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .args(packages)
            .current_dir(venv),
        Duration::from_secs(300),
    );
    python
}

/// A fresh venv in `dir` with the SDK installed from `sdk/python`; returns its interpreter.
pub fn venv_with_sdk(dir: &Path) -> PathBuf {
    venv_with(&dir.join("venv"), &[repo().join("sdk/python").into()])
}

/// One venv with the SDK for the whole test process, made on first use under the target
/// directory (`it-python-venv`, recreated by each test run); returns its interpreter.
pub fn shared_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = crate::bins::bin_dir().join("it-python-venv");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("venv directory");
        venv_with_sdk(&dir)
    })
    .clone()
}

/// A venv with the official OTLP protos and gRPC (PyPI `opentelemetry-proto`, `grpcio`,
/// `protobuf`) for `tests/otlp_receiver.py`, made once per test process under the target
/// directory (`it-otlp-venv`); returns its interpreter. A venv left by an earlier run is reused
/// when its packages import, and made afresh otherwise.
pub fn otlp_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = crate::bins::bin_dir().join("it-otlp-venv");
        let python = dir.join("bin/python3");
        let imports = || {
            Command::new(&python)
                .args([
                    "-c",
                    "import grpc, google.protobuf; from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if imports() {
            return python;
        }
        let _ = std::fs::remove_dir_all(&dir);
        let packages = ["opentelemetry-proto", "grpcio", "protobuf"].map(Into::into);
        venv_with(&dir, &packages);
        assert!(imports(), "the OTLP venv at {} does not import its packages", dir.display());
        python
    })
    .clone()
}
