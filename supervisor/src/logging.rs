//! The front's log. Under systemd (`JOURNAL_STREAM` set) records go to journald through its
//! native protocol, every field of a record as a journal field prefixed `PLUGVISOR_` (so a record
//! about a plugin carries `PLUGVISOR_PLUGIN=<name>`, the field the plugins' own records carry
//! too); otherwise they are lines on stderr, human-readable or, with `--log-format json`, JSON.
//! The filter comes from `PLUGVISOR_LOG` (default `info`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where and how the log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// journald when `JOURNAL_STREAM` is set, else human-readable on stderr.
    #[default]
    Auto,
    /// journald's native protocol.
    Journald,
    /// Human-readable lines on stderr.
    Human,
    /// One JSON object per line on stderr.
    Json,
}

impl LogFormat {
    /// The name used on the command line and in `PLUGVISOR_LOG_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Journald => "journald",
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }
}

/// Whether the service manager connected stderr to the journal.
pub fn under_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty())
}

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
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.to_owned()))
                    .with_syslog_identifier("plugvisor".to_owned());
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
