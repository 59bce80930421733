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
];

/// When a change to the top-level `key` applies.
pub fn top_level(key: &str) -> Option<Applies> {
    TOP_LEVEL.iter().find(|(k, _)| *k == key).map(|(_, a)| *a)
}

/// When a change to the plugin key `key` applies.
pub fn plugin(key: &str) -> Option<Applies> {
    PLUGIN.iter().find(|(k, _)| *k == key).map(|(_, a)| *a)
}
