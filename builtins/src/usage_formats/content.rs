//! Which events of a response carry generated content, per format, and when they arrived: the
//! clock behind TTFT and inter-token latency.
//!
//! A stream carries more than tokens: OpenAI's first chunk is often a role-only delta (`"role":
//! "assistant", "content": ""`) and its last ones a `finish_reason` and a usage chunk with no
//! choices; Anthropic sends `message_start`, `content_block_start`, `ping`, `message_delta` and
//! `message_stop` around its `content_block_delta`s; the Responses API announces items and parts
//! before the first `*.delta`; Gemini may close with a candidate whose only part is an empty
//! text with a thought signature. Timing any of those as "the first token" makes TTFT look
//! better than what the client waits for, so [`is_content`] counts only events that carry
//! generated text, reasoning, refusals, tool-call arguments or other output parts.
//!
//! [`super::ResponseObserver`] counts these events (`content_events`) and keeps the arrival
//! stamps of the first and last (`first_content_ns`, `last_content_ns`), in the same pass that
//! reads the usage. A plain JSON body has no events: its content arrives with its last byte
//! (`last_body_ns`).

use serde_json::Value as Json;

use super::Format;

/// Whether one event (SSE event name and JSON data) of a response in `format` carries generated
/// content. See the module docs.
pub fn is_content(format: Format, event: Option<&str>, json: &Json) -> bool {
    match format {
        Format::OpenAiChat => openai_chat(json),
        Format::OpenAiResponses => openai_responses(json),
        Format::Anthropic => anthropic(event, json),
        Format::Gemini => gemini(json),
        Format::Bedrock => bedrock(event, json),
    }
}

fn text(v: Option<&Json>) -> bool {
    v.and_then(Json::as_str).is_some_and(|s| !s.is_empty())
}

fn non_empty(v: Option<&Json>) -> bool {
    match v {
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
        _ => false,
    }
}

/// A chunk with a choice whose delta has text (`content`; `reasoning_content` or `reasoning` as
/// vLLM, SGLang and DeepSeek send it; `refusal`) or tool calls, or a legacy completions choice
/// with `text`. Role-only deltas, `finish_reason`-only chunks and usage chunks are not content.
fn openai_chat(json: &Json) -> bool {
    let Some(choices) = json.get("choices").and_then(Json::as_array) else {
        return false;
    };
    choices.iter().any(|c| {
        text(c.get("text"))
            || c.get("delta").is_some_and(|d| {
                ["content", "reasoning_content", "reasoning", "refusal"]
                    .iter()
                    .any(|k| text(d.get(*k)))
                    || non_empty(d.get("tool_calls"))
                    || non_empty(d.get("function_call"))
            })
    })
}

/// A `*.delta` event (output text, reasoning, refusal, function-call arguments, audio, ...) with
/// a non-empty `delta`.
fn openai_responses(json: &Json) -> bool {
    json.get("type")
        .and_then(Json::as_str)
        .is_some_and(|t| t.ends_with(".delta"))
        && non_empty(json.get("delta"))
}

/// A `content_block_delta` with text, thinking or tool-input JSON (not a `signature_delta`).
fn anthropic(event: Option<&str>, json: &Json) -> bool {
    let kind = json.get("type").and_then(Json::as_str).or(event);
    if kind != Some("content_block_delta") {
        return false;
    }
    let Some(delta) = json.get("delta") else {
        return false;
    };
    match delta.get("type").and_then(Json::as_str) {
        Some("text_delta") => text(delta.get("text")),
        Some("thinking_delta") => text(delta.get("thinking")),
        Some("input_json_delta") => text(delta.get("partial_json")),
        Some("signature_delta") => false,
        Some("citations_delta") => non_empty(delta.get("citation")),
        // A delta type newer than this code: content if it carries anything.
        _ => delta
            .as_object()
            .is_some_and(|o| o.iter().any(|(k, v)| k != "type" && non_empty(Some(v)))),
    }
}

/// A response with a candidate part that has text (thoughts included) or is another kind of
/// output (`functionCall`, `inlineData`, `executableCode`, ...). An empty text part, with or
/// without a `thoughtSignature`, is not content.
fn gemini(json: &Json) -> bool {
    let Some(candidates) = json.get("candidates").and_then(Json::as_array) else {
        return false;
    };
    candidates.iter().any(|c| {
        c.get("content")
            .and_then(|c| c.get("parts"))
            .and_then(Json::as_array)
            .is_some_and(|parts| {
                parts.iter().any(|p| {
                    text(p.get("text"))
                        || p.as_object().is_some_and(|o| {
                            o.iter().any(|(k, v)| {
                                !matches!(k.as_str(), "text" | "thought" | "thoughtSignature")
                                    && !v.is_null()
                            })
                        })
                })
            })
    })
}

/// Bedrock: a `ConverseStream` `contentBlockDelta` with text, tool-input JSON or reasoning text;
/// an `InvokeModelWithResponseStream` chunk whose inner event is an Anthropic content delta, or
/// carries generated text in another family's field: Llama `generation`, Titan `outputText`,
/// Mistral `outputs[].text`, Cohere `text` or `generations[].text`, Nova
/// `contentBlockDelta.delta.text`.
fn bedrock(event: Option<&str>, json: &Json) -> bool {
    let converse_delta = |d: Option<&Json>| {
        d.is_some_and(|d| {
            text(d.get("text"))
                || non_empty(d.get("toolUse").and_then(|t| t.get("input")))
                || text(d.get("reasoningContent").and_then(|r| r.get("text")))
        })
    };
    match event {
        Some("contentBlockDelta") => converse_delta(json.get("delta")),
        Some("chunk") if json.get("type").is_some_and(Json::is_string) => anthropic(None, json),
        Some("chunk") => {
            let texts = |list: Option<&Json>| {
                list.and_then(Json::as_array)
                    .is_some_and(|l| l.iter().any(|o| text(o.get("text"))))
            };
            ["generation", "outputText", "text"]
                .iter()
                .any(|k| text(json.get(*k)))
                || texts(json.get("outputs"))
                || texts(json.get("generations"))
                || converse_delta(json.get("contentBlockDelta").and_then(|c| c.get("delta")))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn content(format: Format, event: Option<&str>, json: Json) -> bool {
        is_content(format, event, &json)
    }

    #[test]
    fn openai_chat_content_is_text_reasoning_refusal_or_tool_calls_not_roles_or_usage() {
        let f = Format::OpenAiChat;
        let delta = |d: Json| json!({"choices": [{"index": 0, "delta": d}]});
        assert!(!content(
            f,
            None,
            delta(json!({"role": "assistant", "content": ""}))
        ));
        assert!(!content(f, None, delta(json!({"role": "assistant"}))));
        assert!(!content(f, None, delta(json!({"content": null}))));
        assert!(!content(
            f,
            None,
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        ));
        assert!(!content(
            f,
            None,
            json!({"choices": [], "usage": {"prompt_tokens": 1}})
        ));
        assert!(content(f, None, delta(json!({"content": "Hi"}))));
        assert!(content(
            f,
            None,
            delta(json!({"reasoning_content": "Let me"}))
        ));
        assert!(content(f, None, delta(json!({"reasoning": "hmm"}))));
        assert!(content(f, None, delta(json!({"refusal": "I can't"}))));
        assert!(content(
            f,
            None,
            delta(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\""}}]}))
        ));
        // Legacy completions.
        assert!(content(f, None, json!({"choices": [{"text": "Once"}]})));
        assert!(!content(f, None, json!({"choices": [{"text": ""}]})));
    }

    #[test]
    fn responses_content_is_a_non_empty_delta_event() {
        let f = Format::OpenAiResponses;
        for kind in [
            "response.output_text.delta",
            "response.reasoning_summary_text.delta",
            "response.function_call_arguments.delta",
            "response.refusal.delta",
        ] {
            assert!(
                content(f, None, json!({"type": kind, "delta": "x"})),
                "{kind}"
            );
            assert!(
                !content(f, None, json!({"type": kind, "delta": ""})),
                "{kind}"
            );
        }
        for kind in [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.done",
            "response.completed",
        ] {
            assert!(!content(f, None, json!({"type": kind})), "{kind}");
        }
    }

    #[test]
    fn anthropic_content_is_a_content_block_delta_with_something_in_it() {
        let f = Format::Anthropic;
        let delta = |d: Json| json!({"type": "content_block_delta", "index": 0, "delta": d});
        for kind in [
            "message_start",
            "content_block_start",
            "ping",
            "message_delta",
            "message_stop",
        ] {
            assert!(!content(f, Some(kind), json!({"type": kind})), "{kind}");
        }
        assert!(!content(
            f,
            Some("content_block_start"),
            json!({"type": "content_block_start", "content_block": {"type": "text", "text": ""}})
        ));
        assert!(content(
            f,
            None,
            delta(json!({"type": "text_delta", "text": "The"}))
        ));
        assert!(!content(
            f,
            None,
            delta(json!({"type": "text_delta", "text": ""}))
        ));
        assert!(content(
            f,
            None,
            delta(json!({"type": "thinking_delta", "thinking": "So"}))
        ));
        assert!(content(
            f,
            None,
            delta(json!({"type": "input_json_delta", "partial_json": "{\"a\""}))
        ));
        assert!(!content(
            f,
            None,
            delta(json!({"type": "input_json_delta", "partial_json": ""}))
        ));
        assert!(!content(
            f,
            None,
            delta(json!({"type": "signature_delta", "signature": "EqQB"}))
        ));
        // The event name alone is enough when `type` is missing.
        assert!(content(
            f,
            Some("content_block_delta"),
            json!({"delta": {"type": "text_delta", "text": "x"}})
        ));
    }

    #[test]
    fn gemini_content_is_a_part_with_text_or_other_output_not_an_empty_part() {
        let f = Format::Gemini;
        let parts = |p: Json| json!({"candidates": [{"content": {"parts": p, "role": "model"}}]});
        assert!(content(f, None, parts(json!([{"text": "The"}]))));
        assert!(content(
            f,
            None,
            parts(json!([{"text": "Thinking", "thought": true}]))
        ));
        assert!(content(
            f,
            None,
            parts(json!([{"functionCall": {"name": "f", "args": {}}}]))
        ));
        assert!(!content(f, None, parts(json!([{"text": ""}]))));
        assert!(!content(
            f,
            None,
            parts(json!([{"text": "", "thoughtSignature": "Cq"}]))
        ));
        assert!(!content(f, None, parts(json!([]))));
        assert!(!content(
            f,
            None,
            json!({"candidates": [{"finishReason": "STOP"}], "usageMetadata": {}})
        ));
        assert!(!content(
            f,
            None,
            json!({"usageMetadata": {"promptTokenCount": 3}})
        ));
    }

    #[test]
    fn bedrock_content_is_a_delta_or_a_chunk_with_generated_text_in_any_family() {
        let f = Format::Bedrock;
        let chunk = |j: Json| content(f, Some("chunk"), j);
        assert!(content(
            f,
            Some("contentBlockDelta"),
            json!({"delta": {"text": "Hi"}, "contentBlockIndex": 0})
        ));
        assert!(content(
            f,
            Some("contentBlockDelta"),
            json!({"delta": {"toolUse": {"input": "{\"city\""}}})
        ));
        assert!(content(
            f,
            Some("contentBlockDelta"),
            json!({"delta": {"reasoningContent": {"text": "So"}}})
        ));
        assert!(!content(
            f,
            Some("contentBlockDelta"),
            json!({"delta": {"reasoningContent": {"signature": "EqQB"}}})
        ));
        assert!(!content(
            f,
            Some("contentBlockDelta"),
            json!({"delta": {"text": ""}})
        ));
        for kind in [
            "messageStart",
            "contentBlockStart",
            "messageStop",
            "metadata",
        ] {
            assert!(
                !content(f, Some(kind), json!({"role": "assistant"})),
                "{kind}"
            );
        }
        assert!(chunk(
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}})
        ));
        assert!(!chunk(json!({"type": "message_start", "message": {}})));
        assert!(chunk(
            json!({"generation": " Paris", "prompt_token_count": null})
        ));
        assert!(!chunk(json!({"generation": "", "stop_reason": "stop"})));
        assert!(chunk(json!({"outputText": "Hello", "index": 0})));
        assert!(chunk(
            json!({"outputs": [{"text": "Bonjour", "stop_reason": null}]})
        ));
        assert!(chunk(json!({"text": "Hi", "is_finished": false})));
        assert!(chunk(json!({"generations": [{"text": "Hi"}]})));
        assert!(chunk(
            json!({"contentBlockDelta": {"delta": {"text": "Hi"}, "contentBlockIndex": 0}})
        ));
        assert!(!chunk(
            json!({"is_finished": true, "finish_reason": "COMPLETE"})
        ));
    }

    use super::super::ResponseObserver;

    fn clock(body: &str, sizes: usize) -> ResponseObserver {
        let mut c = ResponseObserver::default();
        let mut last = 0;
        for (i, chunk) in body.as_bytes().chunks(sizes).enumerate() {
            last = 1000 * (i as u64 + 1);
            c.push(chunk, chunk.len() as u64, last);
        }
        c.finish(last);
        c
    }

    #[test]
    fn the_clock_skips_the_role_delta_and_times_the_first_text() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"!\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        // One event per chunk: chunk i arrives at 1000 * (i + 1).
        let mut c = ResponseObserver::default();
        for (i, event) in body.split_inclusive("\n\n").enumerate() {
            c.push(event.as_bytes(), event.len() as u64, 1000 * (i as u64 + 1));
        }
        c.finish(6000);
        assert_eq!(c.format(), Some(Format::OpenAiChat));
        assert_eq!(c.content_events, 2);
        assert_eq!(c.first_content_ns, Some(2000));
        assert_eq!(c.last_content_ns, Some(3000));
        assert_eq!(c.last_body_ns, Some(5000));
        for size in 1..body.len() {
            assert_eq!(clock(body, size).content_events, 2, "chunk size {size}");
        }
    }

    #[test]
    fn the_clock_reads_a_compressed_stream_and_stops_at_an_undecodable_one() {
        use std::io::Write;
        let body = "event: ping\ndata: {\"type\":\"ping\"}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"}}\n\n";
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(body.as_bytes()).unwrap();
        let gz = e.finish().unwrap();
        let mut c = ResponseObserver::default();
        c.set_content_type("text/event-stream");
        c.set_content_encoding("gzip");
        for (i, b) in gz.chunks(7).enumerate() {
            c.push(b, b.len() as u64, i as u64 + 1);
        }
        c.finish(99);
        assert_eq!((c.format(), c.content_events), (Some(Format::Anthropic), 1));

        let mut c = ResponseObserver::default();
        c.set_content_encoding("compress");
        c.push(body.as_bytes(), body.len() as u64, 1);
        c.finish(2);
        assert_eq!(c.content_events, 0);
        assert_eq!(c.last_body_ns, Some(1));
    }

    #[test]
    fn a_json_body_has_no_events_but_a_last_byte() {
        let c = clock("{\"choices\":[{\"message\":{\"content\":\"Hi\"}}]}", 10);
        assert!(!c.is_sse());
        assert_eq!(c.content_events, 0);
        assert_eq!(c.last_body_ns, Some(5000));
    }
}
