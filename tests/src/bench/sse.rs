//! A stamped OpenAI-like SSE upstream and a client that reads the stamps back, so each chunk's
//! one-way latency (upstream write → client read, one process, one monotonic clock) is measured
//! directly rather than inferred from pacing.
//!
//! The request asks for `x-bench-events` content events of `x-bench-size` bytes, the first sent
//! at once and the rest every `x-bench-delay-us` (on an absolute schedule, so pacing never
//! drifts). Each event carries `"t":<ns since the harness epoch>` taken just before its write.
//! After the usage event and `data: [DONE]`, the time the terminating chunk is written is kept
//! under the request's `x-bench-id`, for the end-of-response latency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the harness's epoch (the first call).
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The API key the client sends (and a proxy under test is given as its own).
pub const BENCH_KEY: &str = "sk-plugvisor-bench";

/// When the upstream wrote each response's terminating chunk, by `x-bench-id`.
pub type Ends = Arc<Mutex<HashMap<u64, u64>>>;

/// The running upstream.
pub struct StampedUpstream {
    /// Its loopback port.
    pub port: u16,
    /// End stamps by request id.
    pub ends: Ends,
    task: tokio::task::JoinHandle<()>,
}

impl StampedUpstream {
    /// Binds a free loopback port and serves.
    pub async fn start() -> StampedUpstream {
        now_ns();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let ends: Ends = Arc::default();
        let e = ends.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let e = e.clone();
                tokio::spawn(async move {
                    let _ = serve_conn(s, e).await;
                });
            }
        });
        StampedUpstream { port, ends, task }
    }
}

impl Drop for StampedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_conn(mut s: TcpStream, ends: Ends) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    loop {
        let Some((headers, body)) = crate::upstream::read_request_body(&mut s, &mut buf).await?
        else {
            return Ok(());
        };
        let body = String::from_utf8_lossy(&body);
        // A proxy that sends its own request upstream (LiteLLM) drops the client's headers but
        // passes the prompt on: the same `name=value` pairs are read from the body then.
        let get = |k: &str| -> u64 {
            headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .or_else(|| {
                    let at = body.find(&format!("{k}="))? + k.len() + 1;
                    let rest = &body[at..];
                    Some(
                        &rest[..rest
                            .find(|c: char| !c.is_ascii_digit())
                            .unwrap_or(rest.len())],
                    )
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let (events, size, delay, id) = (
            get("x-bench-events"),
            get("x-bench-size") as usize,
            Duration::from_micros(get("x-bench-delay-us")),
            get("x-bench-id"),
        );
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await?;
        let pad = "x".repeat(size.saturating_sub(38));
        let start = tokio::time::Instant::now();
        for i in 0..events {
            if !delay.is_zero() && i > 0 {
                tokio::time::sleep_until(start + delay * i as u32).await;
            }
            // The stamp twice: as the event's last field, and inside the content, which a
            // proxy that re-encodes events (LiteLLM) passes on.
            let t = now_ns();
            let event = format!(
                "data: {{\"id\":\"bench-{id}\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"bench\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{i} @{t}@ {pad}\"}}}}],\"t\":{t}}}\n\n"
            );
            s.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
                .await?;
        }
        let tail = format!(
            "data: {{\"id\":\"bench-{id}\",\"created\":0,\"object\":\"chat.completion.chunk\",\"model\":\"bench\",\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{events},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            events + 5
        );
        s.write_all(format!("{:x}\r\n{tail}\r\n", tail.len()).as_bytes())
            .await?;
        ends.lock().expect("ends lock").insert(id, now_ns());
        s.write_all(b"0\r\n\r\n").await?;
    }
}

/// One stream as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct StreamResult {
    /// Per content event: upstream write → client read, µs.
    pub chunk_us: Vec<f64>,
    /// Per content event: when the client read it, ns since the harness epoch ([`now_ns`]).
    pub chunk_at: Vec<u64>,
    /// Request sent → body end, µs.
    pub ttlb_us: f64,
    /// Upstream's terminating chunk → body end at the client, µs.
    pub end_us: f64,
    /// Content events received.
    pub events: usize,
    /// HTTP status.
    pub status: u16,
}

/// What one stream asks the upstream for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// Content events.
    pub events: u64,
    /// Bytes per event (about).
    pub size: usize,
    /// Pacing between events.
    pub delay: Duration,
}

/// Posts one chat completion through Envoy on `port`, reads it to the end and measures it.
pub async fn stream(port: u16, ask: Ask, id: u64, ends: &Ends) -> Result<StreamResult, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to envoy: {e}"))?;
    tcp.set_nodelay(true).ok();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::post(format!("/v1/chat/completions?bench-id={id}"))
        .header("host", "gateway")
        .header("content-type", "application/json")
        .header("x-request-id", format!("bench-{id}"))
        // A proxy with a key (LiteLLM's master key) checks it; the others ignore it.
        .header("authorization", format!("Bearer {BENCH_KEY}"))
        .header("x-bench-events", ask.events.to_string())
        .header("x-bench-size", ask.size.to_string())
        .header("x-bench-delay-us", ask.delay.as_micros().to_string())
        .header("x-bench-id", id.to_string())
        .body(Full::new(Bytes::from(format!(
            r#"{{"model":"bench","stream":true,"messages":[{{"role":"user","content":"hi x-bench-events={} x-bench-size={} x-bench-delay-us={} x-bench-id={id}"}}]}}"#,
            ask.events,
            ask.size,
            ask.delay.as_micros()
        ))))
        .map_err(|e| e.to_string())?;
    let start = now_ns();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut out = StreamResult {
        status,
        ..Default::default()
    };
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = now_ns();
        pending.extend_from_slice(&data);
        while let Some(p) = pending.windows(2).position(|w| w == b"\n\n") {
            if let Some(t) = stamp_of(&pending[..p]) {
                out.chunk_us.push(now.saturating_sub(t) as f64 / 1e3);
                out.chunk_at.push(now);
                out.events += 1;
            }
            pending.drain(..p + 2);
        }
    }
    let end = now_ns();
    out.ttlb_us = end.saturating_sub(start) as f64 / 1e3;
    if let Some(t) = ends.lock().expect("ends lock").remove(&id) {
        out.end_us = end.saturating_sub(t) as f64 / 1e3;
    }
    Ok(out)
}

/// The `"t":` stamp at the end of one SSE event, or the `@<ns>@` one in its content (what a
/// proxy that re-encodes events keeps), if it has one.
fn stamp_of(event: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(event).ok()?;
    if let Some(at) = text.rfind("\"t\":") {
        if let Ok(t) = text[at + 4..].trim_end_matches('}').trim().parse() {
            return Some(t);
        }
    }
    let at = text.find(" @")? + 2;
    let len = text[at..].find('@')?;
    text[at..at + len].parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps_are_read_from_the_event_end() {
        assert_eq!(super::stamp_of(b"data: {\"a\":1,\"t\":12345}"), Some(12345));
        assert_eq!(super::stamp_of(b"data: [DONE]"), None);
        assert_eq!(
            super::stamp_of(b"data: {\"choices\":[{\"delta\":{\"content\":\"3 @987@ xx\"}}]}"),
            Some(987)
        );
    }
}
