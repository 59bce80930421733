//! Idle ext_proc streams, opened the way Envoy opens them (a gRPC stream per HTTP request, the
//! request headers sent and answered, then nothing), straight to a front's socket: for measuring
//! what a stream that waits costs.

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, ProcessingRequest, ProcessingResponse,
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
    let mut held = Vec::with_capacity(connections * per_connection);
    for _ in 0..connections {
        let mut client = ExternalProcessorClient::new(channel(listen).await);
        for _ in 0..per_connection {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(ProcessingRequest {
                request: Some(Request::RequestHeaders(HttpHeaders {
                    headers: Some(HeaderMap::default()),
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
            held.push((tx, replies));
        }
    }
    IdleStreams { held }
}

/// A process's resident set, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    crate::bench::procfs::rss_bytes(pid) / 1024
}
