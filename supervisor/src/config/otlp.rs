//! What the OTLP exports (usage records as logs, [`crate::records`]; spans,
//! [`crate::traces`]) share in the configuration: the transport's keys (`endpoint`, `protocol`,
//! `headers`, `timeout_ms`), resolved from the file and the OpenTelemetry environment variables
//! by one rule, and the resource attributes.
//!
//! The file wins over the environment, key by key: a key set in the file's table is used as
//! written, a key left out is taken from `OTEL_EXPORTER_OTLP_<SIGNAL>_*`, then
//! `OTEL_EXPORTER_OTLP_*` (the signal-specific variable before the generic one, as the
//! OpenTelemetry specification orders them), then the default. That is the rule of the
//! OpenTelemetry SDKs for explicit configuration against the environment, and it keeps a
//! reviewed file authoritative.

use std::collections::BTreeMap;
use std::time::Duration;

/// Default `timeout_ms` of one export, as OTEL_EXPORTER_OTLP_TIMEOUT's default.
pub const DEFAULT_OTLP_TIMEOUT_MS: u64 = 10_000;

/// OTLP's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `http/protobuf`: `POST <endpoint>` with an `ExportLogsServiceRequest`.
    HttpProtobuf,
    /// `grpc`: `LogsService/Export` on `<endpoint>`.
    Grpc,
}

impl OtlpProtocol {
    /// The name OTEL_EXPORTER_OTLP_PROTOCOL uses.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::Grpc => "grpc",
        }
    }
}

/// A bad value of `[records]` or `[traces]`: the key (`records.path`,
/// `$OTEL_EXPORTER_OTLP_ENDPOINT`), the
/// byte offset of its value in the file if it has one, and what is wrong.
pub(super) struct Bad {
    pub key: String,
    pub span: Option<std::ops::Range<usize>>,
    pub message: String,
}

pub(super) fn bad(key: &str, span: Option<std::ops::Range<usize>>, message: String) -> Bad {
    Bad {
        key: key.to_owned(),
        span,
        message,
    }
}

/// The environment the OTLP keys fall back on (a function so tests give their own).
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, empty values as unset (as the OpenTelemetry specification says).
pub(super) fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// No environment: what `Config::parse` (the text alone) sees.
pub(super) fn no_env(_: &str) -> Option<String> {
    None
}

/// The signal an export carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Log records (the usage records).
    Logs,
    /// Spans.
    Traces,
}

impl Signal {
    /// The part of the signal-specific variables' names: `OTEL_EXPORTER_OTLP_<this>_ENDPOINT`.
    fn env(self) -> &'static str {
        match self {
            Signal::Logs => "LOGS",
            Signal::Traces => "TRACES",
        }
    }

    /// The path OTLP/HTTP appends to a base endpoint.
    pub fn path(self) -> &'static str {
        match self {
            Signal::Logs => "v1/logs",
            Signal::Traces => "v1/traces",
        }
    }
}

/// Where and how one signal is exported, resolved from the file and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpTransport {
    /// For `http/protobuf` the whole URL of the signal's endpoint (`.../v1/logs`), for `grpc`
    /// the collector's `http://host:port`.
    pub endpoint: String,
    /// The transport.
    pub protocol: OtlpProtocol,
    /// Extra request headers (e.g. an API key), as OTEL_EXPORTER_OTLP_HEADERS.
    pub headers: Vec<(String, String)>,
    /// How long one export request may take.
    pub timeout: Duration,
}

/// The transport's keys as a table of the file has them.
pub(super) struct RawTransport {
    pub endpoint: Option<toml::Spanned<String>>,
    pub protocol: Option<toml::Spanned<String>>,
    pub headers: Option<BTreeMap<String, String>>,
    pub timeout_ms: Option<u64>,
}

impl RawTransport {
    /// Each key from the file (its table named `table`, e.g. `records.otlp`), else the
    /// signal's variable, else the generic one, else the default; `None` when no endpoint is
    /// configured (the export is off). Every key is checked either way.
    pub(super) fn resolve(
        self,
        table: &str,
        signal: Signal,
        env: Env<'_>,
    ) -> Result<Option<OtlpTransport>, Bad> {
        let key = |k: &str| format!("{table}.{k}");
        let from_env = |suffix: &str| -> Option<(String, String)> {
            for name in [
                format!("OTEL_EXPORTER_OTLP_{}_{suffix}", signal.env()),
                format!("OTEL_EXPORTER_OTLP_{suffix}"),
            ] {
                if let Some(v) = env(&name) {
                    return Some((format!("${name}"), v));
                }
            }
            None
        };
        let protocol = match &self.protocol {
            Some(p) => {
                parse_protocol(p.get_ref()).map_err(|m| bad(&key("protocol"), Some(p.span()), m))?
            }
            None => match from_env("PROTOCOL") {
                Some((key, v)) => parse_protocol(&v).map_err(|m| bad(&key, None, m))?,
                None => OtlpProtocol::HttpProtobuf,
            },
        };
        let endpoint = match &self.endpoint {
            Some(e) if e.get_ref().is_empty() => None,
            Some(e) => Some(
                endpoint(e.get_ref(), protocol, true, signal)
                    .map_err(|m| bad(&key("endpoint"), Some(e.span()), m))?,
            ),
            None => {
                let specific = format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", signal.env());
                let found = match env(&specific) {
                    Some(v) => Some((format!("${specific}"), v, true)),
                    None => env("OTEL_EXPORTER_OTLP_ENDPOINT")
                        .map(|v| ("$OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), v, false)),
                };
                match found {
                    Some((key, v, as_is)) => Some(
                        endpoint(&v, protocol, as_is, signal).map_err(|m| bad(&key, None, m))?,
                    ),
                    None => None,
                }
            }
        };
        let headers = match self.headers {
            Some(h) => {
                for name in h.keys() {
                    check_header_name(name).map_err(|m| bad(&key("headers"), None, m))?;
                }
                h.into_iter().collect()
            }
            None => match from_env("HEADERS") {
                Some((key, v)) => parse_headers(&v).map_err(|m| bad(&key, None, m))?,
                None => Vec::new(),
            },
        };
        let timeout_ms = match self.timeout_ms {
            Some(ms) => ms,
            None => match from_env("TIMEOUT") {
                Some((key, v)) => match v.trim().parse::<u64>() {
                    Ok(ms) if (1..=super::keys::DAY_MS).contains(&ms) => ms,
                    _ => {
                        return Err(bad(
                            &key,
                            None,
                            format!("`{v}` is not a timeout in milliseconds (1 to 86400000)"),
                        ))
                    }
                },
                None => DEFAULT_OTLP_TIMEOUT_MS,
            },
        };
        Ok(endpoint.map(|endpoint| OtlpTransport {
            endpoint,
            protocol,
            headers,
            timeout: Duration::from_millis(timeout_ms),
        }))
    }
}

fn parse_protocol(p: &str) -> Result<OtlpProtocol, String> {
    match p {
        "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
        "grpc" => Ok(OtlpProtocol::Grpc),
        "http/json" => {
            Err("`http/json` is not supported; use \"http/protobuf\" or \"grpc\"".into())
        }
        other => Err(format!(
            "unknown protocol `{other}`; use \"http/protobuf\" or \"grpc\""
        )),
    }
}

/// Checks an endpoint URL and gives the URL `signal` is sent to. For `http/protobuf`, a
/// signal-specific endpoint (`as_is`: the file's key, `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`) is
/// used as written, but one without a path gets `/v1/<signal>`; the generic
/// `OTEL_EXPORTER_OTLP_ENDPOINT` always gets `v1/<signal>` appended to its path, as the
/// specification says.
pub(super) fn endpoint(
    url: &str,
    protocol: OtlpProtocol,
    as_is: bool,
    signal: Signal,
) -> Result<String, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "`{url}`: https is not supported by plugvisor's exporter; send to a collector or \
                 agent on this host over http (it forwards over TLS)"
            ))
        }
        _ => return Err(format!("`{url}` is not an http:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` names no host"));
    }
    if protocol == OtlpProtocol::Grpc {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let path = uri.path();
    if as_is && path != "/" && !path.is_empty() {
        return Ok(url.to_owned());
    }
    Ok(format!("{}/{}", url.trim_end_matches('/'), signal.path()))
}

fn check_header_name(name: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|_| ())
        .map_err(|_| format!("`{name}` is not a valid HTTP header name"))
}

/// `k1=v1,k2=v2` with percent-encoded values, as OTEL_EXPORTER_OTLP_HEADERS.
pub(super) fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("`{pair}` is not key=value"));
        };
        let k = k.trim().to_owned();
        check_header_name(&k)?;
        let v = percent_decode(v.trim())?;
        http::HeaderValue::from_str(&v)
            .map_err(|_| format!("the value of `{k}` is not a valid HTTP header value"))?;
        out.push((k, v));
    }
    Ok(out)
}

/// OTEL_SERVICE_NAME (wins), OTEL_RESOURCE_ATTRIBUTES, and `service.name = plugvisor` when
/// neither names a service.
pub(super) fn resource(env: Env<'_>) -> Result<Vec<(String, String)>, (&'static str, String)> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    if let Some(text) = env("OTEL_RESOURCE_ATTRIBUTES") {
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err((
                    "$OTEL_RESOURCE_ATTRIBUTES",
                    format!("`{pair}` is not key=value"),
                ));
            };
            let v = percent_decode(v.trim()).map_err(|m| ("$OTEL_RESOURCE_ATTRIBUTES", m))?;
            attrs.retain(|(key, _)| key != k.trim());
            attrs.push((k.trim().to_owned(), v));
        }
    }
    let service = env("OTEL_SERVICE_NAME");
    attrs.retain(|(k, _)| service.is_none() || k != "service.name");
    if let Some(name) = service {
        attrs.insert(0, ("service.name".to_owned(), name));
    } else if !attrs.iter().any(|(k, _)| k == "service.name") {
        attrs.insert(0, ("service.name".to_owned(), "plugvisor".to_owned()));
    }
    Ok(attrs)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("`{s}`: a `%` not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` does not decode to UTF-8"))
}
