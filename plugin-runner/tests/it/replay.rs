//! Replayed events through the real host: unwrapped, run in order with `is_replayed()` true,
//! credited by their whole frame, and a `Replayed` around anything but an event ends the
//! connection as a protocol error.

use crate::harness;

use bytes::Bytes;
use harness::serve_in_process;
use ipc_protocol::{
    Chunk, Final, FinalOutcome, FromPlugin, Metadata, Ping, RequestStart, ToPlugin, Value,
};
use plugin_runner::{EventCtx, Exit, Plugin};

/// Lists, per stream, whether each event it saw was replayed.
#[derive(Clone)]
struct Seer;

impl Plugin for Seer {
    type Stream = Vec<bool>;
    fn name(&self) -> &str {
        "seer"
    }
    fn on_request_start(&self, s: &mut Vec<bool>, ctx: &EventCtx, _: &RequestStart) {
        s.push(ctx.is_replayed());
    }
    fn on_chunk(&self, s: &mut Vec<bool>, ctx: &EventCtx, _: &Chunk) {
        s.push(ctx.is_replayed());
    }
    fn on_final(&self, s: &mut Vec<bool>, ctx: &EventCtx, _: &Final) -> Metadata {
        s.push(ctx.is_replayed());
        Metadata::from([(
            "plugvisor.seer".to_owned(),
            Value::map([(
                "replayed",
                Value::List(s.iter().map(|&b| Value::Bool(b)).collect()),
            )]),
        )])
    }
}

fn start(id: u64) -> ToPlugin {
    ToPlugin::RequestStart(RequestStart {
        stream_id: id,
        seq: 0,
        stamp_ns: 1,
        request_id: None,
        headers: vec![],
    })
}

fn chunk(id: u64, seq: u32) -> ToPlugin {
    ToPlugin::Chunk(Chunk {
        stream_id: id,
        seq,
        stamp_ns: 2,
        len: 1,
        bytes: Bytes::from_static(b"x"),
        end_of_stream: false,
        ack: false,
    })
}

fn fin(id: u64, seq: u32) -> ToPlugin {
    ToPlugin::Final(Final {
        stream_id: id,
        seq,
        stamp_ns: 3,
        call_id: id,
        len: 0,
        bytes: Bytes::new(),
        trailers: vec![],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_journal_rebuilds_the_stream_which_then_ends_whole() {
    let mut front = serve_in_process(Seer, 2).await;
    front.welcome(Value::Null).await;
    // The journal of a stream the crashed process had seen up to seq 2, then live events.
    for e in [start(7), chunk(7, 1), chunk(7, 2)] {
        front.feed(e.replayed().unwrap());
    }
    front.feed(chunk(7, 3));
    front.feed(fin(7, 4));
    front.flush().await;
    let FromPlugin::FinalReply(reply) = front.recv().await else {
        panic!("expected the final reply")
    };
    let FinalOutcome::Metadata(md) = reply.outcome else {
        panic!("{:?}", reply.outcome)
    };
    let flags = |b: &[bool]| Value::List(b.iter().map(|&b| Value::Bool(b)).collect());
    // Whole: no gaps, not partial, every event run once in order.
    assert_eq!(
        md["plugvisor.seer"],
        Value::map([("replayed", flags(&[true, true, true, false, false]))])
    );
    // Replayed frames are credited whole, like live ones.
    front.wait_credited(front.written()).await;
}

#[tokio::test]
async fn a_replayed_connection_message_is_a_protocol_error() {
    let mut front = serve_in_process(Seer, 1).await;
    front.welcome(Value::Null).await;
    front
        .send_now(ToPlugin::Replayed(Box::new(ToPlugin::Ping(Ping {
            nonce: 1,
        }))))
        .await;
    assert_eq!(front.host_exit().await, Exit::Failed);
}
