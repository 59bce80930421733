//! Test support: plays one recorded response through a built-in plugin with known stamps, on the
//! SDK's player (`plugin_runner::testing`), so the tests see what the host would send the front.

use plugin_runner::testing::{Player, Split, Stream};
use plugin_runner::{Metadata, Plugin};

/// Request start stamp.
pub(crate) const START_NS: u64 = 1_000_000_000;
/// Response headers' stamp.
const HEADERS_NS: u64 = START_NS + 50_000_000;
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
pub(crate) fn play<P: Plugin>(
    player: &Player<P>,
    body: &str,
    size: usize,
    content_type: &str,
) -> Played {
    let chunks = Split::Every(size).apply(body.as_bytes());
    play_chunks(player, &chunks, content_type)
}

/// Plays one request with the given body chunks, status 200, and an empty final.
pub(crate) fn play_chunks<P: Plugin, C: AsRef<[u8]>>(
    player: &Player<P>,
    chunks: &[C],
    content_type: &str,
) -> Played {
    play_response(player, chunks, 200, &[("content-type", content_type)])
}

/// Plays one request with the given response status, headers and body chunks (text or bytes,
/// e.g. a compressed body), and an empty final.
pub(crate) fn play_response<P: Plugin, C: AsRef<[u8]>>(
    player: &Player<P>,
    chunks: &[C],
    status: u16,
    headers: &[(&str, &str)],
) -> Played {
    let end_ns = FIRST_CHUNK_NS + chunks.len() as u64 * STEP_NS;
    let stream = Stream::new(7)
        .at(START_NS)
        .request(&[(":path", "/v1/chat/completions"), ("x-request-id", "req-1")])
        .at(HEADERS_NS)
        .response(status, headers)
        .at(FIRST_CHUNK_NS)
        .step(STEP_NS)
        .chunks(chunks)
        .final_(b"");
    Played {
        meta: player.play(&stream).into_metadata(),
        chunks: chunks.len(),
        end_ns,
    }
}
