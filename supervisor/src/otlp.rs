//! The OTLP transports both of the front's exports use: usage records as log records
//! ([`crate::records`]) and spans ([`crate::traces`]). One client, generic over the [`Signal`]
//! it carries: `http/protobuf` is one `POST` of the protobuf body with hyper, `grpc` the
//! `Export` call of `opentelemetry-proto`'s generated client for the signal; both bounded by the
//! configured timeout, both classify a failure as worth retrying or not.
//!
//! Also the small builders of OTLP's common types (attributes, times) both mappings use.

use std::future::Future;
use std::marker::PhantomData;
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
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use crate::config::{OtlpProtocol, OtlpTransport};

/// What an OTLP signal's export looks like on the wire.
pub trait Signal: Send + Sync + 'static {
    /// The export request.
    type Request: Message + Send + 'static;
    /// The collector's answer.
    type Response: Message + Default + Send + 'static;
    /// What the collector says it rejected of an accepted export (partial success).
    fn rejected(response: &Self::Response) -> u64;
    /// The gRPC `Export` call on `channel`.
    fn grpc(
        channel: Channel,
        request: tonic::Request<Self::Request>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>> + Send;
}

/// Log records (`LogsService`).
pub struct Logs;

impl Signal for Logs {
    type Request = ExportLogsServiceRequest;
    type Response = ExportLogsServiceResponse;

    fn rejected(response: &Self::Response) -> u64 {
        response
            .partial_success
            .as_ref()
            .map_or(0, |p| p.rejected_log_records.max(0) as u64)
    }

    async fn grpc(
        channel: Channel,
        request: tonic::Request<Self::Request>,
    ) -> Result<tonic::Response<Self::Response>, tonic::Status> {
        LogsServiceClient::new(channel).export(request).await
    }
}

/// Spans (`TraceService`).
pub struct Traces;

impl Signal for Traces {
    type Request = ExportTraceServiceRequest;
    type Response = ExportTraceServiceResponse;

    fn rejected(response: &Self::Response) -> u64 {
        response
            .partial_success
            .as_ref()
            .map_or(0, |p| p.rejected_spans.max(0) as u64)
    }

    async fn grpc(
        channel: Channel,
        request: tonic::Request<Self::Request>,
    ) -> Result<tonic::Response<Self::Response>, tonic::Status> {
        TraceServiceClient::new(channel).export(request).await
    }
}

/// Why an export failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportError {
    /// Worth trying again later: the collector is down, busy or slow, or refuses us for now
    /// (429, 5xx, UNAVAILABLE, RESOURCE_EXHAUSTED, a timeout, no connection; also 401/403/404
    /// and UNIMPLEMENTED, which an operator fixes without the data being wrong).
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
    /// Items (log records, spans) it says it rejected (OTLP partial success).
    pub rejected: u64,
}

/// The connection side of a [`Client`].
enum Transport {
    /// `http/protobuf`.
    Http {
        /// The connection pool (boxed: it is most of the enum's size).
        client: Box<HyperClient<HttpConnector, Full<Bytes>>>,
        /// The signal's endpoint.
        uri: http::Uri,
        /// Extra headers.
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    /// `grpc`.
    Grpc {
        /// The channel (connects lazily, reconnects by itself).
        channel: Channel,
        /// Extra metadata.
        headers: Vec<(
            tonic::metadata::AsciiMetadataKey,
            tonic::metadata::AsciiMetadataValue,
        )>,
    },
}

/// An OTLP client for signal `S` over one of the transports.
pub struct Client<S: Signal> {
    transport: Transport,
    /// One export's bound.
    timeout: Duration,
    signal: PhantomData<S>,
}

impl<S: Signal> Client<S> {
    /// A client for `config`; nothing is connected yet.
    pub fn new(config: &OtlpTransport) -> Result<Client<S>, String> {
        let transport = match config.protocol {
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
                Transport::Http {
                    client: Box::new(client),
                    uri: config.endpoint.parse().map_err(|e| format!("{e}"))?,
                    headers,
                }
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
                Transport::Grpc {
                    channel: endpoint.connect_lazy(),
                    headers,
                }
            }
        };
        Ok(Client {
            transport,
            timeout: config.timeout,
            signal: PhantomData,
        })
    }

    /// Sends one request.
    pub async fn export(&self, request: S::Request) -> Result<Accepted, ExportError> {
        let timeout = self.timeout;
        match &self.transport {
            Transport::Http {
                client,
                uri,
                headers,
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
                    tokio::time::timeout(timeout, exchange)
                        .await
                        .map_err(|_| {
                            ExportError::Retryable(format!(
                                "no answer from {uri} within {timeout:?}"
                            ))
                        })??;
                if status.is_success() {
                    let rejected = S::Response::decode(body)
                        .ok()
                        .map_or(0, |r| S::rejected(&r));
                    return Ok(Accepted { rejected });
                }
                let message = format!(
                    "{uri} answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                );
                Err(classify_http(status.as_u16(), message))
            }
            Transport::Grpc { channel, headers } => {
                let mut req = tonic::Request::new(request);
                req.set_timeout(timeout);
                for (k, v) in headers {
                    req.metadata_mut().insert(k.clone(), v.clone());
                }
                match tokio::time::timeout(
                    timeout + Duration::from_millis(100),
                    S::grpc(channel.clone(), req),
                )
                .await
                {
                    Err(_) => Err(ExportError::Retryable(format!(
                        "no answer within {timeout:?}"
                    ))),
                    Ok(Ok(resp)) => Ok(Accepted {
                        rejected: S::rejected(resp.get_ref()),
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

/// Nanoseconds since the Unix epoch, as OTLP's times are.
pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

/// One attribute.
pub fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(value),
        ..Default::default()
    }
}

/// A string value.
pub fn string(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_owned())),
    }
}

/// An integer value.
pub fn int(i: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(i)),
    }
}

/// An array of strings (the semantic conventions' form of a request header).
pub fn strings(values: &[&str]) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::ArrayValue(ArrayValue {
            values: values.iter().map(|v| string(v)).collect(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
