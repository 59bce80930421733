//! Anthropic Messages API (`/v1/messages`): a `message` object, or a stream of typed events.
//!
//! Stream: `message_start` carries `message.model` and the input side of `message.usage`
//! (`input_tokens`, `cache_read_input_tokens`, `cache_creation_input_tokens`); each
//! `message_delta` carries the cumulative `usage.output_tokens` (and may restate input fields);
//! `message_stop` ends it; `ping` is ignored; an `error` event (`error.type`, `error.message`) is
//! the upstream's error. Usage is final once a `message_delta` came. Token events are
//! `content_block_delta`; content events those whose delta has `text`, `thinking` or
//! `partial_json` (not a `signature_delta`).
//!
//! Anthropic's `input_tokens` excludes cache reads and writes; [`Usage::input_tokens`] is their
//! sum, so it counts the whole prompt like the other formats.

use serde_json::Value as Json;

use super::{int, Reading, UpstreamError, Usage};

const EVENTS: [&str; 7] = [
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "ping",
];

fn kind(json: &Json) -> Option<&str> {
    json.get("type").and_then(Json::as_str)
}

pub(super) fn detects(event: Option<&str>, json: &Json) -> bool {
    let kind = kind(json);
    kind.is_some_and(|k| EVENTS.contains(&k))
        || (kind == Some("message") && json.get("role").is_some())
        || (kind == Some("error") && json.get("error").is_some_and(Json::is_object))
        || event.is_some_and(|e| EVENTS.contains(&e))
}

pub(super) fn observe(r: &mut Reading, event: Option<&str>, json: &Json) -> bool {
    match kind(json).or(event) {
        Some("message_start") => {
            let message = json.get("message").unwrap_or(&Json::Null);
            r.set_model(message.get("model").and_then(Json::as_str));
            if let Some(u) = message.get("usage") {
                r.pending = merge(r.pending, u);
            }
            false
        }
        Some("message_delta") => {
            if let Some(u) = json.get("usage") {
                r.pending = merge(r.pending, u);
                r.usage = r.pending;
            }
            false
        }
        Some("message_stop") => {
            r.ended = true;
            false
        }
        Some("message") => {
            r.set_model(json.get("model").and_then(Json::as_str));
            if let Some(u) = json.get("usage") {
                r.usage = merge(None, u);
            }
            false
        }
        Some("error") => {
            r.error = json.get("error").and_then(UpstreamError::from_json);
            false
        }
        Some("content_block_delta") => true,
        _ => false,
    }
}

/// Applies an Anthropic `usage` object over what earlier events reported: a field present (and
/// not null) replaces the earlier value, an absent one keeps it.
fn merge(base: Option<Usage>, u: &Json) -> Option<Usage> {
    let base = base.unwrap_or_default();
    let cache_read = int(u, "cache_read_input_tokens").or(base.cached_input_tokens);
    let cache_creation = int(u, "cache_creation_input_tokens").or(base.cache_creation_input_tokens);
    let base_uncached = base.input_tokens
        - base.cached_input_tokens.unwrap_or(0)
        - base.cache_creation_input_tokens.unwrap_or(0);
    let uncached = int(u, "input_tokens").unwrap_or(base_uncached);
    let input = uncached + cache_read.unwrap_or(0) + cache_creation.unwrap_or(0);
    let output = int(u, "output_tokens").unwrap_or(base.output_tokens);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: input + output,
        cached_input_tokens: cache_read,
        cache_creation_input_tokens: cache_creation,
        reasoning_tokens: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_delta_restating_input_fields_replaces_them_and_absent_ones_are_kept() {
        let start = serde_json::json!({"input_tokens": 10, "cache_read_input_tokens": 100, "output_tokens": 1});
        let base = merge(None, &start);
        let delta = serde_json::json!({"input_tokens": 12, "cache_creation_input_tokens": null, "output_tokens": 40});
        assert_eq!(
            merge(base, &delta),
            Some(Usage {
                input_tokens: 112,
                output_tokens: 40,
                total_tokens: 152,
                cached_input_tokens: Some(100),
                cache_creation_input_tokens: None,
                reasoning_tokens: None,
            })
        );
    }
}
