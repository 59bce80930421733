//! A panic anywhere in plugin code a worker runs (the stream state's `Default` or `Drop`, a
//! hook) fails only that stream: its final reply names the panic, the other streams complete,
//! and a host with a single worker thread goes on processing later streams.

use crate::harness;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use harness::serve_in_process;
use ipc_protocol::{
    Chunk, Final, FinalOutcome, FromPlugin, Metadata, Ping, RequestStart, Shutdown, ToPlugin, Value,
};
use plugin_runner::{EventCtx, Exit, Plugin};

/// The stream whose plugin code panics.
const DOOMED: u64 = 3;

fn events(id: u64) -> [ToPlugin; 3] {
    [
        ToPlugin::RequestStart(RequestStart {
            stream_id: id,
            seq: 0,
            stamp_ns: 1,
            request_id: None,
            headers: vec![],
        }),
        ToPlugin::Chunk(Chunk {
            stream_id: id,
            seq: 1,
            stamp_ns: 2,
            len: 2,
            bytes: Bytes::from_static(b"hi"),
            end_of_stream: false,
            ack: false,
        }),
        ToPlugin::Final(Final {
            stream_id: id,
            seq: 2,
            stamp_ns: 3,
            call_id: id + 1000,
            len: 0,
            bytes: Bytes::new(),
            trailers: vec![],
        }),
    ]
}

/// Counts the events each stream saw; `P` decides where it panics.
fn counted(name: &str, events: u64) -> Metadata {
    Metadata::from([(
        format!("plugvisor.{name}"),
        Value::map([("events", Value::from(events))]),
    )])
}

/// Sends streams `ids` on a 1-worker host serving `plugin` and returns their final outcomes.
async fn run_streams(
    front: &mut harness::Front,
    ids: std::ops::Range<u64>,
) -> HashMap<u64, FinalOutcome> {
    for id in ids.clone() {
        for e in events(id) {
            front.feed(e);
        }
    }
    front.flush().await;
    let mut got = HashMap::new();
    while got.len() < ids.clone().count() {
        if let FromPlugin::FinalReply(r) = front.recv().await {
            assert_eq!(r.call_id, r.stream_id + 1000);
            assert!(got.insert(r.stream_id, r.outcome).is_none());
        }
    }
    got
}

/// The whole drill: 10 streams of which `DOOMED` panics (its reply names `panic` and `hook`),
/// then 50 more streams on the same single worker, then a ping and a clean shutdown.
async fn doomed_stream_fails_alone(
    plugin: impl Plugin + Clone,
    name: &str,
    panic: &str,
    hook: &str,
) {
    let mut front = serve_in_process(plugin, 1).await;
    front.welcome(Value::Null).await;
    let got = run_streams(&mut front, 0..10).await;
    for (id, outcome) in &got {
        match outcome {
            FinalOutcome::Error(e) if *id == DOOMED => {
                assert!(e.contains(panic) && e.contains(hook), "{e}")
            }
            FinalOutcome::Metadata(m) if *id != DOOMED => assert_eq!(m, &counted(name, 3)),
            other => panic!("stream {id}: {other:?}"),
        }
    }
    let later = run_streams(&mut front, 100..150).await;
    for (id, outcome) in &later {
        assert_eq!(
            outcome,
            &FinalOutcome::Metadata(counted(name, 3)),
            "stream {id}"
        );
    }
    front.send_now(ToPlugin::Ping(Ping { nonce: 9 })).await;
    match front.recv().await {
        FromPlugin::Pong(p) => {
            assert_eq!(p.nonce, 9);
            assert_eq!(p.active_streams, 0);
        }
        other => panic!("{other:?}"),
    }
    front
        .send_now(ToPlugin::Shutdown(Shutdown { grace_ms: 500 }))
        .await;
    assert_eq!(front.host_exit().await, Exit::Clean);
}

/// A per-stream state counting events.
macro_rules! counting_plugin {
    ($plugin:ident, $state:ident, $name:literal $(, on_final: $on_final:expr)?) => {
        #[derive(Clone)]
        struct $plugin;
        impl Plugin for $plugin {
            type Stream = $state;
            fn name(&self) -> &str {
                $name
            }
            fn on_request_start(&self, s: &mut $state, ctx: &EventCtx, _: &RequestStart) {
                s.events += 1;
                s.doomed = ctx.stream_id == DOOMED;
            }
            fn on_chunk(&self, s: &mut $state, _: &EventCtx, _: &Chunk) {
                s.events += 1;
            }
            fn on_final(&self, s: &mut $state, ctx: &EventCtx, _: &Final) -> Metadata {
                s.events += 1;
                $( ($on_final)(ctx); )?
                let _ = ctx;
                counted($name, s.events)
            }
        }
    };
}

/// Creating the state of the stream with index `DOOMED` panics (one worker creates states in
/// the streams' arrival order, so that stream is `DOOMED`).
struct DefaultPanics {
    events: u64,
    doomed: bool,
}

static CREATED: AtomicU32 = AtomicU32::new(0);

impl Default for DefaultPanics {
    fn default() -> Self {
        if CREATED.fetch_add(1, Ordering::SeqCst) == DOOMED as u32 {
            panic!("no state for you");
        }
        DefaultPanics {
            events: 0,
            doomed: false,
        }
    }
}

counting_plugin!(PanicInDefault, DefaultPanics, "default-panics");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_creating_a_stream_s_state_fails_that_stream_and_the_worker_goes_on() {
    doomed_stream_fails_alone(
        PanicInDefault,
        "default-panics",
        "no state for you",
        "Default",
    )
    .await;
}

/// The doomed stream's state panics when dropped, after its final hook ran.
#[derive(Default)]
struct DropPanics {
    events: u64,
    doomed: bool,
}

impl Drop for DropPanics {
    fn drop(&mut self) {
        if self.doomed {
            panic!("cannot let go");
        }
    }
}

counting_plugin!(PanicOnDrop, DropPanics, "drop-panics");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_dropping_a_stream_s_state_is_in_its_final_reply_and_the_worker_goes_on() {
    doomed_stream_fails_alone(PanicOnDrop, "drop-panics", "cannot let go", "Drop").await;
}

#[derive(Default)]
struct Plain {
    events: u64,
    doomed: bool,
}

counting_plugin!(PanicInFinal, Plain, "final-panics", on_final: |ctx: &EventCtx| {
    if ctx.stream_id == DOOMED {
        panic!("final straw");
    }
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_final_hook_fails_that_stream_and_the_worker_goes_on() {
    doomed_stream_fails_alone(PanicInFinal, "final-panics", "final straw", "on_final").await;
}

/// `Shutdown` overtakes the events the front had queued: a stream's final that arrives after it
/// is still run and answered within the grace, and the host then exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_that_follows_shutdown_is_still_answered() {
    // Stream 7 is not the doomed one: this plugin runs it like any other.
    let mut front = serve_in_process(PanicInFinal, 1).await;
    front.welcome(Value::Null).await;
    let [start, chunk, last] = events(7);
    front.feed(start);
    front.feed(chunk);
    front.flush().await;
    front
        .send_now(ToPlugin::Shutdown(Shutdown { grace_ms: 2000 }))
        .await;
    front.send_now(last).await;
    let reply = loop {
        match front.recv().await {
            FromPlugin::FinalReply(r) => break r,
            _ => continue,
        }
    };
    assert_eq!(reply.stream_id, 7);
    assert_eq!(
        reply.outcome,
        FinalOutcome::Metadata(counted("final-panics", 3))
    );
    assert_eq!(front.host_exit().await, Exit::Clean);
}

/// A chunk as large as the front may send (its `max_message_bytes` goes up to 64 MiB − 64 KiB)
/// is one frame the host takes: 20 MiB, over the 16 MiB it used to refuse, ending the
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_frame_past_16_mib_is_taken() {
    let mut front = serve_in_process(PanicInFinal, 1).await;
    front.welcome(Value::Null).await;
    let [start, chunk, last] = events(7);
    let ToPlugin::Chunk(mut chunk) = chunk else {
        panic!("the second event is a chunk")
    };
    chunk.bytes = Bytes::from(vec![b'x'; 20 * 1024 * 1024]);
    chunk.len = chunk.bytes.len() as u32;
    front.feed(start);
    front.feed(ToPlugin::Chunk(chunk));
    front.feed(last);
    front.flush().await;
    let reply = loop {
        match front.recv().await {
            FromPlugin::FinalReply(r) => break r,
            _ => continue,
        }
    };
    assert_eq!(
        reply.outcome,
        FinalOutcome::Metadata(counted("final-panics", 3))
    );
}
