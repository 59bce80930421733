//! Test support: plays one recorded response through a plugin's hooks with known stamps.

use bytes::Bytes;
use ipc_protocol::{Chunk, Final, Metadata, RequestStart, ResponseHeaders};

use plugin_runner::{EventCtx, Plugin};

/// Request start stamp.
pub(crate) const START_NS: u64 = 1_000_000_000;
/// First body chunk's stamp; chunk i arrives at `FIRST_CHUNK_NS + i * STEP_NS`.
pub(crate) const FIRST_CHUNK_NS: u64 = START_NS + 100_000_000;
/// Time between chunks.
pub(crate) const STEP_NS: u64 = 20_000_000;

/// What playing a response produced.
pub(crate) struct Played {
    pub meta: Metadata,
    pub chunks: usize,
    pub end_ns: u64,
}

/// Plays `body` cut into `size`-byte chunks.
pub(crate) fn play<P: Plugin>(plugin: &P, body: &str, size: usize, content_type: &str) -> Played {
    let chunks: Vec<String> = body
        .as_bytes()
        .chunks(size)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    play_chunks(plugin, &chunks, content_type)
}

/// Plays one request with the given body chunks, status 200, and an empty final.
pub(crate) fn play_chunks<P: Plugin>(plugin: &P, chunks: &[String], content_type: &str) -> Played {
    let headers = vec![("content-type".into(), content_type.into())];
    play_response(plugin, chunks, 200, headers)
}

/// Plays one request with the given response status, headers and body chunks (text or bytes,
/// e.g. a compressed body), and an empty final.
pub(crate) fn play_response<P: Plugin, C: AsRef<[u8]>>(
    plugin: &P,
    chunks: &[C],
    status: u16,
    headers: Vec<(String, String)>,
) -> Played {
    let mut state = P::Stream::default();
    let ctx = |seq: u32, stamp_ns: u64| EventCtx {
        stream_id: 7,
        seq,
        stamp_ns,
        gap: 0,
        partial: false,
    };
    plugin.on_request_start(
        &mut state,
        &ctx(0, START_NS),
        &RequestStart {
            stream_id: 7,
            seq: 0,
            stamp_ns: START_NS,
            request_id: Some("req-1".into()),
            headers: vec![(":path".into(), "/v1/chat/completions".into())],
        },
    );
    plugin.on_response_headers(
        &mut state,
        &ctx(1, START_NS + 50_000_000),
        &ResponseHeaders {
            stream_id: 7,
            seq: 1,
            stamp_ns: START_NS + 50_000_000,
            status,
            headers,
        },
    );
    for (i, c) in chunks.iter().enumerate() {
        let c = c.as_ref();
        let seq = 2 + i as u32;
        let stamp_ns = FIRST_CHUNK_NS + i as u64 * STEP_NS;
        plugin.on_chunk(
            &mut state,
            &ctx(seq, stamp_ns),
            &Chunk {
                stream_id: 7,
                seq,
                stamp_ns,
                len: c.len() as u32,
                bytes: Bytes::copy_from_slice(c),
                end_of_stream: false,
                ack: false,
            },
        );
    }
    let seq = 2 + chunks.len() as u32;
    let end_ns = FIRST_CHUNK_NS + chunks.len() as u64 * STEP_NS;
    let meta = plugin.on_final(
        &mut state,
        &ctx(seq, end_ns),
        &Final {
            stream_id: 7,
            seq,
            stamp_ns: end_ns,
            call_id: 1,
            len: 0,
            bytes: Bytes::new(),
            trailers: vec![],
        },
    );
    Played {
        meta,
        chunks: chunks.len(),
        end_ns,
    }
}
