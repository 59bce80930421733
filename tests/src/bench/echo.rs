//! The reference: the barest `ext_proc` server tonic can make. It answers every message at once
//! (headers: continue; body: echo the bytes back in `FULL_DUPLEX_STREAMED`; trailers: continue)
//! and does nothing else, so what a configuration adds beyond it is the cost of its own work.
//! The harness runs it as a process of its own (`bench --echo-server unix:<path>`), on the same
//! tokio runtime shape as `plugvisor`, so its CPU time is read from /proc the same way.

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, BodyMutation, BodyResponse, CommonResponse, HeadersResponse, ProcessingRequest,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

/// The echo service; with `end_metadata`, the reply to the end of the response body carries it as
/// `dynamic_metadata` (the tests use that to find what Envoy itself accepts).
#[derive(Clone, Default)]
pub struct Echo {
    /// Sent with the reply to the body message that ends the response.
    pub end_metadata: Option<envoy_types::pb::google::protobuf::Struct>,
}

#[tonic::async_trait]
impl ExternalProcessor for Echo {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: GrpcRequest<Streaming<ProcessingRequest>>,
    ) -> Result<GrpcResponse<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let end_metadata = self.end_metadata.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let ends =
                    matches!(&req.request, Some(Request::ResponseBody(b)) if b.end_of_stream);
                let Some(mut resp) = answer(req) else {
                    continue;
                };
                if ends {
                    resp.dynamic_metadata = end_metadata.clone();
                }
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(GrpcResponse::new(ReceiverStream::new(rx)))
    }
}

fn answer(req: ProcessingRequest) -> Option<ProcessingResponse> {
    let response = match req.request? {
        Request::RequestHeaders(_) => Response::RequestHeaders(HeadersResponse::default()),
        Request::ResponseHeaders(_) => Response::ResponseHeaders(HeadersResponse::default()),
        Request::ResponseBody(b) => Response::ResponseBody(echo(b.body, b.end_of_stream)),
        Request::RequestBody(b) => Response::RequestBody(echo(b.body, b.end_of_stream)),
        Request::ResponseTrailers(_) => Response::ResponseTrailers(TrailersResponse::default()),
        Request::RequestTrailers(_) => Response::RequestTrailers(TrailersResponse::default()),
    };
    Some(ProcessingResponse {
        response: Some(response),
        ..Default::default()
    })
}

fn echo(body: Vec<u8>, end_of_stream: bool) -> BodyResponse {
    BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    }
}

/// Serves the echo on the Unix socket `path` until the process is killed.
pub fn serve_forever(path: &std::path::Path) -> ! {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).expect("bind echo socket");
        tonic::transport::Server::builder()
            .add_service(ExternalProcessorServer::new(Echo::default()))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .expect("echo server");
    });
    std::process::exit(0)
}
