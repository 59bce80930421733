//! Reading OpenAI-compatible response bodies as they stream by, for the built-in plugins.
//!
//! [`ResponseObserver`] is fed body chunks with their arrival stamps and works out, without ever
//! holding more than one unfinished line (or, for a plain JSON body, the body up to a cap):
//! whether the body is an SSE stream or plain JSON; SSE events and their count, `data: [DONE]`;
//! which events carry tokens (chat/completions chunks with `choices`, Responses API `*.delta`
//! events) and when the first and last of them arrived; the `usage` (top-level, or
//! `response.usage` for the Responses API, normalised to prompt/completion/total/cached tokens);
//! the model; an error object. Lines split across chunks are reassembled, because Envoy splits
//! and merges upstream writes freely.

use ipc_protocol::Value;
use serde_json::Value as Json;

/// Longest SSE line kept while waiting for its end; longer lines are dropped (and counted).
pub const MAX_LINE: usize = 1024 * 1024;
/// Largest plain JSON body parsed.
pub const MAX_JSON_BODY: usize = 8 * 1024 * 1024;

/// Token counts as the upstream reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: i64,
    /// Completion (output) tokens.
    pub completion_tokens: i64,
    /// Total tokens (prompt + completion unless the upstream says otherwise).
    pub total_tokens: i64,
    /// Prompt tokens served from the prefix cache, when reported.
    pub cached_tokens: Option<i64>,
}

impl Usage {
    /// Reads `usage` in either the chat/completions shape (`prompt_tokens`, `completion_tokens`)
    /// or the Responses API shape (`input_tokens`, `output_tokens`).
    pub fn from_json(usage: &Json) -> Option<Usage> {
        let obj = usage.as_object()?;
        let int = |k: &str| obj.get(k).and_then(Json::as_i64);
        let prompt = int("prompt_tokens").or_else(|| int("input_tokens"));
        let completion = int("completion_tokens").or_else(|| int("output_tokens"));
        if prompt.is_none() && completion.is_none() {
            return None;
        }
        let (prompt, completion) = (prompt.unwrap_or(0), completion.unwrap_or(0));
        let cached = ["prompt_tokens_details", "input_tokens_details"]
            .iter()
            .find_map(|k| obj.get(*k)?.get("cached_tokens")?.as_i64());
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: int("total_tokens").unwrap_or(prompt + completion),
            cached_tokens: cached,
        })
    }

    /// As a metadata map: `{prompt_tokens, completion_tokens, total_tokens, cached_tokens?}`.
    pub fn to_value(&self) -> Value {
        let mut map = Value::map([
            ("prompt_tokens", Value::Int(self.prompt_tokens)),
            ("completion_tokens", Value::Int(self.completion_tokens)),
            ("total_tokens", Value::Int(self.total_tokens)),
        ]);
        if let (Some(c), Value::Map(m)) = (self.cached_tokens, &mut map) {
            m.insert("cached_tokens".into(), Value::Int(c));
        }
        map
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unknown,
    Sse,
    Json,
}

/// Watches one response body go by. See the module docs.
#[derive(Debug)]
pub struct ResponseObserver {
    mode: Mode,
    line: Vec<u8>,
    skipping_long_line: bool,
    data: String,
    has_data: bool,
    body: Vec<u8>,
    /// Body messages that carried at least one byte.
    pub chunks: u64,
    /// Body bytes seen (the lengths Envoy reported, whether or not bytes were sent).
    pub body_bytes: u64,
    /// SSE events with data, `[DONE]` excluded.
    pub events: u64,
    /// SSE events that carry tokens.
    pub token_events: u64,
    /// Whether `data: [DONE]` was seen.
    pub done: bool,
    /// Arrival of the first body byte.
    pub first_body_ns: Option<u64>,
    /// Arrival of the chunk that completed the first token event.
    pub first_token_ns: Option<u64>,
    /// Arrival of the chunk that completed the last token event.
    pub last_token_ns: Option<u64>,
    /// The last usage reported.
    pub usage: Option<Usage>,
    /// The model named by the response.
    pub model: Option<String>,
    /// The message of an error object in the body.
    pub error: Option<String>,
    /// SSE lines longer than [`MAX_LINE`] that were dropped, or a JSON body over [`MAX_JSON_BODY`].
    pub overflows: u64,
    /// SSE events whose data was not JSON.
    pub non_json_events: u64,
}

impl Default for ResponseObserver {
    fn default() -> Self {
        ResponseObserver {
            mode: Mode::Unknown,
            line: Vec::new(),
            skipping_long_line: false,
            data: String::new(),
            has_data: false,
            body: Vec::new(),
            chunks: 0,
            body_bytes: 0,
            events: 0,
            token_events: 0,
            done: false,
            first_body_ns: None,
            first_token_ns: None,
            last_token_ns: None,
            usage: None,
            model: None,
            error: None,
            overflows: 0,
            non_json_events: 0,
        }
    }
}

impl ResponseObserver {
    /// Uses the response's `content-type` to decide between SSE and JSON (otherwise the first
    /// body byte decides: `{` or `[` means JSON).
    pub fn set_content_type(&mut self, content_type: &str) {
        let ct = content_type.to_ascii_lowercase();
        if ct.contains("text/event-stream") {
            self.mode = Mode::Sse;
        } else if ct.contains("json") {
            self.mode = Mode::Json;
        }
    }

    /// Records a body message of `len` bytes that arrived at `stamp_ns`, of which `bytes` are
    /// known (empty when the plugin does not receive bytes).
    pub fn push(&mut self, bytes: &[u8], len: u64, stamp_ns: u64) {
        let len = len.max(bytes.len() as u64);
        if len == 0 {
            return;
        }
        self.chunks += 1;
        self.body_bytes += len;
        self.first_body_ns.get_or_insert(stamp_ns);
        if self.mode == Mode::Unknown {
            match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'{') | Some(b'[') => self.mode = Mode::Json,
                Some(_) => self.mode = Mode::Sse,
                None => return,
            }
        }
        match self.mode {
            Mode::Json => {
                if self.body.len() + bytes.len() > MAX_JSON_BODY {
                    self.overflows += 1;
                } else {
                    self.body.extend_from_slice(bytes);
                }
            }
            _ => self.push_sse(bytes, stamp_ns),
        }
    }

    fn push_sse(&mut self, mut bytes: &[u8], stamp_ns: u64) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = bytes.split_at(nl);
            bytes = &rest[1..];
            if self.skipping_long_line {
                self.skipping_long_line = false;
                continue;
            }
            if self.line.len() + head.len() > MAX_LINE {
                self.overflows += 1;
                self.line.clear();
            } else if self.line.is_empty() {
                self.line_done(head, stamp_ns);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.line_done(&line, stamp_ns);
                line.clear();
                self.line = line;
            }
        }
        if !self.skipping_long_line {
            if self.line.len() + bytes.len() > MAX_LINE {
                self.overflows += 1;
                self.line.clear();
                self.skipping_long_line = true;
            } else {
                self.line.extend_from_slice(bytes);
            }
        }
    }

    fn line_done(&mut self, line: &[u8], stamp_ns: u64) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(stamp_ns);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        if field == b"data" {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(&String::from_utf8_lossy(value));
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, stamp_ns: u64) {
        if !self.has_data {
            return;
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        if data.trim() == "[DONE]" {
            self.done = true;
            return;
        }
        self.events += 1;
        match serde_json::from_str::<Json>(&data) {
            Ok(json) => {
                if self.observe_json(&json) {
                    self.token_events += 1;
                    self.first_token_ns.get_or_insert(stamp_ns);
                    self.last_token_ns = Some(stamp_ns);
                }
            }
            Err(_) => self.non_json_events += 1,
        }
    }

    /// Takes usage, model and error from one JSON object; returns whether it carries tokens.
    fn observe_json(&mut self, json: &Json) -> bool {
        let response = json.get("response");
        if let Some(model) = json
            .get("model")
            .or_else(|| response.and_then(|r| r.get("model")))
            .and_then(Json::as_str)
        {
            if self.model.as_deref() != Some(model) {
                self.model = Some(model.to_owned());
            }
        }
        if let Some(usage) = json.get("usage").and_then(Usage::from_json).or_else(|| {
            response
                .and_then(|r| r.get("usage"))
                .and_then(Usage::from_json)
        }) {
            self.usage = Some(usage);
        }
        if let Some(err) = json
            .get("error")
            .or_else(|| response.and_then(|r| r.get("error")))
            .filter(|e| !e.is_null())
        {
            let msg = err
                .get("message")
                .and_then(Json::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| err.to_string());
            self.error = Some(msg);
        }
        let has_choices = json
            .get("choices")
            .and_then(Json::as_array)
            .is_some_and(|c| !c.is_empty());
        let is_delta = json
            .get("type")
            .and_then(Json::as_str)
            .is_some_and(|t| t.ends_with(".delta"));
        has_choices || is_delta
    }

    /// The body ended: dispatches an SSE event left without its blank line, or parses the JSON
    /// body.
    pub fn finish(&mut self, stamp_ns: u64) {
        match self.mode {
            Mode::Json => {
                let body = std::mem::take(&mut self.body);
                if body.is_empty() {
                    return;
                }
                match serde_json::from_slice::<Json>(&body) {
                    Ok(json) => {
                        self.observe_json(&json);
                    }
                    Err(_) => self.non_json_events += 1,
                }
            }
            _ => {
                if !self.line.is_empty() && !self.skipping_long_line {
                    let line = std::mem::take(&mut self.line);
                    self.line_done(&line, stamp_ns);
                }
                self.dispatch(stamp_ns);
            }
        }
    }

    /// Whether the body was an SSE stream.
    pub fn is_sse(&self) -> bool {
        self.mode == Mode::Sse
    }

    /// How many tokens the response generated: the reported `completion_tokens` if any, else the
    /// number of token-carrying events.
    pub fn output_tokens(&self) -> u64 {
        match self.usage {
            Some(u) if u.completion_tokens > 0 => u.completion_tokens as u64,
            _ => self.token_events,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const CHAT_STREAM: &str = include_str!("../fixtures/chat_stream.sse");
    pub(crate) const RESPONSES_STREAM: &str = include_str!("../fixtures/responses_stream.sse");
    pub(crate) const CHAT_JSON: &str = include_str!("../fixtures/chat_completion.json");
    pub(crate) const ERROR_JSON: &str = include_str!("../fixtures/error.json");

    /// Feeds `body` cut into `size`-byte chunks, chunk i arriving at stamp 1000 * (i + 1).
    pub(crate) fn observe(body: &str, size: usize) -> ResponseObserver {
        let mut o = ResponseObserver::default();
        let mut last = 0;
        for (i, chunk) in body.as_bytes().chunks(size).enumerate() {
            last = 1000 * (i as u64 + 1);
            o.push(chunk, chunk.len() as u64, last);
        }
        o.finish(last);
        o
    }

    #[test]
    fn chat_stream_usage_survives_every_chunking() {
        for size in [1, 2, 3, 7, 64, 100, 333, CHAT_STREAM.len()] {
            let o = observe(CHAT_STREAM, size);
            assert!(o.is_sse());
            assert_eq!(
                o.usage,
                Some(Usage {
                    prompt_tokens: 17,
                    completion_tokens: 7,
                    total_tokens: 24,
                    cached_tokens: Some(16)
                }),
                "chunk size {size}"
            );
            assert_eq!(o.events, 8, "chunk size {size}");
            assert_eq!(o.token_events, 7, "chunk size {size}");
            assert!(o.done);
            assert_eq!(o.model.as_deref(), Some("meta-llama/Llama-3.1-8B-Instruct"));
        }
    }

    #[test]
    fn crlf_line_endings_are_read_too() {
        let o = observe(&CHAT_STREAM.replace('\n', "\r\n"), 5);
        assert_eq!(o.usage.unwrap().completion_tokens, 7);
        assert_eq!(o.events, 8);
    }

    #[test]
    fn responses_api_usage_comes_from_response_completed() {
        let o = observe(RESPONSES_STREAM, 50);
        assert_eq!(
            o.usage,
            Some(Usage {
                prompt_tokens: 36,
                completion_tokens: 3,
                total_tokens: 39,
                cached_tokens: Some(0)
            })
        );
        assert_eq!(o.token_events, 3);
        assert_eq!(o.events, 11);
        assert_eq!(o.model.as_deref(), Some("gpt-4.1-mini-2025-04-14"));
    }

    #[test]
    fn plain_json_body_is_parsed_at_the_end() {
        let o = observe(CHAT_JSON, 40);
        assert!(!o.is_sse());
        assert_eq!(o.usage.unwrap().total_tokens, 33);
        assert_eq!(o.usage.unwrap().cached_tokens, Some(0));
        assert_eq!(o.model.as_deref(), Some("Qwen/Qwen2.5-7B-Instruct"));
        assert_eq!(o.token_events, 0);
    }

    #[test]
    fn error_body_yields_its_message_and_no_usage() {
        let o = observe(ERROR_JSON, 16);
        assert_eq!(o.usage, None);
        assert!(o
            .error
            .unwrap()
            .starts_with("This model's maximum context length"));
    }

    #[test]
    fn an_overlong_line_is_dropped_without_losing_the_next_event() {
        let long = format!("data: {}\n\n", "x".repeat(MAX_LINE + 10));
        let body = format!("{long}{CHAT_STREAM}");
        let o = observe(&body, 4096);
        assert_eq!(o.overflows, 1);
        assert_eq!(o.usage.unwrap().completion_tokens, 7);
    }

    #[test]
    fn token_stamps_are_the_arrivals_of_the_chunks_completing_token_events() {
        let o = observe(CHAT_STREAM, CHAT_STREAM.len() / 4 + 1);
        assert_eq!(o.first_body_ns, Some(1000));
        assert_eq!(o.first_token_ns, Some(1000));
        assert!(o.last_token_ns.unwrap() >= 3000);
    }
}
