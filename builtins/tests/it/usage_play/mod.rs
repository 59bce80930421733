//! Playing recorded responses through the `usage` plugin, shared by `usage_golden.rs` and
//! `usage_compressed.rs`: the recorded bodies under `tests/fixtures/`, the sample config's CEL
//! cost attribute, and one response played with fixed stamps on the SDK's player.

use std::path::PathBuf;

use plugin_runner::testing::{Player, Stream};
use plugin_runner::{Metadata, Value};
use plugvisor_builtins::usage::UsagePlugin;

/// `builtins/tests/fixtures`: `usage/` holds the recorded bodies and their golden files,
/// `compressed/` bodies compressed by the `gzip` and `zstd` tools, `eventstream/` the readable
/// sources of the Bedrock bodies and the script that encodes them.
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
/// `content_encoding`), `chunks`, an empty final; event `seq` is stamped `1000 * (seq + 1)`.
/// Returns the final's metadata.
pub fn play(
    p: &Player<UsagePlugin>,
    status: u16,
    content_type: &str,
    content_encoding: Option<&str>,
    chunks: &[&[u8]],
) -> Metadata {
    play_request(p, None, status, content_type, content_encoding, chunks)
}

/// [`play`] for a request to `path` (its `:path` header; none when `None`).
pub fn play_request(
    p: &Player<UsagePlugin>,
    path: Option<&str>,
    status: u16,
    content_type: &str,
    content_encoding: Option<&str>,
    chunks: &[&[u8]],
) -> Metadata {
    let request: Vec<(&str, &str)> = path.map(|p| (":path", p)).into_iter().collect();
    let mut headers = vec![("content-type", content_type)];
    if let Some(enc) = content_encoding {
        headers.push(("content-encoding", enc));
    }
    let stream = Stream::new(1)
        .at(1_000)
        .step(1_000)
        .request(&request)
        .response(status, &headers)
        .chunks(chunks)
        .final_(b"");
    p.play(&stream).into_metadata()
}
