//! A streaming upstream that speaks like an OpenAI-compatible server, written over raw HTTP/1.1 so
//! that every SSE event is exactly one chunk on the wire, paced as asked, with optional trailers.
//!
//! A request chooses its response with headers (see [`Params::headers`]): number of chunks, their
//! size and pacing, streaming or a plain JSON body, trailers, and a marker text placed in one
//! chunk. The same [`Params`] compute the expected body, so tests compare byte for byte.

use std::time::Duration;

use std::future::Future as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream sends for one request.
#[derive(Debug, Clone)]
pub struct Params {
    /// Content chunks (each is one token and one SSE event); the usage event and `[DONE]` follow.
    pub chunks: usize,
    /// Padding so each content event carries about this many bytes of text.
    pub size: usize,
    /// Pause before each chunk.
    pub delay: Duration,
    /// SSE stream (true) or one JSON body (false).
    pub stream: bool,
    /// End the chunked body with trailers.
    pub trailers: bool,
    /// Text put into the content of chunk `marker_at`.
    pub marker: Option<(usize, String)>,
    /// Reported prompt tokens.
    pub prompt_tokens: u64,
    /// Reset the connection (TCP RST) after this many body frames of a streamed HTTP/1.1
    /// response: an upstream that fails mid-stream.
    pub reset_after: Option<usize>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            chunks: 5,
            size: 16,
            delay: Duration::ZERO,
            stream: true,
            trailers: false,
            marker: None,
            reset_after: None,
            prompt_tokens: 7,
        }
    }
}

impl Params {
    /// The request headers that ask the upstream for this response.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
            ("x-test-chunks".into(), self.chunks.to_string()),
            ("x-test-size".into(), self.size.to_string()),
            ("x-test-delay-ms".into(), self.delay.as_millis().to_string()),
            ("x-test-stream".into(), (self.stream as u8).to_string()),
            ("x-test-trailers".into(), (self.trailers as u8).to_string()),
            (
                "x-test-prompt-tokens".into(),
                self.prompt_tokens.to_string(),
            ),
        ];
        if let Some((at, m)) = &self.marker {
            h.push(("x-test-marker-at".into(), at.to_string()));
            h.push(("x-test-marker".into(), m.clone()));
        }
        if let Some(n) = self.reset_after {
            h.push(("x-test-reset-after".into(), n.to_string()));
        }
        h
    }

    fn from_headers(headers: &[(String, String)], d: &Params) -> Params {
        let get = |k: &str| {
            headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        let num = |k: &str, d: u64| get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        Params {
            chunks: num("x-test-chunks", d.chunks as u64) as usize,
            size: num("x-test-size", d.size as u64) as usize,
            delay: Duration::from_millis(num("x-test-delay-ms", d.delay.as_millis() as u64)),
            stream: num("x-test-stream", u64::from(d.stream)) == 1,
            trailers: num("x-test-trailers", u64::from(d.trailers)) == 1,
            marker: get("x-test-marker")
                .map(|m| (num("x-test-marker-at", 0) as usize, m.to_owned())),
            prompt_tokens: num("x-test-prompt-tokens", d.prompt_tokens),
            reset_after: get("x-test-reset-after").and_then(|v| v.parse().ok()),
        }
    }

    fn content(&self, i: usize) -> String {
        let mut text = format!("tok{i} ");
        if let Some((at, m)) = &self.marker {
            if *at == i {
                text.push_str(m);
            }
        }
        while text.len() < self.size {
            text.push('x');
        }
        text
    }

    fn usage(&self) -> String {
        let c = self.chunks as u64;
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
            self.prompt_tokens,
            c,
            self.prompt_tokens + c
        )
    }

    /// The body as the upstream writes it, one element per wire chunk.
    pub fn body_chunks(&self) -> Vec<Vec<u8>> {
        if !self.stream {
            let text: String = (0..self.chunks).map(|i| self.content(i)).collect();
            return vec![format!(
                r#"{{"id":"cmpl-1","object":"chat.completion","model":"test-model","choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"finish_reason":"stop"}}],"usage":{}}}"#,
                serde_json::Value::String(text),
                self.usage()
            )
            .into_bytes()];
        }
        let mut out: Vec<Vec<u8>> = (0..self.chunks)
            .map(|i| {
                format!(
                    "data: {{\"id\":\"cmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"test-model\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}}}}]}}\n\n",
                    serde_json::Value::String(self.content(i))
                )
                .into_bytes()
            })
            .collect();
        out.push(
            format!(
                "data: {{\"id\":\"cmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"test-model\",\"choices\":[],\"usage\":{}}}\n\n",
                self.usage()
            )
            .into_bytes(),
        );
        out.push(b"data: [DONE]\n\n".to_vec());
        out
    }

    /// The whole body.
    pub fn body(&self) -> Vec<u8> {
        self.body_chunks().concat()
    }

    /// The streamed text (what a chat client would print).
    pub fn text(&self) -> String {
        (0..self.chunks).map(|i| self.content(i)).collect()
    }
}

/// A running upstream; stops when dropped.
pub struct Upstream {
    /// Its port on 127.0.0.1.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Binds a free loopback port and serves.
    pub async fn start() -> Upstream {
        Upstream::start_on(0, Params::default()).await
    }

    /// Binds `port` on loopback (0: any) and serves, with `defaults` for what requests leave out.
    pub async fn start_on(port: u16, defaults: Params) -> Upstream {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let defaults = defaults.clone();
                tokio::spawn(async move {
                    let _ = serve_conn(s, defaults).await;
                });
            }
        });
        Upstream { port, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// The same responses over HTTP/2 (prior knowledge, as Envoy's `http2_protocol_options`
    /// speaks it). Each SSE event is one DATA frame, and the last event's frame carries
    /// END_STREAM itself, as h2 LLM servers send it: the last tokens arrive with the end.
    pub async fn start_h2() -> Upstream {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind h2 upstream");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let headers: Vec<(String, String)> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                })
                                .collect();
                            let p = Params::from_headers(&headers, &Params::default());
                            let content_type = if p.stream {
                                "text/event-stream"
                            } else {
                                "application/json"
                            };
                            let body = Paced {
                                chunks: p
                                    .body_chunks()
                                    .into_iter()
                                    .map(bytes::Bytes::from)
                                    .collect(),
                                delay: p.delay,
                                sleep: None,
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", content_type)
                                    .body(body)
                                    .expect("response"),
                            )
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                    .await;
                });
            }
        });
        Upstream { port, task }
    }
}

/// A response body of paced chunks that reports its end as soon as the last chunk is taken, so
/// hyper sends that chunk's DATA frame with END_STREAM.
struct Paced {
    chunks: std::collections::VecDeque<bytes::Bytes>,
    delay: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl hyper::body::Body for Paced {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.chunks.is_empty() {
            return std::task::Poll::Ready(None);
        }
        if !self.delay.is_zero() {
            let delay = self.delay;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if sleep.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            self.sleep = None;
        }
        let chunk = self.chunks.pop_front().expect("not empty");
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// Reads the next request on a keep-alive connection, its head and its `content-length` body,
/// consuming both from `buf` (which keeps whatever arrived of the next request). Returns the
/// headers with lowercase names, or `None` when the client closed the connection.
pub(crate) async fn read_request(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<(String, String)>>> {
    Ok(read_request_body(s, buf).await?.map(|(h, _)| h))
}

/// [`read_request`] that also returns the body.
pub(crate) async fn read_request_body(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(Vec<(String, String)>, Vec<u8>)>> {
    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
        let mut tmp = [0u8; 4096];
        let n = s.read(&mut tmp).await?;
        buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if !fill(s, buf).await? {
            return Ok(None);
        }
    };
    let headers: Vec<(String, String)> = String::from_utf8_lossy(&buf[..head_end])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let content_length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + content_length {
        if !fill(s, buf).await? {
            return Ok(None);
        }
    }
    let body = buf
        .drain(..head_end + content_length)
        .skip(head_end)
        .collect();
    Ok(Some((headers, body)))
}

async fn serve_conn(mut s: TcpStream, defaults: Params) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    loop {
        let Some(headers) = read_request(&mut s, &mut buf).await? else {
            return Ok(());
        };
        let p = Params::from_headers(&headers, &defaults);
        if !p.stream {
            let body = p.body();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await?;
            s.write_all(&body).await?;
            continue;
        }
        let mut head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                .to_owned();
        if p.trailers {
            head.push_str("trailer: x-upstream-done\r\n");
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        for (i, chunk) in p.body_chunks().into_iter().enumerate() {
            if p.reset_after == Some(i) {
                // Linger 0: closing sends RST, not FIN, as an upstream that crashes does. (Tokio
                // deprecates SO_LINGER because a non-zero linger blocks the thread on drop; a zero
                // one resets at once.)
                #[allow(deprecated)]
                s.set_linger(Some(Duration::ZERO))?;
                return Ok(());
            }
            if !p.delay.is_zero() {
                tokio::time::sleep(p.delay).await;
            }
            let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
            frame.extend_from_slice(&chunk);
            frame.extend_from_slice(b"\r\n");
            s.write_all(&frame).await?;
        }
        if p.trailers {
            s.write_all(b"0\r\nx-upstream-done: 1\r\n\r\n").await?;
        } else {
            s.write_all(b"0\r\n\r\n").await?;
        }
    }
}
