//! An HTTP/1.1 client that posts a chat completion through Envoy and timestamps every body chunk
//! it receives.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::upstream::Params;

/// What the client received.
#[derive(Debug)]
pub struct Received {
    /// The HTTP status.
    pub status: u16,
    /// Each data frame with its arrival time since the request was sent.
    pub chunks: Vec<(Duration, Bytes)>,
    /// Time until the body ended.
    pub total: Duration,
    /// Why the body ended early (a reset or a truncated transfer), if it did.
    pub error: Option<String>,
}

impl Received {
    /// The whole body.
    pub fn body(&self) -> Vec<u8> {
        self.chunks
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect()
    }
}

async fn send(
    port: u16,
    params: &Params,
    request_id: &str,
    x_request_id: &str,
    extra: &[(&str, &str)],
) -> (Instant, hyper::Response<hyper::body::Incoming>) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to envoy");
    stream.set_nodelay(true).ok();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let body = format!(
        r#"{{"model":"test-model","stream":{},"messages":[{{"role":"user","content":"hello"}}]}}"#,
        params.stream
    );
    // The test's own id rides in the path too, so the access log line can be found even when
    // many requests share one x-request-id.
    let mut req = hyper::Request::post(format!("/v1/chat/completions?test-id={request_id}"))
        .header("host", "gateway")
        .header("content-type", "application/json")
        .header("x-request-id", x_request_id);
    for (k, v) in params.headers() {
        req = req.header(k, v);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    let start = Instant::now();
    let resp = sender.send_request(req).await.expect("send request");
    (start, resp)
}

/// Posts a chat completion and reads the whole response.
pub async fn chat(port: u16, params: &Params, request_id: &str) -> Received {
    chat_as(port, params, request_id, request_id).await
}

/// [`chat`] with an `x-request-id` header other than the test's id (the id goes in the path, as
/// `?test-id=`).
pub async fn chat_as(port: u16, params: &Params, test_id: &str, x_request_id: &str) -> Received {
    chat_with(port, params, test_id, x_request_id, &[]).await
}

/// [`chat_as`] with `extra` request headers (e.g. `traceparent`), sent as given.
pub async fn chat_with(
    port: u16,
    params: &Params,
    test_id: &str,
    x_request_id: &str,
    extra: &[(&str, &str)],
) -> Received {
    let (start, resp) = send(port, params, test_id, x_request_id, extra).await;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut chunks = Vec::new();
    let mut error = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        };
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                chunks.push((start.elapsed(), data));
            }
        }
    }
    Received {
        status,
        chunks,
        total: start.elapsed(),
        error,
    }
}

/// Posts a chat completion, reads `n` body frames, then drops the connection (a client gone
/// mid-stream).
pub async fn chat_and_disconnect(port: u16, params: &Params, request_id: &str, n: usize) {
    let (_, resp) = send(port, params, request_id, request_id, &[]).await;
    let mut body = resp.into_body();
    let mut seen = 0;
    while seen < n {
        match body.frame().await {
            Some(Ok(f)) if f.is_data() => seen += 1,
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    drop(body);
}
