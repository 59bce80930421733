//! The front's log. Under systemd (`JOURNAL_STREAM` set) records go to journald through its
//! native protocol ([`super::journal`]), every field of a record as a journal field prefixed
//! `PLUGVISOR_` with its plain value (so a record about a plugin carries `PLUGVISOR_PLUGIN=<name>`,
//! the field the plugins' own records carry too, and names it in its message); otherwise they are lines on stderr, human-readable or, with `--log-format json`, JSON.
//! The filter comes from `PLUGVISOR_LOG` (default `info`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where and how the log is written: the same option, and the same names, as the plugins'
/// (`--log-format`, `PLUGVISOR_LOG_FORMAT`), which the front passes down to them.
pub use plugin_runner::logging::LogFormat;

/// Whether the service manager connected stderr to the journal (the plugins' own test).
pub use plugin_runner::logging::under_journal;

/// The journal field prefix of a record's own fields (`plugin` becomes `PLUGVISOR_PLUGIN`).
pub const JOURNAL_FIELD_PREFIX: &str = "PLUGVISOR";

/// Installs the global subscriber. Falls back to stderr, with a warning, when journald cannot be
/// reached.
pub fn init(format: LogFormat) {
    let filter =
        || EnvFilter::try_from_env("PLUGVISOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => under_journal(),
        LogFormat::Human | LogFormat::Json => false,
    };
    if format != LogFormat::Auto {
        // Plugins the front spawns follow its choice. Called from main before any other thread
        // exists, so changing the environment races with nothing.
        std::env::set_var("PLUGVISOR_LOG_FORMAT", format.as_str());
    }
    let mut journal_error = None;
    if journald {
        match super::journal::JournalLayer::new("plugvisor", JOURNAL_FIELD_PREFIX) {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => journal_error = Some(e),
        }
    }
    // Colours only for a person at a terminal, never into a log file or a pipe.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if format == LogFormat::Json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "cannot reach journald; logging to stderr");
    }
}

/// Per-request warnings, rate-limited: at most `BURST` records of one kind per
/// `WINDOW`; past that they are counted, and the next record let through says how many were
/// held back. A thousand streams failing the same way must not become a thousand log lines a
/// second, nor hide that they did.
pub mod limited {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// Records of one kind let through per window.
    pub const BURST: u32 = 10;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(10);

    struct Window {
        start: Instant,
        passed: u32,
        held: u64,
    }

    static WINDOWS: Mutex<Option<HashMap<&'static str, Window>>> = Mutex::new(None);

    /// Whether a record of `kind` may be written now; `Some(n)`: yes, and `n` records of this
    /// kind were held back since the last one written.
    pub fn allow(kind: &'static str) -> Option<u64> {
        allow_at(kind, Instant::now())
    }

    fn allow_at(kind: &'static str, now: Instant) -> Option<u64> {
        let mut windows = WINDOWS.lock().unwrap_or_else(|e| e.into_inner());
        let w = windows
            .get_or_insert_with(HashMap::new)
            .entry(kind)
            .or_insert(Window {
                start: now,
                passed: 0,
                held: 0,
            });
        if now.duration_since(w.start) >= WINDOW {
            w.start = now;
            w.passed = 0;
        }
        if w.passed < BURST {
            w.passed += 1;
            Some(std::mem::take(&mut w.held))
        } else {
            w.held += 1;
            None
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_burst_passes_the_rest_is_counted_and_reported_with_the_next_window() {
            let t0 = Instant::now();
            for _ in 0..BURST {
                assert_eq!(allow_at("test-kind", t0), Some(0));
            }
            assert_eq!(allow_at("test-kind", t0), None);
            assert_eq!(allow_at("test-kind", t0 + WINDOW / 2), None);
            // Other kinds are not affected.
            assert_eq!(allow_at("other-kind", t0), Some(0));
            assert_eq!(allow_at("test-kind", t0 + WINDOW), Some(2));
            assert_eq!(allow_at("test-kind", t0 + WINDOW), Some(0));
        }
    }
}

/// A message and its causes on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
