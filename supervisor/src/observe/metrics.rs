//! Prometheus metrics and the loopback admin HTTP server that serves them at `/metrics`.
//!
//! Names follow the Prometheus conventions: counters end in `_total` (added by the encoder),
//! durations are histograms in `_seconds`. Every per-plugin series carries a `plugin` label.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// `plugin` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    /// The plugin's name.
    pub plugin: String,
}

/// `plugin` and `reason` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginReason {
    /// The plugin's name.
    pub plugin: String,
    /// Why (`queue_full`, `down`, `timeout`, `failed`, ...).
    pub reason: String,
}

/// `message` label for the response-path overhead.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabel {
    /// `headers`, `chunk` or `final`: a request body's reply counts as `chunk`, request trailers'
    /// as `headers`, and the reply that carries the final RPC's metadata as `final`.
    pub message: String,
}

/// `sink` label of the usage records' series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    /// `file` or `otlp`.
    pub sink: String,
}

/// `sink` and `reason` labels of dropped usage records.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkReason {
    /// `file` or `otlp`.
    pub sink: String,
    /// `queue_full`, `spool_full`, `rejected`, `write_error`, ...
    pub reason: String,
}

/// `reason` label of dropped spans.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `queue_full`, `export_failed`, `rejected`, `stopped`.
    pub reason: String,
}

fn final_histogram() -> Histogram {
    // 100 µs .. ~26 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn overhead_histogram() -> Histogram {
    // 5 µs .. ~5 s
    Histogram::new(exponential_buckets(0.000005, 2.0, 20))
}

/// Every metric the front exports.
pub struct Metrics {
    registry: Registry,
    /// Events put on a plugin's queue.
    pub events_sent: Family<PluginLabel, Counter>,
    /// Journaled events sent again to a replacement process (part of `events_sent`).
    pub events_replayed: Family<PluginLabel, Counter>,
    /// Events not delivered to a plugin, by reason.
    pub events_dropped: Family<PluginReason, Counter>,
    /// Events waiting in a plugin's queue.
    pub queue_depth: Family<PluginLabel, Gauge>,
    /// Body bytes waiting in a plugin's queue.
    pub queue_bytes: Family<PluginLabel, Gauge>,
    /// Event bytes written to a plugin and not yet credited back (flow control).
    pub inflight_bytes: Family<PluginLabel, Gauge>,
    /// Final RPC latency per plugin (answered calls only).
    pub final_duration: Family<PluginLabel, Histogram, fn() -> Histogram>,
    /// Final RPCs without metadata, by reason.
    pub finals_missing: Family<PluginReason, Counter>,
    /// Metadata namespaces a plugin answered without a grant, left out.
    pub namespaces_denied: Family<PluginLabel, Counter>,
    /// 1 while a plugin is connected.
    pub plugin_connected: Family<PluginLabel, Gauge>,
    /// Streams the plugin holds state for, as its last `Pong` said.
    pub plugin_active_streams: Family<PluginLabel, Gauge>,
    /// Lanes stuck in one event, as the plugin's last `Pong` said.
    pub stuck_lanes: Family<PluginLabel, Gauge>,
    /// Handshakes refused, by plugin name as announced and reason.
    pub handshakes_refused: Family<PluginReason, Counter>,
    /// Replies from a plugin refused, by reason (`wrong_stream`: a final reply naming another
    /// stream than its call's).
    pub replies_refused: Family<PluginReason, Counter>,
    /// ext_proc streams in progress.
    pub streams_active: Gauge,
    /// ext_proc streams started.
    pub streams_total: Counter,
    /// Streams that ended with an error the front reported to Envoy.
    pub stream_errors: Counter,
    /// Streams served without plugins because `max_streams` streams were already active.
    pub streams_shed: Counter,
    /// ext_proc messages refused for being larger than `max_message_bytes`.
    pub messages_too_large: Counter,
    /// Streams ended before their end of response while Envoy may have handed the front body
    /// bytes: answered with an `ImmediateResponse`, so the client sees a failure, not a gap.
    pub streams_cut: Counter,
    /// 1 while this process holds the listener after a crash loop instead of serving.
    pub crash_loop_held: Gauge,
    /// Time from a message's arrival to its reply.
    pub response_overhead: Family<MessageLabel, Histogram, fn() -> Histogram>,
    /// 1 while a spawned plugin's current process has completed its handshake.
    pub plugin_up: Family<PluginLabel, Gauge>,
    /// Restarts of a spawned plugin.
    pub restarts: Family<PluginLabel, Counter>,
    /// Exit status of a spawned plugin's previous process (0 when a signal ended it).
    pub last_exit_code: Family<PluginLabel, Gauge>,
    /// Signal that ended a spawned plugin's previous process (0 when it exited).
    pub last_exit_signal: Family<PluginLabel, Gauge>,
    /// Time from spawning a plugin process to its completed handshake.
    pub start_duration: Family<PluginLabel, Histogram, fn() -> Histogram>,
    /// Usage records submitted by the streams.
    pub records_submitted: Counter,
    /// Usage records written, by sink (`file`: lines appended; `otlp`: taken by the collector).
    pub records_written: Family<SinkLabel, Counter>,
    /// Usage records written to the OTLP spool.
    pub records_spooled: Counter,
    /// Usage records sent again after a failed export.
    pub records_retried: Counter,
    /// Usage records lost, by sink and reason.
    pub records_dropped: Family<SinkReason, Counter>,
    /// Bytes in the OTLP spool (all fronts' files).
    pub records_spool_bytes: Gauge,
    /// Duration of OTLP export requests, answered or failed.
    pub records_export_duration: Histogram,
    /// Spans the collector took.
    pub spans_exported: Counter,
    /// Spans lost, by reason.
    pub spans_dropped: Family<ReasonLabel, Counter>,
    /// A plugin's `Spans` messages dropped, by plugin and reason.
    pub plugin_spans_dropped: Family<PluginReason, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let events_sent = Family::default();
        let events_replayed = Family::default();
        let events_dropped = Family::default();
        let queue_depth = Family::default();
        let queue_bytes = Family::default();
        let inflight_bytes = Family::default();
        let final_duration =
            Family::<PluginLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                final_histogram,
            );
        let finals_missing = Family::default();
        let namespaces_denied = Family::default();
        let plugin_connected = Family::default();
        let handshakes_refused = Family::default();
        let replies_refused = Family::default();
        let plugin_active_streams = Family::default();
        let stuck_lanes = Family::default();
        let streams_active = Gauge::default();
        let streams_total = Counter::default();
        let stream_errors = Counter::default();
        let streams_shed = Counter::default();
        let messages_too_large = Counter::default();
        let streams_cut = Counter::default();
        let crash_loop_held = Gauge::default();
        let response_overhead =
            Family::<MessageLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                overhead_histogram,
            );
        registry.register(
            "plugvisor_plugin_events_sent",
            "Events put on a plugin's queue",
            events_sent.clone(),
        );
        registry.register(
            "plugvisor_plugin_events_replayed",
            "Journaled events of in-flight streams sent again to a plugin's replacement process",
            events_replayed.clone(),
        );
        registry.register(
            "plugvisor_plugin_events_dropped",
            "Events not delivered to a plugin (queue_full: its queue was full; down: no connection)",
            events_dropped.clone(),
        );
        registry.register(
            "plugvisor_plugin_queue_depth",
            "Events waiting in a plugin's queue",
            queue_depth.clone(),
        );
        registry.register(
            "plugvisor_plugin_queue_bytes",
            "Body bytes waiting in a plugin's queue",
            queue_bytes.clone(),
        );
        registry.register(
            "plugvisor_plugin_inflight_bytes",
            "Event bytes written to a plugin and not yet credited back, at most its budget_bytes",
            inflight_bytes.clone(),
        );
        registry.register(
            "plugvisor_plugin_final_duration_seconds",
            "Final RPC latency of answered calls",
            final_duration.clone(),
        );
        registry.register(
            "plugvisor_plugin_finals_missing",
            "Final RPCs whose metadata did not reach Envoy (down, timeout, failed, too_large, too_deep, stream_full)",
            finals_missing.clone(),
        );
        registry.register(
            "plugvisor_plugin_namespaces_denied",
            "Metadata namespaces a plugin answered without a grant (its own plugvisor.<name>, its namespaces key, a built-in's configured outputs); left out of the stream's metadata",
            namespaces_denied.clone(),
        );
        registry.register(
            "plugvisor_plugin_connected",
            "1 while the plugin has a live connection",
            plugin_connected.clone(),
        );
        registry.register(
            "plugvisor_plugin_active_streams",
            "Streams the plugin holds state for, as reported by its last pong",
            plugin_active_streams.clone(),
        );
        registry.register(
            "plugvisor_plugin_stuck_lanes",
            "Lanes stuck in one event, as reported by the plugin's last pong",
            stuck_lanes.clone(),
        );
        registry.register(
            "plugvisor_plugin_handshakes_refused",
            "Plugin handshakes refused, by reason",
            handshakes_refused.clone(),
        );
        registry.register(
            "plugvisor_plugin_replies_refused",
            "Replies from a plugin refused, by reason",
            replies_refused.clone(),
        );
        registry.register(
            "plugvisor_streams_active",
            "ext_proc streams in progress",
            streams_active.clone(),
        );
        registry.register(
            "plugvisor_streams",
            "ext_proc streams started",
            streams_total.clone(),
        );
        registry.register(
            "plugvisor_stream_errors",
            "ext_proc streams ended with an error sent to Envoy",
            stream_errors.clone(),
        );
        registry.register(
            "plugvisor_streams_shed",
            "ext_proc streams echoed without plugins because max_streams were already active",
            streams_shed.clone(),
        );
        registry.register(
            "plugvisor_messages_too_large",
            "ext_proc messages from Envoy refused for exceeding max_message_bytes",
            messages_too_large.clone(),
        );
        registry.register(
            "plugvisor_streams_cut",
            "Streams ended before their end of response while the front carried body bytes, failed to the client instead of passed with a gap",
            streams_cut.clone(),
        );
        registry.register(
            "plugvisor_crash_loop_held",
            "1 while plugvisor holds the listener after a crash loop instead of serving",
            crash_loop_held.clone(),
        );
        registry.register(
            "plugvisor_response_overhead_seconds",
            "Time from a message's arrival from Envoy to the front's reply",
            response_overhead.clone(),
        );
        let plugin_up = Family::default();
        let restarts = Family::default();
        let last_exit_code = Family::default();
        let last_exit_signal = Family::default();
        let start_duration =
            Family::<PluginLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                final_histogram,
            );
        registry.register(
            "plugvisor_plugin_up",
            "1 while the spawned plugin's process has completed its handshake",
            plugin_up.clone(),
        );
        registry.register(
            "plugvisor_plugin_restarts",
            "Restarts of a spawned plugin",
            restarts.clone(),
        );
        registry.register(
            "plugvisor_plugin_last_exit_code",
            "Exit status of the plugin's previous process (0 if a signal ended it)",
            last_exit_code.clone(),
        );
        registry.register(
            "plugvisor_plugin_last_exit_signal",
            "Signal that ended the plugin's previous process (0 if it exited)",
            last_exit_signal.clone(),
        );
        registry.register(
            "plugvisor_plugin_start_duration_seconds",
            "Time from spawning a plugin process to its completed handshake",
            start_duration.clone(),
        );
        let records_submitted = Counter::default();
        let records_written = Family::default();
        let records_spooled = Counter::default();
        let records_retried = Counter::default();
        let records_dropped = Family::default();
        let records_spool_bytes = Gauge::default();
        let records_export_duration = final_histogram();
        registry.register(
            "plugvisor_records_submitted",
            "Usage records submitted by the streams",
            records_submitted.clone(),
        );
        registry.register(
            "plugvisor_records_written",
            "Usage records written, by sink (file: lines appended to the JSON Lines file; otlp: taken by the collector)",
            records_written.clone(),
        );
        registry.register(
            "plugvisor_records_spooled",
            "Usage records written to the OTLP spool while the collector did not take them",
            records_spooled.clone(),
        );
        registry.register(
            "plugvisor_records_retried",
            "Usage records sent again after a failed OTLP export",
            records_retried.clone(),
        );
        registry.register(
            "plugvisor_records_dropped",
            "Usage records lost, by sink and reason (queue_full, spool_full, rejected, write_error, spool_error, corrupt, stopped)",
            records_dropped.clone(),
        );
        registry.register(
            "plugvisor_records_spool_bytes",
            "Bytes in the OTLP spool directory, all fronts' files",
            records_spool_bytes.clone(),
        );
        registry.register(
            "plugvisor_records_export_duration_seconds",
            "Duration of OTLP export requests of usage records",
            records_export_duration.clone(),
        );
        let spans_exported = Counter::default();
        let spans_dropped = Family::default();
        registry.register(
            "plugvisor_spans_exported",
            "Spans of the front's own work ([traces]) the OTLP collector took",
            spans_exported.clone(),
        );
        registry.register(
            "plugvisor_spans_dropped",
            "Spans lost, by reason (queue_full: the exporter's queue was full; export_failed: the collector did not take the batch; rejected: it refused part of it; stopped: the front stopped before they were sent)",
            spans_dropped.clone(),
        );
        let plugin_spans_dropped = Family::default();
        registry.register(
            "plugvisor_plugin_spans_dropped",
            "A plugin's Spans messages dropped, by reason (no_final: no final call of that stream waiting on the connection; too_large: larger than metadata_max_bytes; too_many: more than 64 spans or attributes in one place; duplicate: a second Spans for the same final call)",
            plugin_spans_dropped.clone(),
        );
        Metrics {
            spans_exported,
            spans_dropped,
            plugin_spans_dropped,
            records_submitted,
            records_written,
            records_spooled,
            records_retried,
            records_dropped,
            records_spool_bytes,
            records_export_duration,
            registry,
            plugin_up,
            restarts,
            last_exit_code,
            last_exit_signal,
            start_duration,
            events_sent,
            events_replayed,
            events_dropped,
            queue_depth,
            queue_bytes,
            inflight_bytes,
            final_duration,
            finals_missing,
            namespaces_denied,
            plugin_connected,
            plugin_active_streams,
            stuck_lanes,
            handshakes_refused,
            replies_refused,
            streams_active,
            streams_total,
            stream_errors,
            streams_shed,
            messages_too_large,
            streams_cut,
            crash_loop_held,
            response_overhead,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Labels for a plugin.
    pub fn plugin(name: &str) -> PluginLabel {
        PluginLabel {
            plugin: name.to_owned(),
        }
    }

    /// Labels for a plugin and a reason.
    pub fn reason(name: &str, reason: &str) -> PluginReason {
        PluginReason {
            plugin: name.to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// Label of a usage records sink.
    pub fn sink(sink: &str) -> SinkLabel {
        SinkLabel {
            sink: sink.to_owned(),
        }
    }

    /// Labels of a usage records sink and a reason.
    pub fn drop_reason(reason: &str) -> ReasonLabel {
        ReasonLabel {
            reason: reason.to_owned(),
        }
    }

    /// Labels for a dropped usage record.
    pub fn sink_reason(sink: &str, reason: &str) -> SinkReason {
        SinkReason {
            sink: sink.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// Why the front is not healthy right now, if it is not (for `/healthz`): the `required` plugins
/// that are down, or a crash-loop hold.
pub type Unhealthy = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// `/healthz`'s reason for the `required` plugins in `down`, if any.
pub fn required_down(down: &[String]) -> Option<String> {
    (!down.is_empty()).then(|| format!("required plugin(s) down: {}", down.join(", ")))
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until `shutdown` resolves.
/// `/healthz` answers 503 with the reason `unhealthy` gives, else 200.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    unhealthy: Unhealthy,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // A response is headers then body: without NODELAY the second write waits for an ACK.
        let _ = stream.set_nodelay(true);
        let metrics = metrics.clone();
        let unhealthy = unhealthy.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let unhealthy = unhealthy.clone();
                    async move {
                        Ok::<_, Infallible>(admin_response(req.uri().path(), &metrics, &*unhealthy))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn admin_response(
    path: &str,
    metrics: &Metrics,
    unhealthy: &dyn Fn() -> Option<String>,
) -> hyper::Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => healthz(unhealthy()),
        _ => (404, "text/plain", "not found; try /metrics\n".to_owned()),
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// `/healthz`: 200 `ok`, or 503 with the reason (the `required` plugins that are not connected,
/// or a crash-loop hold): a load balancer or probe then keeps traffic away.
fn healthz(unhealthy: Option<String>) -> (u16, &'static str, String) {
    match unhealthy {
        None => (200, "text/plain", "ok\n".to_owned()),
        Some(reason) => (503, "text/plain", format!("{reason}\n")),
    }
}

/// Binds the admin listener; the address must be loopback (checked by the config).
pub async fn bind_admin(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_is_503_naming_the_required_plugins_that_are_down() {
        let metrics = Metrics::new();
        let ok = admin_response("/healthz", &metrics, &|| required_down(&[]));
        assert_eq!(ok.status(), 200);
        let down = admin_response("/healthz", &metrics, &|| {
            required_down(&["usage".to_owned(), "latency".to_owned()])
        });
        assert_eq!(down.status(), 503);
        let (_, body, _) = healthz(required_down(&["usage".to_owned(), "latency".to_owned()]));
        assert_eq!(body, "text/plain");
        assert_eq!(
            healthz(required_down(&["usage".to_owned()])).2,
            "required plugin(s) down: usage\n"
        );
        // /metrics does not depend on plugin health.
        assert_eq!(
            admin_response("/metrics", &metrics, &|| required_down(&[
                "usage".to_owned()
            ]))
            .status(),
            200
        );
    }
}
