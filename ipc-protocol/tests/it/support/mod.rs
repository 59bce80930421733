//! Sample messages shared by the protocol's integration tests.

use bytes::Bytes;
use ipc_protocol::*;

pub fn every_to_plugin() -> Vec<ToPlugin> {
    vec![
        ToPlugin::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            config: Value::map([
                ("spin_us", Value::Int(1000)),
                (
                    "attributes",
                    Value::List(vec![Value::map([("name", Value::from("x"))])]),
                ),
            ]),
            budget_bytes: 8 << 20,
            metadata_max_bytes: 16 << 10,
            capabilities: vec!["replayed".into()],
        }),
        ToPlugin::Refuse(Refuse {
            code: RefuseCode::AlreadyConnected,
            reason: "plugin usage already has a live connection (pid 42)".into(),
        }),
        ToPlugin::RequestStart(RequestStart {
            stream_id: 7,
            seq: 0,
            stamp_ns: 1_000,
            request_id: Some("req-1".into()),
            headers: vec![(":path".into(), "/v1/chat/completions".into())],
        }),
        ToPlugin::ResponseHeaders(ResponseHeaders {
            stream_id: 7,
            seq: 1,
            stamp_ns: 2_000,
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
        }),
        ToPlugin::Chunk(Chunk {
            stream_id: 7,
            seq: 2,
            stamp_ns: 3_000,
            len: 5,
            bytes: Bytes::from_static(b"data:"),
            end_of_stream: false,
            ack: true,
        }),
        ToPlugin::Final(Final {
            stream_id: 7,
            seq: 3,
            stamp_ns: 4_000,
            call_id: 99,
            len: 0,
            bytes: Bytes::new(),
            trailers: vec![("grpc-status".into(), "0".into())],
        }),
        ToPlugin::Abort(Abort {
            stream_id: 8,
            seq: 2,
            stamp_ns: 5_000,
            cause: AbortCause::ClientDisconnect,
            detail: "stream reset by envoy".into(),
        }),
        ToPlugin::AbortedFinal(AbortedFinal {
            stream_id: 9,
            seq: 4,
            stamp_ns: 6_000,
            call_id: 77,
            cause: AbortCause::Shutdown,
            detail: "front is stopping".into(),
        }),
        ToPlugin::Ping(Ping { nonce: u64::MAX }),
        ToPlugin::Shutdown(Shutdown { grace_ms: 5_000 }),
    ]
}

pub fn every_from_plugin() -> Vec<FromPlugin> {
    let mut metadata = Metadata::new();
    metadata.insert(
        "plugvisor.usage".into(),
        Value::map([
            ("prompt_tokens", Value::Int(12)),
            ("ratio", Value::Float(0.25)),
            ("model", Value::from("m")),
            ("cached", Value::Null),
            ("flags", Value::List(vec![Value::Bool(true)])),
        ]),
    );
    vec![
        FromPlugin::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            plugin: "usage".into(),
            pid: 4242,
            subscriptions: Subscriptions::ALL,
            capabilities: vec!["replayed".into()],
        }),
        FromPlugin::FinalReply(FinalReply {
            call_id: 99,
            stream_id: 7,
            outcome: FinalOutcome::Metadata(metadata),
        }),
        FromPlugin::FinalReply(FinalReply {
            call_id: 100,
            stream_id: 8,
            outcome: FinalOutcome::Error("panic in on_chunk: boom".into()),
        }),
        FromPlugin::Pong(Pong {
            nonce: 3,
            active_streams: 2,
            stuck: vec![StuckLane {
                stream_id: 7,
                running_ms: 1500,
            }],
        }),
        FromPlugin::Ack(Ack {
            stream_id: 7,
            seq: 2,
        }),
        FromPlugin::Credit(Credit { consumed: 8 << 20 }),
    ]
}
