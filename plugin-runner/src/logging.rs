//! Logging. Under systemd (`JOURNAL_STREAM` set, also inherited from a front that runs as a
//! service) a plugin writes its records to journald itself, through the native protocol, so they
//! carry the plugin process's own `_PID` and the field `PLUGVISOR_PLUGIN=<name>`:
//! `journalctl _PID=<pid>` and `journalctl PLUGVISOR_PLUGIN=usage` find them. Otherwise records
//! are lines on stderr, each starting with `plugin=<name> pid=<pid>` so that a front merging
//! several plugins' stderr (or a developer running one by hand) always knows who spoke, or JSON
//! objects with `plugin` and `pid` keys (`--log-format json`). Panics anywhere in the process
//! become error records too.
//!
//! A plugin the front spawned (it sets [`SUPERVISED_ENV`]) that would write to stderr (human or
//! JSON) writes compact lines instead, `LEVEL target: message fields`, with neither timestamp nor
//! `plugin=`/`pid=` prefix: the front reads its stderr, turns each line into a record of that
//! level tagged with plugin and pid, and stamps it itself ([`parse_supervised`]).

use std::fmt;
use std::sync::OnceLock;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The journal field naming the plugin on every record of a plugin process.
pub const JOURNAL_PLUGIN_FIELD: &str = "PLUGVISOR_PLUGIN";

/// Set to `1` by the front in the environment of every plugin it spawns: the plugin's stderr is
/// the front's pipe, so stderr records are written in the compact supervised form.
pub const SUPERVISED_ENV: &str = "PLUGVISOR_SUPERVISED";

/// The levels of the supervised form, as written.
const LEVELS: [(&str, tracing::Level); 5] = [
    ("ERROR", tracing::Level::ERROR),
    ("WARN", tracing::Level::WARN),
    ("INFO", tracing::Level::INFO),
    ("DEBUG", tracing::Level::DEBUG),
    ("TRACE", tracing::Level::TRACE),
];

/// Reads one line of the supervised form: its level and the rest (`target: message fields`).
/// `None` for anything else (a panic message the hook did not catch, output of a program that
/// is not built on this crate), which the front logs as it is.
pub fn parse_supervised(line: &str) -> Option<(tracing::Level, &str)> {
    let (word, rest) = line.split_once(' ')?;
    let level = LEVELS.iter().find(|(w, _)| *w == word)?.1;
    Some((level, rest))
}

/// The parts of a supervised record after its level (`target: message key=value ...`): the
/// target, the message, and the fields as they were written (`key=value` pairs, string values
/// quoted), so the front can log them as fields of their own instead of inside the message.
/// Fields are taken from the end of the line: a trailing run of `key=value` words, where `key` is
/// an identifier and `value` a quoted string or a word without spaces. Without a `target: `
/// prefix the target is empty.
pub fn split_record(rest: &str) -> (&str, &str, &str) {
    let (target, body) = match rest.split_once(": ") {
        Some((t, b)) if !t.is_empty() && !t.contains(' ') => (t, b),
        _ => ("", rest),
    };
    let mut cut = body.len();
    loop {
        let head = &body[..cut];
        let Some(field_start) = last_field_start(head) else {
            break;
        };
        cut = field_start;
    }
    let message = body[..cut].trim_end();
    let fields = body[cut..].trim_start();
    (target, message, fields)
}

/// Where the last `key=value` of `text` starts (at a space), if `text` ends in one.
fn last_field_start(text: &str) -> Option<usize> {
    let key_end = if text.ends_with('"') && text.len() > 1 {
        // A quoted value: find its opening quote, skipping escaped ones.
        let bytes = text.as_bytes();
        let mut end = text.len() - 1;
        let open = loop {
            let open = text[..end].rfind('"')?;
            let backslashes = bytes[..open]
                .iter()
                .rev()
                .take_while(|b| **b == b'\\')
                .count();
            if backslashes % 2 == 0 {
                break open;
            }
            end = open;
        };
        text[..open].strip_suffix('=')?.len()
    } else {
        let token_start = text.rfind(' ').map_or(0, |s| s + 1);
        let eq = text[token_start..].find('=')?;
        if token_start + eq + 1 == text.len() {
            return None;
        }
        token_start + eq
    };
    let key_start = text[..key_end].rfind(' ').map_or(0, |s| s + 1);
    let key = &text[key_start..key_end];
    let ident = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    // A field follows the message after a space; the whole line is no field.
    if ident && key_start > 0 {
        Some(key_start - 1)
    } else {
        None
    }
}

/// Whether the front spawned this process (see [`SUPERVISED_ENV`]).
fn supervised() -> bool {
    std::env::var_os(SUPERVISED_ENV).is_some_and(|v| v == "1")
}

/// `LEVEL target: message fields`, one line, for the front to parse ([`parse_supervised`]).
struct Compact;

impl<S, N> FormatEvent<S, N> for Compact
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(writer, "{} {}: ", meta.level(), meta.target())?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Where and how the log is written (`--log-format`, `PLUGVISOR_LOG_FORMAT`).
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

static WHO: OnceLock<(String, u32)> = OnceLock::new();

/// Prefixes every human-readable record with `plugin=<name> pid=<pid>`.
struct Tagged(Format);

impl<S, N> FormatEvent<S, N> for Tagged
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some((name, pid)) = WHO.get() {
            write!(writer, "plugin={name} pid={pid} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// Puts `"plugin"` and `"pid"` first in every JSON record.
struct TaggedJson(Format<Json>);

impl<S> FormatEvent<S, JsonFields> for TaggedJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match (WHO.get(), line.strip_prefix('{')) {
            (Some((name, pid)), Some(rest)) => {
                let name = serde_json::Value::String(name.clone());
                write!(writer, "{{\"plugin\":{name},\"pid\":{pid},{rest}")
            }
            _ => writer.write_str(&line),
        }
    }
}

/// Whether the service manager connected this process (or the front that spawned it) to the
/// journal.
pub fn under_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty())
}

/// [`init_with`] in the default format ([`LogFormat::Auto`]).
pub fn init(plugin: &str) {
    init_with(plugin, LogFormat::Auto)
}

/// Installs the subscriber (filter from `RUST_LOG`, default `info`) for `plugin` in `format`,
/// and a panic hook that logs. When journald cannot be reached the log goes to stderr, with a
/// warning. Safe to call more than once: only the first call installs anything.
pub fn init_with(plugin: &str, format: LogFormat) {
    let _ = WHO.set((plugin.to_owned(), std::process::id()));
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => under_journal(),
        LogFormat::Human | LogFormat::Json => false,
    };
    let mut journal_error = None;
    let mut installed = false;
    if journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(Some("PLUGVISOR".to_owned()))
                    .with_syslog_identifier("plugvisor-plugin".to_owned())
                    .with_custom_fields([(JOURNAL_PLUGIN_FIELD, plugin)]);
                installed = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init()
                    .is_ok();
            }
            Err(e) => journal_error = Some(e),
        }
    }
    if !journald || journal_error.is_some() {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(false);
        // Supervised, stderr is the front's pipe whatever the format asked for (a front logging
        // JSON passes PLUGVISOR_LOG_FORMAT=json down): the front formats the records itself.
        installed = if supervised() {
            builder.event_format(Compact).try_init().is_ok()
        } else if format == LogFormat::Json {
            builder
                .json()
                .event_format(TaggedJson(Format::default().json().with_thread_names(true)))
                .try_init()
                .is_ok()
        } else {
            builder
                .event_format(Tagged(Format::default().with_thread_names(true)))
                .try_init()
                .is_ok()
        };
    }
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "cannot reach journald; logging to stderr");
    }
    if installed {
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = crate::lanes::panic_message(info.payload());
            let thread = std::thread::current();
            tracing::error!(
                thread = thread.name().unwrap_or("?"),
                %location,
                panic = %msg,
                "panic"
            );
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_splits_into_target_message_and_its_trailing_fields() {
        assert_eq!(
            split_record("plugin_runner::host: lane stuck stream=5 running_ms=6000"),
            (
                "plugin_runner::host",
                "lane stuck",
                "stream=5 running_ms=6000"
            )
        );
        assert_eq!(
            split_record(r#"usage: cost failed error="bad \"x\" = y" namespace=envoy.lb"#),
            (
                "usage",
                "cost failed",
                r#"error="bad \"x\" = y" namespace=envoy.lb"#
            )
        );
        // No fields, no target, or a message that only looks like a field.
        assert_eq!(split_record("t: just words"), ("t", "just words", ""));
        assert_eq!(split_record("no target here"), ("", "no target here", ""));
        assert_eq!(split_record("t: a=b"), ("t", "a=b", ""));
        assert_eq!(split_record("t: set a = b"), ("t", "set a = b", ""));
    }

    #[test]
    fn supervised_lines_parse_into_level_and_rest_and_others_do_not() {
        assert_eq!(
            parse_supervised("WARN plugvisor_plugin::host: slow lane=3"),
            Some((tracing::Level::WARN, "plugvisor_plugin::host: slow lane=3"))
        );
        assert_eq!(
            parse_supervised("ERROR x: y").map(|(l, _)| l),
            Some(tracing::Level::ERROR)
        );
        for other in [
            "",
            "WARN",
            "warn x: y",
            " WARN x: y",
            "2026-01-01T00:00:00Z  WARN x: y",
            "thread 'main' panicked at src/main.rs:1:1:",
        ] {
            assert_eq!(parse_supervised(other), None, "{other:?}");
        }
    }
}
