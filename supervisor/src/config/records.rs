//! The `[records]` table (usage records, [`crate::records`]) and its `[records.otlp]` table:
//! the schema, the defaults (the state directory), the OpenTelemetry environment variables, and
//! the checks that can be made before the front starts.
//!
//! The file wins over the environment, key by key: a key set in `[records.otlp]` is used as
//! written, a key left out is taken from `OTEL_EXPORTER_OTLP_LOGS_*`, then `OTEL_EXPORTER_OTLP_*`,
//! then the default ([`super::otlp`], the rule `[traces]` follows too).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[cfg(test)]
use super::otlp::no_env;
use super::otlp::{bad, resource, Bad, Env, OtlpTransport, RawTransport, Signal};
pub use super::otlp::{OtlpProtocol, DEFAULT_OTLP_TIMEOUT_MS};

/// Default `rotate_bytes`: 64 MiB.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;
/// Default `keep`: rotated files kept beside the live one.
pub const DEFAULT_KEEP: u32 = 5;
/// Default `queue_records`: records waiting for each sink's task.
pub const DEFAULT_QUEUE_RECORDS: usize = 8192;
/// Default `spool_max_bytes`: 256 MiB.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// The top-level fields of a record that `omit` may name (every field but `record_id`, the
/// dedupe key). `plugins.<namespace>` and `plugins.<namespace>.<key>` name parts of `plugins`.
pub const OMITTABLE: &[&str] = &[
    "request_id",
    "stream_id",
    "front_pid",
    "method",
    "path",
    "authority",
    "started_at",
    "ended_at",
    "status",
    "cause",
    "http_status",
    "plugins",
    "missing",
    "reasons",
];

/// Usage records: where they go.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordsConfig {
    /// The JSON Lines file; `None`: no file.
    pub path: Option<PathBuf>,
    /// The file is rotated when a batch would take it past this size.
    pub rotate_bytes: u64,
    /// Rotated files kept (`records.jsonl.1` the newest).
    pub keep: u32,
    /// Fields left out of every record (validated names, see [`OMITTABLE`]).
    pub omit: Vec<String>,
    /// Records waiting in memory for each sink's task; past it a record goes to the spool
    /// (OTLP) or is dropped and counted (the file).
    pub queue_records: usize,
    /// The OTLP export; `None`: off (no endpoint configured).
    pub otlp: Option<OtlpConfig>,
}

/// The OTLP export of usage records, resolved from the file and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// Where records are sent: for `http/protobuf` the whole URL of the logs endpoint
    /// (`.../v1/logs`), for `grpc` the collector's `http://host:port`.
    pub endpoint: String,
    /// The transport.
    pub protocol: OtlpProtocol,
    /// Extra request headers (e.g. an API key), as OTEL_EXPORTER_OTLP_HEADERS.
    pub headers: Vec<(String, String)>,
    /// How long one export request may take.
    pub timeout: Duration,
    /// Where records wait while the collector cannot take them.
    pub spool_dir: PathBuf,
    /// The most the spool may hold, all fronts' files together.
    pub spool_max_bytes: u64,
    /// Resource attributes: `service.name` (`plugvisor` unless OTEL_SERVICE_NAME or
    /// OTEL_RESOURCE_ATTRIBUTES say otherwise) and the others of OTEL_RESOURCE_ATTRIBUTES.
    pub resource: Vec<(String, String)>,
}

impl OtlpConfig {
    /// Where and how records are sent.
    pub fn transport(&self) -> OtlpTransport {
        OtlpTransport {
            endpoint: self.endpoint.clone(),
            protocol: self.protocol,
            headers: self.headers.clone(),
            timeout: self.timeout,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecords {
    path: Option<toml::Spanned<String>>,
    rotate_bytes: Option<u64>,
    keep: Option<u32>,
    omit: Option<toml::Spanned<Vec<String>>>,
    queue_records: Option<usize>,
    #[serde(default)]
    otlp: RawOtlp,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOtlp {
    endpoint: Option<toml::Spanned<String>>,
    protocol: Option<toml::Spanned<String>>,
    headers: Option<BTreeMap<String, String>>,
    timeout_ms: Option<u64>,
    spool_dir: Option<toml::Spanned<String>>,
    spool_max_bytes: Option<u64>,
}

/// Where the front keeps state across restarts (the records file, the spool):
/// `$STATE_DIRECTORY` (systemd's `StateDirectory=`; the first entry if several), else
/// `$XDG_STATE_HOME/plugvisor`, else `~/.local/state/plugvisor`, else (no home)
/// `/var/lib/plugvisor`.
pub fn default_state_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = var("STATE_DIRECTORY") {
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        return PathBuf::from(first);
    }
    if let Some(dir) = var("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("plugvisor");
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/plugvisor"),
        None => PathBuf::from("/var/lib/plugvisor"),
    }
}

impl RawRecords {
    /// Validates the table and resolves the defaults and the environment.
    pub(super) fn resolve(self, env: Env<'_>) -> Result<RecordsConfig, Bad> {
        let state = default_state_dir();
        let path = match &self.path {
            None => Some(state.join("records.jsonl")),
            Some(p) if p.get_ref().is_empty() => None,
            Some(p) => {
                let path = PathBuf::from(p.get_ref());
                if !path.is_absolute() {
                    return Err(bad(
                        "records.path",
                        Some(p.span()),
                        format!(
                            "`{}` is not an absolute path; give one, or \"\" to write no file",
                            p.get_ref()
                        ),
                    ));
                }
                if path.file_name().is_none() {
                    return Err(bad(
                        "records.path",
                        Some(p.span()),
                        format!("`{}` names no file", p.get_ref()),
                    ));
                }
                Some(path)
            }
        };
        let mut omit = Vec::new();
        if let Some(list) = &self.omit {
            for name in list.get_ref() {
                check_omit(name).map_err(|m| bad("records.omit", Some(list.span()), m))?;
                omit.push(name.clone());
            }
        }
        let otlp = self.otlp.resolve(env, &state)?;
        Ok(RecordsConfig {
            path,
            rotate_bytes: self.rotate_bytes.unwrap_or(DEFAULT_ROTATE_BYTES),
            keep: self.keep.unwrap_or(DEFAULT_KEEP),
            omit,
            queue_records: self.queue_records.unwrap_or(DEFAULT_QUEUE_RECORDS),
            otlp,
        })
    }
}

/// An `omit` entry names a field a record has.
fn check_omit(name: &str) -> Result<(), String> {
    if let Some(rest) = name.strip_prefix("plugins.") {
        if rest.is_empty() || rest.starts_with('.') || rest.ends_with('.') {
            return Err(format!(
                "`{name}`: name a namespace (`plugins.<namespace>`) or one of its keys \
                 (`plugins.<namespace>.<key>`)"
            ));
        }
        return Ok(());
    }
    if name == "record_id" {
        return Err(
            "`record_id` cannot be omitted: it is how a consumer drops a record delivered twice"
                .into(),
        );
    }
    if OMITTABLE.contains(&name) {
        return Ok(());
    }
    Err(format!(
        "`{name}` is no field of a record (fields: {}; or plugins.<namespace>[.<key>])",
        OMITTABLE.join(", ")
    ))
}

impl RawOtlp {
    fn resolve(self, env: Env<'_>, state: &Path) -> Result<Option<OtlpConfig>, Bad> {
        let transport = RawTransport {
            endpoint: self.endpoint,
            protocol: self.protocol,
            headers: self.headers,
            timeout_ms: self.timeout_ms,
        }
        .resolve("records.otlp", Signal::Logs, env)?;
        let spool_dir = match &self.spool_dir {
            None => state.join("spool"),
            Some(d) => {
                let dir = PathBuf::from(d.get_ref());
                if !dir.is_absolute() {
                    return Err(bad(
                        "records.otlp.spool_dir",
                        Some(d.span()),
                        format!("`{}` is not an absolute path", d.get_ref()),
                    ));
                }
                dir
            }
        };
        let Some(OtlpTransport {
            endpoint,
            protocol,
            headers,
            timeout,
        }) = transport
        else {
            return Ok(None);
        };
        Ok(Some(OtlpConfig {
            endpoint,
            protocol,
            headers,
            timeout,
            spool_dir,
            spool_max_bytes: self.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES),
            resource: resource(env).map_err(|(key, m)| bad(key, None, m))?,
        }))
    }
}

/// What can be known about the records' places before the front starts: the file's and the
/// spool's directories can be created and written.
pub(super) fn check_places(records: &RecordsConfig) -> Result<(), Bad> {
    if let Some(path) = &records.path {
        if let Some(dir) = path.parent() {
            writable_dir(dir).map_err(|m| {
                bad(
                    "records.path",
                    None,
                    format!("cannot write {}: {m}", path.display()),
                )
            })?;
        }
    }
    if let Some(otlp) = &records.otlp {
        writable_dir(&otlp.spool_dir).map_err(|m| bad("records.otlp.spool_dir", None, m))?;
    }
    Ok(())
}

/// `dir` is a writable directory, or can be made one: its nearest existing ancestor is a
/// writable directory (nothing is created here; `check-config` leaves the host as it is).
fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(parent) => at = parent,
            None => break,
        }
    }
    if !at.is_dir() {
        return Err(format!(
            "cannot create directory {}: {} is not a directory",
            dir.display(),
            at.display()
        ));
    }
    nix::unistd::access(
        at,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|e| {
        if at == dir {
            format!("directory {} is not writable: {e}", dir.display())
        } else {
            format!(
                "cannot create directory {}: {} is not writable: {e}",
                dir.display(),
                at.display()
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn raw(text: &str) -> RawRecords {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn otlp_is_off_without_an_endpoint_and_the_file_wins_over_the_environment() {
        let none = raw("").resolve(&no_env).ok().unwrap();
        assert!(none.otlp.is_none());
        assert!(none.path.unwrap().ends_with("records.jsonl"));

        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret, x=1"),
            ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "2500"),
            ("OTEL_SERVICE_NAME", "gateway"),
        ]);
        let o = raw("").resolve(&env).ok().unwrap().otlp.unwrap();
        assert_eq!(o.endpoint, "http://collector:4318/v1/logs");
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            o.headers,
            vec![
                ("api-key".into(), "s=cret".into()),
                ("x".into(), "1".into())
            ]
        );
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert_eq!(o.resource, vec![("service.name".into(), "gateway".into())]);

        let o = raw(
            "[otlp]\nendpoint = \"http://127.0.0.1:4317\"\nprotocol = \"grpc\"\ntimeout_ms = 7\n",
        )
        .resolve(&env)
        .ok()
        .unwrap()
        .otlp
        .unwrap();
        assert_eq!(o.endpoint, "http://127.0.0.1:4317");
        assert_eq!(o.protocol, OtlpProtocol::Grpc);
        assert_eq!(o.timeout, Duration::from_millis(7));

        let logs = env_of(&[
            (
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                "http://c:4318/custom/logs",
            ),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4318"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=gw,deployment.environment=prod",
            ),
        ]);
        let o = raw("").resolve(&logs).ok().unwrap().otlp.unwrap();
        assert_eq!(o.endpoint, "http://c:4318/custom/logs");
        assert_eq!(
            o.resource,
            vec![
                ("service.name".into(), "gw".into()),
                ("deployment.environment".into(), "prod".into())
            ]
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str)] = &[
            ("path = \"records.jsonl\"", "records.path"),
            ("omit = [\"secret\"]", "records.omit"),
            ("omit = [\"record_id\"]", "records.omit"),
            ("omit = [\"plugins.\"]", "records.omit"),
            (
                "[otlp]\nendpoint = \"collector:4318\"",
                "records.otlp.endpoint",
            ),
            (
                "[otlp]\nendpoint = \"https://c:4318\"",
                "records.otlp.endpoint",
            ),
            (
                "[otlp]\nendpoint = \"http://c\"\nprotocol = \"http/json\"",
                "records.otlp.protocol",
            ),
            (
                "[otlp]\nendpoint = \"http://c\"\nprotocol = \"udp\"",
                "records.otlp.protocol",
            ),
            (
                "[otlp]\nendpoint = \"http://c\"\nspool_dir = \"spool\"",
                "records.otlp.spool_dir",
            ),
            (
                "[otlp]\nendpoint = \"http://c\"\nheaders = { \"a b\" = \"1\" }",
                "records.otlp.headers",
            ),
        ];
        for (text, key) in cases {
            let Err(e) = raw(text).resolve(&no_env) else {
                panic!("{text} accepted")
            };
            assert_eq!(&e.key, key, "{text}: {}", e.message);
        }
        let env = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")]);
        let Err(e) = raw("").resolve(&env) else {
            panic!("bad env accepted")
        };
        assert_eq!(e.key, "$OTEL_EXPORTER_OTLP_ENDPOINT");
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift"),
        ]);
        let Err(e) = raw("").resolve(&env) else {
            panic!("bad protocol accepted")
        };
        assert_eq!(e.key, "$OTEL_EXPORTER_OTLP_PROTOCOL");
    }

    /// Each `[records]` integer key holds at and past both ends of its range, named in one line,
    /// and docs/configuration.md lists the range.
    #[test]
    fn every_records_integer_key_is_checked_at_and_past_its_range() {
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .unwrap();
        for (key, lo, hi) in super::super::keys::TABLE_RANGES {
            assert!(
                docs.contains(&format!("| `{key}` | {lo} | {hi} |")),
                "{key}"
            );
            let (table, short) = key.rsplit_once('.').unwrap();
            let text = |v: i128| format!("[{table}]\n{short} = {v}\n");
            for ok in [*lo as i128, *hi as i128] {
                crate::config::Config::parse(&text(ok), "t").unwrap_or_else(|e| panic!("{e}"));
            }
            for bad in [*lo as i128 - 1, *hi as i128 + 1] {
                if bad < 0 && *lo == 0 {
                    continue;
                }
                let err = crate::config::Config::parse(&text(bad), "t")
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains(&format!("key `{key}`")) && err.contains("line 2"),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn omit_takes_fields_and_plugin_namespaces() {
        let r = raw("omit = [\"path\", \"authority\", \"plugins.envoy.lb\", \"plugins.plugvisor.usage.model\"]")
            .resolve(&no_env)
            .ok()
            .unwrap();
        assert_eq!(r.omit.len(), 4);
        assert!(raw("path = \"\"")
            .resolve(&no_env)
            .ok()
            .unwrap()
            .path
            .is_none());
    }
}
