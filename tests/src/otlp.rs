//! A real OTLP collector for the usage records' and the traces' tests: `tests/otlp_receiver.py`,
//! built on the official protos, run in the venv of [`crate::python::otlp_venv`], over HTTP or
//! gRPC on a port of its own, taking logs and traces; stopped by pid (and started again on the
//! same port), or told to fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{eventually, free_port, FileText};

/// The transport the collector serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies, `POST /v1/logs`.
    Http,
    /// OTLP/gRPC, `LogsService/Export`.
    Grpc,
}

/// A running (or stopped) collector.
pub struct Collector {
    protocol: Protocol,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Collector {
    /// Starts one in `dir` (its received records go to `dir/otlp-records.jsonl`).
    pub fn start(dir: &Path, protocol: Protocol) -> Collector {
        let mut c = Collector {
            protocol,
            port: free_port(),
            dir: dir.to_owned(),
            child: None,
        };
        c.restart();
        c
    }

    /// `[records.otlp]` keys pointing at it.
    pub fn config(&self) -> String {
        match self.protocol {
            Protocol::Http => format!(
                "endpoint = \"http://127.0.0.1:{}/v1/logs\"\nprotocol = \"http/protobuf\"\n",
                self.port
            ),
            Protocol::Grpc => format!(
                "endpoint = \"http://127.0.0.1:{}\"\nprotocol = \"grpc\"\n",
                self.port
            ),
        }
    }

    /// `[traces]` keys pointing at it.
    pub fn traces_config(&self) -> String {
        match self.protocol {
            Protocol::Http => format!(
                "endpoint = \"http://127.0.0.1:{}/v1/traces\"\nprotocol = \"http/protobuf\"\n",
                self.port
            ),
            Protocol::Grpc => format!(
                "endpoint = \"http://127.0.0.1:{}\"\nprotocol = \"grpc\"\n",
                self.port
            ),
        }
    }

    /// Starts it (again) on its port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let ready = self.dir.join("otlp-ready");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(self.dir.join("otlp-receiver.log")).expect("log");
        let child = Command::new(crate::python::otlp_venv())
            .arg(crate::python::repo().join("tests/otlp_receiver.py"))
            .args([
                "--protocol",
                match self.protocol {
                    Protocol::Http => "http",
                    Protocol::Grpc => "grpc",
                },
            ])
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--out")
            .arg(self.out())
            .arg("--spans")
            .arg(self.dir.join("otlp-spans.jsonl"))
            .arg("--fail")
            .arg(self.dir.join("otlp-fail"))
            .arg("--ready")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start otlp_receiver.py");
        self.child = Some(child);
        let log = self.dir.join("otlp-receiver.log");
        let child = self.child.as_mut().expect("started");
        eventually(
            "the OTLP receiver listening",
            Duration::from_secs(20),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("otlp_receiver.py exited with {status}:\n{}", FileText(&log));
                }
                ready.exists().then_some(()).ok_or(FileText(&log))
            },
        );
    }

    /// Kills it (SIGKILL by pid) and waits for it: the port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Answers 503 / UNAVAILABLE while `on`.
    pub fn fail(&self, on: bool) {
        let flag = self.dir.join("otlp-fail");
        if on {
            std::fs::write(flag, b"").expect("fail flag");
        } else {
            let _ = std::fs::remove_file(flag);
        }
    }

    fn out(&self) -> PathBuf {
        self.dir.join("otlp-records.jsonl")
    }

    /// Every log record received so far, as the receiver decoded it.
    pub fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.out())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Every span received so far, as the receiver decoded it (ids in lowercase hex).
    pub fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("otlp-spans.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The `plugvisor.record_id` of every log record received so far, in order, repeats kept.
    pub fn record_ids(&self) -> Vec<String> {
        self.records()
            .iter()
            .filter_map(|r| {
                r["attributes"]["plugvisor.record_id"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}
