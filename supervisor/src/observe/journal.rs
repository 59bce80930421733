//! The front's records to journald through its native protocol, written so `journalctl` shows
//! them plainly: each field of a record becomes `PLUGVISOR_<FIELD>` with its plain value (an
//! `Option` logged with `?` is its value, or no field at all for `None`, never `Some(..)`), and a
//! record about a plugin names it in the message text too (`plugin exited (plugin=usage)`), so
//! the default `journalctl -u plugvisor` output says which plugin a line is about.

use std::io;
use std::os::unix::net::UnixDatagram;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// journald's native socket.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Longest field value sent; longer ones are cut (a record must fit one datagram).
const MAX_VALUE: usize = 16 * 1024;

/// A layer writing every event to journald.
pub struct JournalLayer {
    socket: UnixDatagram,
    identifier: String,
    prefix: String,
}

impl JournalLayer {
    /// Connects to journald; fails when its socket cannot be reached.
    pub fn new(identifier: &str, prefix: &str) -> io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        // An empty datagram proves the socket is there without logging anything.
        socket.send_to(&[], JOURNAL_SOCKET)?;
        Ok(JournalLayer {
            socket,
            identifier: identifier.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut record = Vec::with_capacity(256);
        put(&mut record, "PRIORITY", priority(*meta.level()));
        put(&mut record, "MESSAGE", &message_text(&fields));
        put(&mut record, "SYSLOG_IDENTIFIER", &self.identifier);
        put(&mut record, "TARGET", meta.target());
        if let Some(file) = meta.file() {
            put(&mut record, "CODE_FILE", file);
        }
        if let Some(line) = meta.line() {
            put(&mut record, "CODE_LINE", &line.to_string());
        }
        for (name, value) in &fields.other {
            put(&mut record, &field_name(&self.prefix, name), value);
        }
        // A full journald buffer must not stall the front: the record is lost, not waited for.
        let _ = self.socket.send_to(&record, JOURNAL_SOCKET);
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    plugin: Option<String>,
    other: Vec<(&'static str, String)>,
}

impl Fields {
    fn add(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            name => {
                if name == "plugin" {
                    self.plugin = Some(value.clone());
                }
                self.other.push((name, value));
            }
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else if let Some(plain) = plain_value(&text) {
            self.add(field, plain.to_owned());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, value.to_owned());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.add(field, value.to_string());
    }
}

/// A debug-formatted value as an operator reads it: `Some(x)` is `x`, `None` is no value, a
/// quoted string loses its quotes.
fn plain_value(debug: &str) -> Option<&str> {
    if debug == "None" {
        return None;
    }
    let inner = debug
        .strip_prefix("Some(")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or(debug);
    Some(
        inner
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .filter(|s| !s.contains('"'))
            .unwrap_or(inner),
    )
}

/// The MESSAGE: the record's message, with `(plugin=<name>)` after it for a record about one.
fn message_text(fields: &Fields) -> String {
    match &fields.plugin {
        Some(plugin) => format!("{} (plugin={plugin})", fields.message),
        None => fields.message.clone(),
    }
}

/// `plugin` with prefix `PLUGVISOR` is `PLUGVISOR_PLUGIN`; anything journald would reject in a
/// name becomes `_`.
fn field_name(prefix: &str, name: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + name.len());
    out.push_str(prefix);
    out.push('_');
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    out
}

fn priority(level: Level) -> &'static str {
    match level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        Level::DEBUG | Level::TRACE => "7",
    }
}

/// Appends one field in the native format: `NAME=value\n`, or, for a value with a newline,
/// `NAME\n`, its length as 64-bit little-endian, the value, `\n`.
fn put(record: &mut Vec<u8>, name: &str, value: &str) {
    let mut value = value;
    if value.len() > MAX_VALUE {
        let mut cut = MAX_VALUE;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value = &value[..cut];
    }
    record.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        record.push(b'\n');
        record.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        record.push(b'=');
    }
    record.extend_from_slice(value.as_bytes());
    record.push(b'\n');
}

/// Test helper: the record a subscriber with this layer's formatting would send, as text.
#[cfg(test)]
fn render(fields: &Fields) -> String {
    use std::fmt::Write as _;
    let mut s = format!("MESSAGE={}\n", message_text(fields));
    for (name, value) in &fields.other {
        let _ = writeln!(s, "{}={value}", field_name("PLUGVISOR", name));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_values_are_written_plainly() {
        let cases: &[(&str, Option<&str>)] = &[
            ("Some(127)", Some("127")),
            ("None", None),
            ("Some(127.0.0.1:9003)", Some("127.0.0.1:9003")),
            ("Some(\"usage\")", Some("usage")),
            ("\"a\"", Some("a")),
            ("5s", Some("5s")),
            ("Refused { code: 3 }", Some("Refused { code: 3 }")),
        ];
        for (debug, want) in cases {
            assert_eq!(plain_value(debug), *want, "{debug}");
        }
    }

    #[test]
    fn a_record_about_a_plugin_names_it_in_the_message() {
        let fields = Fields {
            message: "plugin exited".into(),
            plugin: Some("usage".into()),
            other: vec![("plugin", "usage".into()), ("pid", "127".into())],
        };
        assert_eq!(
            render(&fields),
            "MESSAGE=plugin exited (plugin=usage)\nPLUGVISOR_PLUGIN=usage\nPLUGVISOR_PID=127\n"
        );
        let plain = Fields {
            message: "ready".into(),
            ..Fields::default()
        };
        assert_eq!(render(&plain), "MESSAGE=ready\n");
    }

    #[test]
    fn multi_line_values_use_the_binary_form() {
        let mut record = Vec::new();
        put(&mut record, "MESSAGE", "a\nb");
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(record, want);
        assert_eq!(
            field_name("PLUGVISOR", "queue.depth"),
            "PLUGVISOR_QUEUE_DEPTH"
        );
    }
}
