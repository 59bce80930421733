use std::collections::BTreeMap;

use bytes::Bytes;
use ipc_protocol::{Chunk, Credit, FinalOutcome, Value};
use tokio::net::UnixStream;

use super::*;
use crate::config::Dispatch;

fn plugin(queue_events: usize, queue_bytes: usize, final_ms: u64) -> PluginConfig {
    PluginConfig {
        name: "p".into(),
        process: crate::config::ProcessConfig {
            spawn: false,
            command: None,
            args: None,
            env: BTreeMap::new(),
            uid: None,
            group: None,
            config: Value::Null,
            cpu_scheduling: crate::config::CpuScheduling::Normal,
            metadata_max_bytes: crate::config::DEFAULT_PLUGIN_METADATA_BYTES,
            budget_bytes: crate::config::DEFAULT_BUDGET_BYTES,
        },
        dispatch: Dispatch::Async,
        final_timeout: Duration::from_millis(final_ms),
        inline_timeout: Duration::from_millis(100),
        queue_events,
        queue_bytes,
        required: false,
        restart: crate::plugin::restart::Policy::default(),
        start_timeout: Duration::from_secs(10),
        hang_timeout: Duration::from_secs(5),
        replay_bytes: crate::config::DEFAULT_REPLAY_BYTES,
        drain_grace: Duration::from_secs(30),
        batch: Duration::ZERO,
        stuck_timeout: Duration::from_secs(10),
        namespaces: Vec::new(),
        granted: vec!["plugvisor.p".into()],
    }
}

/// A link attached to one end of a socket pair; the other end is the "plugin".
fn linked(config: PluginConfig) -> (Arc<PluginLink>, Arc<Metrics>, UnixStream) {
    linked_with(config, &["replayed"])
}

/// [`linked`], the plugin announcing `capabilities`.
fn linked_with(
    config: PluginConfig,
    capabilities: &[&str],
) -> (Arc<PluginLink>, Arc<Metrics>, UnixStream) {
    let metrics = Arc::new(Metrics::new());
    let link = Arc::new(PluginLink::new(config, metrics.clone()));
    let plugin = attach_pair(&link, capabilities);
    (link, metrics, plugin)
}

/// Attaches a new connection with `capabilities` to `link`; returns the plugin's end.
fn attach_pair(link: &Arc<PluginLink>, capabilities: &[&str]) -> UnixStream {
    let (front, plugin) = UnixStream::pair().unwrap();
    let (r, w) = crate::quiet_socket::split(front).unwrap();
    let welcome = ipc_protocol::handshake::answer_hello(
        &ipc_protocol::Hello {
            protocol_version: ipc_protocol::PROTOCOL_VERSION,
            plugin: link.name().to_owned(),
            pid: 1,
            subscriptions: Subscriptions::ALL,
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        },
        Value::Map(Default::default()),
        // As the front's handshake does: the plugin's window is its configured budget.
        ipc_protocol::Limits {
            budget_bytes: link.config().process.budget_bytes as u64,
            metadata_max_bytes: 1 << 14,
        },
    )
    .unwrap();
    link.attach(
        1,
        Subscriptions::ALL,
        &welcome,
        FrameReader::new(r),
        FrameWriter::new(w),
    )
    .unwrap();
    plugin
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

fn with_budget(mut config: PluginConfig, budget_bytes: usize) -> PluginConfig {
    config.process.budget_bytes = budget_bytes;
    config
}

/// The counted length of `msg`'s frame.
fn frame_len(msg: &ToPlugin) -> u64 {
    (ipc_protocol::codec::encoded_len(msg).unwrap() + ipc_protocol::frame::PREFIX_LEN) as u64
}

async fn next_frame(reader: &mut FrameReader<tokio::net::unix::OwnedReadHalf>) -> ToPlugin {
    tokio::time::timeout(Duration::from_secs(10), reader.read::<ToPlugin>())
        .await
        .expect("a frame within 10 s")
        .unwrap()
        .expect("connection open")
}

#[test]
fn the_window_admits_events_up_to_the_budget_and_always_one_when_empty() {
    // (in flight, frame length, budget, allowed)
    let table = [
        (0, 10, 100, true),
        (90, 10, 100, true),
        (91, 10, 100, false),
        (100, 1, 100, false),
        // Nothing in flight: one event larger than the window still goes.
        (0, 1_000, 100, true),
        (1, 1_000, 100, false),
        (u64::MAX - 1, 10, u64::MAX - 5, false),
    ];
    for (in_flight, len, budget, allowed) in table {
        assert_eq!(
            window_allows(in_flight, len, budget),
            allowed,
            "in flight {in_flight}, frame {len}, budget {budget}"
        );
    }
}

#[tokio::test]
async fn events_beyond_the_window_are_not_written_until_credit_arrives() {
    let one = frame_len(&chunk(0, 1000));
    // Room for exactly three events.
    let (link, metrics, plugin) = linked(with_budget(plugin(64, 1 << 20, 100), 3 * one as usize));
    let conn = link.connection().unwrap();
    let (r, w) = plugin.into_split();
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    for seq in 0..10 {
        assert!(link.send_event(Some(&conn), chunk(seq, 1000)));
    }
    for seq in 0..3 {
        assert_eq!(next_frame(&mut reader).await.stream_seq(), Some((1, seq)));
    }
    assert_eq!(conn.in_flight(), 3 * one);
    // The window is full: nothing more arrives, the rest waits in the front's queue.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), reader.read::<ToPlugin>())
            .await
            .is_err(),
        "an event beyond the window was written"
    );
    let text = metrics.encode();
    assert!(
        text.contains(&format!(
            "plugvisor_plugin_inflight_bytes{{plugin=\"p\"}} {}",
            3 * one
        )),
        "{text}"
    );
    // Credit for two events lets exactly two more through.
    writer
        .send(&FromPlugin::Credit(Credit { consumed: 2 * one }))
        .await
        .unwrap();
    for seq in 3..5 {
        assert_eq!(next_frame(&mut reader).await.stream_seq(), Some((1, seq)));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), reader.read::<ToPlugin>())
            .await
            .is_err(),
        "credit for two events let more than two through"
    );
    // Everything credited: the rest follows.
    writer
        .send(&FromPlugin::Credit(Credit { consumed: 5 * one }))
        .await
        .unwrap();
    for seq in 5..8 {
        assert_eq!(next_frame(&mut reader).await.stream_seq(), Some((1, seq)));
    }
    assert_eq!(conn.in_flight(), 3 * one);
    assert!(link.is_connected());
}

#[tokio::test]
async fn one_event_larger_than_the_window_goes_when_nothing_is_in_flight() {
    let (link, _metrics, plugin) = linked(with_budget(plugin(16, 1 << 20, 100), 1000));
    let conn = link.connection().unwrap();
    let (r, w) = plugin.into_split();
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    let big = frame_len(&chunk(0, 5000));
    assert!(link.send_event(Some(&conn), chunk(0, 5000)));
    assert!(link.send_event(Some(&conn), chunk(1, 5000)));
    assert_eq!(next_frame(&mut reader).await.stream_seq(), Some((1, 0)));
    writer
        .send(&FromPlugin::Credit(Credit { consumed: big }))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut reader).await.stream_seq(), Some((1, 1)));
}

#[tokio::test]
async fn a_ping_is_written_while_the_window_is_exhausted_and_the_queue_is_full() {
    let one = frame_len(&chunk(0, 1000));
    let (link, metrics, plugin) = linked(with_budget(plugin(4, 1 << 20, 100), 2 * one as usize));
    let conn = link.connection().unwrap();
    let (r, _w) = plugin.into_split();
    let mut reader = FrameReader::new(r);
    let mut dropped = 0;
    for seq in 0..50 {
        if !link.send_event(Some(&conn), chunk(seq, 1000)) {
            dropped += 1;
        }
    }
    // Two in the window, one held by the writer, the queue full again: the next is dropped.
    assert_eq!(next_frame(&mut reader).await.stream_seq(), Some((1, 0)));
    assert_eq!(next_frame(&mut reader).await.stream_seq(), Some((1, 1)));
    let mut refilled = 0;
    while link.send_event(Some(&conn), chunk(100 + refilled, 1000)) {
        refilled += 1;
        assert!(refilled <= 4, "the queue holds at most 4 events");
    }
    assert!(dropped > 0);
    link.ping(77);
    match next_frame(&mut reader).await {
        ToPlugin::Ping(p) => assert_eq!(p.nonce, 77),
        other => panic!(
            "expected the ping ahead of queued events, got {}",
            other.kind()
        ),
    }
    link.send_shutdown(Duration::from_millis(5));
    assert!(matches!(
        next_frame(&mut reader).await,
        ToPlugin::Shutdown(_)
    ));
    let text = metrics.encode();
    assert!(
        text.contains("plugvisor_plugin_events_dropped_total{plugin=\"p\",reason=\"queue_full\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn credit_for_bytes_never_sent_is_a_protocol_error() {
    let (link, _metrics, plugin) = linked(plugin(16, 1 << 20, 100));
    let conn = link.connection().unwrap();
    let (r, w) = plugin.into_split();
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    assert!(link.send_event(Some(&conn), chunk(0, 10)));
    let one = frame_len(&chunk(0, 10));
    let _ = next_frame(&mut reader).await;
    writer
        .send(&FromPlugin::Credit(Credit { consumed: one + 1 }))
        .await
        .unwrap();
    let mut connected = link.subscribe_connected();
    tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| !*c))
        .await
        .expect("disconnected")
        .unwrap();
}

#[tokio::test]
async fn a_replay_goes_out_ahead_of_live_events_and_leaves_the_queue_bytes_alone() {
    // queue_bytes of 10 KB, and a replay of three 8 KB chunks: had the replay counted against the
    // queue, the live chunk after it would be dropped.
    let (link, _metrics, plugin) = linked(plugin(16, 10_000, 1000));
    let conn = link.connection().unwrap();
    link.replay(
        &conn,
        (0..3).map(|seq| ToPlugin::Replayed(Box::new(chunk(seq, 8_000)))),
    );
    assert!(link.send_event(Some(&conn), chunk(3, 8_000)));
    let (r, _w) = plugin.into_split();
    let mut reader = FrameReader::new(r);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        match reader.read::<ToPlugin>().await.unwrap() {
            Some(ToPlugin::Replayed(inner)) => {
                seen.push(("replayed", inner.stream_seq().unwrap().1))
            }
            Some(ToPlugin::Chunk(c)) => seen.push(("live", c.seq)),
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    assert_eq!(
        seen,
        vec![
            ("replayed", 0),
            ("replayed", 1),
            ("replayed", 2),
            ("live", 3)
        ]
    );
}

/// What the plugin's end reads next, within a second: a message, or `None` at end-of-file.
async fn read_or_eof(reader: &mut FrameReader<UnixStream>) -> Option<ToPlugin> {
    tokio::time::timeout(Duration::from_secs(1), reader.read::<ToPlugin>())
        .await
        .expect("a frame or end-of-file within a second")
        .expect("a well-formed frame")
}

#[tokio::test]
async fn a_reload_hands_over_by_reconnect_and_closes_the_old_connection_without_shutdown() {
    let metrics = Arc::new(Metrics::new());
    let link = Arc::new(PluginLink::new(plugin(100, 1 << 20, 100), metrics));
    let mut old = FrameReader::new(attach_pair(&link, &["replayed", "reconnect"]));
    let first = link.connection().unwrap();
    assert!(link.reconnects());
    link.bind(&first);

    let streams = link.hand_over_by_reconnect(
        Duration::from_secs(30),
        Duration::from_secs(5),
        "config changed",
    );
    assert_eq!(streams, Some(1));
    match read_or_eof(&mut old).await {
        Some(ToPlugin::Reconnect(r)) => assert_eq!(r.reason, "config changed"),
        other => panic!("expected Reconnect, got {other:?}"),
    }
    // New streams wait for the next connection rather than report the plugin missing.
    assert_eq!(link.expected(), Expected::Coming { at: None });
    assert!(!link.is_connected());

    let _new = attach_pair(&link, &["replayed", "reconnect"]);
    assert!(link.is_connected());
    assert_eq!(link.draining(), 1);
    // Its last stream ends: the old connection is closed, with no Shutdown, which would end
    // the process that now serves the new one.
    link.unbind(&first);
    assert_eq!(read_or_eof(&mut old).await, None);
    assert!(first.is_closed());
    assert_eq!(link.draining(), 0);
    assert!(link.is_connected(), "the new connection stays");
}

#[tokio::test]
async fn a_plugin_without_the_capability_is_not_asked_and_one_that_never_reconnects_is_given_up() {
    let metrics = Arc::new(Metrics::new());
    let link = Arc::new(PluginLink::new(plugin(100, 1 << 20, 100), metrics));
    let _old = attach_pair(&link, &["replayed"]);
    assert!(!link.reconnects());
    assert_eq!(
        link.hand_over_by_reconnect(Duration::from_secs(30), Duration::from_secs(5), "x"),
        None
    );
    assert!(!link.ask_reconnect("x"));
    assert!(link.is_connected(), "nothing changed");
    link.disconnect("test");

    let _old = attach_pair(&link, &["replayed", "reconnect"]);
    let wait = Duration::from_millis(50);
    assert_eq!(
        link.hand_over_by_reconnect(Duration::from_secs(30), wait, "x"),
        Some(0)
    );
    let deadline = link.next_drain_deadline().expect("the wait is a deadline");
    assert!(deadline <= tokio::time::Instant::now() + wait);
    tokio::time::sleep_until(deadline).await;
    link.expire_drains();
    // Finals stop waiting for a connection that is not coming.
    assert_eq!(link.expected(), Expected::NotComing(Missing::NotConnected));
}

#[tokio::test]
async fn a_stop_closes_a_connection_asked_over_to_another_front_without_shutdown() {
    let metrics = Arc::new(Metrics::new());
    let link = Arc::new(PluginLink::new(plugin(100, 1 << 20, 100), metrics));
    let mut moved = FrameReader::new(attach_pair(&link, &["replayed", "reconnect"]));
    assert!(link.ask_reconnect("front upgrade to pid 7"));
    assert!(matches!(
        read_or_eof(&mut moved).await,
        Some(ToPlugin::Reconnect(_))
    ));
    // Still live: the old front keeps serving on it until it stops.
    assert!(link.is_connected());
    assert!(
        link.shut_down_all(Duration::from_millis(100)).await,
        "nothing to wait for"
    );
    link.close_all("stopped", Duration::from_secs(1)).await;
    assert_eq!(read_or_eof(&mut moved).await, None, "closed, no Shutdown");

    // A failed upgrade takes the request back: Shutdown reaches it again.
    let mut kept = FrameReader::new(attach_pair(&link, &["replayed", "reconnect"]));
    assert!(link.ask_reconnect("front upgrade to pid 8"));
    assert!(matches!(
        read_or_eof(&mut kept).await,
        Some(ToPlugin::Reconnect(_))
    ));
    link.cancel_reconnect();
    let _ = link.shut_down_all(Duration::from_millis(100)).await;
    assert!(matches!(
        read_or_eof(&mut kept).await,
        Some(ToPlugin::Shutdown(_))
    ));
}

#[tokio::test]
async fn a_full_window_pings_a_plugin_on_credit_on_ping_and_again_when_credit_leaves_no_room() {
    let one = frame_len(&chunk(0, 1000));
    let (link, _metrics, peer) = linked_with(
        with_budget(plugin(64, 1 << 20, 100), 3 * one as usize),
        &["replayed", "credit_on_ping"],
    );
    let conn = link.connection().unwrap();
    let (r, w) = peer.into_split();
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    for seq in 0..6 {
        assert!(link.send_event(Some(&conn), chunk(seq, 1000)));
    }
    for seq in 0..3 {
        assert_eq!(next_frame(&mut reader).await.stream_seq(), Some((1, seq)));
    }
    // The window is full: the front asks for the credit the plugin may be holding back.
    assert_eq!(next_frame(&mut reader).await, CREDIT_PING);
    // Credit for one event: room for one more, and a ping, since the next is still waiting.
    writer
        .send(&FromPlugin::Credit(Credit { consumed: one }))
        .await
        .unwrap();
    let mut got = vec![next_frame(&mut reader).await, next_frame(&mut reader).await];
    got.sort_by_key(|m| m.kind());
    assert_eq!(got[0].stream_seq(), Some((1, 3)), "{got:?}");
    assert_eq!(got[1], CREDIT_PING, "{got:?}");

    // A plugin without the capability reports when idle: no ping for it.
    let (link, _metrics, peer) = linked(with_budget(plugin(64, 1 << 20, 100), 3 * one as usize));
    let conn = link.connection().unwrap();
    let mut reader = FrameReader::new(peer);
    for seq in 0..6 {
        assert!(link.send_event(Some(&conn), chunk(seq, 1000)));
    }
    for seq in 0..3 {
        assert_eq!(
            next_frame_of(&mut reader).await.stream_seq(),
            Some((1, seq))
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), reader.read::<ToPlugin>())
            .await
            .is_err(),
        "pinged a plugin that did not agree on credit_on_ping"
    );
}

async fn next_frame_of(reader: &mut FrameReader<UnixStream>) -> ToPlugin {
    read_or_eof(reader).await.expect("connection open")
}

fn spans(stream_id: u64, n: usize, attribute: &str) -> FromPlugin {
    FromPlugin::Spans(Spans {
        stream_id,
        attributes: vec![("plugin.note".into(), Value::String(attribute.into()))],
        spans: (0..n)
            .map(|i| ipc_protocol::PluginSpan {
                name: format!("step {i}"),
                start_ns: 1,
                end_ns: 2,
                attributes: Vec::new(),
            })
            .collect(),
    })
}

fn final_of(stream_id: u64, call_id: u64) -> ToPlugin {
    ToPlugin::Final(ipc_protocol::Final {
        stream_id,
        seq: 0,
        stamp_ns: 0,
        call_id,
        len: 0,
        bytes: Bytes::new(),
        trailers: vec![],
    })
}

#[tokio::test]
async fn spans_before_the_reply_come_with_it_and_those_past_the_limits_are_dropped_and_counted() {
    let mut config = plugin(16, 1 << 20, 2000);
    config.process.metadata_max_bytes = 4096;
    let (link, metrics, plugin) = linked_with(config, &["replayed", "trace"]);
    assert!(link.connection().unwrap().traces());
    let (r, w) = plugin.into_split();
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    let answer = tokio::spawn(async move {
        for traced in [true, false] {
            let Some(ToPlugin::Final(f)) = reader.read::<ToPlugin>().await.unwrap() else {
                panic!("expected Final")
            };
            let mut sent = vec![
                spans(f.stream_id + 1, 1, "no final for this stream"),
                spans(f.stream_id, 1, &"x".repeat(5000)),
                spans(f.stream_id, 65, "too many spans"),
                spans(f.stream_id, 64, "kept"),
                spans(f.stream_id, 1, "a second one"),
            ];
            if !traced {
                sent.remove(0);
            }
            for m in sent {
                writer.send(&m).await.unwrap();
            }
            writer
                .send(&FromPlugin::FinalReply(FinalReply {
                    call_id: f.call_id,
                    stream_id: f.stream_id,
                    outcome: FinalOutcome::Metadata(Metadata::new()),
                }))
                .await
                .unwrap();
        }
        (reader, writer)
    });
    let (result, got) = link
        .traced_final_call(link.connection(), 1, final_of(5, 1), Instant::now(), true)
        .await;
    assert!(result.is_ok());
    let got = got.expect("the plugin's spans");
    assert_eq!(got.spans.len(), 64);
    assert_eq!(got.attributes[0].1, Value::String("kept".into()));
    let text = metrics.encode();
    for reason in ["no_final", "too_large", "too_many", "duplicate"] {
        let series =
            format!("plugvisor_plugin_spans_dropped_total{{plugin=\"p\",reason=\"{reason}\"}} 1");
        assert!(text.contains(&series), "{series}\n{text}");
    }
    // An untraced stream: its plugin's spans are dropped, not counted, not returned.
    let (result, got) = link
        .traced_final_call(link.connection(), 2, final_of(6, 2), Instant::now(), false)
        .await;
    assert!(result.is_ok() && got.is_none());
    let dropped = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("plugvisor_plugin_spans_dropped_total"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(dropped(&metrics.encode()), dropped(&text));
    let _ = answer.await.unwrap();
    assert!(link.is_connected());
}

#[tokio::test]
async fn spans_from_a_plugin_without_the_capability_trace_end_its_connection() {
    let (link, _metrics, plugin) = linked(plugin(16, 1 << 20, 2000));
    assert!(!link.connection().unwrap().traces());
    let (_r, w) = plugin.into_split();
    let mut writer = FrameWriter::new(w);
    writer.send(&spans(1, 1, "unasked")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while link.is_connected() {
        assert!(Instant::now() < deadline, "still connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn events_wait_for_the_batch_but_a_final_or_an_inline_chunk_takes_them_at_once() {
    let mut config = plugin(64, 1 << 20, 100);
    config.batch = Duration::from_millis(300);
    let (link, _metrics, peer) = linked(config);
    let conn = link.connection().unwrap();
    let mut reader = FrameReader::new(peer);
    // Chunks alone wait for the batch: nothing within 100 ms, both once it is over.
    let sent = tokio::time::Instant::now();
    assert!(link.send_event(Some(&conn), chunk(0, 10)));
    assert!(link.send_event(Some(&conn), chunk(1, 10)));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), reader.read::<ToPlugin>())
            .await
            .is_err(),
        "a chunk went out before its batch was over"
    );
    assert_eq!(next_frame_of(&mut reader).await.stream_seq(), Some((1, 0)));
    assert_eq!(next_frame_of(&mut reader).await.stream_seq(), Some((1, 1)));
    assert!(
        sent.elapsed() >= Duration::from_millis(250),
        "{:?}",
        sent.elapsed()
    );
    // A final call goes at once, and the chunk queued before it with it, in order.
    assert!(link.send_event(Some(&conn), chunk(2, 10)));
    assert!(link.send_event(Some(&conn), final_of(1, 7)));
    let at_once = Duration::from_millis(150);
    let first = tokio::time::timeout(at_once, reader.read::<ToPlugin>()).await;
    assert_eq!(first.unwrap().unwrap().unwrap().stream_seq(), Some((1, 2)));
    let second = tokio::time::timeout(at_once, reader.read::<ToPlugin>()).await;
    assert!(second.unwrap().unwrap().unwrap().final_call().is_some());
    // So does an inline chunk, whose stream waits for the acknowledgement.
    let mut inline = chunk(3, 10);
    if let ToPlugin::Chunk(c) = &mut inline {
        c.ack = true;
    }
    assert!(link.send_event(Some(&conn), inline));
    let got = tokio::time::timeout(at_once, reader.read::<ToPlugin>()).await;
    assert_eq!(got.unwrap().unwrap().unwrap().stream_seq(), Some((1, 3)));
}

fn chunk_of(stream_id: u64, seq: u32) -> ToPlugin {
    let mut c = chunk(seq, 10);
    if let ToPlugin::Chunk(c) = &mut c {
        c.stream_id = stream_id;
    }
    c
}

/// [`final_of`] at sequence number `seq` of its stream.
fn final_at(stream_id: u64, seq: u32, call_id: u64) -> ToPlugin {
    let mut end = final_of(stream_id, call_id);
    if let ToPlugin::Final(f) = &mut end {
        f.seq = seq;
    }
    end
}

#[tokio::test]
async fn a_final_takes_its_stream_ahead_of_other_streams_held_chunks() {
    let mut config = plugin(64, 1 << 20, 100);
    config.batch = Duration::from_millis(300);
    let (link, _metrics, peer) = linked(config);
    let conn = link.connection().unwrap();
    let mut reader = FrameReader::new(peer);
    // Held for the batch: stream 2's chunks, then stream 1's, interleaved; then stream 1 ends.
    for seq in 0..3 {
        assert!(link.send_event(Some(&conn), chunk_of(2, seq)));
        assert!(link.send_event(Some(&conn), chunk_of(1, seq)));
    }
    assert!(link.send_event(Some(&conn), final_at(1, 3, 7)));
    let mut order = Vec::new();
    for _ in 0..7 {
        let msg = tokio::time::timeout(Duration::from_millis(150), reader.read::<ToPlugin>())
            .await
            .expect("the final did not wait for the batch")
            .unwrap()
            .unwrap();
        order.push(msg.stream_seq().unwrap());
    }
    // Stream 1 whole and in order, its final last; then stream 2, in order.
    assert_eq!(
        order,
        [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2)]
    );
}

#[test]
fn waiting_streams_first_keeps_each_stream_s_order_and_moves_nothing_without_an_urgent_event() {
    let queued = |msg: ToPlugin| Queued {
        msg,
        bytes: 0,
        replayed: false,
        journaled: false,
    };
    let order = |staged: &VecDeque<Queued>| -> Vec<(u64, u32)> {
        staged.iter().map(|q| q.msg.stream_seq().unwrap()).collect()
    };
    let mut staged: VecDeque<Queued> = [chunk_of(2, 0), chunk_of(1, 0), chunk_of(2, 1)]
        .into_iter()
        .map(queued)
        .collect();
    waiting_streams_first(&mut staged);
    assert_eq!(order(&staged), [(2, 0), (1, 0), (2, 1)]);
    // An inline chunk of stream 3 and a final of stream 1 wait for answers: both streams first.
    let mut inline = chunk_of(3, 0);
    if let ToPlugin::Chunk(c) = &mut inline {
        c.ack = true;
    }
    staged.extend([
        queued(inline),
        queued(final_at(1, 1, 9)),
        queued(chunk_of(2, 2)),
    ]);
    waiting_streams_first(&mut staged);
    assert_eq!(
        order(&staged),
        [(1, 0), (3, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    );
}

/// Everything `buf` holds as frames, decoded.
fn frames_in(buf: &[u8]) -> Vec<ToPlugin> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= buf.len() {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        out.push(
            ipc_protocol::codec::decode_frame(&Bytes::copy_from_slice(&buf[at + 4..at + 4 + len]))
                .unwrap(),
        );
        at += 4 + len;
    }
    assert_eq!(at, buf.len(), "a partial frame");
    out
}

/// A final call (or an inline chunk) is written by the task that queues it, before that task
/// yields, with the batch the writer held before it: on this single-threaded runtime the writer
/// task cannot have run in between, so the bytes on the socket are the caller's own write.
#[tokio::test]
async fn a_final_is_on_the_socket_before_its_sender_yields_with_the_held_batch_ahead() {
    let mut config = plugin(64, 1 << 20, 100);
    config.batch = Duration::from_secs(60);
    let (link, _metrics, peer) = linked(config);
    let conn = link.connection().unwrap();
    // Read with plain syscalls: a tokio socket would answer from readiness its reactor has not
    // polled yet, and this test never yields to it after the send.
    let peer = peer.into_std().unwrap();
    let read_now = |buf: &mut [u8]| std::io::Read::read(&mut &peer, buf);
    assert!(link.send_event(Some(&conn), chunk(0, 10)));
    // The writer takes the first chunk and starts a batch (it holds it for a minute)...
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...and the rest of the batch waits in the queue.
    assert!(link.send_event(Some(&conn), chunk(1, 10)));
    assert!(link.send_event(Some(&conn), chunk(2, 10)));
    let mut buf = vec![0u8; 64 * 1024];
    assert!(
        matches!(read_now(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the batch went out early"
    );
    assert!(link.send_event(Some(&conn), final_at(1, 3, 9)));
    // No await since the send: only the sender can have written this.
    let n = read_now(&mut buf).expect("the final and its batch are on the socket");
    let got = frames_in(&buf[..n]);
    let seqs: Vec<_> = got.iter().map(|m| m.stream_seq()).collect();
    assert_eq!(
        seqs,
        [Some((1, 0)), Some((1, 1)), Some((1, 2)), Some((1, 3))],
        "{got:?}"
    );
    assert!(got[3].final_call().is_some());
    assert_eq!(conn.queued_events(), 0);
    assert_eq!(conn.in_flight(), got.iter().map(frame_len).sum::<u64>());
}

/// Two links on one batch clock: neither batch goes before it is due, both go when it is, and
/// once no batch is held the clock holds nothing (its task has ended).
#[tokio::test]
async fn one_clock_sends_two_links_batches_when_due_and_holds_nothing_after() {
    let clock = BatchClock::new();
    let mut config = plugin(64, 1 << 20, 100);
    config.batch = Duration::from_millis(300);
    let metrics = Arc::new(Metrics::new());
    let mut peers = Vec::new();
    let mut links = Vec::new();
    for _ in 0..2 {
        let link = Arc::new(PluginLink::with_clock(
            config.clone(),
            metrics.clone(),
            clock.clone(),
        ));
        peers.push(FrameReader::new(attach_pair(&link, &["replayed"])));
        links.push(link);
    }
    let sent = tokio::time::Instant::now();
    for link in &links {
        let conn = link.connection().unwrap();
        assert!(link.send_event(Some(&conn), chunk(0, 10)));
        assert!(link.send_event(Some(&conn), chunk(1, 10)));
    }
    for reader in &mut peers {
        assert!(
            tokio::time::timeout(Duration::from_millis(100), reader.read::<ToPlugin>())
                .await
                .is_err(),
            "a chunk went out before its batch was due"
        );
    }
    for (i, reader) in peers.iter_mut().enumerate() {
        eprintln!("reading {i} at {:?} held {}", sent.elapsed(), clock.held());
        assert_eq!(next_frame_of(reader).await.stream_seq(), Some((1, 0)));
        assert_eq!(next_frame_of(reader).await.stream_seq(), Some((1, 1)));
    }
    assert!(
        sent.elapsed() >= Duration::from_millis(250),
        "{:?}",
        sent.elapsed()
    );
    // The beat after the batch finds nothing new: the batch ends, and the clock holds nothing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while clock.held() > 0 {
        assert!(Instant::now() < deadline, "the clock still holds a batch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new event starts a batch again.
    let conn = links[0].connection().unwrap();
    assert!(links[0].send_event(Some(&conn), chunk(2, 10)));
    assert_eq!(
        next_frame_of(&mut peers[0]).await.stream_seq(),
        Some((1, 2))
    );
}
