//! Pins the byte layout that docs/protocol.md documents, so the document cannot drift from the
//! code: if one of these fails, the wire format changed and the doc (and PROTOCOL_VERSION) must too.

use bytes::Bytes;
use ipc_protocol::*;

fn frame(msg: &impl serde::Serialize) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    w.feed(msg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(w.flush()).unwrap();
    w.get_ref().clone()
}

#[test]
fn hello_bytes_match_the_documented_dump() {
    let hello = FromPlugin::Hello(Hello {
        protocol_version: 3,
        plugin: "usage".into(),
        pid: 4242,
        subscriptions: Subscriptions::ALL,
        capabilities: vec!["replayed".into()],
    });
    let mut expected: Vec<u8> = vec![
        0x1a, 0x00, 0x00, 0x00, // frame length 26, u32 little endian
        0x00, // FromPlugin variant 0 = Hello
        0x03, // protocol_version 3
        0x05, b'u', b's', b'a', b'g', b'e', // plugin: length 5, "usage"
        0xfb, 0x92, 0x10, // pid 4242: 251 marker, then u16 LE 0x1092
        0x01, 0x01, 0x01, 0x01, 0x01, // subscriptions, five bools
        0x01, 0x08, // capabilities: 1 entry, its length 8
    ];
    expected.extend_from_slice(b"replayed");
    assert_eq!(frame(&hello), expected);
}

#[test]
fn a_version_2_hello_ends_after_its_subscriptions() {
    let hello = FromPlugin::Hello(Hello {
        protocol_version: 2,
        plugin: "usage".into(),
        pid: 4242,
        subscriptions: Subscriptions::ALL,
        capabilities: vec![],
    });
    let expected: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // frame length 16
        0x00, 0x02, // Hello, protocol_version 2
        0x05, b'u', b's', b'a', b'g', b'e', 0xfb, 0x92, 0x10, // plugin, pid
        0x01, 0x01, 0x01, 0x01, 0x01, // subscriptions; no capabilities field
    ];
    assert_eq!(frame(&hello), expected);
    assert_eq!(codec::decode::<FromPlugin>(&expected[4..]).unwrap(), hello);
    // Capabilities a version 2 Hello claims are not on the wire, so they do not survive.
    let claimed = FromPlugin::Hello(Hello {
        protocol_version: 2,
        plugin: "usage".into(),
        pid: 4242,
        subscriptions: Subscriptions::ALL,
        capabilities: vec!["replayed".into()],
    });
    assert_eq!(frame(&claimed), expected);
    // A version 3 Hello without its capabilities is truncated, and one with extra bytes is
    // refused as trailing data.
    let mut v3 = expected[4..].to_vec();
    v3[1] = 0x03;
    assert!(codec::decode::<FromPlugin>(&v3).is_err());
    let mut v2_with_tail = expected[4..].to_vec();
    v2_with_tail.extend_from_slice(&[0x00]);
    assert!(codec::decode::<FromPlugin>(&v2_with_tail).is_err());
}

#[test]
fn welcome_bytes_match_the_documented_dump() {
    let welcome = ToPlugin::Welcome(Welcome {
        protocol_version: 3,
        config: Value::Map(Default::default()),
        budget_bytes: 8 * 1024 * 1024,
        metadata_max_bytes: 16 * 1024,
        capabilities: vec!["replayed".into()],
    });
    let mut expected: Vec<u8> = vec![
        0x16, 0x00, 0x00, 0x00, // frame length 22
        0x00, // ToPlugin variant 0 = Welcome
        0x03, // protocol_version 3
        0x06, 0x00, // config: Value tag 6 = Map, 0 entries
        0xfc, 0x00, 0x00, 0x80, 0x00, // budget_bytes 8 MiB: 252 marker, then u32 LE
        0xfb, 0x00, 0x40, // metadata_max_bytes 16 KiB: 251 marker, then u16 LE
        0x01, 0x08, // capabilities: 1 entry, its length 8
    ];
    expected.extend_from_slice(b"replayed");
    assert_eq!(frame(&welcome), expected);
}

#[test]
fn a_version_2_welcome_ends_after_its_metadata_cap() {
    let welcome = ToPlugin::Welcome(Welcome {
        protocol_version: 2,
        config: Value::Map(Default::default()),
        budget_bytes: 8 * 1024 * 1024,
        metadata_max_bytes: 16 * 1024,
        capabilities: vec![],
    });
    let expected: &[u8] = &[
        0x0c, 0x00, 0x00, 0x00, // frame length 12
        0x00, 0x02, // Welcome, protocol_version 2
        0x06, 0x00, // config: empty Map
        0xfc, 0x00, 0x00, 0x80, 0x00, 0xfb, 0x00, 0x40, // budget_bytes, metadata_max_bytes
    ];
    assert_eq!(frame(&welcome), expected);
    assert_eq!(codec::decode::<ToPlugin>(&expected[4..]).unwrap(), welcome);
}

#[test]
fn credit_bytes_match_the_documented_dump() {
    let credit = FromPlugin::Credit(Credit {
        consumed: 1_000_000,
    });
    let expected: &[u8] = &[
        0x06, 0x00, 0x00, 0x00, // frame length 6
        0x04, // FromPlugin variant 4 = Credit
        0xfc, 0x40, 0x42, 0x0f, 0x00, // consumed 1,000,000: 252 marker, then u32 LE
    ];
    assert_eq!(frame(&credit), expected);
}

#[test]
fn chunk_bytes_match_the_documented_dump() {
    let chunk = ToPlugin::Chunk(Chunk {
        stream_id: 7,
        seq: 2,
        stamp_ns: 1_234_567_890_123,
        len: 19,
        bytes: Bytes::from_static(b"data: {\"id\":\"c1\"}\n\n"),
        end_of_stream: false,
        ack: false,
    });
    let mut expected: Vec<u8> = vec![
        0x23, 0x00, 0x00, 0x00, // frame length 35
        0x04, // ToPlugin variant 4 = Chunk
        0x07, // stream_id 7
        0x02, // seq 2
        0xfd, 0xcb, 0x04, 0xfb, 0x71, 0x1f, 0x01, 0x00, 0x00, // stamp_ns: 253 marker, u64 LE
        0x13, // len 19
        0x13, // bytes: length 19, then the bytes
    ];
    expected.extend_from_slice(b"data: {\"id\":\"c1\"}\n\n");
    expected.extend_from_slice(&[0x00, 0x00]); // end_of_stream false, ack false
    assert_eq!(frame(&chunk), expected);
}

#[test]
fn replayed_chunk_bytes_match_the_documented_dump() {
    let chunk = ToPlugin::Chunk(Chunk {
        stream_id: 7,
        seq: 2,
        stamp_ns: 1_234_567_890_123,
        len: 19,
        bytes: Bytes::from_static(b"data: {\"id\":\"c1\"}\n\n"),
        end_of_stream: false,
        ack: false,
    });
    let replayed = chunk.clone().replayed().unwrap();
    let mut expected: Vec<u8> = vec![
        0x24, 0x00, 0x00, 0x00, // frame length 36: the Chunk's payload plus one byte
        0x09, // ToPlugin variant 9 = Replayed (the Box adds nothing on the wire)
        0x04, // the inner ToPlugin variant 4 = Chunk, then the Chunk exactly as sent live
    ];
    expected.extend_from_slice(&frame(&chunk)[5..]);
    assert_eq!(frame(&replayed), expected);
    assert_eq!(replayed.flow_bytes(expected.len()), 40);
}

#[test]
fn variant_indices_match_the_documented_tables() {
    use ipc_protocol::codec::encode;
    let first_byte = |m: &ToPlugin| encode(m).unwrap()[0];
    let to: Vec<(u8, &str)> = vec![
        (0, "Welcome"),
        (1, "Refuse"),
        (2, "RequestStart"),
        (3, "ResponseHeaders"),
        (4, "Chunk"),
        (5, "Final"),
        (6, "Abort"),
        (7, "Ping"),
        (8, "Shutdown"),
        (9, "Replayed"),
        (10, "AbortedFinal"),
        (11, "Reconnect"),
    ];
    let samples = [
        ToPlugin::Welcome(Welcome {
            protocol_version: 3,
            config: Value::Null,
            budget_bytes: 0,
            metadata_max_bytes: 0,
            capabilities: vec![],
        }),
        ToPlugin::Refuse(Refuse {
            code: RefuseCode::BadConfig,
            reason: String::new(),
        }),
        ToPlugin::RequestStart(RequestStart {
            stream_id: 0,
            seq: 0,
            stamp_ns: 0,
            request_id: None,
            headers: vec![],
        }),
        ToPlugin::ResponseHeaders(ResponseHeaders {
            stream_id: 0,
            seq: 0,
            stamp_ns: 0,
            status: 200,
            headers: vec![],
        }),
        ToPlugin::Chunk(Chunk {
            stream_id: 0,
            seq: 0,
            stamp_ns: 0,
            len: 0,
            bytes: Bytes::new(),
            end_of_stream: false,
            ack: false,
        }),
        ToPlugin::Final(Final {
            stream_id: 0,
            seq: 0,
            stamp_ns: 0,
            call_id: 0,
            len: 0,
            bytes: Bytes::new(),
            trailers: vec![],
        }),
        ToPlugin::Abort(Abort {
            stream_id: 0,
            seq: 0,
            stamp_ns: 0,
            cause: AbortCause::Shutdown,
            detail: String::new(),
        }),
        ToPlugin::Ping(Ping { nonce: 0 }),
        ToPlugin::Shutdown(Shutdown { grace_ms: 0 }),
        ToPlugin::Replayed(Box::new(ToPlugin::Ping(Ping { nonce: 0 }))),
        ToPlugin::AbortedFinal(AbortedFinal {
            stream_id: 0,
            seq: 0,
            stamp_ns: 0,
            call_id: 0,
            cause: AbortCause::ClientDisconnect,
            detail: String::new(),
        }),
        ToPlugin::Reconnect(Reconnect {
            reason: String::new(),
        }),
    ];
    assert_eq!(to.len(), samples.len());
    for ((index, name), msg) in to.iter().zip(samples.iter()) {
        assert_eq!(first_byte(msg), *index, "{name}");
        assert_eq!(msg.kind(), *name);
    }
    let from = [
        (0u8, "Hello"),
        (1, "FinalReply"),
        (2, "Pong"),
        (3, "Ack"),
        (4, "Credit"),
        (5, "Spans"),
    ];
    let from_samples = [
        FromPlugin::Hello(Hello {
            protocol_version: 3,
            plugin: String::new(),
            pid: 0,
            subscriptions: Subscriptions::ALL,
            capabilities: vec![],
        }),
        FromPlugin::FinalReply(FinalReply {
            call_id: 0,
            stream_id: 0,
            outcome: FinalOutcome::Error(String::new()),
        }),
        FromPlugin::Pong(Pong {
            nonce: 0,
            active_streams: 0,
            stuck: vec![],
        }),
        FromPlugin::Ack(Ack {
            stream_id: 0,
            seq: 0,
        }),
        FromPlugin::Credit(Credit { consumed: 0 }),
        FromPlugin::Spans(Spans {
            stream_id: 0,
            attributes: vec![],
            spans: vec![],
        }),
    ];
    assert_eq!(from.len(), from_samples.len());
    for ((index, name), msg) in from.iter().zip(from_samples.iter()) {
        assert_eq!(encode(msg).unwrap()[0], *index, "{name}");
        assert_eq!(msg.kind(), *name);
    }
    // Only per-stream events count against the flow-control window (a `Replayed` around a
    // connection message is a protocol error and counts nothing).
    let counted: Vec<&str> = samples
        .iter()
        .filter(|m| m.counts_for_credit())
        .map(|m| m.kind())
        .collect();
    assert_eq!(
        counted,
        [
            "RequestStart",
            "ResponseHeaders",
            "Chunk",
            "Final",
            "Abort",
            "AbortedFinal"
        ]
    );
    // Value tags: Null 0, Bool 1, Int 2, Float 3, String 4, List 5, Map 6.
    let tags = [
        Value::Null,
        Value::Bool(true),
        Value::Int(-1),
        Value::Float(0.5),
        Value::from("s"),
        Value::List(vec![]),
        Value::Map(Default::default()),
    ];
    for (i, v) in tags.iter().enumerate() {
        assert_eq!(encode(v).unwrap()[0], i as u8);
    }
    // Int is zigzag: -1 → 1; Float is 8 bytes little endian.
    assert_eq!(encode(&Value::Int(-1)).unwrap(), vec![2, 1]);
    assert_eq!(
        encode(&Value::Float(0.5)).unwrap()[1..],
        0.5f64.to_le_bytes()
    );
}
