//! What a reload does with each key of the configuration: one table for the top level, one for a
//! plugin's table. The reload ([`crate::shell::reload`]) reports changed keys by these tables,
//! docs/configuration.md marks every key with the same words, and a test walks the schema so a
//! key added later without a row here fails the build's tests.

/// When a changed key takes effect after a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// Streams that start after the reload use it; running streams keep what they started with.
    NewStreams,
    /// At once: a policy or a deadline the front reads each time it needs it.
    AtOnce,
    /// The plugin's process is restarted by handover: a new process with the new table takes
    /// new streams while the old one finishes its own.
    NewProcess,
    /// The plugin's socket changes: it is stopped, then started afresh.
    NewSocket,
    /// Only a restart of plugvisor or `plugvisor upgrade` applies it; the running value stays
    /// until then, and the reload says so.
    Upgrade,
    /// Only a restart of plugvisor applies it (an upgrade keeps the listeners it hands over);
    /// the running value stays until then, and the reload says so.
    Restart,
}

impl Applies {
    /// The words docs/configuration.md and the reload's answer use.
    pub fn as_str(self) -> &'static str {
        match self {
            Applies::NewStreams => "new streams",
            Applies::AtOnce => "at once",
            Applies::NewProcess => "new process",
            Applies::NewSocket => "new socket",
            Applies::Upgrade => "upgrade",
            Applies::Restart => "restart",
        }
    }

    /// Whether the running front keeps its value until it is restarted or upgraded.
    pub fn kept_until_restart(self) -> bool {
        matches!(self, Applies::Upgrade | Applies::Restart)
    }
}

/// Every top-level key but `plugins`, and when a change to it applies.
pub const TOP_LEVEL: &[(&str, Applies)] = &[
    ("listen", Applies::Restart),
    ("admin_listen", Applies::Upgrade),
    ("runtime_dir", Applies::Restart),
    ("default_response_body_mode", Applies::NewStreams),
    // Read only while the front starts: an upgrade starts a new one.
    ("connect_timeout_ms", Applies::Upgrade),
    ("shutdown_grace_ms", Applies::AtOnce),
    ("upgrade_drain_ms", Applies::AtOnce),
    ("ping_interval_ms", Applies::AtOnce),
    ("ready_timeout_ms", Applies::AtOnce),
    ("max_streams", Applies::NewStreams),
    // The gRPC server is built with its decode limit.
    ("max_message_bytes", Applies::Upgrade),
    ("stream_metadata_max_bytes", Applies::NewStreams),
    ("idle_stream_timeout_ms", Applies::NewStreams),
    // The async runtime is built before anything else: an upgrade starts a new front.
    ("workers", Applies::Upgrade),
];

/// Every key of a `[plugins.<name>]` table, and when a change to it applies.
pub const PLUGIN: &[(&str, Applies)] = &[
    ("spawn", Applies::NewSocket),
    ("group", Applies::NewSocket),
    ("command", Applies::NewProcess),
    ("args", Applies::NewProcess),
    ("env", Applies::NewProcess),
    ("uid", Applies::NewProcess),
    ("config", Applies::NewProcess),
    ("cpu_scheduling", Applies::NewProcess),
    ("metadata_max_bytes", Applies::NewProcess),
    ("budget_bytes", Applies::NewProcess),
    ("dispatch", Applies::NewStreams),
    ("final_timeout_ms", Applies::AtOnce),
    ("inline_timeout_ms", Applies::AtOnce),
    ("queue_events", Applies::AtOnce),
    ("queue_bytes", Applies::AtOnce),
    ("required", Applies::AtOnce),
    ("restart", Applies::AtOnce),
    ("backoff_min_ms", Applies::AtOnce),
    ("backoff_max_ms", Applies::AtOnce),
    ("max_restarts", Applies::AtOnce),
    ("restart_period_ms", Applies::AtOnce),
    ("start_timeout_ms", Applies::AtOnce),
    ("hang_timeout_ms", Applies::AtOnce),
    ("replay_bytes", Applies::AtOnce),
    ("drain_grace_ms", Applies::AtOnce),
    ("stuck_timeout_ms", Applies::AtOnce),
    ("batch_ms", Applies::AtOnce),
    ("namespaces", Applies::AtOnce),
];

/// Every key of `[records]` and `[records.otlp]` (as `records.<key>`, `records.otlp.<key>`),
/// and when a change to it applies. The sinks are built once, when the front starts, and an
/// upgrade's new front builds its own from the file: each takes effect with `plugvisor upgrade`
/// (the old front flushes and spools what it has with its old settings).
pub const RECORDS: &[(&str, Applies)] = &[
    ("records.path", Applies::Upgrade),
    ("records.rotate_bytes", Applies::Upgrade),
    ("records.keep", Applies::Upgrade),
    ("records.omit", Applies::Upgrade),
    ("records.queue_records", Applies::Upgrade),
    ("records.otlp.endpoint", Applies::Upgrade),
    ("records.otlp.protocol", Applies::Upgrade),
    ("records.otlp.headers", Applies::Upgrade),
    ("records.otlp.timeout_ms", Applies::Upgrade),
    ("records.otlp.spool_dir", Applies::Upgrade),
    ("records.otlp.spool_max_bytes", Applies::Upgrade),
];

/// Every key of `[traces]` (as `traces.<key>`), and when a change to it applies: the exporter
/// is built once, when the front starts, like the records' sinks; the sampler is read from the
/// running configuration by each stream when it starts.
pub const TRACES: &[(&str, Applies)] = &[
    ("traces.endpoint", Applies::Upgrade),
    ("traces.protocol", Applies::Upgrade),
    ("traces.headers", Applies::Upgrade),
    ("traces.timeout_ms", Applies::Upgrade),
    ("traces.sampler", Applies::NewStreams),
    ("traces.sampler_arg", Applies::NewStreams),
];

/// When a change to the `[traces]` key `key` (`traces.sampler`) applies.
pub fn traces(key: &str) -> Option<Applies> {
    TRACES.iter().find(|(k, _)| *k == key).map(|(_, a)| *a)
}

/// When a change to the `[records]` key `key` (`records.path`, `records.otlp.endpoint`)
/// applies.
pub fn records(key: &str) -> Option<Applies> {
    RECORDS.iter().find(|(k, _)| *k == key).map(|(_, a)| *a)
}

/// When a change to the top-level `key` applies.
pub fn top_level(key: &str) -> Option<Applies> {
    TOP_LEVEL.iter().find(|(k, _)| *k == key).map(|(_, a)| *a)
}

/// When a change to the plugin key `key` applies.
pub fn plugin(key: &str) -> Option<Applies> {
    PLUGIN.iter().find(|(k, _)| *k == key).map(|(_, a)| *a)
}

/// A day in milliseconds: the longest deadline, grace or interval accepted.
pub const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// The accepted range of every integer key, top level and `plugins.<name>.*` alike: what the
/// front can act on without overflow or an absurd allocation. `check-config` refuses a value
/// outside it with one line naming the key.
pub const RANGES: &[(&str, u64, u64)] = &[
    ("connect_timeout_ms", 0, DAY_MS),
    ("shutdown_grace_ms", 0, DAY_MS),
    ("upgrade_drain_ms", 1, super::MAX_UPGRADE_DRAIN_MS),
    ("ping_interval_ms", 1, DAY_MS),
    ("ready_timeout_ms", 0, DAY_MS),
    ("max_streams", 1, 1_000_000),
    (
        "max_message_bytes",
        super::MIN_MESSAGE_BYTES as u64,
        super::MAX_MESSAGE_BYTES as u64,
    ),
    (
        "stream_metadata_max_bytes",
        super::MIN_METADATA_BYTES as u64,
        super::MAX_METADATA_BYTES as u64,
    ),
    ("idle_stream_timeout_ms", 0, DAY_MS),
    ("workers", 1, super::MAX_WORKERS as u64),
    ("final_timeout_ms", 1, DAY_MS),
    ("inline_timeout_ms", 1, DAY_MS),
    ("queue_events", 1, super::MAX_QUEUE_EVENTS as u64),
    ("queue_bytes", 1, 1 << 34),
    ("uid", 0, u32::MAX as u64 - 1),
    ("backoff_min_ms", 0, DAY_MS),
    ("backoff_max_ms", 0, DAY_MS),
    ("max_restarts", 0, 1_000_000),
    ("restart_period_ms", 1, DAY_MS),
    ("start_timeout_ms", 1, DAY_MS),
    // Above the fastest ping (every 10 ms), or every plugin would count as hung.
    ("hang_timeout_ms", 11, DAY_MS),
    (
        "metadata_max_bytes",
        super::MIN_METADATA_BYTES as u64,
        super::MAX_METADATA_BYTES as u64,
    ),
    ("budget_bytes", super::MIN_BUDGET_BYTES as u64, 1 << 30),
    ("replay_bytes", 0, 1 << 36),
    ("drain_grace_ms", 0, DAY_MS),
    ("stuck_timeout_ms", 1, DAY_MS),
    // A hold longer than a second would only delay what plugins see; finals never wait for it.
    ("batch_ms", 0, 1000),
];

/// The accepted range of every integer key of `[records]`, `[records.otlp]` and `[traces]`, by
/// its dotted name.
pub const TABLE_RANGES: &[(&str, u64, u64)] = &[
    ("records.rotate_bytes", 4096, 1 << 40),
    ("records.keep", 0, 1000),
    ("records.queue_records", 1, 1 << 20),
    ("records.otlp.timeout_ms", 1, DAY_MS),
    ("records.otlp.spool_max_bytes", 0, 1 << 40),
    ("traces.timeout_ms", 1, DAY_MS),
];

/// The accepted range of the integer key `key`.
pub fn range(key: &str) -> Option<(u64, u64)> {
    RANGES
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, lo, hi)| (*lo, *hi))
}
