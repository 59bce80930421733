//! Playing recorded responses through the `usage` plugin's hooks, shared by `usage_golden.rs`
//! and `usage_compressed.rs`: the recorded bodies under `tests/fixtures/`, the sample config's
//! CEL cost attribute, and one response played with fixed stamps.

use std::path::PathBuf;

use bytes::Bytes;
use plugin_runner::{
    Chunk, EventCtx, Final, Metadata, Plugin, RequestStart, ResponseHeaders, Value,
};
use plugvisor_builtins::usage::UsagePlugin;

/// `builtins/tests/fixtures`: `usage/` holds the recorded bodies and their golden files,
/// `compressed/` bodies compressed by the `gzip` and `zstd` tools.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The sample config's `attributes`: the CEL cost `x-gateway-inference-request-cost` in
/// `envoy.lb`.
pub fn cost_attributes() -> Value {
    Value::List(vec![Value::map([
        ("namespace", Value::from("envoy.lb")),
        ("name", Value::from("x-gateway-inference-request-cost")),
        (
            "expression",
            Value::from("usage.prompt_tokens + 2 * usage.completion_tokens"),
        ),
    ])])
}

/// Plays one response: request start, headers (`status`, `content_type` and, when given,
/// `content_encoding`), `chunks`, an empty final. Returns the final's metadata.
pub fn play(
    p: &UsagePlugin,
    status: u16,
    content_type: &str,
    content_encoding: Option<&str>,
    chunks: &[&[u8]],
) -> Metadata {
    let mut s = <UsagePlugin as Plugin>::Stream::default();
    let ctx = |seq: u32| EventCtx {
        stream_id: 1,
        seq,
        stamp_ns: 1_000 * u64::from(seq + 1),
        gap: 0,
        partial: false,
    };
    p.on_request_start(
        &mut s,
        &ctx(0),
        &RequestStart {
            stream_id: 1,
            seq: 0,
            stamp_ns: 1_000,
            request_id: None,
            headers: vec![],
        },
    );
    let mut headers = vec![("content-type".to_owned(), content_type.to_owned())];
    if let Some(enc) = content_encoding {
        headers.push(("content-encoding".to_owned(), enc.to_owned()));
    }
    p.on_response_headers(
        &mut s,
        &ctx(1),
        &ResponseHeaders {
            stream_id: 1,
            seq: 1,
            stamp_ns: 2_000,
            status,
            headers,
        },
    );
    let mut seq = 2;
    for c in chunks {
        let e = ctx(seq);
        p.on_chunk(
            &mut s,
            &e,
            &Chunk {
                stream_id: 1,
                seq,
                stamp_ns: e.stamp_ns,
                len: c.len() as u32,
                bytes: Bytes::copy_from_slice(c),
                end_of_stream: false,
                ack: false,
            },
        );
        seq += 1;
    }
    let e = ctx(seq);
    p.on_final(
        &mut s,
        &e,
        &Final {
            stream_id: 1,
            seq,
            stamp_ns: e.stamp_ns,
            call_id: 1,
            len: 0,
            bytes: Bytes::new(),
            trailers: vec![],
        },
    )
}
