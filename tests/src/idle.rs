//! Idle ext_proc streams, opened the way Envoy opens them (a gRPC stream per HTTP request, the
//! request headers sent and answered, then nothing), straight to a front's socket: for measuring
//! what a stream that waits costs.

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};

/// Open streams; dropping it closes them.
pub struct IdleStreams {
    held: Vec<(
        tokio::sync::mpsc::Sender<ProcessingRequest>,
        tonic::Streaming<ProcessingResponse>,
    )>,
}

impl IdleStreams {
    /// How many are open.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// A gRPC channel to the ext_proc server at `unix:/path`.
pub async fn channel(listen: &str) -> tonic::transport::Channel {
    let path = std::path::PathBuf::from(listen.strip_prefix("unix:").expect("unix:/path"));
    tonic::transport::Endpoint::from_static("http://front")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect to the ext_proc server")
}

/// Opens `connections × per_connection` streams to `listen` (`unix:/path`); each has sent its
/// request headers and got the reply before the next opens.
pub async fn open(listen: &str, connections: usize, per_connection: usize) -> IdleStreams {
    open_streams(listen, connections, per_connection, None).await
}

/// Opens `connections × per_connection` streams to `listen` (`unix:/path`) that are in the
/// middle of a response, as while a model streams tokens: request headers, response headers and
/// `chunks` body messages of `size` bytes each were sent and answered, the end never comes.
pub async fn open_in_flight(
    listen: &str,
    connections: usize,
    per_connection: usize,
    chunks: usize,
    size: usize,
) -> IdleStreams {
    open_streams(listen, connections, per_connection, Some((chunks, size))).await
}

/// Sends `msg` on a stream and waits for the front's reply to it.
async fn exchange(
    tx: &tokio::sync::mpsc::Sender<ProcessingRequest>,
    replies: &mut tonic::Streaming<
        envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse,
    >,
    request: Request,
) {
    tx.send(ProcessingRequest {
        request: Some(request),
        ..Default::default()
    })
    .await
    .expect("queue a message");
    replies
        .message()
        .await
        .expect("a reply")
        .expect("a reply, not the end");
}

/// The streams of [`open`] (`body: None`: request headers only) and [`open_in_flight`]
/// (`body: Some((chunks, size))`: response headers and body messages too).
async fn open_streams(
    listen: &str,
    connections: usize,
    per_connection: usize,
    body: Option<(usize, usize)>,
) -> IdleStreams {
    let header = |k: &str, v: &str| envoy_types::pb::envoy::config::core::v3::HeaderValue {
        key: k.into(),
        raw_value: v.as_bytes().to_vec(),
        ..Default::default()
    };
    let mut held = Vec::with_capacity(connections * per_connection);
    for c in 0..connections {
        let mut client = ExternalProcessorClient::new(channel(listen).await);
        for i in 0..per_connection {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let headers = match body {
                None => HeaderMap::default(),
                Some(_) => HeaderMap {
                    headers: vec![
                        header(":path", "/v1/chat/completions"),
                        header("x-request-id", &format!("in-flight-{c}-{i}")),
                    ],
                },
            };
            tx.send(ProcessingRequest {
                request: Some(Request::RequestHeaders(HttpHeaders {
                    headers: Some(headers),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .await
            .expect("queue the headers");
            let mut replies = client
                .process(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("stream opens")
                .into_inner();
            replies
                .message()
                .await
                .expect("a reply to the headers")
                .expect("a reply, not the end");
            if let Some((chunks, size)) = body {
                let response = HttpHeaders {
                    headers: Some(HeaderMap {
                        headers: vec![
                            header(":status", "200"),
                            header("content-type", "text/event-stream"),
                        ],
                    }),
                    ..Default::default()
                };
                exchange(&tx, &mut replies, Request::ResponseHeaders(response)).await;
                for k in 0..chunks {
                    let mut body = format!(
                        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{k} "
                    )
                    .into_bytes();
                    body.resize(size.saturating_sub(6), b'x');
                    body.extend_from_slice(b"\"}}]}\n\n");
                    let chunk = HttpBody {
                        body,
                        end_of_stream: false,
                        ..Default::default()
                    };
                    exchange(&tx, &mut replies, Request::ResponseBody(chunk)).await;
                }
            }
            held.push((tx, replies));
        }
    }
    IdleStreams { held }
}

/// A process's resident set, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    crate::bench::procfs::rss_bytes(pid) / 1024
}
