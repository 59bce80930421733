//! One usage record: its schema (the JSON every sink writes), its timestamps in RFC 3339, and
//! the redaction of the fields `[records] omit` names.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How a stream ended, as the record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    /// The response ended and every plugin's metadata is in the record.
    Complete,
    /// The response ended, but some plugin's metadata is missing or partial (see `missing` and
    /// `reasons`).
    Partial,
    /// The stream ended before its end of response (a client disconnect, an upstream error, a
    /// stop or a cut): see `cause`.
    Aborted,
    /// The front failed the stream (a message too large, a malformed message, a timeout).
    Error,
}

impl RecordStatus {
    /// The word the JSON uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordStatus::Complete => "complete",
            RecordStatus::Partial => "partial",
            RecordStatus::Aborted => "aborted",
            RecordStatus::Error => "error",
        }
    }
}

/// One request the front saw, as written to the JSON Lines file and exported over OTLP.
///
/// Field names are the JSON's (docs/records.md). Absent optional values are written as `null`;
/// fields named by `[records] omit` are left out altogether.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `<front instance>-<stream_id>`: unique across fronts and restarts, the same in every sink
    /// and every delivery of the record. A consumer drops a second record with the same id.
    pub record_id: String,
    /// Envoy's `x-request-id`, when the request had one.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The front's stream id (counts per front process).
    pub stream_id: u64,
    /// The front process that served the stream.
    pub front_pid: u32,
    /// `:method`.
    #[serde(default)]
    pub method: Option<String>,
    /// `:path` (with its query string, as Envoy sent it).
    #[serde(default)]
    pub path: Option<String>,
    /// `:authority`.
    #[serde(default)]
    pub authority: Option<String>,
    /// When the stream's first message arrived.
    #[serde(with = "rfc3339")]
    pub started_at: SystemTime,
    /// When the stream ended.
    #[serde(with = "rfc3339")]
    pub ended_at: SystemTime,
    /// How it ended.
    pub status: RecordStatus,
    /// Why it did not end complete: `client_disconnect`, `upstream_error`, `timeout`,
    /// `front_stop`, `cut`, ...
    #[serde(default)]
    pub cause: Option<String>,
    /// The response's `:status`, when response headers arrived.
    #[serde(default)]
    pub http_status: Option<u16>,
    /// Namespace → the JSON object the plugins answered: what went (or would have gone) to
    /// Envoy as `dynamic_metadata`, the front's own `plugvisor` namespace included.
    #[serde(default)]
    pub plugins: BTreeMap<String, Value>,
    /// Plugins whose metadata is missing, in config order.
    #[serde(default)]
    pub missing: Vec<String>,
    /// Plugin → why its metadata is missing (`timeout`, `down`, ...).
    #[serde(default)]
    pub reasons: BTreeMap<String, String>,
}

/// The record as the sinks write it: its JSON object with the omitted fields left out.
pub(crate) fn redacted(record: &Record, omit: &[String]) -> Map<String, Value> {
    let Ok(Value::Object(mut map)) = serde_json::to_value(record) else {
        unreachable!("a record serializes to a JSON object");
    };
    for name in omit {
        match name.strip_prefix("plugins.") {
            None => {
                map.remove(name);
            }
            Some(part) => {
                let Some(Value::Object(plugins)) = map.get_mut("plugins") else {
                    continue;
                };
                if plugins.remove(part).is_some() {
                    continue;
                }
                // `plugins.<namespace>.<key>`; namespaces have dots of their own, so try each
                // split, longest namespace first.
                let mut at = part.len();
                while let Some(dot) = part[..at].rfind('.') {
                    let (ns, key) = (&part[..dot], &part[dot + 1..]);
                    if let Some(Value::Object(inner)) = plugins.get_mut(ns) {
                        inner.remove(key);
                        break;
                    }
                    at = dot;
                }
            }
        }
    }
    map
}

/// RFC 3339 in UTC with microseconds (`2025-01-31T12:00:00.123456Z`), as serde's `with`.
pub mod rfc3339 {
    use std::time::SystemTime;

    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// The text of `t`.
    pub fn format(t: SystemTime) -> String {
        DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    /// `text` read back (any offset; kept as the instant it names).
    pub fn parse(text: &str) -> Result<SystemTime, String> {
        DateTime::parse_from_rfc3339(text)
            .map(|t| SystemTime::from(t.with_timezone(&Utc)))
            .map_err(|e| format!("`{text}` is not an RFC 3339 time: {e}"))
    }

    /// serde's serializer.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    /// serde's deserializer.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    pub(crate) fn sample() -> Record {
        let started = UNIX_EPOCH + Duration::from_micros(1_738_324_800_123_456);
        Record {
            record_id: "00ff00ff00ff00ff-7".into(),
            request_id: Some("req-1".into()),
            stream_id: 7,
            front_pid: 4242,
            method: Some("POST".into()),
            path: Some("/v1/chat/completions?key=secret".into()),
            authority: Some("llm.internal:8000".into()),
            started_at: started,
            ended_at: started + Duration::from_millis(1500),
            status: RecordStatus::Partial,
            cause: None,
            http_status: Some(200),
            plugins: BTreeMap::from([
                (
                    "plugvisor.usage".into(),
                    serde_json::json!({"input_tokens": 17, "output_tokens": 7, "model": "m"}),
                ),
                ("envoy.lb".into(), serde_json::json!({"cost": 31})),
            ]),
            missing: vec!["latency".into()],
            reasons: BTreeMap::from([("latency".into(), "timeout".into())]),
        }
    }

    #[test]
    fn the_json_has_the_documented_field_names_and_rfc3339_times() {
        let json = serde_json::to_value(sample()).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "record_id",
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
        let mut keys = keys;
        keys.sort();
        expected.sort();
        assert_eq!(keys, expected);
        assert_eq!(json["started_at"], "2025-01-31T12:00:00.123456Z");
        assert_eq!(json["ended_at"], "2025-01-31T12:00:01.623456Z");
        assert_eq!(json["status"], "partial");
        assert_eq!(json["cause"], Value::Null);
        assert_eq!(json["plugins"]["plugvisor.usage"]["input_tokens"], 17);
        // And back.
        let back: Record = serde_json::from_value(json).unwrap();
        assert_eq!(back, sample());
        assert!(rfc3339::parse("yesterday").is_err());
    }

    #[test]
    fn omit_leaves_out_fields_namespaces_and_keys_of_namespaces_with_dots() {
        let omit = [
            "path".to_owned(),
            "authority".to_owned(),
            "plugins.envoy.lb".to_owned(),
            "plugins.plugvisor.usage.model".to_owned(),
            "plugins.not.there".to_owned(),
        ];
        let map = redacted(&sample(), &omit);
        assert!(!map.contains_key("path") && !map.contains_key("authority"));
        assert!(map.contains_key("method"));
        let plugins = map["plugins"].as_object().unwrap();
        assert!(!plugins.contains_key("envoy.lb"));
        let usage = plugins["plugvisor.usage"].as_object().unwrap();
        assert!(!usage.contains_key("model"));
        assert_eq!(usage["input_tokens"], 17);
        assert_eq!(map["record_id"], "00ff00ff00ff00ff-7");
    }
}
