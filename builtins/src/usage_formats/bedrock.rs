//! Amazon Bedrock's streaming APIs: `InvokeModelWithResponseStream` and `ConverseStream`, whose
//! responses are AWS event streams (`application/vnd.amazon.eventstream`, framed by
//! [`super::eventstream`]). The format is known by that framing, never guessed from a JSON
//! event.
//!
//! Every message has a `:message-type`. An `exception` (`:exception-type`: `throttlingException`,
//! `modelStreamErrorException`, `validationException`, ...; payload `{"message"}`) or an `error`
//! (`:error-code`, `:error-message`) is the upstream's error. An `event` is named by
//! `:event-type` and carries JSON:
//!
//! - **InvokeModelWithResponseStream**: `chunk` events, `{"bytes": "<base64>"}`, each the model's
//!   own stream event. The last one carries `amazon-bedrock-invocationMetrics`
//!   (`inputTokenCount`, `outputTokenCount`, optionally `cacheReadInputTokenCount` and
//!   `cacheWriteInputTokenCount`): Bedrock's billing numbers, which win and end the stream, for
//!   every model family (Anthropic Claude, Meta Llama, Amazon Titan and Nova, Mistral, Cohere).
//!   Claude's inner events are the Anthropic Messages stream ([`super::anthropic`]): its usage
//!   stands when the metrics are missing, and gives the cache details the metrics lack.
//! - **ConverseStream**: `messageStart`, `contentBlockStart`, `contentBlockDelta`,
//!   `contentBlockStop`, `messageStop` (`stopReason`) and last `metadata`, with `usage`
//!   (`inputTokens`, `outputTokens`, `totalTokens`, `cacheReadInputTokens`,
//!   `cacheWriteInputTokens`) and `metrics` (`latencyMs`). The usage is final at `metadata`.
//!
//! Bedrock's input counts exclude cache reads and writes (its `totalTokens` adds them back), so
//! [`Usage::input_tokens`] is their sum, the whole prompt, as for the other formats. The model is
//! the Bedrock model id of the request path (`/model/<modelId>/converse-stream`, percent-decoded,
//! see [`model_from_path`]): the id Bedrock bills under, and the only one `ConverseStream` names;
//! without it, Claude's `message.model`. Token events are `contentBlockDelta`s and the chunks that
//! carry generated text ([`super::content`]).

use base64::Engine as _;
use serde_json::Value as Json;

use super::eventstream::Message;
use super::{anthropic, content, int, Format, Reading, UpstreamError, Usage};

/// What one event stream message says, for [`super::ResponseObserver`].
#[derive(Debug, PartialEq)]
pub(super) enum Event {
    /// An event: its `:event-type` and JSON (for a `chunk`, the decoded inner model event).
    Json { name: String, json: Json },
    /// An exception or error message.
    Error(UpstreamError),
    /// An event whose payload (or chunk bytes) is not JSON.
    NotJson,
}

/// Reads one message: see the module docs.
pub(super) fn event(m: &Message) -> Event {
    match m.header_str(":message-type") {
        Some("exception") => {
            let json = serde_json::from_slice::<Json>(&m.payload).ok();
            let message = json
                .as_ref()
                .and_then(|j| j.get("message").or_else(|| j.get("Message")))
                .and_then(Json::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&m.payload).into_owned());
            Event::Error(UpstreamError {
                message,
                kind: m.header_str(":exception-type").map(str::to_owned),
            })
        }
        Some("error") => Event::Error(UpstreamError {
            message: m
                .header_str(":error-message")
                .unwrap_or("event stream error")
                .to_owned(),
            kind: m.header_str(":error-code").map(str::to_owned),
        }),
        _ => {
            let name = m.header_str(":event-type").unwrap_or_default().to_owned();
            let Ok(json) = serde_json::from_slice::<Json>(&m.payload) else {
                return Event::NotJson;
            };
            if name != "chunk" {
                return Event::Json { name, json };
            }
            let inner = json
                .get("bytes")
                .and_then(Json::as_str)
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| serde_json::from_slice::<Json>(&b).ok());
            match inner {
                Some(json) => Event::Json { name, json },
                None => Event::NotJson,
            }
        }
    }
}

/// Bedrock is known by its framing: no JSON event on its own says "Bedrock".
pub(super) fn detects(_event: Option<&str>, _json: &Json) -> bool {
    false
}

pub(super) fn observe(r: &mut Reading, event: Option<&str>, json: &Json) -> bool {
    match event {
        Some("chunk") => chunk(r, json),
        Some("metadata") => {
            if let Some(u) = json.get("usage").and_then(converse_usage) {
                r.usage = Some(u);
            }
            r.ended = true;
            false
        }
        Some("contentBlockDelta") => true,
        _ => false,
    }
}

/// One `InvokeModelWithResponseStream` chunk's inner event.
fn chunk(r: &mut Reading, inner: &Json) -> bool {
    let token = if inner.get("type").is_some_and(Json::is_string) {
        anthropic::observe(r, None, inner)
    } else {
        content::is_content(Format::Bedrock, Some("chunk"), inner)
    };
    if let Some(m) = inner.get("amazon-bedrock-invocationMetrics") {
        if let Some(u) = metrics(m, r.usage.or(r.pending)) {
            r.usage = Some(u);
        }
        r.ended = true;
    }
    token
}

/// `amazon-bedrock-invocationMetrics`; cache counts it lacks come from the model's own usage.
fn metrics(m: &Json, model: Option<Usage>) -> Option<Usage> {
    let input = int(m, "inputTokenCount")?;
    let output = int(m, "outputTokenCount")?;
    let model = model.unwrap_or_default();
    let cache_read = int(m, "cacheReadInputTokenCount").or(model.cached_input_tokens);
    let cache_write = int(m, "cacheWriteInputTokenCount").or(model.cache_creation_input_tokens);
    let input = input + cache_read.unwrap_or(0) + cache_write.unwrap_or(0);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: input + output,
        cached_input_tokens: cache_read,
        cache_creation_input_tokens: cache_write,
        reasoning_tokens: None,
    })
}

/// `ConverseStream`'s `metadata.usage`.
fn converse_usage(u: &Json) -> Option<Usage> {
    let input = int(u, "inputTokens");
    let output = int(u, "outputTokens");
    if input.is_none() && output.is_none() {
        return None;
    }
    let cache_read = int(u, "cacheReadInputTokens");
    let cache_write = int(u, "cacheWriteInputTokens");
    let input = input.unwrap_or(0) + cache_read.unwrap_or(0) + cache_write.unwrap_or(0);
    let output = output.unwrap_or(0);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: int(u, "totalTokens").unwrap_or(input + output),
        cached_input_tokens: cache_read,
        cache_creation_input_tokens: cache_write,
        reasoning_tokens: None,
    })
}

/// The Bedrock actions whose path names the model: `/model/<modelId>/<action>`.
const ACTIONS: [&str; 4] = [
    "invoke",
    "invoke-with-response-stream",
    "converse",
    "converse-stream",
];

/// The model id of a Bedrock runtime request path (`/model/<modelId>/<action>`, after any prefix
/// a gateway adds), percent-decoded: `anthropic.claude-3-5-sonnet-20240620-v1%3A0` is
/// `anthropic.claude-3-5-sonnet-20240620-v1:0`, an inference profile ARN keeps its `/`.
pub fn model_from_path(path: &str) -> Option<String> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').collect();
    segments
        .windows(3)
        .find(|w| w[0] == "model" && !w[1].is_empty() && ACTIONS.contains(&w[2]))
        .map(|w| {
            percent_encoding::percent_decode_str(w[1])
                .decode_utf8_lossy()
                .into_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage_formats::eventstream::{encode, HeaderValue};
    use serde_json::json;

    fn s(v: &str) -> HeaderValue {
        HeaderValue::String(v.to_owned())
    }

    fn decoded(bytes: &[u8]) -> Message {
        let mut d = crate::usage_formats::eventstream::EventStreamDecoder::default();
        let mut out = None;
        d.push(bytes, &mut |m| out = Some(m));
        out.expect("one message")
    }

    #[test]
    fn the_model_id_comes_percent_decoded_from_either_api_path() {
        for (path, want) in [
            (
                "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke-with-response-stream",
                Some("anthropic.claude-3-5-sonnet-20240620-v1:0"),
            ),
            (
                "/model/us.amazon.nova-pro-v1%3A0/converse-stream?trace=1",
                Some("us.amazon.nova-pro-v1:0"),
            ),
            (
                "/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse",
                Some("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-7-sonnet-20250219-v1:0"),
            ),
            ("/model/meta.llama3-8b-instruct-v1:0/invoke", Some("meta.llama3-8b-instruct-v1:0")),
            ("/v1/chat/completions", None),
            ("/model//converse-stream", None),
            ("/model/x/unknown-action", None),
        ] {
            assert_eq!(model_from_path(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn a_chunk_is_unwrapped_and_exceptions_and_errors_are_upstream_errors() {
        let inner = br#"{"type":"message_stop"}"#;
        let b64 = base64::engine::general_purpose::STANDARD.encode(inner);
        let m = decoded(&encode(
            &[
                (":event-type", s("chunk")),
                (":content-type", s("application/json")),
                (":message-type", s("event")),
            ],
            json!({"bytes": b64, "p": "abcdefgh"})
                .to_string()
                .as_bytes(),
        ));
        assert_eq!(
            event(&m),
            Event::Json {
                name: "chunk".into(),
                json: json!({"type": "message_stop"})
            }
        );
        let m = decoded(&encode(
            &[
                (":exception-type", s("throttlingException")),
                (":content-type", s("application/json")),
                (":message-type", s("exception")),
            ],
            br#"{"message":"Too many requests, please wait before trying again."}"#,
        ));
        assert_eq!(
            event(&m),
            Event::Error(UpstreamError {
                message: "Too many requests, please wait before trying again.".into(),
                kind: Some("throttlingException".into())
            })
        );
        let m = decoded(&encode(
            &[
                (":message-type", s("error")),
                (":error-code", s("InternalFailure")),
                (":error-message", s("boom")),
            ],
            b"",
        ));
        assert_eq!(
            event(&m),
            Event::Error(UpstreamError {
                message: "boom".into(),
                kind: Some("InternalFailure".into())
            })
        );
        let not_base64 = decoded(&encode(
            &[(":event-type", s("chunk")), (":message-type", s("event"))],
            br#"{"bytes":"%%%"}"#,
        ));
        assert_eq!(event(&not_base64), Event::NotJson);
    }

    #[test]
    fn invocation_metrics_win_over_the_model_usage_and_keep_its_cache_details() {
        let mut r = Reading::default();
        chunk(
            &mut r,
            &json!({"type": "message_start", "message": {"model": "claude-3-5-sonnet-20240620",
                "usage": {"input_tokens": 10, "cache_read_input_tokens": 2000, "output_tokens": 1}}}),
        );
        chunk(
            &mut r,
            &json!({"type": "message_delta", "usage": {"output_tokens": 40}}),
        );
        assert_eq!(r.usage.map(|u| u.input_tokens), Some(2010));
        assert!(!r.ended);
        chunk(
            &mut r,
            &json!({"type": "message_stop", "amazon-bedrock-invocationMetrics":
                {"inputTokenCount": 11, "outputTokenCount": 42, "invocationLatency": 900, "firstByteLatency": 300}}),
        );
        assert!(r.ended);
        assert_eq!(
            r.usage,
            Some(Usage {
                input_tokens: 2011,
                output_tokens: 42,
                total_tokens: 2053,
                cached_input_tokens: Some(2000),
                cache_creation_input_tokens: None,
                reasoning_tokens: None,
            })
        );
        // Metrics that carry cache counts use theirs.
        let u = metrics(
            &json!({"inputTokenCount": 5, "outputTokenCount": 1, "cacheReadInputTokenCount": 7,
                "cacheWriteInputTokenCount": 3}),
            r.usage,
        )
        .unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_creation_input_tokens
            ),
            (15, Some(7), Some(3))
        );
        // Metrics without their counts are not usage.
        assert_eq!(metrics(&json!({"invocationLatency": 9}), None), None);
    }

    #[test]
    fn converse_usage_counts_cache_reads_and_writes_into_the_input() {
        let u = converse_usage(
            &json!({"inputTokens": 4, "outputTokens": 210, "totalTokens": 4548,
            "cacheReadInputTokens": 0, "cacheWriteInputTokens": 4334}),
        )
        .unwrap();
        assert_eq!(
            u,
            Usage {
                input_tokens: 4338,
                output_tokens: 210,
                total_tokens: 4548,
                cached_input_tokens: Some(0),
                cache_creation_input_tokens: Some(4334),
                reasoning_tokens: None,
            }
        );
        assert_eq!(converse_usage(&json!({"latencyMs": 3})), None);
    }
}
