//! Records as OpenTelemetry log records, and the two OTLP transports that carry them.
//!
//! A record becomes one `LogRecord`: its body is the record's JSON (as written to the file),
//! `event_name` is `plugvisor.usage_record`, and its attributes carry what a backend indexes:
//! the GenAI semantic conventions' names for the `plugvisor.usage` numbers, the HTTP ones for
//! the request, and `plugvisor.*` for the rest. Attributes are taken from the redacted record,
//! so an omitted field is in neither the body nor the attributes.
//!
//! The types and the gRPC client are `opentelemetry-proto`'s; the HTTP transport is one
//! `POST` of the protobuf body with hyper.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use serde_json::{Map, Value};
use tonic::transport::{Channel, Endpoint};

use crate::config::{OtlpConfig, OtlpProtocol};

/// `event_name` of every record.
pub const EVENT_NAME: &str = "plugvisor.usage_record";
/// The instrumentation scope.
const SCOPE: &str = "plugvisor.records";

/// Why an export failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportError {
    /// Worth trying again later: the collector is down, busy or slow, or refuses us for now
    /// (429, 5xx, UNAVAILABLE, RESOURCE_EXHAUSTED, a timeout, no connection; also 401/403/404
    /// and UNIMPLEMENTED, which an operator fixes without the records being wrong).
    Retryable(String),
    /// The collector says the batch itself is bad (HTTP 400 or 413, gRPC INVALID_ARGUMENT):
    /// sending it again cannot help.
    Permanent(String),
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportError::Retryable(m) | ExportError::Permanent(m) => f.write_str(m),
        }
    }
}

/// What a collector answered to an accepted export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accepted {
    /// Log records it says it rejected (OTLP partial success).
    pub rejected: u64,
}

/// An OTLP logs client over one of the transports.
pub enum Client {
    /// `http/protobuf`.
    Http {
        /// The connection pool (boxed: it is most of the enum's size).
        client: Box<HyperClient<HttpConnector, Full<Bytes>>>,
        /// The logs endpoint.
        uri: http::Uri,
        /// Extra headers.
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
        /// One export's bound.
        timeout: Duration,
    },
    /// `grpc`.
    Grpc {
        /// The channel (connects lazily, reconnects by itself).
        client: LogsServiceClient<Channel>,
        /// Extra metadata.
        headers: Vec<(
            tonic::metadata::AsciiMetadataKey,
            tonic::metadata::AsciiMetadataValue,
        )>,
        /// One export's bound.
        timeout: Duration,
    },
}

impl Client {
    /// A client for `config`; nothing is connected yet.
    pub fn new(config: &OtlpConfig) -> Result<Client, String> {
        match config.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(config.timeout));
                connector.set_nodelay(true);
                let client = HyperClient::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(connector);
                let headers = config
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            http::HeaderName::from_bytes(k.as_bytes())
                                .map_err(|e| e.to_string())?,
                            http::HeaderValue::from_str(v).map_err(|e| e.to_string())?,
                        ))
                    })
                    .collect::<Result<_, String>>()?;
                Ok(Client::Http {
                    client: Box::new(client),
                    uri: config.endpoint.parse().map_err(|e| format!("{e}"))?,
                    headers,
                    timeout: config.timeout,
                })
            }
            OtlpProtocol::Grpc => {
                let endpoint = Endpoint::from_shared(config.endpoint.clone())
                    .map_err(|e| e.to_string())?
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout);
                let headers = config
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.to_ascii_lowercase()
                                .parse()
                                .map_err(|_| format!("header `{k}`"))?,
                            v.parse()
                                .map_err(|_| format!("the value of header `{k}`"))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?;
                Ok(Client::Grpc {
                    client: LogsServiceClient::new(endpoint.connect_lazy()),
                    headers,
                    timeout: config.timeout,
                })
            }
        }
    }

    /// Sends one request.
    pub async fn export(&self, request: ExportLogsServiceRequest) -> Result<Accepted, ExportError> {
        match self {
            Client::Http {
                client,
                uri,
                headers,
                timeout,
            } => {
                let mut req = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf");
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let req = req
                    .body(Full::new(Bytes::from(request.encode_to_vec())))
                    .map_err(|e| ExportError::Permanent(e.to_string()))?;
                let exchange = async {
                    let resp = client.request(req).await.map_err(|e| {
                        ExportError::Retryable(format!(
                            "cannot reach {uri}: {}",
                            crate::observe::logging::error_chain(&e)
                        ))
                    })?;
                    let status = resp.status();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    Ok::<_, ExportError>((status, body))
                };
                let (status, body) =
                    tokio::time::timeout(*timeout, exchange)
                        .await
                        .map_err(|_| {
                            ExportError::Retryable(format!(
                                "no answer from {uri} within {timeout:?}"
                            ))
                        })??;
                if status.is_success() {
                    let rejected = ExportLogsServiceResponse::decode(body)
                        .ok()
                        .and_then(|r| r.partial_success)
                        .map_or(0, |p| p.rejected_log_records.max(0) as u64);
                    return Ok(Accepted { rejected });
                }
                let message = format!(
                    "{uri} answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                );
                Err(classify_http(status.as_u16(), message))
            }
            Client::Grpc {
                client,
                headers,
                timeout,
            } => {
                let mut req = tonic::Request::new(request);
                req.set_timeout(*timeout);
                for (k, v) in headers {
                    req.metadata_mut().insert(k.clone(), v.clone());
                }
                let mut client = client.clone();
                match tokio::time::timeout(
                    *timeout + Duration::from_millis(100),
                    client.export(req),
                )
                .await
                {
                    Err(_) => Err(ExportError::Retryable(format!(
                        "no answer within {timeout:?}"
                    ))),
                    Ok(Ok(resp)) => Ok(Accepted {
                        rejected: resp
                            .into_inner()
                            .partial_success
                            .map_or(0, |p| p.rejected_log_records.max(0) as u64),
                    }),
                    Ok(Err(status)) => Err(classify_grpc(&status)),
                }
            }
        }
    }
}

/// 400 and 413 say the batch is bad; anything else may pass later.
pub fn classify_http(status: u16, message: String) -> ExportError {
    match status {
        400 | 413 => ExportError::Permanent(message),
        _ => ExportError::Retryable(message),
    }
}

/// INVALID_ARGUMENT says the batch is bad; anything else may pass later.
pub fn classify_grpc(status: &tonic::Status) -> ExportError {
    let message = format!("gRPC {:?}: {}", status.code(), status.message());
    match status.code() {
        tonic::Code::InvalidArgument => ExportError::Permanent(message),
        _ => ExportError::Retryable(message),
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
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| kv(k, string(v))).collect(),
                ..Default::default()
            }),
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
    let mut put_str = |key: &str, field: &str| {
        if let Some(v) = map.get(field).and_then(Value::as_str) {
            attributes.push(kv(key, string(v)));
        }
    };
    put_str("plugvisor.record_id", "record_id");
    put_str("plugvisor.status", "status");
    put_str("plugvisor.cause", "cause");
    put_str("http.request.method", "method");
    put_str("url.path", "path");
    put_str("server.address", "authority");
    if let Some(id) = map.get("request_id").and_then(Value::as_str) {
        // The semantic conventions' name for a request header, a string array.
        attributes.push(kv(
            "http.request.header.x-request-id",
            AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue {
                    values: vec![string(id)],
                })),
            },
        ));
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

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(value),
        ..Default::default()
    }
}

fn string(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_owned())),
    }
}

fn int(i: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(i)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn only_a_bad_batch_is_permanent() {
        for s in [429, 500, 502, 503, 504, 401, 404] {
            assert!(
                matches!(classify_http(s, String::new()), ExportError::Retryable(_)),
                "{s}"
            );
        }
        for s in [400, 413] {
            assert!(
                matches!(classify_http(s, String::new()), ExportError::Permanent(_)),
                "{s}"
            );
        }
        assert!(matches!(
            classify_grpc(&tonic::Status::unavailable("down")),
            ExportError::Retryable(_)
        ));
        assert!(matches!(
            classify_grpc(&tonic::Status::resource_exhausted("busy")),
            ExportError::Retryable(_)
        ));
        assert!(matches!(
            classify_grpc(&tonic::Status::invalid_argument("bad")),
            ExportError::Permanent(_)
        ));
    }
}
