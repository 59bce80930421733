//! `metrics`: Prometheus histograms and counters of the LLM traffic (TTFT, TPOT, input/output
//! tokens, response bytes, requests and aborts, by model and status), served at `/metrics` on a
//! configured loopback address (`listen`, default `127.0.0.1:9464`) by the plugin process itself.
//! The address is bound while the config is applied, so a taken port fails the handshake (exit
//! 78) instead of failing silently later. It returns no metadata of its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

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

use super::latency::Latency;
use crate::config::{ConfigError, ConfigMap};
use crate::plugin::{EventCtx, Plugin};
use crate::usage_formats::ResponseObserver;

/// The default `/metrics` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// Labels of every per-request metric.
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

type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

#[derive(Clone)]
struct Metrics {
    ttft: Histograms,
    tpot: Histograms,
    response_bytes: Histograms,
    requests: Family<Labels, Counter>,
    input_tokens: Family<Labels, Counter>,
    output_tokens: Family<Labels, Counter>,
    aborted: Family<AbortLabels, Counter>,
}

impl Metrics {
    fn register() -> (Metrics, Registry) {
        let m = Metrics {
            ttft: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
            tpot: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 12))
            }),
            response_bytes: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(256.0, 4.0, 10))
            }),
            requests: Family::default(),
            input_tokens: Family::default(),
            output_tokens: Family::default(),
            aborted: Family::default(),
        };
        let mut r = Registry::with_prefix("plugvisor_llm");
        r.register(
            "ttft_seconds",
            "Time to first response byte, from the front's arrival stamps",
            m.ttft.clone(),
        );
        r.register(
            "tpot_seconds",
            "Time per output token after the first",
            m.tpot.clone(),
        );
        r.register(
            "response_bytes",
            "Response body size",
            m.response_bytes.clone(),
        );
        r.register("requests", "Responses that completed", m.requests.clone());
        r.register(
            "input_tokens",
            "Prompt tokens reported by the upstream",
            m.input_tokens.clone(),
        );
        r.register(
            "output_tokens",
            "Completion tokens reported (or counted) in responses",
            m.output_tokens.clone(),
        );
        r.register(
            "aborted_requests",
            "Streams that ended without a response end",
            m.aborted.clone(),
        );
        (m, r)
    }
}

/// The `metrics` plugin.
pub struct MetricsPlugin {
    metrics: Metrics,
    registry: Arc<Registry>,
    local_addr: Option<SocketAddr>,
}

impl Default for MetricsPlugin {
    fn default() -> Self {
        let (metrics, registry) = Metrics::register();
        MetricsPlugin {
            metrics,
            registry: Arc::new(registry),
            local_addr: None,
        }
    }
}

/// Per-stream state of [`MetricsPlugin`].
#[derive(Debug, Default)]
pub struct MetricsStream {
    start_ns: Option<u64>,
    status: u16,
    body: ResponseObserver,
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

fn serve(listener: std::net::TcpListener, registry: Arc<Registry>) {
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
            let (stream, _) = match listener.accept().await {
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

/// The `/metrics` address of a config, without binding it: what `configure` binds, and all that
/// can be checked before the plugin runs (the port may be free now and taken later, or held now
/// by the running plugin during a reload).
pub fn listen_addr(config: &Value) -> Result<SocketAddr, ConfigError> {
    let config = ConfigMap::new(config)?;
    config.deny_unknown(&["listen"])?;
    let listen = config.str("listen")?.unwrap_or(DEFAULT_LISTEN);
    listen.parse().map_err(|e| {
        ConfigError::new(format!(
            "config.listen: `{listen}` is not an address like 127.0.0.1:9464: {e}"
        ))
    })
}

impl Plugin for MetricsPlugin {
    type Stream = MetricsStream;

    fn name(&self) -> &str {
        "metrics"
    }

    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let addr = listen_addr(config)?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "metrics served on a non-loopback address");
        }
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| {
                ConfigError::new(format!("config.listen: cannot listen on {addr}: {e}"))
            })?;
        self.local_addr = listener.local_addr().ok();
        let registry = Arc::clone(&self.registry);
        std::thread::Builder::new()
            .name("pv-metrics".into())
            .spawn(move || serve(listener, registry))
            .map_err(|e| {
                ConfigError::new(format!("cannot start the metrics server thread: {e}"))
            })?;
        tracing::info!(addr = ?self.local_addr, "serving /metrics");
        Ok(())
    }

    fn on_request_start(&self, s: &mut MetricsStream, ctx: &EventCtx, _: &RequestStart) {
        s.start_ns = Some(ctx.stamp_ns);
    }

    fn on_response_headers(&self, s: &mut MetricsStream, _: &EventCtx, e: &ResponseHeaders) {
        s.status = e.status;
        if let Some(ct) = e.header("content-type") {
            s.body.set_content_type(ct);
        }
    }

    fn on_chunk(&self, s: &mut MetricsStream, ctx: &EventCtx, c: &Chunk) {
        s.body.push(&c.bytes, c.len.into(), ctx.stamp_ns);
    }

    fn on_final(&self, s: &mut MetricsStream, ctx: &EventCtx, f: &Final) -> Metadata {
        s.body.push(&f.bytes, f.len.into(), ctx.stamp_ns);
        s.body.finish(ctx.stamp_ns);
        let labels = Labels {
            model: s.body.model.clone().unwrap_or_else(|| "unknown".into()),
            status: s.status.to_string(),
        };
        let l = Latency::compute(s.start_ns, &s.body, ctx.stamp_ns);
        let m = &self.metrics;
        m.requests.get_or_create(&labels).inc();
        if let Some(ttft) = l.ttft_ms {
            m.ttft.get_or_create(&labels).observe(ttft / 1e3);
        }
        if let Some(tpot) = l.tpot_ms {
            m.tpot.get_or_create(&labels).observe(tpot / 1e3);
        }
        m.response_bytes
            .get_or_create(&labels)
            .observe(s.body.body_bytes as f64);
        if let Some(u) = s.body.usage {
            m.input_tokens
                .get_or_create(&labels)
                .inc_by(u.input_tokens.max(0) as u64);
        }
        m.output_tokens
            .get_or_create(&labels)
            .inc_by(s.body.output_tokens());
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
    use crate::builtin::testing::play;
    use crate::usage_formats::tests::CHAT_STREAM;
    use std::io::{Read, Write};

    #[test]
    fn metrics_are_served_over_http_with_model_and_status_labels() {
        let mut p = MetricsPlugin::default();
        p.configure(&Value::map([("listen", Value::from("127.0.0.1:0"))]))
            .unwrap();
        play(&p, CHAT_STREAM, 120, "text/event-stream");
        let mut conn = std::net::TcpStream::connect(p.local_addr().unwrap()).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let labels = r#"{model="meta-llama/Llama-3.1-8B-Instruct",status="200"}"#;
        assert!(
            text.contains(&format!("plugvisor_llm_input_tokens_total{labels} 17")),
            "{text}"
        );
        assert!(
            text.contains(&format!("plugvisor_llm_output_tokens_total{labels} 7")),
            "{text}"
        );
        assert!(
            text.contains(&format!("plugvisor_llm_requests_total{labels} 1")),
            "{text}"
        );
        assert!(text.contains("plugvisor_llm_ttft_seconds_bucket"), "{text}");
        assert!(text.contains("plugvisor_llm_tpot_seconds_count"), "{text}");
    }

    #[test]
    fn a_taken_or_bad_address_is_a_config_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut p = MetricsPlugin::default();
        let addr = taken.local_addr().unwrap().to_string();
        let e = p
            .configure(&Value::map([("listen", Value::from(addr))]))
            .unwrap_err();
        assert!(e.to_string().contains("cannot listen"), "{e}");
        let e = p
            .configure(&Value::map([("listen", Value::from("localhost"))]))
            .unwrap_err();
        assert!(e.to_string().contains("config.listen"), "{e}");
    }
}
