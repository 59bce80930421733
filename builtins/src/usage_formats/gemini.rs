//! Google Gemini `generateContent` (one JSON body) and `streamGenerateContent` (SSE with
//! `alt=sse`, else a JSON array of the same responses).
//!
//! Every response may carry `usageMetadata` (`promptTokenCount`, `candidatesTokenCount`,
//! `cachedContentTokenCount`, `thoughtsTokenCount`, `toolUsePromptTokenCount`,
//! `totalTokenCount`); the last one wins. A stream counts as ended once a candidate has a
//! `finishReason` (or the prompt was blocked, `promptFeedback.blockReason`); before that the
//! counts are partial and are not reported. The model is `modelVersion`. Token events are
//! responses whose candidates have content parts; content events those with a part holding
//! text (thoughts included) or a function call.
//!
//! [`Usage::input_tokens`] is `promptTokenCount` (which includes the cached tokens) plus
//! `toolUsePromptTokenCount`; [`Usage::output_tokens`] is `candidatesTokenCount` plus
//! `thoughtsTokenCount`, so reasoning is inside the output as in the OpenAI formats.

use serde_json::Value as Json;

use super::{int, Reading, UpstreamError, Usage};

pub(super) fn detects(_event: Option<&str>, json: &Json) -> bool {
    json.get("candidates").is_some()
        || json.get("usageMetadata").is_some()
        || json.get("promptFeedback").is_some()
}

pub(super) fn observe(r: &mut Reading, _event: Option<&str>, json: &Json) -> bool {
    r.set_model(json.get("modelVersion").and_then(Json::as_str));
    if let Some(u) = json.get("usageMetadata").and_then(usage) {
        r.pending = Some(u);
    }
    if let Some(e) = json.get("error").and_then(UpstreamError::from_json) {
        r.error = Some(e);
    }
    let candidates = json
        .get("candidates")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let blocked = json
        .get("promptFeedback")
        .and_then(|f| f.get("blockReason"))
        .is_some();
    if blocked || candidates.iter().any(|c| c.get("finishReason").is_some()) {
        r.ended = true;
    }
    candidates.iter().any(|c| {
        c.get("content")
            .and_then(|c| c.get("parts"))
            .and_then(Json::as_array)
            .is_some_and(|p| !p.is_empty())
    })
}

fn usage(u: &Json) -> Option<Usage> {
    let prompt = int(u, "promptTokenCount");
    let candidates = int(u, "candidatesTokenCount");
    let total = int(u, "totalTokenCount");
    if prompt.is_none() && candidates.is_none() && total.is_none() {
        return None;
    }
    let thoughts = int(u, "thoughtsTokenCount");
    let input = prompt.unwrap_or(0) + int(u, "toolUsePromptTokenCount").unwrap_or(0);
    let output = candidates.unwrap_or(0) + thoughts.unwrap_or(0);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: total.unwrap_or(input + output),
        cached_input_tokens: int(u, "cachedContentTokenCount"),
        cache_creation_input_tokens: None,
        reasoning_tokens: thoughts,
    })
}
