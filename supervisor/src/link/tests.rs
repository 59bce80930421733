use std::collections::BTreeMap;

use bytes::Bytes;
use ipc_protocol::{Chunk, FinalOutcome, Value};
use tokio::net::UnixStream;

use super::*;
use crate::config::Dispatch;

fn plugin(queue_events: usize, queue_bytes: usize, final_ms: u64) -> PluginConfig {
    PluginConfig {
        name: "p".into(),
        spawn: false,
        command: None,
        args: None,
        env: BTreeMap::new(),
        dispatch: Dispatch::Async,
        final_timeout: Duration::from_millis(final_ms),
        inline_timeout: Duration::from_millis(100),
        queue_events,
        queue_bytes,
        uid: None,
        group: None,
        required: false,
        config: Value::Null,
        restart: crate::restart::Policy::default(),
        start_timeout: Duration::from_secs(10),
        hang_timeout: Duration::from_secs(5),
        cpu_scheduling: crate::config::CpuScheduling::Normal,
        metadata_max_bytes: crate::config::DEFAULT_PLUGIN_METADATA_BYTES,
        budget_bytes: crate::config::DEFAULT_BUDGET_BYTES,
    }
}

/// A link attached to one end of a socket pair; the other end is the "plugin".
fn linked(config: PluginConfig) -> (Arc<PluginLink>, Arc<Metrics>, UnixStream) {
    let metrics = Arc::new(Metrics::new());
    let link = Arc::new(PluginLink::new(config, metrics.clone()));
    let (front, plugin) = UnixStream::pair().unwrap();
    let (r, w) = front.into_split();
    link.attach(
        1,
        Subscriptions::ALL,
        FrameReader::new(r),
        FrameWriter::new(w),
    )
    .unwrap();
    (link, metrics, plugin)
}

fn chunk(seq: u32, bytes: usize) -> ToPlugin {
    ToPlugin::Chunk(Chunk {
        stream_id: 1,
        seq,
        stamp_ns: 0,
        len: bytes as u32,
        bytes: Bytes::from(vec![b'x'; bytes]),
        end_of_stream: false,
        ack: false,
    })
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_waiting() {
    // The plugin never reads: the socket buffer fills, then the 4-event queue.
    let (link, metrics, _plugin) = linked(plugin(4, 1 << 30, 100));
    let conn = link.connection().unwrap();
    let started = Instant::now();
    let mut delivered = 0;
    for seq in 0..200 {
        if link.send_event(Some(&conn), chunk(seq, 64 * 1024)) {
            delivered += 1;
        }
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(delivered < 200, "nothing dropped");
    let text = metrics.encode();
    assert!(
        text.contains("plugvisor_plugin_events_dropped_total{plugin=\"p\",reason=\"queue_full\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn the_byte_bound_drops_before_the_event_bound() {
    let (link, _metrics, _plugin) = linked(plugin(1000, 100_000, 100));
    let conn = link.connection().unwrap();
    // Fill the socket buffer first so the queue itself holds bytes.
    let mut drops = 0;
    for seq in 0..400 {
        if !link.send_event(Some(&conn), chunk(seq, 50_000)) {
            drops += 1;
        }
    }
    assert!(drops > 0);
    assert!(conn.queued_bytes.load(Ordering::Relaxed) <= 100_000 + 50_000);
}

#[tokio::test]
async fn a_final_without_answer_times_out_and_a_late_reply_is_ignored() {
    let (link, _metrics, plugin) = linked(plugin(16, 1 << 20, 50));
    let (r, w) = plugin.into_split();
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    let conn = link.connection();
    let msg = ToPlugin::Final(ipc_protocol::Final {
        stream_id: 1,
        seq: 0,
        stamp_ns: 0,
        call_id: 9,
        len: 0,
        bytes: Bytes::new(),
        trailers: vec![],
    });
    let result = link.final_call(conn.clone(), 9, msg, Instant::now()).await;
    assert_eq!(result.unwrap_err(), Missing::Timeout);
    // The plugin answers late: nothing breaks, the connection stays.
    let _ = reader.read::<ToPlugin>().await.unwrap();
    writer
        .send(&FromPlugin::FinalReply(FinalReply {
            call_id: 9,
            stream_id: 1,
            outcome: FinalOutcome::Metadata(Metadata::new()),
        }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(link.is_connected());
}

#[tokio::test]
async fn a_final_is_answered_through_the_reader_and_a_close_means_down() {
    let (link, _metrics, plugin) = linked(plugin(16, 1 << 20, 1000));
    let (r, w) = plugin.into_split();
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    let answer = tokio::spawn(async move {
        let Some(ToPlugin::Final(f)) = reader.read::<ToPlugin>().await.unwrap() else {
            panic!("expected Final")
        };
        let md = Metadata::from([("ns".to_owned(), Value::map([("k", Value::Int(1))]))]);
        writer
            .send(&FromPlugin::FinalReply(FinalReply {
                call_id: f.call_id,
                stream_id: f.stream_id,
                outcome: FinalOutcome::Metadata(md),
            }))
            .await
            .unwrap();
        (reader, writer)
    });
    let final_msg = |call_id| {
        ToPlugin::Final(ipc_protocol::Final {
            stream_id: 1,
            seq: 0,
            stamp_ns: 0,
            call_id,
            len: 0,
            bytes: Bytes::new(),
            trailers: vec![],
        })
    };
    let md = link
        .final_call(link.connection(), 1, final_msg(1), Instant::now())
        .await
        .unwrap();
    assert_eq!(md["ns"].get("k"), Some(&Value::Int(1)));
    let (reader, writer) = answer.await.unwrap();
    drop((reader, writer));
    let started = Instant::now();
    let result = link
        .final_call(link.connection(), 2, final_msg(2), Instant::now())
        .await;
    assert_eq!(result.unwrap_err(), Missing::Down);
    assert!(started.elapsed() < Duration::from_millis(900));
    assert!(!link.is_connected());
}
