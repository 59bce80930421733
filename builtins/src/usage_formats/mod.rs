//! LLM provider response formats, read as the body streams by: one parser module per wire format.
//!
//! [`ResponseObserver`] is fed body chunks with their arrival stamps. It frames the body (SSE via
//! [`plugin_runner::sse`], an AWS event stream via [`eventstream`], or plain JSON up to
//! [`MAX_JSON_BODY`]), works out the provider [`Format`] — forced by config, Bedrock for an
//! event stream, or detected from the first event or body that one of the formats recognises —
//! and hands every JSON event to that format's parser. The parsers fill one
//! [`Reading`]: normalised [`Usage`], the response's model, an upstream error, whether the
//! provider's end marker came, and which events carry tokens (for TTFT/TPOT). A new format is a new module here, a new
//! [`Format`] variant and a new golden fixture under `tests/fixtures/usage/`.
//!
//! Usage is never guessed: when a response ends without it (compressed body, unknown format,
//! upstream error, truncated stream, an event stream with a bad CRC) [`ResponseObserver::usage`]
//! stays `None` and
//! [`ResponseObserver::no_usage_reason`] says why.

pub mod anthropic;
pub mod bedrock;
pub mod content;
pub mod eventstream;
pub mod gemini;
pub mod openai_chat;
pub mod openai_responses;

use ipc_protocol::Value;
use serde_json::Value as Json;

pub use plugin_runner::sse::MAX_LINE;

/// Largest plain JSON body parsed.
pub const MAX_JSON_BODY: usize = 8 * 1024 * 1024;

/// A provider wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenAI Chat Completions and legacy Completions, and OpenAI-compatible servers (vLLM,
    /// SGLang, ...).
    OpenAiChat,
    /// OpenAI Responses API.
    OpenAiResponses,
    /// Anthropic Messages API.
    Anthropic,
    /// Google Gemini `generateContent` / `streamGenerateContent`.
    Gemini,
    /// Amazon Bedrock `InvokeModelWithResponseStream` and `ConverseStream` (AWS event stream).
    Bedrock,
}

impl Format {
    /// Every format. Their detections do not overlap (each keys on fields the others lack;
    /// Bedrock is known by its framing, not by a JSON event), so this is also the detection order.
    pub const ALL: [Format; 5] = [
        Format::OpenAiChat,
        Format::OpenAiResponses,
        Format::Anthropic,
        Format::Gemini,
        Format::Bedrock,
    ];

    /// The name used in config and in metadata.
    pub fn name(self) -> &'static str {
        match self {
            Format::OpenAiChat => "openai",
            Format::OpenAiResponses => "openai-responses",
            Format::Anthropic => "anthropic",
            Format::Gemini => "gemini",
            Format::Bedrock => "bedrock",
        }
    }

    /// The format named `name` (see [`Format::name`]).
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether one event (SSE event name and data, or a whole JSON body) is in this format.
    fn detects(self, event: Option<&str>, json: &Json) -> bool {
        match self {
            Format::OpenAiChat => openai_chat::detects(event, json),
            Format::OpenAiResponses => openai_responses::detects(event, json),
            Format::Anthropic => anthropic::detects(event, json),
            Format::Gemini => gemini::detects(event, json),
            Format::Bedrock => bedrock::detects(event, json),
        }
    }

    fn observe(self, r: &mut Reading, event: Option<&str>, json: &Json) -> bool {
        match self {
            Format::OpenAiChat => openai_chat::observe(r, event, json),
            Format::OpenAiResponses => openai_responses::observe(r, event, json),
            Format::Anthropic => anthropic::observe(r, event, json),
            Format::Gemini => gemini::observe(r, event, json),
            Format::Bedrock => bedrock::observe(r, event, json),
        }
    }
}

/// Token counts, normalised across formats.
///
/// `input_tokens` counts every prompt token, cached ones included (for Anthropic: its
/// `input_tokens` + `cache_read_input_tokens` + `cache_creation_input_tokens`), and
/// `output_tokens` every generated token, reasoning included (for Gemini:
/// `candidatesTokenCount` + `thoughtsTokenCount`), so the same arithmetic works for every
/// provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens, cached and cache-creation tokens included.
    pub input_tokens: i64,
    /// Generated tokens, reasoning tokens included.
    pub output_tokens: i64,
    /// Total as the upstream reported it, else input + output.
    pub total_tokens: i64,
    /// Input tokens served from the provider's prompt cache, when reported.
    pub cached_input_tokens: Option<i64>,
    /// Input tokens written to the provider's prompt cache (Anthropic), when reported.
    pub cache_creation_input_tokens: Option<i64>,
    /// Output tokens spent on reasoning/thinking, when reported.
    pub reasoning_tokens: Option<i64>,
}

impl Usage {
    /// As metadata: the token types by name, plus the OpenAI-style `prompt_tokens`,
    /// `completion_tokens` and `cached_tokens` that existing access logs and CEL expressions use.
    pub fn insert_into(&self, m: &mut std::collections::BTreeMap<String, Value>) {
        let mut put = |k: &str, v: i64| {
            m.insert(k.to_owned(), Value::Int(v));
        };
        put("input_tokens", self.input_tokens);
        put("output_tokens", self.output_tokens);
        put("total_tokens", self.total_tokens);
        put("prompt_tokens", self.input_tokens);
        put("completion_tokens", self.output_tokens);
        if let Some(c) = self.cached_input_tokens {
            put("cached_input_tokens", c);
            put("cached_tokens", c);
        }
        if let Some(c) = self.cache_creation_input_tokens {
            put("cache_creation_input_tokens", c);
        }
        if let Some(r) = self.reasoning_tokens {
            put("reasoning_tokens", r);
        }
    }
}

/// An error the upstream reported in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// The upstream's message.
    pub message: String,
    /// Its type or code (`invalid_request_error`, `overloaded_error`, `INVALID_ARGUMENT`), when
    /// given.
    pub kind: Option<String>,
}

impl UpstreamError {
    /// Reads `{message, type?, code?, status?}`; a non-object is kept as its JSON text.
    pub(crate) fn from_json(err: &Json) -> Option<UpstreamError> {
        if err.is_null() {
            return None;
        }
        let message = err
            .get("message")
            .and_then(Json::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| err.to_string());
        let kind = ["type", "status", "code"]
            .iter()
            .find_map(|k| match err.get(*k)? {
                Json::String(s) => Some(s.clone()),
                Json::Number(n) => Some(n.to_string()),
                _ => None,
            });
        Some(UpstreamError { message, kind })
    }

    /// The error a response object carries: its `error` object (OpenAI, Gemini, SGLang and
    /// newer vLLM), or the whole object when it is a flat `{"object": "error", "message", "type",
    /// "code"}` (older vLLM, also mid-stream as an SSE event).
    pub(crate) fn in_body(json: &Json) -> Option<UpstreamError> {
        if json.get("object").and_then(Json::as_str) == Some("error") {
            return UpstreamError::from_json(json);
        }
        json.get("error").and_then(UpstreamError::from_json)
    }
}

/// What the format parsers found in one response.
#[derive(Debug, Default)]
pub struct Reading {
    /// Usage the format considers final.
    pub usage: Option<Usage>,
    /// Usage seen but not yet final (Anthropic's `message_start`, Gemini's chunks before the
    /// `finishReason`); promoted to `usage` when the end marker came.
    pub pending: Option<Usage>,
    /// The format's end marker was seen (`[DONE]`, `response.completed`, `message_stop`, a
    /// `finishReason`), or the body was a whole JSON document.
    pub ended: bool,
    /// The model the response names.
    pub model: Option<String>,
    /// An error the upstream reported in the body.
    pub error: Option<UpstreamError>,
}

impl Reading {
    pub(crate) fn set_model(&mut self, model: Option<&str>) {
        if let Some(model) = model.filter(|m| !m.is_empty()) {
            if self.model.as_deref() != Some(model) {
                self.model = Some(model.to_owned());
            }
        }
    }
}

/// Reads a non-negative integer field.
pub(crate) fn int(obj: &Json, key: &str) -> Option<i64> {
    obj.get(key).and_then(Json::as_i64)
}

/// Longest prefix of a body kept to describe an error response that has no error object (a
/// proxy's plain-text 503, a framework's `{"detail": "Not Found"}`).
pub const MAX_ERROR_BODY: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Unknown,
    Sse,
    /// An AWS event stream (`application/vnd.amazon.eventstream`).
    EventStream,
    Json,
}

/// Watches one response body go by. See the module docs.
#[derive(Debug)]
pub struct ResponseObserver {
    mode: Mode,
    format: Option<Format>,
    forced: bool,
    /// Some event (or the body) was in `format`.
    recognised: bool,
    sse: plugin_runner::sse::SseDecoder,
    eventstream: eventstream::EventStreamDecoder,
    /// Why the event stream could not be read to its end (bad CRC, cut inside a message); the
    /// usage is then withheld.
    frame_error: Option<eventstream::FrameError>,
    /// The model the request path names (Bedrock's `/model/<modelId>/...`).
    request_model: Option<String>,
    body: Vec<u8>,
    json_overflow: bool,
    /// The first [`MAX_ERROR_BODY`] bytes of the (decoded) body, to describe an error response.
    head: Vec<u8>,
    /// The decoder of a `Content-Encoding`d body.
    decoder: Option<crate::decode::Decoder>,
    /// Why the body is not (or no longer) decoded; the usage is then withheld.
    undecodable: Option<crate::decode::DecodeError>,
    reading: Reading,
    /// Body messages that carried at least one byte.
    pub chunks: u64,
    /// Body bytes seen (the lengths Envoy reported, whether or not bytes were sent).
    pub body_bytes: u64,
    /// SSE events with data (`[DONE]` excluded), or event stream messages.
    pub events: u64,
    /// SSE events (or event stream messages) that carry tokens.
    pub token_events: u64,
    /// SSE events that deliver generated content ([`content::is_content`]): the count the
    /// `usage` plugin reports as estimated output tokens when the upstream sent no usage, and the
    /// events TTFT and inter-token latency are timed on.
    pub content_events: u64,
    /// Arrival of the chunk that completed the first content-bearing event.
    pub first_content_ns: Option<u64>,
    /// Arrival of the chunk that completed the last content-bearing event.
    pub last_content_ns: Option<u64>,
    /// Arrival of the last body message that carried bytes (a JSON body's content arrives with
    /// it).
    pub last_body_ns: Option<u64>,
    /// Whether `data: [DONE]` was seen.
    pub done: bool,
    /// Arrival of the first body byte.
    pub first_body_ns: Option<u64>,
    /// Arrival of the chunk that completed the first token event.
    pub first_token_ns: Option<u64>,
    /// Arrival of the chunk that completed the last token event.
    pub last_token_ns: Option<u64>,
    /// The final usage, once [`ResponseObserver::finish`] ran.
    pub usage: Option<Usage>,
    /// The model named by the response.
    pub model: Option<String>,
    /// The message of an error object in the body.
    pub error: Option<String>,
    /// SSE lines longer than [`MAX_LINE`] or event stream messages longer than
    /// [`eventstream::MAX_MESSAGE`] that were dropped, or a JSON body over [`MAX_JSON_BODY`].
    pub overflows: u64,
    /// SSE events (or a body) whose data was not JSON.
    pub non_json_events: u64,
}

impl Default for ResponseObserver {
    fn default() -> Self {
        ResponseObserver {
            mode: Mode::Unknown,
            format: None,
            forced: false,
            recognised: false,
            sse: plugin_runner::sse::SseDecoder::default(),
            eventstream: eventstream::EventStreamDecoder::default(),
            frame_error: None,
            request_model: None,
            body: Vec::new(),
            json_overflow: false,
            head: Vec::new(),
            decoder: None,
            undecodable: None,
            reading: Reading::default(),
            chunks: 0,
            body_bytes: 0,
            events: 0,
            token_events: 0,
            content_events: 0,
            first_content_ns: None,
            last_content_ns: None,
            last_body_ns: None,
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
    /// Reads the body as `format` instead of detecting it (`None`: detect). Call before the
    /// first body byte.
    pub fn force_format(&mut self, format: Option<Format>) {
        self.forced = format.is_some();
        self.format = format;
    }

    /// Uses the response's `content-type` to decide between SSE, an AWS event stream and JSON
    /// (otherwise the first body byte decides: `{` or `[` means JSON, a NUL byte — the top of an
    /// event stream prelude's length — an event stream, anything else SSE).
    pub fn set_content_type(&mut self, content_type: &str) {
        let ct = content_type.to_ascii_lowercase();
        if ct.contains("text/event-stream") {
            self.mode = Mode::Sse;
        } else if ct.contains("application/vnd.amazon.eventstream") {
            self.mode = Mode::EventStream;
        } else if ct.contains("json") {
            self.mode = Mode::Json;
        }
    }

    /// Uses the response's `content-encoding`: a gzip, deflate, br or zstd body is decoded
    /// chunk by chunk ([`crate::decode`]) before it is read, and the byte counts stay those of
    /// the encoded body. An encoding that cannot be decoded (unknown, stacked), or a body that
    /// fails to decode (corrupt, truncated, a chunk over
    /// [`crate::decode::MAX_DECODED_PER_CHUNK`] decoded), has no usage and the reason says why.
    pub fn set_content_encoding(&mut self, encoding: &str) {
        match crate::decode::Encoding::from_header(encoding) {
            Ok(None) => {}
            Ok(Some(enc)) => self.decoder = Some(crate::decode::Decoder::new(enc)),
            Err(e) => self.undecodable = Some(e),
        }
    }

    /// Uses the request's `:path`: a Bedrock response names no model, its path does
    /// ([`bedrock::model_from_path`]).
    pub fn set_request_path(&mut self, path: &str) {
        self.request_model = bedrock::model_from_path(path);
    }

    /// The format read: forced, or detected so far.
    pub fn format(&self) -> Option<Format> {
        self.format
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
        self.last_body_ns = Some(stamp_ns);
        if self.undecodable.is_some() {
            return;
        }
        match self.decoder.take() {
            Some(mut decoder) => {
                let decoded = decoder.push(bytes, &mut |piece| self.parse(piece, stamp_ns));
                self.undecodable = decoded.err();
                self.decoder = Some(decoder);
            }
            None => self.parse(bytes, stamp_ns),
        }
    }

    /// Reads (decoded) body bytes.
    fn parse(&mut self, bytes: &[u8], stamp_ns: u64) {
        let room = MAX_ERROR_BODY - self.head.len();
        self.head.extend_from_slice(&bytes[..room.min(bytes.len())]);
        if self.mode == Mode::Unknown {
            match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'{') | Some(b'[') => self.mode = Mode::Json,
                Some(0) => self.mode = Mode::EventStream,
                Some(_) => self.mode = Mode::Sse,
                None => return,
            }
        }
        match self.mode {
            Mode::Json => {
                if self.body.len() + bytes.len() > MAX_JSON_BODY {
                    if !self.json_overflow {
                        self.overflows += 1;
                    }
                    self.json_overflow = true;
                } else {
                    self.body.extend_from_slice(bytes);
                }
            }
            Mode::EventStream => {
                let mut es = std::mem::take(&mut self.eventstream);
                es.push(bytes, &mut |m| self.on_message(&m, stamp_ns));
                self.overflows = es.overflows;
                self.eventstream = es;
            }
            _ => {
                let mut sse = std::mem::take(&mut self.sse);
                sse.push(bytes, &mut |event, data| {
                    self.on_event(event, data, stamp_ns)
                });
                self.overflows = sse.overflows;
                self.sse = sse;
            }
        }
    }

    fn on_event(&mut self, event: Option<&str>, data: &str, stamp_ns: u64) {
        if data.trim() == "[DONE]" {
            self.done = true;
            self.reading.ended = true;
            return;
        }
        self.events += 1;
        match serde_json::from_str::<Json>(data) {
            Ok(json) => self.on_json(event, &json, stamp_ns),
            Err(_) => self.non_json_events += 1,
        }
    }

    /// One event stream message. Its body is Bedrock's, unless another format was forced: then
    /// it is not read (and the format is not recognised).
    fn on_message(&mut self, m: &eventstream::Message, stamp_ns: u64) {
        let format = *self.format.get_or_insert(Format::Bedrock);
        if format != Format::Bedrock {
            return;
        }
        self.recognised = true;
        self.events += 1;
        match bedrock::event(m) {
            bedrock::Event::Json { name, json } => self.on_json(Some(&name), &json, stamp_ns),
            bedrock::Event::Error(e) => self.reading.error = Some(e),
            bedrock::Event::NotJson => self.non_json_events += 1,
        }
    }

    /// One JSON event: its tokens, content and the clocks.
    fn on_json(&mut self, event: Option<&str>, json: &Json, stamp_ns: u64) {
        if self.observe_json(event, json) {
            self.token_events += 1;
            self.first_token_ns.get_or_insert(stamp_ns);
            self.last_token_ns = Some(stamp_ns);
        }
        if self
            .format
            .is_some_and(|f| content::is_content(f, event, json))
        {
            self.content_events += 1;
            self.first_content_ns.get_or_insert(stamp_ns);
            self.last_content_ns = Some(stamp_ns);
        }
    }

    /// Detects the format if needed, then lets its parser read the event; returns whether the
    /// event carries tokens.
    fn observe_json(&mut self, event: Option<&str>, json: &Json) -> bool {
        match self.format {
            None => {
                self.format = Format::ALL.into_iter().find(|f| f.detects(event, json));
                self.recognised = self.format.is_some();
            }
            Some(f) if !self.recognised => self.recognised = f.detects(event, json),
            Some(_) => {}
        }
        match self.format {
            Some(f) => f.observe(&mut self.reading, event, json),
            None => {
                // No format recognised (yet): an error object is still worth reporting.
                if let Some(e) = UpstreamError::in_body(json) {
                    self.reading.error = Some(e);
                }
                false
            }
        }
    }

    /// A whole JSON body: one response object, or (Gemini `streamGenerateContent` without
    /// `alt=sse`) an array of them.
    fn observe_document(&mut self, json: &Json) {
        match json {
            Json::Array(items) => {
                for item in items {
                    self.observe_json(None, item);
                }
            }
            _ => {
                self.observe_json(None, json);
            }
        }
        self.reading.ended = true;
    }

    /// The body ended: dispatches an SSE event left without its blank line, or parses the JSON
    /// body; then settles the usage.
    pub fn finish(&mut self, stamp_ns: u64) {
        if let (Some(decoder), None) = (self.decoder.as_mut(), &self.undecodable) {
            self.undecodable = decoder.finish().err();
        }
        match self.mode {
            Mode::Json => {
                let body = std::mem::take(&mut self.body);
                if !body.is_empty() && !self.json_overflow {
                    match serde_json::from_slice::<Json>(&body) {
                        Ok(json) => self.observe_document(&json),
                        Err(_) => self.non_json_events += 1,
                    }
                }
            }
            Mode::EventStream => self.frame_error = self.eventstream.finish().err(),
            _ => {
                let mut sse = std::mem::take(&mut self.sse);
                sse.finish(&mut |event, data| self.on_event(event, data, stamp_ns));
                self.overflows = sse.overflows;
                self.sse = sse;
            }
        }
        let r = &mut self.reading;
        if r.usage.is_none() && r.ended {
            r.usage = r.pending;
        }
        self.usage = r
            .usage
            .filter(|_| self.undecodable.is_none() && self.frame_error.is_none());
        self.model = match self.format {
            Some(Format::Bedrock) => self.request_model.clone().or_else(|| r.model.clone()),
            _ => r.model.clone(),
        };
        self.error = r.error.as_ref().map(|e| e.message.clone());
    }
}

impl ResponseObserver {
    /// Usage seen but not final, for a stream that ended before its end marker: Anthropic's
    /// `message_start` (its input tokens, also inside Bedrock's Claude chunks), Gemini's chunks
    /// before the `finishReason`.
    pub fn pending_usage(&self) -> Option<Usage> {
        self.reading.pending
    }

    /// Whether the body was a stream of events, SSE or an AWS event stream (not one JSON
    /// document): what the streamed clocks (TTFT, inter-token latency) and the output estimate
    /// need.
    pub fn is_sse(&self) -> bool {
        matches!(self.mode, Mode::Sse | Mode::EventStream)
    }

    /// The error the upstream reported in the body, with its type when given.
    pub fn upstream_error(&self) -> Option<&UpstreamError> {
        self.reading.error.as_ref()
    }

    /// After [`ResponseObserver::finish`]: the response's error, typed. An error object or event
    /// in the body is reported as the upstream gave it; a non-2xx `status` without one becomes
    /// `http_<status>` with the start of the body (up to [`MAX_ERROR_BODY`] bytes, whitespace
    /// collapsed) or `upstream status <status>` as its message.
    pub fn typed_error(&self, status: u16) -> Option<UpstreamError> {
        if let Some(e) = &self.reading.error {
            return Some(e.clone());
        }
        if status < 400 {
            return None;
        }
        let text = String::from_utf8_lossy(&self.head);
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        Some(UpstreamError {
            message: if text.is_empty() || self.undecodable.is_some() {
                format!("upstream status {status}")
            } else {
                text
            },
            kind: Some(format!("http_{status}")),
        })
    }

    /// After [`ResponseObserver::finish`]: why there is no usage (`None` when there is), as a
    /// lowercase fragment an operator can act on.
    pub fn no_usage_reason(&self, status: u16) -> Option<String> {
        if self.usage.is_some() {
            return None;
        }
        let format = self.format.map(Format::name).unwrap_or("unknown");
        Some(if let Some(e) = &self.undecodable {
            format!("compressed body not read: {e}")
        } else if let Some(e @ eventstream::FrameError::Truncated { .. }) = &self.frame_error {
            format!("truncated stream: {e}")
        } else if let Some(e) = &self.frame_error {
            format!("corrupt event stream, usage not trusted: {e}")
        } else if self.reading.error.is_some() && status >= 400 {
            format!("upstream error (status {status})")
        } else if self.reading.error.is_some() {
            "upstream error".to_owned()
        } else if status >= 400 {
            format!("upstream status {status}")
        } else if self.body_bytes == 0 {
            "empty body".to_owned()
        } else if self.json_overflow {
            format!("json body over {MAX_JSON_BODY} bytes, not parsed")
        } else if self.format.is_none() && self.events == 0 && self.non_json_events > 0 {
            "body is not json".to_owned()
        } else if self.format.is_none() {
            "unrecognised response format".to_owned()
        } else if self.forced && !self.recognised {
            format!("body is not in the configured {format} format")
        } else if !self.reading.ended {
            format!("truncated stream: the {format} stream ended before its last event")
        } else if self.format == Some(Format::OpenAiChat) && self.is_sse() {
            "no usage in the openai stream (the request needs stream_options.include_usage)"
                .to_owned()
        } else {
            format!("no usage in the {format} response")
        })
    }

    /// How many tokens the response generated: the reported output tokens if any, else the
    /// number of token-carrying events.
    pub fn output_tokens(&self) -> u64 {
        match self.usage {
            Some(u) if u.output_tokens > 0 => u.output_tokens as u64,
            _ => self.token_events,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const CHAT_STREAM: &str = include_str!("../../fixtures/chat_stream.sse");
    pub(crate) const RESPONSES_STREAM: &str = include_str!("../../fixtures/responses_stream.sse");
    pub(crate) const CHAT_JSON: &str = include_str!("../../fixtures/chat_completion.json");
    pub(crate) const ERROR_JSON: &str = include_str!("../../fixtures/error.json");

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
                    input_tokens: 17,
                    output_tokens: 7,
                    total_tokens: 24,
                    cached_input_tokens: Some(16),
                    ..Usage::default()
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
        assert_eq!(o.usage.unwrap().output_tokens, 7);
        assert_eq!(o.events, 8);
    }

    #[test]
    fn responses_api_usage_comes_from_response_completed() {
        let o = observe(RESPONSES_STREAM, 50);
        assert_eq!(
            o.usage,
            Some(Usage {
                input_tokens: 36,
                output_tokens: 3,
                total_tokens: 39,
                cached_input_tokens: Some(0),
                reasoning_tokens: Some(0),
                ..Usage::default()
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
        assert_eq!(o.usage.unwrap().cached_input_tokens, Some(0));
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
        assert_eq!(o.usage.unwrap().output_tokens, 7);
    }

    #[test]
    fn a_bedrock_event_stream_is_timed_like_sse_and_names_the_model_of_its_path() {
        let body: &[u8] =
            include_bytes!("../../tests/fixtures/usage/bedrock_converse_stream.eventstream");
        let mut o = ResponseObserver::default();
        o.set_content_type("application/vnd.amazon.eventstream");
        o.set_request_path("/model/us.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse-stream");
        // Whole messages, one per chunk, as Bedrock writes them: chunk i arrives at 1000 * (i + 1).
        let mut at = 0;
        let mut i = 0;
        while at < body.len() {
            let len = u32::from_be_bytes(body[at..at + 4].try_into().unwrap()) as usize;
            i += 1;
            o.push(&body[at..at + len], len as u64, 1000 * i);
            at += len;
        }
        o.finish(1000 * (i + 1));
        assert!(o.is_sse(), "an event stream is timed as a stream");
        assert_eq!((o.events, o.token_events, o.content_events), (10, 6, 6));
        assert_eq!(o.first_content_ns, Some(2000));
        assert_eq!(o.last_content_ns, Some(7000));
        assert_eq!(o.usage.map(|u| u.output_tokens), Some(58));
        assert_eq!(
            o.model.as_deref(),
            Some("us.anthropic.claude-3-7-sonnet-20250219-v1:0")
        );
        assert_eq!(o.no_usage_reason(200), None);
    }

    #[test]
    fn token_stamps_are_the_arrivals_of_the_chunks_completing_token_events() {
        let o = observe(CHAT_STREAM, CHAT_STREAM.len() / 4 + 1);
        assert_eq!(o.first_body_ns, Some(1000));
        assert_eq!(o.first_token_ns, Some(1000));
        assert!(o.last_token_ns.unwrap() >= 3000);
    }
}
