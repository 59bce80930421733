//! Capability `trace` through the real host: what hooks record goes out as one `Spans` right
//! before the stream's final reply (`Final` or `AbortedFinal`), naming the stream, with the
//! request's `traceparent` readable from every hook; nothing without the capability, nothing
//! for an aborted stream, and nothing over `metadata_max_bytes`.

use crate::harness::{serve_in_process, Front, BUDGET};

use bytes::Bytes;
use ipc_protocol::{
    Abort, AbortCause, AbortedFinal, Chunk, Final, FinalReply, FromPlugin, Metadata, RequestStart,
    Spans, ToPlugin, Value,
};
use plugin_runner::{trace, EventCtx, Plugin};

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// Records the request span's id on its final-call span, a span per chunk, and a big attribute
/// when a chunk says `big`.
#[derive(Clone)]
struct Tracer;

impl Plugin for Tracer {
    type Stream = u64;
    fn name(&self) -> &str {
        "tracer"
    }
    fn on_chunk(&self, n: &mut u64, _: &EventCtx, c: &Chunk) {
        let mut span = trace::span("tracer.chunk");
        span.attribute("bytes", u64::from(c.len));
        if c.bytes.as_ref() == b"big" {
            trace::attribute("tracer.big", "x".repeat(2000));
        }
        *n += 1;
    }
    fn on_final(&self, n: &mut u64, _: &EventCtx, _: &Final) -> Metadata {
        if let Some(tp) = trace::traceparent() {
            trace::attribute("tracer.parent", tp.span_id_hex());
        }
        trace::attribute("tracer.chunks", *n);
        Metadata::from([(
            "plugvisor.tracer".to_owned(),
            Value::map([("chunks", Value::from(*n))]),
        )])
    }
    fn on_aborted_final(&self, n: &mut u64, _: &EventCtx, _: &AbortedFinal) -> Metadata {
        trace::attribute("tracer.aborted", true);
        trace::attribute("tracer.chunks", *n);
        Metadata::new()
    }
}

fn start(id: u64) -> ToPlugin {
    ToPlugin::RequestStart(RequestStart {
        stream_id: id,
        seq: 0,
        stamp_ns: 1,
        request_id: None,
        headers: vec![("traceparent".into(), TRACEPARENT.into())],
    })
}

fn chunk(id: u64, seq: u32, body: &'static [u8]) -> ToPlugin {
    ToPlugin::Chunk(Chunk {
        stream_id: id,
        seq,
        stamp_ns: 2,
        len: body.len() as u32,
        bytes: Bytes::from_static(body),
        end_of_stream: false,
        ack: false,
    })
}

fn fin(id: u64, seq: u32) -> ToPlugin {
    ToPlugin::Final(Final {
        stream_id: id,
        seq,
        stamp_ns: 3,
        call_id: id + 100,
        len: 0,
        bytes: Bytes::new(),
        trailers: vec![],
    })
}

async fn send(front: &mut Front, msgs: Vec<ToPlugin>) {
    for m in msgs {
        front.feed(m);
    }
    front.flush().await;
}

async fn reply(front: &mut Front) -> FinalReply {
    match front.recv().await {
        FromPlugin::FinalReply(r) => r,
        other => panic!("expected a final reply, got {other:?}"),
    }
}

async fn spans(front: &mut Front) -> Spans {
    match front.recv().await {
        FromPlugin::Spans(s) => s,
        other => panic!("expected Spans, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_come_right_before_the_final_reply_when_trace_is_agreed() {
    let mut front = serve_in_process(Tracer, 2).await;
    assert!(front.hello.capabilities.iter().any(|c| c == "trace"));
    front.welcome_caps(Value::Null, &["trace"]).await;
    send(
        &mut front,
        vec![start(1), chunk(1, 1, b"ab"), chunk(1, 2, b"c"), fin(1, 3)],
    )
    .await;
    let s = spans(&mut front).await;
    assert_eq!(s.stream_id, 1);
    assert_eq!(
        s.attributes,
        vec![
            ("tracer.parent".to_owned(), Value::from("b7ad6b7169203331")),
            ("tracer.chunks".to_owned(), Value::from(2u64)),
        ]
    );
    assert_eq!(s.spans.len(), 2);
    for (span, bytes) in s.spans.iter().zip([2u64, 1]) {
        assert_eq!(span.name, "tracer.chunk");
        assert!(
            span.start_ns > 0 && span.end_ns >= span.start_ns,
            "{span:?}"
        );
        assert_eq!(
            span.attributes,
            vec![("bytes".to_owned(), Value::from(bytes))]
        );
    }
    let r = reply(&mut front).await;
    assert_eq!((r.call_id, r.stream_id), (101, 1));

    // An aborted final's record goes too; a plain abort's is dropped with its stream.
    send(
        &mut front,
        vec![
            start(2),
            ToPlugin::Abort(Abort {
                stream_id: 2,
                seq: 1,
                stamp_ns: 4,
                cause: AbortCause::ClientDisconnect,
                detail: String::new(),
            }),
            start(3),
            chunk(3, 1, b"x"),
            ToPlugin::AbortedFinal(AbortedFinal {
                stream_id: 3,
                seq: 2,
                stamp_ns: 5,
                call_id: 103,
                cause: AbortCause::UpstreamError,
                detail: String::new(),
            }),
        ],
    )
    .await;
    let s = spans(&mut front).await;
    assert_eq!(s.stream_id, 3);
    assert_eq!(
        s.attributes[0],
        ("tracer.aborted".to_owned(), Value::Bool(true))
    );
    assert_eq!(reply(&mut front).await.stream_id, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_sent_without_the_capability() {
    let mut front = serve_in_process(Tracer, 1).await;
    front.welcome_caps(Value::Null, &["replayed"]).await;
    send(&mut front, vec![start(1), chunk(1, 1, b"ab"), fin(1, 2)]).await;
    let r = reply(&mut front).await;
    assert_eq!(r.stream_id, 1, "the final reply comes first: no Spans");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_over_metadata_max_bytes_are_dropped_and_the_reply_still_goes() {
    let mut front = serve_in_process(Tracer, 1).await;
    front
        .welcome_full(Value::Null, BUDGET, 1024, &["trace"])
        .await;
    send(&mut front, vec![start(1), chunk(1, 1, b"big"), fin(1, 2)]).await;
    assert_eq!(reply(&mut front).await.stream_id, 1);
    // The next stream, within the cap, sends its Spans again.
    send(&mut front, vec![start(2), chunk(2, 1, b"ab"), fin(2, 2)]).await;
    assert_eq!(spans(&mut front).await.stream_id, 2);
    assert_eq!(reply(&mut front).await.stream_id, 2);
}
