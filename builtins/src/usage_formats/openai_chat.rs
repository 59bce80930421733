//! OpenAI Chat Completions (`chat.completion`, `chat.completion.chunk`) and legacy Completions
//! (`text_completion`), as served by OpenAI and OpenAI-compatible servers (vLLM, SGLang).
//!
//! Usage is the `usage` object of the JSON body, or of the last chunk of a stream requested
//! with `stream_options.include_usage` (vLLM's `continuous_usage_stats` repeats it on every
//! chunk: the last wins). Fields the servers add (`prompt_logprobs`, `stop_reason`,
//! `kv_transfer_params`, ...) are ignored. Token events are chunks with non-empty `choices`;
//! content events are chunks whose choices deliver text, reasoning (`reasoning_content` or
//! `reasoning`, as the vLLM and SGLang reasoning parsers stream it), a refusal or tool calls.
//! Errors are an `error` object, or (older vLLM) a flat `{"object": "error", ...}` chunk.

use serde_json::Value as Json;

use super::{int, Reading, UpstreamError, Usage};

pub(super) fn detects(_event: Option<&str>, json: &Json) -> bool {
    json.get("choices").is_some()
        || json
            .get("object")
            .and_then(Json::as_str)
            .is_some_and(|o| o.starts_with("chat.completion") || o == "text_completion")
}

pub(super) fn observe(r: &mut Reading, _event: Option<&str>, json: &Json) -> bool {
    r.set_model(json.get("model").and_then(Json::as_str));
    if let Some(u) = json.get("usage").and_then(usage) {
        r.usage = Some(u);
    }
    if let Some(e) = UpstreamError::in_body(json) {
        r.error = Some(e);
    }
    json.get("choices")
        .and_then(Json::as_array)
        .is_some_and(|c| !c.is_empty())
}

/// `{prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details.cached_tokens,
/// completion_tokens_details.reasoning_tokens}`; SGLang's top-level `reasoning_tokens` too.
fn usage(u: &Json) -> Option<Usage> {
    let prompt = int(u, "prompt_tokens");
    let completion = int(u, "completion_tokens");
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    let (input, output) = (prompt.unwrap_or(0), completion.unwrap_or(0));
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: int(u, "total_tokens").unwrap_or(input + output),
        cached_input_tokens: u
            .get("prompt_tokens_details")
            .and_then(|d| int(d, "cached_tokens")),
        cache_creation_input_tokens: None,
        reasoning_tokens: u
            .get("completion_tokens_details")
            .and_then(|d| int(d, "reasoning_tokens"))
            .or_else(|| int(u, "reasoning_tokens")),
    })
}
