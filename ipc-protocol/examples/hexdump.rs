//! Prints the exact frame bytes of one `Hello`, `Welcome`, `Chunk`, replayed `Chunk` and `Credit`, as quoted in
//! docs/protocol.md.
//!
//! `cargo run -p ipc-protocol --example hexdump`

use bytes::Bytes;
use ipc_protocol::*;

fn dump(title: &str, frame: &[u8]) {
    println!("{title} ({} bytes):", frame.len());
    for (i, line) in frame.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = line
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
            .collect();
        println!("  {:04x}  {:<47}  {}", i * 16, hex.join(" "), ascii);
    }
}

fn frame(msg: &impl serde::Serialize) -> Vec<u8> {
    let payload = codec::encode(msg).expect("sample messages encode");
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&payload);
    out
}

fn main() {
    let hello = FromPlugin::Hello(Hello {
        protocol_version: 3,
        plugin: "usage".into(),
        pid: 4242,
        subscriptions: Subscriptions {
            request_start: true,
            response_headers: true,
            chunks: true,
            body_bytes: true,
            abort: true,
        },
        capabilities: vec!["replayed".into()],
    });
    let chunk = ToPlugin::Chunk(Chunk {
        stream_id: 7,
        seq: 2,
        stamp_ns: 1_234_567_890_123,
        len: 19,
        bytes: Bytes::from_static(b"data: {\"id\":\"c1\"}\n\n"),
        end_of_stream: false,
        ack: false,
    });
    let welcome = ToPlugin::Welcome(Welcome {
        protocol_version: 3,
        config: Value::Map(Default::default()),
        budget_bytes: 8 * 1024 * 1024,
        metadata_max_bytes: 16 * 1024,
        capabilities: vec!["replayed".into()],
    });
    let credit = FromPlugin::Credit(Credit {
        consumed: 1_000_000,
    });
    dump("Hello", &frame(&hello));
    dump("Welcome", &frame(&welcome));
    dump("Chunk", &frame(&chunk));
    let replayed = chunk.replayed().expect("a chunk is a per-stream event");
    dump("Replayed(Chunk)", &frame(&replayed));
    dump("Credit", &frame(&credit));
}
