//! `metrics`: Prometheus metrics of the LLM traffic, served at `/metrics` on a configured
//! loopback address (`listen`, default `127.0.0.1:9464`) by the plugin process itself. The
//! address is bound while the config is applied, so one that cannot be bound fails the handshake
//! (exit 78) instead of failing silently later; a taken port is served once free (a process
//! being replaced may hold it). It returns no metadata of its own.
//!
//! One process, one set of series: the plugin instances of one process (after a `Reconnect`,
//! the old connection's and the new one's) share the registry, the model labels handed out and
//! the `/metrics` server, so counters go on across a reload instead of starting over. A new
//! instance whose `listen` is the one already served keeps that server (no rebind, so its
//! handshake never waits for the old instance to let go of the port); a new `listen` is bound
//! (a taken one served once free) and the old address closed.
//!
//! The LLM metrics follow the OpenTelemetry GenAI semantic conventions (metric and attribute
//! names with `.` as `_`, their advisory bucket boundaries, unit seconds without a suffix, as
//! the issue and the conventions name them): `gen_ai_client_token_usage{gen_ai_token_type}`,
//! `gen_ai_server_request_duration{error_type}`, `gen_ai_server_time_to_first_token` and
//! `gen_ai_server_time_per_output_token`, each with `gen_ai_operation_name`,
//! `gen_ai_provider_name` and `gen_ai_response_model`. TTFT and TPOT are the `latency` plugin's
//! ([`super::latency`]), recorded for successful responses only, as the conventions say. The
//! request's model is in the request body, which plugins do not see, so there is no
//! `gen_ai_request_model`. `plugvisor_llm_requests_total`, `plugvisor_llm_response_bytes` and
//! `plugvisor_llm_aborted_requests_total` have no GenAI counterpart and stay.
//!
//! The model comes from response bodies, so its label values are capped: the first
//! `max_models` distinct names (default [`DEFAULT_MAX_MODELS`]) are kept, later ones and names
//! over [`MAX_MODEL_NAME_BYTES`] are counted as `other`; a response that names none is
//! `unknown`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use ipc_protocol::{
    Abort, AbortCause, Chunk, Final, Metadata, RequestStart, ResponseHeaders, Value,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::latency::{Latency, ResponseTiming};
use plugin_runner::{ConfigError, ConfigMap};
use plugin_runner::{EventCtx, Plugin};

/// The default `/metrics` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// Distinct model label values kept by default.
pub const DEFAULT_MAX_MODELS: usize = 100;

/// Highest `max_models` accepted: past it a model label is no longer a bound on cardinality.
pub const MAX_MAX_MODELS: usize = 10_000;

/// Longest model name used as a label value; longer ones are `other`.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// The label value of models past the cap.
pub const OTHER_MODEL: &str = "other";

/// The label value when the response names no model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// Semconv bucket boundaries of `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// Semconv bucket boundaries of `gen_ai.server.request.duration` (seconds).
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// Semconv bucket boundaries of `gen_ai.server.time_to_first_token` (seconds).
const TTFT_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Semconv bucket boundaries of `gen_ai.server.time_per_output_token` (seconds).
const TPOT_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];

/// Labels of the GenAI latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenAiLabels {
    gen_ai_operation_name: String,
    gen_ai_provider_name: String,
    gen_ai_response_model: String,
}

/// Labels of `gen_ai_client_token_usage`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    gen_ai_operation_name: String,
    gen_ai_provider_name: String,
    gen_ai_response_model: String,
    gen_ai_token_type: String,
}

/// Labels of `gen_ai_server_request_duration`: the [`GenAiLabels`], and on failure
/// `error_type`, the status code of a failed response or `upstream_error` for an error in a 2xx
/// body (a list, so success has no `error_type` label at all rather than an empty one).
type DurationLabels = Vec<(&'static str, String)>;

/// Labels of the `plugvisor_llm_*` per-request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    model: String,
    status: String,
}

/// Labels of the abort counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AbortLabels {
    cause: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone)]
struct Metrics {
    token_usage: Histograms<TokenLabels>,
    request_duration: Histograms<DurationLabels>,
    ttft: Histograms<GenAiLabels>,
    tpot: Histograms<GenAiLabels>,
    response_bytes: Histograms<Labels>,
    requests: Family<Labels, Counter>,
    aborted: Family<AbortLabels, Counter>,
}

impl Metrics {
    fn register() -> (Metrics, Registry) {
        let m = Metrics {
            token_usage: Family::new_with_constructor(|| Histogram::new(TOKEN_BUCKETS)),
            request_duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
            ttft: Family::new_with_constructor(|| Histogram::new(TTFT_BUCKETS)),
            tpot: Family::new_with_constructor(|| Histogram::new(TPOT_BUCKETS)),
            response_bytes: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(256.0, 4.0, 10))
            }),
            requests: Family::default(),
            aborted: Family::default(),
        };
        let mut r = Registry::default();
        r.register(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used, as the upstream reported them",
            m.token_usage.clone(),
        );
        r.register(
            "gen_ai_server_request_duration",
            "Request duration in seconds, request start to the response's last byte",
            m.request_duration.clone(),
        );
        r.register(
            "gen_ai_server_time_to_first_token",
            "Seconds from request start to the first content-bearing event, successful responses",
            m.ttft.clone(),
        );
        r.register(
            "gen_ai_server_time_per_output_token",
            "Seconds per output token after the first, successful responses",
            m.tpot.clone(),
        );
        let own = r.sub_registry_with_prefix("plugvisor_llm");
        own.register(
            "response_bytes",
            "Response body size on the wire",
            m.response_bytes.clone(),
        );
        own.register("requests", "Responses that completed", m.requests.clone());
        own.register(
            "aborted_requests",
            "Streams that ended without a response end",
            m.aborted.clone(),
        );
        (m, r)
    }
}

/// The model label values handed out so far (shared by the instances of one process), capped
/// at the instance's `max`. See the module docs.
#[derive(Debug, Clone)]
struct ModelLabels {
    max: usize,
    seen: Arc<Mutex<HashSet<String>>>,
}

impl ModelLabels {
    fn label(&self, model: Option<&str>) -> String {
        let Some(model) = model.filter(|m| !m.is_empty()) else {
            return UNKNOWN_MODEL.to_owned();
        };
        if model.len() > MAX_MODEL_NAME_BYTES {
            return OTHER_MODEL.to_owned();
        }
        // A panic elsewhere while holding the lock leaves the set intact: keep using it.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(model) {
            model.to_owned()
        } else if seen.len() < self.max {
            seen.insert(model.to_owned());
            model.to_owned()
        } else {
            OTHER_MODEL.to_owned()
        }
    }
}

/// `gen_ai.operation.name` and `gen_ai.provider.name` of a response in the format named
/// `format` (the provider whose wire format it is: an OpenAI-compatible server is `openai`).
fn operation_and_provider(format: Option<&str>) -> (&'static str, String) {
    match format {
        None => (UNKNOWN_MODEL, UNKNOWN_MODEL.to_owned()),
        Some("openai" | "openai-responses") => ("chat", "openai".to_owned()),
        Some("anthropic") => ("chat", "anthropic".to_owned()),
        Some("gemini") => ("generate_content", "gcp.gemini".to_owned()),
        Some("bedrock") => ("chat", "aws.bedrock".to_owned()),
        Some(other) => ("chat", other.to_owned()),
    }
}

/// The `metrics` plugin. A clone shares the original's series, model labels and `/metrics`
/// server (see the module docs): clone the unconfigured plugin once per connection.
#[derive(Clone)]
pub struct MetricsPlugin {
    metrics: Metrics,
    registry: Arc<Registry>,
    models: ModelLabels,
    /// The `/metrics` server of the process, whichever instance started it.
    server: Arc<Mutex<Option<Server>>>,
    local_addr: Option<SocketAddr>,
}

/// The running `/metrics` server: the configured address, the bound one (`None` while it waits
/// for a taken port), and its stop signal (the server thread ends when this is dropped).
struct Server {
    listen: SocketAddr,
    local_addr: Option<SocketAddr>,
    _stop: tokio::sync::watch::Sender<()>,
}

impl Default for MetricsPlugin {
    fn default() -> Self {
        let (metrics, registry) = Metrics::register();
        MetricsPlugin {
            metrics,
            registry: Arc::new(registry),
            models: ModelLabels {
                max: DEFAULT_MAX_MODELS,
                seen: Arc::default(),
            },
            server: Arc::default(),
            local_addr: None,
        }
    }
}

/// Per-stream state of [`MetricsPlugin`].
#[derive(Debug, Default)]
pub struct MetricsStream {
    start_ns: Option<u64>,
    status: u16,
    timing: ResponseTiming,
}

impl MetricsPlugin {
    /// The address `/metrics` is served on, once configured.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The current metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}

async fn handle(
    registry: Arc<Registry>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if req.uri().path() == "/metrics" {
        Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(encode(&registry))))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(
                b"only /metrics is served here\n",
            )))
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l))
}

/// How often a taken metrics address is tried again.
const RETRY_BIND: std::time::Duration = std::time::Duration::from_millis(250);

/// Binds `addr` once it is free, trying every [`RETRY_BIND`] and warning once a minute while
/// it stays taken; `None` when it fails for another reason or the server is stopped first.
fn wait_for_port(
    addr: SocketAddr,
    stop: &tokio::sync::watch::Receiver<()>,
) -> Option<std::net::TcpListener> {
    let mut since_warning = std::time::Instant::now();
    loop {
        std::thread::sleep(RETRY_BIND);
        if stop.has_changed().is_err() {
            return None;
        }
        match bind(addr) {
            Ok(listener) => return Some(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if since_warning.elapsed() >= std::time::Duration::from_secs(60) {
                    tracing::warn!(%addr, "metrics address still taken; /metrics is not served");
                    since_warning = std::time::Instant::now();
                }
            }
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen for /metrics");
                return None;
            }
        }
    }
}

/// Serves `/metrics` until `stop`'s sender is dropped (another address replaced this one).
fn serve(
    listener: std::net::TcpListener,
    registry: Arc<Registry>,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "metrics server cannot start its runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "metrics server cannot use its socket");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.changed() => {
                    tracing::info!(addr = ?listener.local_addr().ok(), "no longer serving /metrics here");
                    return;
                }
            };
            let (stream, _) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics server accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req| handle(Arc::clone(&registry), req));
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    });
}

/// The plugin's config, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where `/metrics` is served.
    pub listen: SocketAddr,
    /// Distinct model label values kept.
    pub max_models: usize,
}

/// Reads and checks a config without binding the address: what `configure` uses, and all that
/// can be checked before the plugin runs (the port may be free now and taken later, or held now
/// by the running plugin during a reload).
pub fn parse_config(config: &Value) -> Result<MetricsConfig, ConfigError> {
    let config = ConfigMap::new(config)?;
    config.deny_unknown(&["listen", "max_models"])?;
    let listen = config.str("listen")?.unwrap_or(DEFAULT_LISTEN);
    let listen = listen.parse().map_err(|e| {
        ConfigError::new(format!(
            "config.listen: `{listen}` is not an address like 127.0.0.1:9464: {e}"
        ))
    })?;
    let max_models = match config.u64("max_models")? {
        None => DEFAULT_MAX_MODELS,
        Some(n) if n <= MAX_MAX_MODELS as u64 => n as usize,
        Some(n) => {
            return Err(ConfigError::new(format!(
                "config.max_models: {n} is over {MAX_MAX_MODELS}; each model is a set of series, keep it small"
            )))
        }
    };
    Ok(MetricsConfig { listen, max_models })
}

impl Plugin for MetricsPlugin {
    type Stream = MetricsStream;

    fn name(&self) -> &str {
        "metrics"
    }

    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let MetricsConfig {
            listen: addr,
            max_models,
        } = parse_config(config)?;
        self.models.max = max_models;
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = server.as_ref().filter(|s| s.listen == addr) {
            // Another instance of this process (the one a reconnection replaces) serves this
            // address already, from the registry they share: nothing to bind.
            self.local_addr = running.local_addr;
            return Ok(());
        }
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "metrics served on a non-loopback address");
        }
        // A taken port is not a configuration error: in a restart by handover the process being
        // replaced serves the port until its last stream ends. Wait for it (warning), rather
        // than exit 78, which the front takes for a configuration refused for good.
        let listener = match bind(addr) {
            Ok(listener) => Some(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tracing::warn!(%addr, "metrics address taken (a replaced metrics process may still serve it); serving /metrics once it is free");
                None
            }
            Err(e) => {
                return Err(ConfigError::new(format!(
                    "config.listen: cannot listen on {addr}: {e}"
                )))
            }
        };
        self.local_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let registry = Arc::clone(&self.registry);
        let (stop, stopped) = tokio::sync::watch::channel(());
        std::thread::Builder::new()
            .name("pv-metrics".into())
            .spawn(move || {
                if let Some(listener) = listener.or_else(|| wait_for_port(addr, &stopped)) {
                    tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics");
                    serve(listener, registry, stopped);
                }
            })
            .map_err(|e| {
                ConfigError::new(format!("cannot start the metrics server thread: {e}"))
            })?;
        // A server on another address (an older instance's config) stops here.
        *server = Some(Server {
            listen: addr,
            local_addr: self.local_addr,
            _stop: stop,
        });
        Ok(())
    }

    fn on_request_start(&self, s: &mut MetricsStream, ctx: &EventCtx, e: &RequestStart) {
        s.start_ns = Some(ctx.stamp_ns);
        s.timing.request(e);
    }

    fn on_response_headers(&self, s: &mut MetricsStream, _: &EventCtx, e: &ResponseHeaders) {
        s.status = e.status;
        s.timing.headers(e);
    }

    fn on_chunk(&self, s: &mut MetricsStream, ctx: &EventCtx, c: &Chunk) {
        s.timing.push(&c.bytes, c.len.into(), ctx.stamp_ns);
    }

    fn quick_final(&self) -> bool {
        true
    }

    fn quick_events(&self) -> bool {
        true
    }

    fn on_final(&self, s: &mut MetricsStream, ctx: &EventCtx, f: &Final) -> Metadata {
        s.timing.push(&f.bytes, f.len.into(), ctx.stamp_ns);
        s.timing.finish(ctx.stamp_ns);
        let body = &s.timing.body;
        let model = self.models.label(body.model.as_deref());
        let format = body.format().map(|f| f.name());
        let (operation, provider) = operation_and_provider(format);
        let gen_ai = GenAiLabels {
            gen_ai_operation_name: operation.to_owned(),
            gen_ai_provider_name: provider,
            gen_ai_response_model: model.clone(),
        };
        let l = Latency::compute(s.start_ns, s.status, &s.timing, ctx.stamp_ns);
        let m = &self.metrics;
        if let Some(u) = body.usage {
            for (kind, n) in [("input", u.input_tokens), ("output", u.output_tokens)] {
                m.token_usage
                    .get_or_create(&TokenLabels {
                        gen_ai_operation_name: gen_ai.gen_ai_operation_name.clone(),
                        gen_ai_provider_name: gen_ai.gen_ai_provider_name.clone(),
                        gen_ai_response_model: model.clone(),
                        gen_ai_token_type: kind.to_owned(),
                    })
                    .observe(n.max(0) as f64);
            }
        }
        let error_type = if s.status >= 400 {
            Some(s.status.to_string())
        } else if !l.ok {
            Some("upstream_error".to_owned())
        } else {
            None
        };
        let mut duration_labels: DurationLabels = vec![
            (
                "gen_ai_operation_name",
                gen_ai.gen_ai_operation_name.clone(),
            ),
            ("gen_ai_provider_name", gen_ai.gen_ai_provider_name.clone()),
            ("gen_ai_response_model", model.clone()),
        ];
        duration_labels.extend(error_type.map(|e| ("error_type", e)));
        m.request_duration
            .get_or_create(&duration_labels)
            .observe(l.duration_ms / 1e3);
        if let Some(ttft) = l.ttft_ms {
            m.ttft.get_or_create(&gen_ai).observe(ttft / 1e3);
        }
        if let Some(tpot) = l.tpot_ms {
            m.tpot.get_or_create(&gen_ai).observe(tpot / 1e3);
        }
        let labels = Labels {
            model,
            status: s.status.to_string(),
        };
        m.requests.get_or_create(&labels).inc();
        m.response_bytes
            .get_or_create(&labels)
            .observe(body.body_bytes as f64);
        Metadata::new()
    }

    fn on_abort(&self, _: &mut MetricsStream, _: &EventCtx, a: &Abort) {
        let cause = match a.cause {
            AbortCause::ClientDisconnect => "client_disconnect",
            AbortCause::UpstreamError => "upstream_error",
            AbortCause::Timeout => "timeout",
            AbortCause::Shutdown => "shutdown",
        };
        self.metrics
            .aborted
            .get_or_create(&AbortLabels {
                cause: cause.into(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{play, play_chunks, FIRST_CHUNK_NS, START_NS, STEP_NS};
    use crate::usage_formats::tests::{CHAT_STREAM, ERROR_JSON};
    use plugin_runner::testing::Player;
    use std::io::{Read, Write};

    fn configured(config: Value) -> Player<MetricsPlugin> {
        let mut p = MetricsPlugin::default();
        let mut config = match config {
            Value::Map(m) => m,
            _ => Default::default(),
        };
        config.insert("listen".into(), Value::from("127.0.0.1:0"));
        p.configure(&Value::Map(config)).unwrap();
        Player::new(p)
    }

    /// The value of the sample line `name{labels}`, labels in the order the registry writes them.
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse().unwrap())
    }

    fn chat_json(model: &str) -> String {
        format!(
            r#"{{"object":"chat.completion","model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}}}}],"usage":{{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}}}"#
        )
    }

    const CHAT: &str = r#"gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_response_model="meta-llama/Llama-3.1-8B-Instruct""#;

    #[test]
    fn genai_metrics_are_served_over_http_with_semconv_names_and_labels() {
        let p = configured(Value::Null);
        let events: Vec<String> = CHAT_STREAM
            .split_inclusive("\n\n")
            .map(str::to_owned)
            .collect();
        let played = play_chunks(&p, &events, "text/event-stream");
        let mut conn = std::net::TcpStream::connect(p.plugin().local_addr().unwrap()).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        for (kind, n) in [("input", 17.0), ("output", 7.0)] {
            let labels = format!("{CHAT},gen_ai_token_type=\"{kind}\"");
            assert_eq!(
                sample(&text, "gen_ai_client_token_usage_sum", &labels),
                Some(n),
                "{text}"
            );
        }
        // TTFT: the first content event is chunk 1 (chunk 0 is the role-only delta).
        let ttft = (FIRST_CHUNK_NS + STEP_NS - START_NS) as f64 / 1e9;
        assert_eq!(
            sample(&text, "gen_ai_server_time_to_first_token_sum", CHAT),
            Some(ttft),
            "{text}"
        );
        let tpot = (5 * STEP_NS) as f64 / 1e9 / 6.0;
        let got = sample(&text, "gen_ai_server_time_per_output_token_sum", CHAT).unwrap();
        assert!((got - tpot).abs() < 1e-12, "{got} vs {tpot}");
        let duration = (played.end_ns - START_NS) as f64 / 1e9;
        assert_eq!(
            sample(&text, "gen_ai_server_request_duration_sum", CHAT),
            Some(duration),
            "{text}"
        );
        // The semconv bucket boundaries.
        assert!(
            text.contains(&format!(
                "gen_ai_server_time_to_first_token_bucket{{le=\"0.001\",{CHAT}}}"
            )),
            "{text}"
        );
        assert!(
            text.contains("gen_ai_client_token_usage_bucket{le=\"67108864.0\""),
            "{text}"
        );
        let labels = r#"model="meta-llama/Llama-3.1-8B-Instruct",status="200""#;
        assert_eq!(
            sample(&text, "plugvisor_llm_requests_total", labels),
            Some(1.0)
        );
        assert!(text.contains("plugvisor_llm_response_bytes_sum"), "{text}");
        // Migrated: the old TTFT/TPOT/token names are gone.
        for old in [
            "plugvisor_llm_ttft",
            "plugvisor_llm_tpot",
            "plugvisor_llm_input_tokens",
        ] {
            assert!(!text.contains(old), "{old} in {text}");
        }
    }

    #[test]
    fn provider_and_operation_follow_the_format() {
        let p = Player::new(MetricsPlugin::default());
        let anthropic = include_str!("../tests/fixtures/usage/anthropic_stream.sse");
        let gemini = include_str!("../tests/fixtures/usage/gemini_stream.sse");
        play(&p, anthropic, 100, "text/event-stream");
        play(&p, gemini, 100, "text/event-stream");
        let text = p.plugin().encode();
        assert!(
            text.contains(r#"gen_ai_operation_name="chat",gen_ai_provider_name="anthropic",gen_ai_response_model="claude-sonnet-4-5-20250929""#),
            "{text}"
        );
        assert!(
            text.contains(r#"gen_ai_operation_name="generate_content",gen_ai_provider_name="gcp.gemini",gen_ai_response_model="gemini-2.5-flash""#),
            "{text}"
        );
    }

    #[test]
    fn an_error_response_has_a_duration_with_its_error_type_and_no_ttft() {
        let p = Player::new(MetricsPlugin::default());
        play(&p, ERROR_JSON, 64, "application/json");
        let text = p.plugin().encode();
        assert_eq!(
            sample(
                &text,
                "gen_ai_server_request_duration_count",
                r#"gen_ai_operation_name="unknown",gen_ai_provider_name="unknown",gen_ai_response_model="unknown",error_type="upstream_error""#
            ),
            Some(1.0),
            "{text}"
        );
        assert!(
            !text.contains("gen_ai_server_time_to_first_token_count{"),
            "{text}"
        );
        assert!(!text.contains("gen_ai_client_token_usage_count{"), "{text}");
    }

    #[test]
    fn model_labels_are_capped_at_max_models_and_the_rest_are_other() {
        let p = configured(Value::map([("max_models", Value::Int(2))]));
        for model in ["m-a", "m-b", "m-c", "m-a", "m-d"] {
            play(&p, &chat_json(model), 1000, "application/json");
        }
        let text = p.plugin().encode();
        let count = |model: &str| {
            sample(
                &text,
                "plugvisor_llm_requests_total",
                &format!("model=\"{model}\",status=\"200\""),
            )
        };
        // At the cap: the first two names keep their label, even when seen again.
        assert_eq!(count("m-a"), Some(2.0), "{text}");
        assert_eq!(count("m-b"), Some(1.0), "{text}");
        // Past it: later names are `other`.
        assert_eq!(count("m-c"), None, "{text}");
        assert_eq!(count("m-d"), None, "{text}");
        assert_eq!(count(OTHER_MODEL), Some(2.0), "{text}");
        assert!(
            text.contains(r#"gen_ai_response_model="other",gen_ai_token_type="output""#),
            "{text}"
        );
    }

    #[test]
    fn a_model_name_over_the_length_cap_is_other_and_no_model_is_unknown() {
        let p = MetricsPlugin::default();
        let at = "m".repeat(MAX_MODEL_NAME_BYTES);
        let past = "m".repeat(MAX_MODEL_NAME_BYTES + 1);
        assert_eq!(p.models.label(Some(&at)), at);
        assert_eq!(p.models.label(Some(&past)), OTHER_MODEL);
        assert_eq!(p.models.label(None), UNKNOWN_MODEL);
        assert_eq!(p.models.label(Some("")), UNKNOWN_MODEL);
    }

    #[test]
    fn max_models_is_checked_at_and_past_its_bound() {
        let max = MAX_MAX_MODELS as i64;
        let config = |n: i64| Value::map([("max_models", Value::Int(n))]);
        assert_eq!(
            parse_config(&config(max)).unwrap().max_models,
            MAX_MAX_MODELS
        );
        assert_eq!(parse_config(&config(0)).unwrap().max_models, 0);
        assert_eq!(
            parse_config(&Value::Null).unwrap().max_models,
            DEFAULT_MAX_MODELS
        );
        let e = parse_config(&config(max + 1)).unwrap_err().to_string();
        assert!(
            e.starts_with("config.max_models: 10001 is over 10000"),
            "{e}"
        );
        let e = parse_config(&config(-1)).unwrap_err().to_string();
        assert!(e.contains("max_models"), "{e}");
        let e = parse_config(&Value::map([("max_model", Value::Int(1))]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `max_model`"), "{e}");
    }

    fn scrape(addr: SocketAddr) -> String {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn instances_of_one_process_share_the_server_and_the_series() {
        let template = MetricsPlugin::default();
        let listen = Value::map([("listen", Value::from("127.0.0.1:0"))]);
        let mut old = template.clone();
        old.configure(&listen).unwrap();
        let addr = old.local_addr().unwrap();
        // The new connection's instance, same address, while the old one still serves it:
        // configured at once, no rebind, same port.
        let mut new = template.clone();
        let started = std::time::Instant::now();
        new.configure(&listen).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(new.local_addr(), Some(addr));
        let (old, new) = (Player::new(old), Player::new(new));
        play(&old, &chat_json("m"), 40, "application/json");
        play(&new, &chat_json("m"), 40, "application/json");
        let text = scrape(addr);
        let requests = sample(
            &text,
            "plugvisor_llm_requests_total",
            r#"model="m",status="200""#,
        );
        assert_eq!(
            requests,
            Some(2.0),
            "both instances count in one series: {text}"
        );
        // Another address: served there, the old one closed.
        let mut moved = template.clone();
        moved
            .configure(&Value::map([("listen", Value::from("127.0.0.2:0"))]))
            .unwrap();
        let moved_addr = moved.local_addr().unwrap();
        assert!(scrape(moved_addr).contains("plugvisor_llm_requests_total"));
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(addr).is_ok() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the old address is still served"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_taken_address_is_served_once_free_and_a_bad_one_is_a_config_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut p = MetricsPlugin::default();
        let addr = taken.local_addr().unwrap();
        p.configure(&Value::map([("listen", Value::from(addr.to_string()))]))
            .expect("a taken port waits: a replaced process may still hold it");
        assert_eq!(p.local_addr(), None);
        drop(taken);
        // Served once free, within a few retries.
        let start = std::time::Instant::now();
        let mut conn = loop {
            match std::net::TcpStream::connect(addr) {
                Ok(c) => break c,
                Err(e) if start.elapsed() > std::time::Duration::from_secs(10) => {
                    panic!("not served after the port was freed: {e}")
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        use std::io::{Read, Write};
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.0 200"), "{text}");
        let e = p
            .configure(&Value::map([("listen", Value::from("192.0.2.1:9"))]))
            .unwrap_err();
        assert!(e.to_string().contains("cannot listen"), "{e}");
        let e = p
            .configure(&Value::map([("listen", Value::from("localhost"))]))
            .unwrap_err();
        assert!(e.to_string().contains("config.listen"), "{e}");
    }
}
