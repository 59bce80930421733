//! The TOML configuration: its schema, the embedded default, validation with errors that name the
//! key and line, and the derived values (runtime directory, plugin socket paths, commands).
//!
//! Plugins are a table keyed by name; their order in the file is the order in which their metadata
//! is merged, so the table is read order-preserving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipc_protocol::Value;
use serde::Deserialize;

use crate::data_path::metadata::FRONT_NAMESPACE;
use crate::plugin::restart::{Policy, RestartType};

/// The configuration compiled into the binary, used when `plugvisor` runs without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// `upgrade_drain_ms` by default: LLM responses stream for seconds to minutes, and an upgrade
/// should cut none of them.
pub const DEFAULT_UPGRADE_DRAIN_MS: u64 = 15 * 60 * 1000;
/// The longest `upgrade_drain_ms` accepted: a day.
pub const MAX_UPGRADE_DRAIN_MS: u64 = 24 * 60 * 60 * 1000;
/// The most `workers` accepted.
pub const MAX_WORKERS: usize = 512;
/// Default `max_streams`.
pub const DEFAULT_MAX_STREAMS: usize = 10_000;
/// Default `max_message_bytes`: twice Envoy's default 1 MiB connection buffer, and more than
/// tonic's 4 MiB default so a buffered body that Envoy may send is never refused by accident.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// The smallest `max_message_bytes` accepted.
pub const MIN_MESSAGE_BYTES: usize = 64 * 1024;
/// The largest `max_message_bytes` accepted: one Envoy body message becomes one event frame to
/// each plugin that takes body bytes, and a frame may not pass the protocol's ceiling (64 MiB,
/// what the SDKs accept), so this leaves 64 KiB for the event's other fields.
pub const MAX_MESSAGE_BYTES: usize = ipc_protocol::codec::MAX_FRAME_CEILING - 64 * 1024;
/// The largest `queue_events` accepted (each open connection's queue is sized for it; the
/// configured bound is checked at every enqueue).
pub const MAX_QUEUE_EVENTS: usize = 1 << 20;
/// Default `metadata_max_bytes` of a plugin.
pub const DEFAULT_PLUGIN_METADATA_BYTES: usize = 16 * 1024;
/// Default `stream_metadata_max_bytes`.
pub const DEFAULT_STREAM_METADATA_BYTES: usize = 64 * 1024;
/// The smallest metadata cap accepted (room for the front's own namespace).
pub const MIN_METADATA_BYTES: usize = 1024;
/// The largest metadata cap accepted.
pub const MAX_METADATA_BYTES: usize = 1024 * 1024;
/// Default `budget_bytes` of a plugin.
pub const DEFAULT_BUDGET_BYTES: usize = 8 * 1024 * 1024;
/// How long, by default, the writer may hold a plugin's events to send them together
/// (`batch_ms`): on a slow stream each event written alone wakes the plugin, and the front's
/// writer, once per chunk, which is most of what a light plugin costs. At 100 ms a stream of a
/// token every 10 ms wakes each plugin once per ten tokens; what waits is only when an
/// asynchronous plugin sees a chunk (a final takes everything held with it at once).
pub const DEFAULT_BATCH: Duration = Duration::from_millis(100);

/// Default `replay_bytes` of a plugin: a few hundred in-flight streams of typical LLM responses
/// (tens of KiB of SSE each); 0 turns replay off.
pub const DEFAULT_REPLAY_BYTES: usize = 32 * 1024 * 1024;
/// The smallest `budget_bytes` accepted.
pub const MIN_BUDGET_BYTES: usize = 64 * 1024;

/// A configuration that failed to load or validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or a key has the wrong type or is unknown.
    #[error("{origin}: {message}")]
    Parse {
        /// File name or `<default>`.
        origin: String,
        /// toml's message, naming the key and line, flattened to one line.
        message: String,
    },
    /// A value is well-typed but not acceptable.
    #[error("{origin}: {}key `{key}`: {message}", line_prefix(*.line))]
    Invalid {
        /// File name or `<default>`.
        origin: String,
        /// 1-based line of the offending value (0 if unknown).
        line: usize,
        /// Dotted key path.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// `line N: `, or nothing for a value that comes from no line (the environment).
fn line_prefix(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!("line {line}: ")
    }
}

/// Where the ext_proc gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address, e.g. `127.0.0.1:9002`.
    Tcp(SocketAddr),
    /// A Unix socket path, written `unix:/path`.
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How the front hands a plugin its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// Queue the event and answer Envoy at once (the default).
    #[default]
    Async,
    /// Wait for the plugin to acknowledge each chunk before answering Envoy.
    Inline,
}

/// The Linux scheduling policy a spawned plugin runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CpuScheduling {
    /// `SCHED_OTHER`, like every other process (the default).
    #[default]
    Normal,
    /// `SCHED_BATCH`: CPU-bound, never mistaken for interactive; wakes with less preference.
    Batch,
    /// `SCHED_IDLE`: runs only on CPU time nobody else wants, so Envoy and the front always
    /// preempt it. For asynchronous plugins on a busy host: their work waits, the stream never.
    Idle,
}

/// The body mode assumed when Envoy's first message carries no `protocol_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BodyMode {
    /// One `BodyResponse` per chunk.
    Streamed,
    /// Echo each chunk as `streamed_response`.
    #[default]
    FullDuplexStreamed,
}

/// One configured plugin, after validation.
///
/// Its keys fall on two sides: [`ProcessConfig`] holds what the plugin's process is started with
/// or told at its handshake, so changing any of it needs a new process; everything else here is
/// what the front does with the plugin (deadlines, queues, dispatch, supervision), which a
/// reload applies in place. "Same process" is one comparison ([`PluginConfig::same_process`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// The name (`[plugins.<name>]`), also the socket's file name.
    pub name: String,
    /// What a change of needs a new process.
    pub process: ProcessConfig,
    /// Async (default) or inline.
    pub dispatch: Dispatch,
    /// How long the final RPC may take.
    pub final_timeout: Duration,
    /// How long an inline chunk may wait for its acknowledgement.
    pub inline_timeout: Duration,
    /// Queue bound in events.
    pub queue_events: usize,
    /// Queue bound in body bytes.
    pub queue_bytes: usize,
    /// Whether `READY=1` waits for this plugin to connect (up to `ready_timeout_ms`).
    pub required: bool,
    /// When and how fast a spawned plugin is restarted.
    pub restart: Policy,
    /// How long a spawned process has to finish its handshake before it is killed.
    pub start_timeout: Duration,
    /// How long a plugin may go without answering pings before it is killed and restarted.
    pub hang_timeout: Duration,
    /// The most bytes of in-flight streams' events the front keeps to replay to a replacement
    /// process after a crash (all streams of this plugin together).
    pub replay_bytes: usize,
    /// How long a replaced process (restart, reload) may keep serving the streams it has before
    /// they move to its successor with their journals.
    pub drain_grace: Duration,
    /// How long one event may run in a plugin's lane before the plugin counts as hung.
    pub stuck_timeout: Duration,
    /// How long the writer may hold this plugin's events to send several in one write; zero
    /// sends each at once. A final call, an inline chunk and control messages never wait.
    pub batch: Duration,
    /// The `namespaces` key: metadata namespaces granted besides the plugin's own.
    pub namespaces: Vec<String>,
    /// Derived from the name, `namespaces` and a built-in's `config`, never set on its own: every
    /// metadata namespace the plugin may write, sorted. Its own `plugvisor.<name>`, those of
    /// `namespaces`, and those its built-in's config writes (the `usage` plugin's costs and
    /// attributes). Anything else it answers is left out and reported.
    pub granted: Vec<String>,
}

/// The keys of a plugin's table that its process is started with or told at its handshake: a
/// reload that changes any of them restarts the plugin by handover (and a change of `spawn` or
/// `group`, which shape its socket, replaces it).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessConfig {
    /// Whether the front starts the process (false: someone else does and it just connects).
    pub spawn: bool,
    /// The program; `None` means `plugvisor-plugin` next to the running executable.
    pub command: Option<PathBuf>,
    /// Arguments; `None` means `<name> --connect <socket>`.
    pub args: Option<Vec<String>>,
    /// Extra environment for the process.
    pub env: BTreeMap<String, String>,
    /// A uid allowed to connect besides the front's own (checked at the handshake).
    pub uid: Option<u32>,
    /// A group given read/write access to the socket (mode 0660 instead of 0600).
    pub group: Option<String>,
    /// The `[plugins.<name>.config]` table, sent in `Welcome`.
    pub config: Value,
    /// The scheduling policy of a spawned plugin's process.
    pub cpu_scheduling: CpuScheduling,
    /// The most metadata one final answer may carry, as Envoy receives it (protobuf bytes),
    /// told in `Welcome`. Over it, the plugin's metadata is left out and the stream says why.
    pub metadata_max_bytes: usize,
    /// The most event bytes the plugin process may hold at once (received but not yet handled):
    /// the flow-control window, told in `Welcome`. Past it, events wait in the front's bounded
    /// queue.
    pub budget_bytes: usize,
}

impl PluginConfig {
    /// Whether `other` can be served by the process running with this table: only the front's
    /// side differs, so a reload applies it in place.
    pub fn same_process(&self, other: &PluginConfig) -> bool {
        self.name == other.name && self.process == other.process
    }

    /// Whether `other` needs a new socket (`spawn` or `group` changed): the reload replaces the
    /// plugin instead of handing it over.
    pub fn same_socket(&self, other: &PluginConfig) -> bool {
        self.process.spawn == other.process.spawn && self.process.group == other.process.group
    }
}

/// The whole configuration, after validation.
#[derive(Debug, Clone)]
pub struct Config {
    /// The ext_proc listener.
    pub listen: Listen,
    /// The loopback address serving `/metrics`; `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Where `plugins/<name>.sock` live.
    pub runtime_dir: PathBuf,
    /// Body mode when Envoy sends no `protocol_config`.
    pub default_response_body_mode: BodyMode,
    /// How long plugins get to connect at start before the front serves anyway.
    pub connect_timeout: Duration,
    /// How long shutdown waits for in-flight streams and plugins.
    pub shutdown_grace: Duration,
    /// After an upgrade handed the listeners to a new front: how long the old one may go on
    /// finishing its in-flight streams before it cuts them.
    pub upgrade_drain: Duration,
    /// Interval between pings to each plugin.
    pub ping_interval: Duration,
    /// How long `READY=1` waits for the `required` plugins.
    pub ready_timeout: Duration,
    /// Concurrent ext_proc streams served with plugins; past it, streams are echoed without them.
    pub max_streams: usize,
    /// The largest ext_proc message accepted from Envoy (gRPC decode limit).
    pub max_message_bytes: usize,
    /// The most merged metadata one stream sends to Envoy (protobuf bytes, all plugins).
    pub stream_metadata_max_bytes: usize,
    /// An ext_proc stream without any message for this long is ended; `None`: never.
    pub idle_stream_timeout: Option<Duration>,
    /// Threads of the front's async runtime ([`default_workers`] unless set).
    pub workers: usize,
    /// The plugins, in file order.
    pub plugins: Vec<PluginConfig>,
    /// Usage records: the JSON Lines file and the OTLP export (`[records]`).
    pub records: RecordsConfig,
    /// Spans of the front's own work over OTLP (`[traces]`); `None`: off (no endpoint).
    pub traces: Option<TracesConfig>,
    /// What the file (and the environment) pass validation with but an operator should hear, one
    /// line each: a config the built-in of a `spawn = false` plugin's name would refuse (written
    /// as errors are, `<file>: line N: key ...`), an `OTEL_*` variable ignored. Said by
    /// `check-config`, at start and at each reload.
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<toml::Spanned<String>>,
    admin_listen: Option<toml::Spanned<String>>,
    runtime_dir: Option<PathBuf>,
    default_response_body_mode: Option<BodyMode>,
    connect_timeout_ms: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    upgrade_drain_ms: Option<toml::Spanned<u64>>,
    ping_interval_ms: Option<toml::Spanned<u64>>,
    ready_timeout_ms: Option<u64>,
    max_streams: Option<usize>,
    max_message_bytes: Option<usize>,
    stream_metadata_max_bytes: Option<usize>,
    idle_stream_timeout_ms: Option<u64>,
    workers: Option<usize>,
    #[serde(default)]
    plugins: OrderedPlugins,
    #[serde(default)]
    records: records::RawRecords,
    #[serde(default)]
    traces: traces::RawTraces,
}

/// `[plugins.*]` in file order (a plain map would sort them, and the order is the merge order),
/// each name with where it is written.
#[derive(Default)]
struct OrderedPlugins(Vec<(toml::Spanned<String>, RawPlugin)>);

impl<'de> Deserialize<'de> for OrderedPlugins {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = OrderedPlugins;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table of plugins")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<toml::Spanned<String>, RawPlugin>()? {
                    out.push((k, v));
                }
                Ok(OrderedPlugins(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    #[serde(default = "yes")]
    spawn: bool,
    command: Option<toml::Spanned<PathBuf>>,
    args: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    dispatch: Dispatch,
    final_timeout_ms: Option<u64>,
    inline_timeout_ms: Option<toml::Spanned<u64>>,
    queue_events: Option<usize>,
    queue_bytes: Option<usize>,
    uid: Option<toml::Spanned<u32>>,
    group: Option<toml::Spanned<String>>,
    #[serde(default)]
    required: bool,
    config: Option<toml::Spanned<toml::Table>>,
    restart: Option<RestartType>,
    backoff_min_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    max_restarts: Option<u32>,
    restart_period_ms: Option<u64>,
    start_timeout_ms: Option<u64>,
    hang_timeout_ms: Option<toml::Spanned<u64>>,
    #[serde(default)]
    cpu_scheduling: CpuScheduling,
    metadata_max_bytes: Option<usize>,
    budget_bytes: Option<usize>,
    replay_bytes: Option<usize>,
    drain_grace_ms: Option<u64>,
    batch_ms: Option<u64>,
    stuck_timeout_ms: Option<u64>,
    namespaces: Option<toml::Spanned<Vec<String>>>,
}

fn yes() -> bool {
    true
}

/// How far [`Config::parse_with`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checks {
    /// The text alone: syntax, types, ranges, rules between keys.
    Text,
    /// Also what the text refers to: built-in plugins and their config, commands, users, groups.
    All,
}

impl Config {
    /// The embedded default.
    pub fn default_config() -> Result<Config, ConfigError> {
        Config::parse_with(DEFAULT_CONFIG, "<default>", Checks::All)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse_with(&text, &path.display().to_string(), Checks::All)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    ///
    /// This checks the text alone; [`Config::load`] (start, reload and `check-config`) also runs
    /// each built-in plugin's own config checks and looks up commands, users and groups.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, origin, Checks::Text)
    }

    fn parse_with(text: &str, origin: &str, checks: Checks) -> Result<Config, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_owned(),
            message: one_line(&e, text),
        };
        // Every number within its range first (a syntax error is left to the parse below): the
        // checks between keys may then rely on sane values, and an absurd one is named as such.
        check_ranges(text, origin)?;
        let raw: RawConfig = toml::from_str(text).map_err(parse_err)?;
        let invalid = |span: Option<std::ops::Range<usize>>, key: &str, message: String| {
            ConfigError::Invalid {
                origin: origin.to_owned(),
                line: span.map_or(0, |s| line_of(text, s.start)),
                key: key.to_owned(),
                message,
            }
        };

        let listen = match &raw.listen {
            None => Listen::Tcp(([127, 0, 0, 1], 9002).into()),
            Some(s) => {
                parse_listen(s.get_ref()).map_err(|m| invalid(Some(s.span()), "listen", m))?
            }
        };
        let admin_listen = match &raw.admin_listen {
            None => None,
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => {
                let addr: SocketAddr = s.get_ref().parse().map_err(|_| {
                    invalid(
                        Some(s.span()),
                        "admin_listen",
                        format!("`{}` is not an ip:port address", s.get_ref()),
                    )
                })?;
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        Some(s.span()),
                        "admin_listen",
                        format!(
                            "{addr} is not a loopback address; /metrics is served on loopback only"
                        ),
                    ));
                }
                Some(addr)
            }
        };

        // The environment overrides the file's addresses (for a front run by hand beside
        // another, and for tests that run the embedded default): loaded configs only.
        let (listen, admin_listen) = if checks == Checks::All {
            env_addresses(listen, admin_listen, origin)?
        } else {
            (listen, admin_listen)
        };
        // In range (check_ranges); the front never pings faster than every 10 ms.
        let ping_interval_ms = raw.ping_interval_ms.as_ref().map_or(1000, |v| *v.get_ref());
        // The front never pings faster than every 10 ms.
        let ping_interval = Duration::from_millis(ping_interval_ms.max(10));

        let mut plugins = Vec::new();
        let mut warnings = Vec::new();
        for (name, raw_plugin) in raw.plugins.0 {
            let name_span = name.span();
            let name = name.into_inner();
            let key = format!("plugins.{name}");
            let line = match line_of(text, name_span.start) {
                // An inline or dotted key has no span of its own in some toml versions.
                1 if name_span.start == 0 => find_table_line(text, &name),
                l => l,
            };
            let bad = |message: String| ConfigError::Invalid {
                origin: origin.to_owned(),
                line,
                key: key.clone(),
                message,
            };
            let bad_at =
                |span: std::ops::Range<usize>, sub: &str, message: String| ConfigError::Invalid {
                    origin: origin.to_owned(),
                    line: line_of(text, span.start),
                    key: format!("{key}.{sub}"),
                    message,
                };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad(
                    "plugin names use letters, digits, `-` and `_` only (they name socket files)"
                        .into(),
                ));
            }
            // Every number is in its range already (check_ranges); what is left are the rules
            // between keys.
            let final_timeout = Duration::from_millis(raw_plugin.final_timeout_ms.unwrap_or(200));
            let queue_events = raw_plugin.queue_events.unwrap_or(4096);
            if !raw_plugin.spawn && (raw_plugin.command.is_some() || raw_plugin.args.is_some()) {
                return Err(bad(
                    "command/args are meaningless with spawn = false; remove them".into(),
                ));
            }
            let defaults = Policy::default();
            let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
            let restart = Policy {
                restart: raw_plugin.restart.unwrap_or_default(),
                backoff_min: ms(raw_plugin.backoff_min_ms, defaults.backoff_min),
                backoff_max: ms(raw_plugin.backoff_max_ms, defaults.backoff_max),
                max_restarts: raw_plugin.max_restarts.unwrap_or(defaults.max_restarts),
                period: ms(raw_plugin.restart_period_ms, defaults.period),
            };
            if restart.backoff_min > restart.backoff_max {
                return Err(bad(format!(
                    "backoff_min_ms ({}) is larger than backoff_max_ms ({})",
                    restart.backoff_min.as_millis(),
                    restart.backoff_max.as_millis()
                )));
            }
            let start_timeout = ms(raw_plugin.start_timeout_ms, Duration::from_secs(10));
            let hang_timeout = ms(
                raw_plugin.hang_timeout_ms.as_ref().map(|v| *v.get_ref()),
                Duration::from_secs(5),
            );
            let stuck_timeout = ms(raw_plugin.stuck_timeout_ms, Duration::from_secs(10));
            let metadata_max_bytes = raw_plugin
                .metadata_max_bytes
                .unwrap_or(DEFAULT_PLUGIN_METADATA_BYTES);
            if !hang_timeout.is_zero() && ping_interval >= hang_timeout {
                let message = format!(
                    "hang_timeout_ms ({}) must be larger than ping_interval_ms ({}): the plugin \
                     would be killed as hung between two pings",
                    hang_timeout.as_millis(),
                    ping_interval.as_millis()
                );
                return Err(match &raw_plugin.hang_timeout_ms {
                    Some(v) => bad_at(v.span(), "hang_timeout_ms", message),
                    None => invalid(
                        raw.ping_interval_ms.as_ref().map(|v| v.span()),
                        "ping_interval_ms",
                        format!("{key}: {message}"),
                    ),
                });
            }
            let inline_timeout_ms = raw_plugin
                .inline_timeout_ms
                .as_ref()
                .map_or(1000, |v| *v.get_ref());
            let budget_bytes = raw_plugin.budget_bytes.unwrap_or(DEFAULT_BUDGET_BYTES);
            let config_span = raw_plugin.config.as_ref().map(|c| c.span());
            let config = toml_to_value(&toml::Value::Table(
                raw_plugin
                    .config
                    .map(|c| c.into_inner())
                    .unwrap_or_default(),
            ));
            let mut granted = vec![format!("{FRONT_NAMESPACE}.{name}")];
            let (namespaces, namespaces_span) = match raw_plugin.namespaces {
                Some(n) => (n.get_ref().clone(), Some(n.span())),
                None => (Vec::new(), None),
            };
            for ns in &namespaces {
                if ns.is_empty() || ns == FRONT_NAMESPACE {
                    return Err(bad_at(
                        namespaces_span.clone().unwrap_or_default(),
                        "namespaces",
                        format!(
                            "`{ns}` cannot be granted: {}",
                            if ns.is_empty() {
                                "a namespace has a name"
                            } else {
                                "`plugvisor` is the front's own namespace"
                            }
                        ),
                    ));
                }
                granted.push(ns.clone());
            }
            // What a built-in writes with this config is granted when the front spawns it, and
            // also when it runs as a unit of its own (`spawn = false`: `plugvisor-plugin@<name>`
            // runs the built-in of the plugin's name). The namespaces come from this plugin's
            // own `config`, so another program under that name gains only what its operator
            // wrote for it.
            if raw_plugin.command.is_none() {
                let builtin = check::builtin_name(&name, raw_plugin.args.as_deref());
                granted.extend(plugvisor_builtins::granted_namespaces(builtin, &config));
            }
            granted.sort();
            granted.dedup();
            if checks == Checks::All {
                if raw_plugin.spawn && raw_plugin.command.is_none() {
                    let builtin = check::builtin_name(&name, raw_plugin.args.as_deref());
                    match check::builtin(builtin, &config) {
                        Ok(()) => {}
                        Err(check::BuiltinError::UnknownPlugin(m)) => return Err(bad(m)),
                        Err(check::BuiltinError::Config(m)) => {
                            return Err(match &config_span {
                                Some(span) => bad_at(span.clone(), "config", m),
                                None => bad(format!("config: {m}")),
                            })
                        }
                    }
                }
                if !raw_plugin.spawn {
                    // A unit of its own: plugvisor cannot see its program, but
                    // `plugvisor-plugin@<name>` runs the built-in of this name, which refuses a
                    // config its checks reject. Another program under the name may take it.
                    if let Err(check::BuiltinError::Config(m)) = check::builtin(&name, &config) {
                        let at = config_span.clone().unwrap_or(name_span.clone());
                        warnings.push(
                            bad_at(
                                at,
                                "config",
                                format!(
                                    "if this plugin's unit runs the built-in `{name}` (as \
                                     plugvisor-plugin@{name} does), the plugin refuses this \
                                     config and exits 78: {m}"
                                ),
                            )
                            .to_string(),
                        );
                    }
                }
                if let Some(command) = &raw_plugin.command {
                    check::command(command.get_ref(), &raw_plugin.env)
                        .map_err(|m| bad_at(command.span(), "command", m))?;
                }
                if let Some(group) = &raw_plugin.group {
                    check::group(group.get_ref()).map_err(|m| bad_at(group.span(), "group", m))?;
                }
                if let Some(uid) = &raw_plugin.uid {
                    check::uid(*uid.get_ref()).map_err(|m| bad_at(uid.span(), "uid", m))?;
                }
            }
            plugins.push(PluginConfig {
                name: name.clone(),
                process: ProcessConfig {
                    spawn: raw_plugin.spawn,
                    command: raw_plugin.command.map(|c| c.into_inner()),
                    args: raw_plugin.args,
                    env: raw_plugin.env,
                    uid: raw_plugin.uid.map(|u| u.into_inner()),
                    group: raw_plugin.group.map(|g| g.into_inner()),
                    config,
                    cpu_scheduling: raw_plugin.cpu_scheduling,
                    metadata_max_bytes,
                    budget_bytes,
                },
                dispatch: raw_plugin.dispatch,
                final_timeout,
                inline_timeout: Duration::from_millis(inline_timeout_ms),
                queue_events,
                queue_bytes: raw_plugin.queue_bytes.unwrap_or(16 * 1024 * 1024),
                required: raw_plugin.required,
                restart,
                start_timeout,
                hang_timeout,
                replay_bytes: raw_plugin.replay_bytes.unwrap_or(DEFAULT_REPLAY_BYTES),
                drain_grace: ms(raw_plugin.drain_grace_ms, Duration::from_secs(30)),
                batch: ms(raw_plugin.batch_ms, DEFAULT_BATCH),
                stuck_timeout,
                namespaces,
                granted,
            });
        }

        let top = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            line: find_key_line(text, key),
            key: key.to_owned(),
            message,
        };
        let max_streams = raw.max_streams.unwrap_or(DEFAULT_MAX_STREAMS);
        let max_message_bytes = raw.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        let stream_metadata_max_bytes = raw
            .stream_metadata_max_bytes
            .unwrap_or(DEFAULT_STREAM_METADATA_BYTES);
        let upgrade_drain_ms = raw
            .upgrade_drain_ms
            .as_ref()
            .map_or(DEFAULT_UPGRADE_DRAIN_MS, |v| *v.get_ref());

        let runtime_dir = match &raw.runtime_dir {
            None => default_runtime_dir(),
            Some(dir) if dir.as_os_str().is_empty() || !dir.is_absolute() => {
                return Err(top(
                    "runtime_dir",
                    format!(
                        "`{}` is not an absolute path; leave runtime_dir out for the default \
                         ($RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/plugvisor, /run/plugvisor)",
                        dir.display()
                    ),
                ))
            }
            Some(dir) => dir.clone(),
        };
        if let (Listen::Tcp(l), Some(a)) = (&listen, admin_listen) {
            if *l == a && a.port() != 0 {
                return Err(top(
                    "admin_listen",
                    format!("{a} is also `listen`; give /metrics its own port"),
                ));
            }
        }
        // A Unix socket's path is at most 107 bytes (sun_path, with its NUL).
        let too_long = |path: &Path| path.as_os_str().len() > MAX_SOCKET_PATH;
        if let Listen::Unix(path) = &listen {
            if too_long(path) {
                return Err(top(
                    "listen",
                    format!(
                        "the socket path {} is {} bytes; a Unix socket path has at most {MAX_SOCKET_PATH}",
                        path.display(),
                        path.as_os_str().len()
                    ),
                ));
            }
        }
        let control = runtime_dir.join("control.sock");
        if too_long(&control) {
            return Err(top(
                "runtime_dir",
                format!(
                    "{} is too long for its sockets ({} is {} bytes; a Unix socket path has at most {MAX_SOCKET_PATH})",
                    runtime_dir.display(),
                    control.display(),
                    control.as_os_str().len()
                ),
            ));
        }
        for p in &plugins {
            let socket = runtime_dir.join("plugins").join(format!("{}.sock", p.name));
            if too_long(&socket) {
                return Err(ConfigError::Invalid {
                    origin: origin.to_owned(),
                    line: find_table_line(text, &p.name),
                    key: format!("plugins.{}", p.name),
                    message: format!(
                        "its socket {} would be {} bytes; a Unix socket path has at most \
                         {MAX_SOCKET_PATH}: shorten the name or runtime_dir",
                        socket.display(),
                        socket.as_os_str().len()
                    ),
                });
            }
        }

        // `[records]`: the environment (OTEL_*) only for loaded configs, as for the addresses.
        let env: otlp::Env<'_> = if checks == Checks::All {
            &otlp::process_env
        } else {
            &otlp::no_env
        };
        let records_bad = |b: otlp::Bad| ConfigError::Invalid {
            origin: origin.to_owned(),
            line: match (
                &b.span,
                b.key
                    .strip_prefix("records.")
                    .or_else(|| b.key.strip_prefix("traces.")),
            ) {
                (Some(span), _) => line_of(text, span.start),
                (None, Some(key)) => find_key_line(text, key.rsplit('.').next().unwrap_or(key)),
                (None, None) => 0,
            },
            key: b.key,
            message: b.message,
        };
        let records = raw.records.resolve(env).map_err(records_bad)?;
        if checks == Checks::All {
            records::check_places(&records).map_err(records_bad)?;
        }
        let traces = match raw.traces.resolve(env).map_err(records_bad)? {
            Some((traces, said)) => {
                warnings.extend(said);
                Some(traces)
            }
            None => None,
        };

        Ok(Config {
            listen,
            admin_listen,
            runtime_dir,
            default_response_body_mode: raw.default_response_body_mode.unwrap_or_default(),
            connect_timeout: Duration::from_millis(raw.connect_timeout_ms.unwrap_or(5000)),
            shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms.unwrap_or(5000)),
            upgrade_drain: Duration::from_millis(upgrade_drain_ms),
            ping_interval,
            ready_timeout: Duration::from_millis(raw.ready_timeout_ms.unwrap_or(10_000)),
            max_streams,
            max_message_bytes,
            stream_metadata_max_bytes,
            idle_stream_timeout: raw
                .idle_stream_timeout_ms
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
            workers: raw.workers.unwrap_or_else(default_workers),
            plugins,
            records,
            traces,
            warnings,
        })
    }

    /// The directory holding the plugin sockets.
    pub fn plugins_dir(&self) -> PathBuf {
        self.runtime_dir.join("plugins")
    }

    /// The socket a plugin connects to.
    pub fn plugin_socket(&self, name: &str) -> PathBuf {
        self.plugins_dir().join(format!("{name}.sock"))
    }

    /// The control socket `plugvisor status|restart|stop|start` talk to.
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("control.sock")
    }
}

/// `$PLUGVISOR_LISTEN` and `$PLUGVISOR_ADMIN_LISTEN`, when set and not empty, in place of the
/// file's `listen` and `admin_listen` (checked the same way; an empty admin value turns `/metrics`
/// off only when set as `PLUGVISOR_ADMIN_LISTEN=off`).
fn env_addresses(
    listen: Listen,
    admin_listen: Option<SocketAddr>,
    origin: &str,
) -> Result<(Listen, Option<SocketAddr>), ConfigError> {
    let bad = |key: &str, message: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        line: 0,
        key: format!("${key}"),
        message,
    };
    let var = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    let listen = match var("PLUGVISOR_LISTEN") {
        Some(v) => parse_listen(&v).map_err(|m| bad("PLUGVISOR_LISTEN", m))?,
        None => listen,
    };
    let admin_listen = match var("PLUGVISOR_ADMIN_LISTEN").as_deref() {
        None => admin_listen,
        Some("off") => None,
        Some(v) => {
            let addr: SocketAddr = v.parse().map_err(|_| {
                bad(
                    "PLUGVISOR_ADMIN_LISTEN",
                    format!("`{v}` is not an ip:port address"),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(bad(
                    "PLUGVISOR_ADMIN_LISTEN",
                    format!(
                        "{addr} is not a loopback address; /metrics is served on loopback only"
                    ),
                ));
            }
            Some(addr)
        }
    };
    Ok((listen, admin_listen))
}

/// `workers` when the file does not set it: one per CPU this process may run on (its affinity
/// and cgroup quota), as tokio's own default. Fewer cost less CPU per message at low load (a
/// message one worker takes wakes another to look for work to steal) but make messages that
/// arrive together wait for each other (docs/configuration.md, `workers`).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The longest path of a Unix socket: `sun_path` is 108 bytes with its terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Every integer key, top level and in each plugin's table, within its range
/// ([`keys::RANGES`]): one error naming the key and its line for the first one outside.
fn check_ranges(text: &str, origin: &str) -> Result<(), ConfigError> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Ok(());
    };
    let out_of_range = |key: String, line: usize, v: i64, lo: u64, hi: u64| ConfigError::Invalid {
        origin: origin.to_owned(),
        line,
        key,
        message: if v < 0 || (v as u64) < lo {
            format!("{v} is out of range: must be at least {lo} (accepted: {lo} to {hi})")
        } else {
            format!("{v} is out of range: must be at most {hi} (accepted: {lo} to {hi})")
        },
    };
    let check = |t: &toml::Table, prefix: &str, line_of_key: &dyn Fn(&str) -> usize| {
        for (key, value) in t {
            let (Some((lo, hi)), toml::Value::Integer(v)) = (keys::range(key), value) else {
                continue;
            };
            if *v < 0 || (*v as u64) < lo || (*v as u64) > hi {
                return Err(out_of_range(
                    format!("{prefix}{key}"),
                    line_of_key(key),
                    *v,
                    lo,
                    hi,
                ));
            }
        }
        Ok(())
    };
    check(&table, "", &|key| find_key_line(text, key))?;
    let check_records = |t: &toml::Table, prefix: &str| {
        for (key, value) in t {
            let name = format!("{prefix}{key}");
            let range = keys::TABLE_RANGES.iter().find(|(k, _, _)| *k == name);
            let (Some((_, lo, hi)), toml::Value::Integer(v)) = (range, value) else {
                continue;
            };
            if *v < 0 || (*v as u64) < *lo || (*v as u64) > *hi {
                return Err(out_of_range(name, find_key_line(text, key), *v, *lo, *hi));
            }
        }
        Ok(())
    };
    if let Some(toml::Value::Table(records)) = table.get("records") {
        check_records(records, "records.")?;
        if let Some(toml::Value::Table(otlp)) = records.get("otlp") {
            check_records(otlp, "records.otlp.")?;
        }
    }
    if let Some(toml::Value::Table(traces)) = table.get("traces") {
        check_records(traces, "traces.")?;
    }
    if let Some(toml::Value::Table(plugins)) = table.get("plugins") {
        for (name, plugin) in plugins {
            if let toml::Value::Table(t) = plugin {
                let start = find_table_line(text, name);
                check(t, &format!("plugins.{name}."), &|key| {
                    find_key_line_after(text, key, start)
                })?;
            }
        }
    }
    Ok(())
}

/// The line where `key = ...` is set at or after line `start` (1-based); `start` if not found.
fn find_key_line_after(text: &str, key: &str, start: usize) -> usize {
    text.lines()
        .enumerate()
        .skip(start.saturating_sub(1))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(start, |(i, _)| i + 1)
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("`unix:` needs a path, e.g. unix:/run/plugvisor/ext_proc.sock".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    s.parse()
        .map(Listen::Tcp)
        .map_err(|_| format!("`{s}` is neither ip:port nor unix:/path"))
}

/// `$RUNTIME_DIRECTORY`, else `$XDG_RUNTIME_DIR/plugvisor`, else `/run/plugvisor` for root, else a
/// private directory under /tmp named after the uid.
pub fn default_runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several directories separated by ':'; the first is ours.
        let dir = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("plugvisor");
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        PathBuf::from("/run/plugvisor")
    } else {
        std::env::temp_dir().join(format!("plugvisor-{uid}"))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where a top-level `key = ...` is set (0 if not found).
fn find_key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

fn find_table_line(text: &str, name: &str) -> usize {
    let needle = format!("plugins.{name}");
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with('[') && l.contains(&needle)
        })
        .map_or(0, |i| i + 1)
}

fn one_line(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = line_of(text, span.start);
            let source = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line} (`{source}`): {msg}")
        }
        None => msg,
    }
}

/// Converts a TOML value into the protocol's JSON-like value (datetimes become strings).
pub fn toml_to_value(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::Int(*i),
        toml::Value::Float(f) => Value::Float(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::List(a.iter().map(toml_to_value).collect()),
        toml::Value::Table(t) => Value::Map(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_value(v)))
                .collect(),
        ),
    }
}

mod check;
pub mod keys;
pub mod otlp;
pub mod records;
pub mod traces;
pub use otlp::{OtlpProtocol, OtlpTransport};
pub use records::{OtlpConfig, RecordsConfig};
pub use traces::{Sampler, TracesConfig};
mod published;
pub use published::Published;
#[cfg(test)]
mod tests;
