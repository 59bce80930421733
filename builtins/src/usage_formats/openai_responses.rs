//! OpenAI Responses API (`/v1/responses`): a `response` object, or a stream of typed events.
//!
//! Usage is `response.usage` of the `response.completed` event (or `response.incomplete` /
//! `response.failed`, which end a stream too), or `usage` of the JSON body: `input_tokens`,
//! `output_tokens`, `total_tokens`, `input_tokens_details.cached_tokens`,
//! `output_tokens_details.reasoning_tokens`. Errors come as an `error` event or
//! `response.error`. Token events are the `*.delta` events; content events those with a
//! non-empty `delta` (output text, reasoning text or summary, refusal, function-call arguments).

use serde_json::Value as Json;

use super::{int, Reading, UpstreamError, Usage};

const ENDS: [&str; 3] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
];

fn kind(json: &Json) -> Option<&str> {
    json.get("type").and_then(Json::as_str)
}

pub(super) fn detects(_event: Option<&str>, json: &Json) -> bool {
    kind(json).is_some_and(|t| t.starts_with("response."))
        || json.get("object").and_then(Json::as_str) == Some("response")
}

pub(super) fn observe(r: &mut Reading, _event: Option<&str>, json: &Json) -> bool {
    let kind = kind(json);
    if kind == Some("error") {
        r.error = UpstreamError::from_json(json);
        return false;
    }
    // Stream events carry the response object under `response`; the JSON body is one itself.
    let response = json.get("response").unwrap_or(json);
    r.set_model(response.get("model").and_then(Json::as_str));
    if let Some(e) = response.get("error").and_then(UpstreamError::from_json) {
        r.error = Some(e);
    }
    let is_body = kind.is_none();
    if is_body || kind.is_some_and(|k| ENDS.contains(&k)) {
        if let Some(u) = response.get("usage").and_then(usage) {
            r.usage = Some(u);
        }
        r.ended = true;
    }
    kind.is_some_and(|t| t.ends_with(".delta"))
}

fn usage(u: &Json) -> Option<Usage> {
    let input = int(u, "input_tokens");
    let output = int(u, "output_tokens");
    if input.is_none() && output.is_none() {
        return None;
    }
    let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: int(u, "total_tokens").unwrap_or(input + output),
        cached_input_tokens: u
            .get("input_tokens_details")
            .and_then(|d| int(d, "cached_tokens")),
        cache_creation_input_tokens: None,
        reasoning_tokens: u
            .get("output_tokens_details")
            .and_then(|d| int(d, "reasoning_tokens")),
    })
}
