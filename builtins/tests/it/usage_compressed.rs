//! Compressed responses through the `usage` plugin: every recorded body under
//! `tests/fixtures/usage/` is encoded with gzip, deflate, br and zstd and played through the
//! plugin's hooks with its `Content-Encoding`, whole and split at every byte into two chunks;
//! the metadata must be exactly that of the plain body (which `usage_golden.rs` pins). Bodies
//! that cannot be decoded (unknown or stacked encodings, corrupt or truncated data, a chunk that
//! decodes past the per-chunk limit) must say so in `reason`, never give `usage={}` or tokens.
//!
//! The encoders are the other halves of the decoders' libraries (flate2, Dropbox's brotli,
//! libzstd); `tests/fixtures/compressed/` adds bodies made by the `gzip` and `zstd` tools.

use crate::usage_play;

use std::io::Write;
use std::path::{Path, PathBuf};

use plugin_runner::testing::Player;
use plugin_runner::{Metadata, Plugin, Value};
use plugvisor_builtins::decode::MAX_DECODED_PER_CHUNK;
use plugvisor_builtins::usage::UsagePlugin;
use usage_play::fixtures;

const ENCODINGS: [&str; 4] = ["gzip", "deflate", "br", "zstd"];

/// Every plain recorded body (golden files and already-compressed bodies left out).
fn plain_fixtures() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(fixtures().join("usage"))
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            !["golden", "gz", "br", "zst", "zz"].contains(&ext)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 15, "fixtures: {out:?}");
    out
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("sse") => "text/event-stream",
        Some("json") => "application/json",
        Some("eventstream") => "application/vnd.amazon.eventstream",
        _ => "application/octet-stream",
    }
}

fn encode(encoding: &str, data: &[u8]) -> Vec<u8> {
    match encoding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 9, 22);
                w.write_all(data).unwrap();
            }
            out
        }
        "zstd" => zstd::encode_all(data, 19).unwrap(),
        other => panic!("no encoder for {other}"),
    }
}

/// The plugin with the sample config's CEL cost attribute, as in `usage_golden.rs`.
fn plugin() -> Player<UsagePlugin> {
    let mut p = UsagePlugin::default();
    p.configure(&Value::map([("attributes", usage_play::cost_attributes())]))
        .expect("valid config");
    Player::new(p)
}

/// Plays one status-200 response (see [`usage_play::play`]).
fn play(
    p: &Player<UsagePlugin>,
    content_type: &str,
    encoding: Option<&str>,
    chunks: &[&[u8]],
) -> Metadata {
    usage_play::play(p, 200, content_type, encoding, chunks)
}

fn usage_key<'m>(meta: &'m Metadata, key: &str) -> Option<&'m Value> {
    meta.get("plugvisor.usage").and_then(|u| u.get(key))
}

fn reason(meta: &Metadata) -> String {
    match usage_key(meta, "reason") {
        Some(Value::String(s)) => s.clone(),
        other => panic!("no reason in {meta:?} ({other:?})"),
    }
}

#[test]
fn every_recorded_body_compressed_gives_the_metadata_of_the_plain_body() {
    let p = plugin();
    for path in plain_fixtures() {
        let plain = std::fs::read(&path).unwrap();
        let ct = content_type(&path);
        let want = play(&p, ct, None, &[&plain]);
        for enc in ENCODINGS {
            let body = encode(enc, &plain);
            let got = play(&p, ct, Some(enc), &[&body]);
            assert_eq!(got, want, "{} as {enc}", path.display());
        }
    }
}

#[test]
fn a_compressed_body_split_anywhere_gives_the_same_metadata() {
    let p = plugin();
    for path in plain_fixtures() {
        let plain = std::fs::read(&path).unwrap();
        let ct = content_type(&path);
        let want = play(&p, ct, None, &[&plain]);
        for enc in ENCODINGS {
            let body = encode(enc, &plain);
            for at in 1..body.len() {
                let (a, b) = body.split_at(at);
                assert_eq!(
                    play(&p, ct, Some(enc), &[a, b]),
                    want,
                    "{} as {enc} split at {at}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn bodies_compressed_by_the_gzip_and_zstd_tools_are_read() {
    let p = plugin();
    for (file, plain, enc) in [
        ("anthropic_stream.sse.gz", "anthropic_stream.sse", "gzip"),
        (
            "openai_responses_stream.sse.zst",
            "openai_responses_stream.sse",
            "zstd",
        ),
    ] {
        let body = std::fs::read(fixtures().join("compressed").join(file)).unwrap();
        let plain = std::fs::read(fixtures().join("usage").join(plain)).unwrap();
        let want = play(&p, "text/event-stream", None, &[&plain]);
        assert!(usage_key(&want, "input_tokens").is_some(), "{want:?}");
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(
            play(&p, "text/event-stream", Some(enc), &bytes),
            want,
            "{file}"
        );
    }
}

/// The chat stream fixture behind SSE comment lines, `len` bytes in all.
fn padded_stream(len: usize) -> Vec<u8> {
    let stream = std::fs::read(fixtures().join("usage/openai_chat_stream.sse")).unwrap();
    let mut body = Vec::with_capacity(len);
    let line = format!(": {}\n", "x".repeat(1021));
    while body.len() + line.len() + stream.len() <= len {
        body.extend_from_slice(line.as_bytes());
    }
    let rest = len - body.len() - stream.len();
    if rest > 0 {
        body.extend_from_slice(b":");
        body.extend(std::iter::repeat_n(b'y', rest - 2));
        body.push(b'\n');
    }
    body.extend_from_slice(&stream);
    assert_eq!(body.len(), len);
    body
}

#[test]
fn a_chunk_decoding_to_the_limit_is_read_and_one_byte_more_is_a_reported_bomb() {
    let p = plugin();
    let at = padded_stream(MAX_DECODED_PER_CHUNK);
    let meta = play(
        &p,
        "text/event-stream",
        Some("gzip"),
        &[&encode("gzip", &at)],
    );
    // Comment lines change nothing: exactly the plain stream's metadata.
    assert_eq!(meta, play(&p, "text/event-stream", None, &[&at]));
    assert!(usage_key(&meta, "completion_tokens").is_some(), "{meta:?}");
    assert_eq!(usage_key(&meta, "reason"), None, "{meta:?}");

    let past = padded_stream(MAX_DECODED_PER_CHUNK + 1);
    let body = encode("gzip", &past);
    assert!(body.len() < 256 * 1024, "{} bytes", body.len());
    let meta = play(&p, "text/event-stream", Some("gzip"), &[&body]);
    assert_eq!(
        reason(&meta),
        "compressed body not read: one gzip chunk decodes to more than 16777216 bytes (a decompression bomb?); the rest of the body is not decoded"
    );
    assert_eq!(usage_key(&meta, "completion_tokens"), None, "{meta:?}");
    assert!(!meta.contains_key("envoy.lb"), "{meta:?}");
}

#[test]
fn encodings_that_are_not_decoded_are_reported_not_read_as_empty() {
    let p = plugin();
    let plain = std::fs::read(fixtures().join("usage/openai_chat.json")).unwrap();
    for (enc, want) in [
        (
            "compress",
            "compressed body not read: unsupported content-encoding `compress` (decoded: gzip, deflate, br, zstd)",
        ),
        (
            "gzip, br",
            "compressed body not read: stacked content-encodings `gzip, br` are not decoded (one of gzip, deflate, br, zstd is)",
        ),
    ] {
        let meta = play(&p, "application/json", Some(enc), &[&plain]);
        assert_eq!(reason(&meta), want);
        assert_eq!(usage_key(&meta, "total_tokens"), None);
    }
    // `identity` is no encoding at all.
    let meta = play(&p, "application/json", Some("identity"), &[&plain]);
    assert_eq!(
        usage_key(&meta, "total_tokens"),
        Some(&Value::Int(22)),
        "{meta:?}"
    );
}

#[test]
fn a_truncated_or_corrupt_compressed_body_withholds_the_usage_it_may_have_read() {
    let p = plugin();
    let plain = std::fs::read(fixtures().join("usage/openai_chat_stream.sse")).unwrap();
    let body = encode("gzip", &plain);
    // Without its 8-byte trailer every event decodes, usage included, but the body cannot be
    // checked: the usage is not reported.
    let meta = play(
        &p,
        "text/event-stream",
        Some("gzip"),
        &[&body[..body.len() - 8]],
    );
    assert_eq!(
        reason(&meta),
        "compressed body not read: the gzip body ended before its encoded stream did (truncated)"
    );
    assert_eq!(usage_key(&meta, "completion_tokens"), None);

    let mut bad = body.clone();
    let n = bad.len();
    bad[n - 5] ^= 1;
    let meta = play(&p, "text/event-stream", Some("gzip"), &[&bad]);
    assert_eq!(
        reason(&meta),
        "compressed body not read: corrupt gzip body: gzip CRC-32 mismatch"
    );
}
