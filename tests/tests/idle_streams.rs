//! Idle ext_proc streams against the real front process: what each one costs in memory, and that
//! none is ever timed out by default (a reasoning model can be silent for minutes).

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpHeaders, ProcessingRequest};
use tests::front::FrontProcess;

const CONNECTIONS: usize = 10;
const STREAMS_PER_CONNECTION: usize = 1000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn channel(path: std::path::PathBuf) -> tonic::transport::Channel {
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
        .expect("connect to the front")
}

fn request_headers() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap::default()),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_streams_cost_little_and_are_never_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let front = tokio::task::block_in_place(|| {
        FrontProcess::start(dir.path(), "[plugins.latency]\n", &["latency"])
    });
    let path = front.ext_proc.strip_prefix("unix:").unwrap().to_owned();
    let pid = front.pid();
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut client = ExternalProcessorClient::new(channel(path.clone().into()).await);
        for _ in 0..STREAMS_PER_CONNECTION {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(request_headers()).await.unwrap();
            let mut replies = client
                .process(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("stream opens")
                .into_inner();
            // The headers' reply: the stream is established on both sides.
            replies.message().await.expect("reply").expect("a reply");
            held.push((tx, replies));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    let streams = (CONNECTIONS * STREAMS_PER_CONNECTION) as u64;
    let per_stream = (after.saturating_sub(before)) * 1024 / streams;
    println!("front RSS {before} KiB -> {after} KiB: {per_stream} bytes per idle stream");
    let metrics = front.metrics();
    assert_eq!(
        tests::front::metric(&metrics, "plugvisor_streams_active"),
        streams as f64
    );
    assert!(per_stream < 20_000, "{per_stream} bytes per idle stream");
    drop(held);
}
