//! What a plugin adds to a request's trace (docs/protocol.md, "Traces"): the `Spans` it may send
//! before its `FinalReply`, the limits the front holds it to, and the OTLP it becomes —
//! attributes on the plugin's `plugvisor.final <plugin>` span, and each `PluginSpan` a child of
//! the request span with `plugvisor.plugin = <name>`, its `CLOCK_MONOTONIC` times turned into
//! wall-clock times.
//!
//! The keys under `plugvisor.` are the front's: a plugin's attribute under that prefix is left
//! out (so it can neither replace the front's own nor pass for one).

use ipc_protocol::{PluginSpan, Spans, Value};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};

use crate::otlp::kv;

/// The most spans one `Spans` may carry.
pub const MAX_SPANS: usize = 64;
/// The most attributes in one place (the final span's, or one span's).
pub const MAX_ATTRIBUTES: usize = 64;
/// The prefix of the front's own attribute keys.
const FRONT_PREFIX: &str = "plugvisor.";

/// Why a plugin's `Spans` was dropped, as `plugvisor_plugin_spans_dropped_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpansDropped {
    /// No final call of its stream waiting on the connection.
    NoFinal,
    /// Its encoding is larger than the plugin's `metadata_max_bytes`.
    TooLarge,
    /// More than [`MAX_SPANS`] spans or [`MAX_ATTRIBUTES`] attributes in one place.
    TooMany,
    /// A second one for the same final call (the first is kept).
    Duplicate,
}

impl SpansDropped {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SpansDropped::NoFinal => "no_final",
            SpansDropped::TooLarge => "too_large",
            SpansDropped::TooMany => "too_many",
            SpansDropped::Duplicate => "duplicate",
        }
    }
}

/// Whether `spans`, whose frame was `frame_len` bytes, is within the limits of a plugin whose
/// `metadata_max_bytes` is `max_bytes`.
pub fn check(spans: &Spans, frame_len: usize, max_bytes: usize) -> Result<(), SpansDropped> {
    if frame_len > max_bytes {
        return Err(SpansDropped::TooLarge);
    }
    if spans.spans.len() > MAX_SPANS
        || spans.attributes.len() > MAX_ATTRIBUTES
        || spans
            .spans
            .iter()
            .any(|s| s.attributes.len() > MAX_ATTRIBUTES)
    {
        return Err(SpansDropped::TooMany);
    }
    Ok(())
}

/// A plugin's attributes as OTLP, later keys replacing earlier ones (in the place of the first),
/// keys under `plugvisor.` left out.
pub fn attributes(attributes: &[(String, Value)]) -> Vec<KeyValue> {
    let mut out: Vec<KeyValue> = Vec::with_capacity(attributes.len());
    for (key, value) in attributes {
        if key.starts_with(FRONT_PREFIX) {
            continue;
        }
        let value = any(value);
        match out.iter_mut().find(|kv| kv.key == *key) {
            Some(earlier) => earlier.value = Some(value),
            None => out.push(kv(key, value)),
        }
    }
    out
}

/// A `Value` as an OTLP attribute value (a `Map` as its JSON text, `Null` as an empty value).
pub fn any(value: &Value) -> AnyValue {
    let v = match value {
        Value::Null => None,
        Value::Bool(b) => Some(any_value::Value::BoolValue(*b)),
        Value::Int(i) => Some(any_value::Value::IntValue(*i)),
        Value::Float(f) => Some(any_value::Value::DoubleValue(*f)),
        Value::String(s) => Some(any_value::Value::StringValue(s.clone())),
        Value::List(items) => Some(any_value::Value::ArrayValue(ArrayValue {
            values: items.iter().map(any).collect(),
        })),
        Value::Map(_) => Some(any_value::Value::StringValue(
            serde_json::Value::from(value.clone()).to_string(),
        )),
    };
    AnyValue { value: v }
}

/// The offset from `CLOCK_MONOTONIC` to the wall clock, in nanoseconds, read now: a plugin's
/// times plus this are Unix times.
pub fn monotonic_to_wall() -> i128 {
    let mono = i128::from(ipc_protocol::stamp::monotonic_now_ns());
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    wall - mono
}

/// A `CLOCK_MONOTONIC` time as Unix nanoseconds, given the offset.
pub fn wall(ns: u64, offset: i128) -> u64 {
    (i128::from(ns) + offset).clamp(0, i128::from(u64::MAX)) as u64
}

/// One plugin span's times (its end not before its start) and attributes, with
/// `plugvisor.plugin` first.
pub fn span_parts(plugin: &str, span: &PluginSpan, offset: i128) -> (u64, u64, Vec<KeyValue>) {
    let start = wall(span.start_ns, offset);
    let end = wall(span.end_ns.max(span.start_ns), offset);
    let mut attrs = vec![kv("plugvisor.plugin", crate::otlp::string(plugin))];
    attrs.extend(attributes(&span.attributes));
    (start, end, attrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(attrs: usize) -> PluginSpan {
        PluginSpan {
            name: "s".into(),
            start_ns: 10,
            end_ns: 20,
            attributes: (0..attrs)
                .map(|i| (format!("k{i}"), Value::Int(i as i64)))
                .collect(),
        }
    }

    fn spans(attrs: usize, spans: Vec<PluginSpan>) -> Spans {
        Spans {
            stream_id: 1,
            attributes: (0..attrs)
                .map(|i| (format!("a{i}"), Value::Bool(true)))
                .collect(),
            spans,
        }
    }

    #[test]
    fn the_limits_hold_at_64_and_drop_just_past_them() {
        let at = spans(MAX_ATTRIBUTES, vec![span(MAX_ATTRIBUTES); MAX_SPANS]);
        assert_eq!(check(&at, 1000, 1000), Ok(()));
        assert_eq!(check(&at, 1001, 1000), Err(SpansDropped::TooLarge));
        let cases = [
            spans(MAX_ATTRIBUTES + 1, Vec::new()),
            spans(0, vec![span(0); MAX_SPANS + 1]),
            spans(0, vec![span(1), span(MAX_ATTRIBUTES + 1)]),
        ];
        for c in cases {
            assert_eq!(check(&c, 10, 1000), Err(SpansDropped::TooMany));
        }
    }

    #[test]
    fn attributes_become_otlp_values_the_later_key_winning_and_the_fronts_keys_kept_out() {
        let got = attributes(&[
            ("a".into(), Value::Int(1)),
            ("plugvisor.outcome".into(), Value::String("mine".into())),
            ("b".into(), Value::Float(0.5)),
            ("a".into(), Value::Int(2)),
            (
                "c".into(),
                Value::List(vec![Value::Bool(true), Value::Null]),
            ),
            (
                "d".into(),
                Value::Map([("x".to_owned(), Value::Int(1))].into()),
            ),
        ]);
        let keys: Vec<&str> = got.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c", "d"]);
        assert_eq!(
            got[0].value,
            Some(AnyValue {
                value: Some(any_value::Value::IntValue(2))
            })
        );
        assert_eq!(
            got[2].value.as_ref().unwrap().value,
            Some(any_value::Value::ArrayValue(ArrayValue {
                values: vec![
                    AnyValue {
                        value: Some(any_value::Value::BoolValue(true))
                    },
                    AnyValue { value: None }
                ]
            }))
        );
        assert_eq!(
            got[3].value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("{\"x\":1}".into()))
        );
    }

    #[test]
    fn monotonic_times_become_wall_times_and_an_end_before_the_start_is_the_start() {
        let offset = monotonic_to_wall();
        let now_mono = ipc_protocol::stamp::monotonic_now_ns();
        let now_wall = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let w = wall(now_mono, offset);
        assert!(w.abs_diff(now_wall) < 50_000_000, "{w} vs {now_wall}");
        let backwards = PluginSpan {
            name: "b".into(),
            start_ns: 100,
            end_ns: 50,
            attributes: vec![("plugvisor.plugin".into(), Value::Int(0))],
        };
        let (s, e, attrs) = span_parts("usage", &backwards, 1_000);
        assert_eq!((s, e), (1_100, 1_100));
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].key, "plugvisor.plugin");
    }
}
