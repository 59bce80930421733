//! Records as OpenTelemetry log records.
//!
//! A record becomes one `LogRecord`: its body is the record's JSON (as written to the file),
//! `event_name` is `plugvisor.usage_record`, and its attributes carry what a backend indexes:
//! the GenAI semantic conventions' names for the `plugvisor.usage` numbers, the HTTP ones for
//! the request, and `plugvisor.*` for the rest. Attributes are taken from the redacted record,
//! so an omitted field is in neither the body nor the attributes.
//!
//! The attributes of a record ([`attributes`]) are also those of its request's span
//! ([`crate::traces`]). The transports are [`crate::otlp`]'s.

use std::time::SystemTime;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde_json::{Map, Value};

use crate::otlp::{int, kv, nanos, string, strings};

/// `event_name` of every record.
pub const EVENT_NAME: &str = "plugvisor.usage_record";
/// The instrumentation scope.
const SCOPE: &str = "plugvisor.records";

/// The resource's attributes.
pub fn resource(attributes: &[(String, String)]) -> Resource {
    Resource {
        attributes: attributes.iter().map(|(k, v)| kv(k, string(v))).collect(),
        ..Default::default()
    }
}

/// One export request for `records` (redacted JSON objects, each with its JSON text).
pub fn request(
    resource: &[(String, String)],
    records: &[(Map<String, Value>, String)],
) -> ExportLogsServiceRequest {
    let observed = nanos(SystemTime::now());
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(self::resource(resource)),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: SCOPE.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                log_records: records
                    .iter()
                    .map(|(map, line)| log_record(map, line, observed))
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// One record as a log record.
pub fn log_record(map: &Map<String, Value>, line: &str, observed: u64) -> LogRecord {
    let time = map
        .get("ended_at")
        .and_then(Value::as_str)
        .and_then(|t| super::record::rfc3339::parse(t).ok())
        .map_or(0, nanos);
    let mut attributes = vec![kv("event.name", string(EVENT_NAME))];
    attributes.extend(self::attributes(map));
    LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: observed,
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".to_owned(),
        body: Some(string(line)),
        attributes,
        event_name: EVENT_NAME.to_owned(),
        ..Default::default()
    }
}

/// The attributes a record's (redacted) JSON object gives, for its log record and its request's
/// span alike: the GenAI semantic conventions' names for the `plugvisor.usage` numbers, the HTTP
/// and URL ones for the request, `plugvisor.*` for the rest. A field left out by `omit` gives
/// no attribute.
pub fn attributes(map: &Map<String, Value>) -> Vec<KeyValue> {
    let mut attributes = Vec::new();
    let mut put_str = |key: &str, field: &str| {
        if let Some(v) = map.get(field).and_then(Value::as_str) {
            attributes.push(kv(key, string(v)));
        }
    };
    put_str("plugvisor.record_id", "record_id");
    put_str("plugvisor.status", "status");
    put_str("plugvisor.cause", "cause");
    put_str("http.request.method", "method");
    put_str("server.address", "authority");
    if let Some(path) = map.get("path").and_then(Value::as_str) {
        // `:path` carries the query; the conventions keep it apart.
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        attributes.push(kv("url.path", string(path)));
        if let Some(q) = query {
            attributes.push(kv("url.query", string(q)));
        }
    }
    if let Some(id) = map.get("request_id").and_then(Value::as_str) {
        // The semantic conventions' name for a request header, a string array.
        attributes.push(kv("http.request.header.x-request-id", strings(&[id])));
    }
    for (key, field) in [
        ("plugvisor.stream_id", "stream_id"),
        ("plugvisor.front_pid", "front_pid"),
        ("http.response.status_code", "http_status"),
    ] {
        if let Some(v) = map.get(field).and_then(Value::as_i64) {
            attributes.push(kv(key, int(v)));
        }
    }
    if let Some(Value::Object(usage)) = map.get("plugins").and_then(|p| p.get("plugvisor.usage")) {
        for (key, field) in [
            ("gen_ai.usage.input_tokens", "input_tokens"),
            ("gen_ai.usage.output_tokens", "output_tokens"),
        ] {
            if let Some(v) = usage.get(field).and_then(Value::as_i64) {
                attributes.push(kv(key, int(v)));
            }
        }
        for (key, field) in [
            ("gen_ai.response.model", "model"),
            ("gen_ai.provider.name", "provider"),
        ] {
            if let Some(v) = usage.get(field).and_then(Value::as_str) {
                attributes.push(kv(key, string(v)));
            }
        }
    }
    attributes
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::any_value;

    fn attr<'a>(r: &'a LogRecord, key: &str) -> Option<&'a any_value::Value> {
        r.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn a_record_becomes_a_log_record_with_genai_and_http_attributes() {
        let record = super::super::record::tests::sample();
        let map = super::super::record::redacted(&record, &["authority".to_owned()]);
        let line = serde_json::to_string(&map).unwrap();
        let r = log_record(&map, &line, 1);
        assert_eq!(r.event_name, EVENT_NAME);
        assert_eq!(
            r.body.as_ref().unwrap().value,
            Some(any_value::Value::StringValue(line.clone()))
        );
        assert_eq!(r.time_unix_nano, 1_738_324_801_623_456_000);
        assert_eq!(
            attr(&r, "gen_ai.usage.input_tokens"),
            Some(&any_value::Value::IntValue(17))
        );
        assert_eq!(
            attr(&r, "gen_ai.usage.output_tokens"),
            Some(&any_value::Value::IntValue(7))
        );
        assert_eq!(
            attr(&r, "gen_ai.response.model"),
            Some(&any_value::Value::StringValue("m".into()))
        );
        assert_eq!(
            attr(&r, "plugvisor.record_id"),
            Some(&any_value::Value::StringValue("00ff00ff00ff00ff-7".into()))
        );
        assert_eq!(
            attr(&r, "plugvisor.status"),
            Some(&any_value::Value::StringValue("partial".into()))
        );
        assert_eq!(
            attr(&r, "http.response.status_code"),
            Some(&any_value::Value::IntValue(200))
        );
        assert!(attr(&r, "http.request.header.x-request-id").is_some());
        // Omitted: in neither the body nor the attributes.
        assert!(attr(&r, "server.address").is_none());
        assert!(!line.contains("llm.internal"));
        assert!(attr(&r, "plugvisor.cause").is_none());
        // `:path` split as the conventions have it.
        assert_eq!(
            attr(&r, "url.path"),
            Some(&any_value::Value::StringValue(
                "/v1/chat/completions".into()
            ))
        );
        assert_eq!(
            attr(&r, "url.query"),
            Some(&any_value::Value::StringValue("key=secret".into()))
        );
    }
}
