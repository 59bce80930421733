//! Server-sent events framing: turns response body bytes, cut anywhere, into `(event name, data)`
//! pairs, for plugins that read streamed LLM responses (`text/event-stream`).
//!
//! Envoy splits and merges the upstream's writes freely, so a chunk may hold half an event or
//! several; feed every chunk to one [`SseDecoder`] per stream and it hands out whole events as
//! their blank line arrives. Lines split across chunks are reassembled, CRLF line ends are
//! accepted, comments (`: ping`) and fields other than `event` and `data` are skipped, and
//! several `data:` lines of one event are joined with `\n`, as the
//! [HTML standard](https://html.spec.whatwg.org/multipage/server-sent-events.html) says. Memory is
//! bounded: no more than one unfinished line is ever held, and a line longer than [`MAX_LINE`] is
//! dropped and counted in [`SseDecoder::overflows`] while the next event still parses.
//!
//! ```
//! use plugin_runner::sse::SseDecoder;
//!
//! let mut decoder = SseDecoder::default();
//! let mut events = Vec::new();
//! let mut on_event = |name: Option<&str>, data: &str| {
//!     events.push((name.map(str::to_owned), data.to_owned()))
//! };
//! // Chunks as Envoy may cut them: mid-line, mid-event, two events in one chunk.
//! decoder.push(b"data: {\"a\"", &mut on_event);
//! decoder.push(b":1}\n\nevent: done\r\ndata: ", &mut on_event);
//! decoder.push(b"[DONE]\n\n: keep-alive\n\ndata: x", &mut on_event);
//! // At the response's end (the final hook): an event left without its blank line still counts.
//! decoder.finish(&mut on_event);
//! assert_eq!(
//!     events,
//!     [
//!         (None, r#"{"a":1}"#.to_owned()),
//!         (Some("done".to_owned()), "[DONE]".to_owned()),
//!         (None, "x".to_owned()),
//!     ]
//! );
//! assert_eq!(decoder.overflows, 0);
//! ```
//!
//! In a plugin, keep the decoder in the stream state: `push` each chunk's bytes in
//! [`crate::Plugin::on_chunk`], and `push` the final's bytes then `finish` in
//! [`crate::Plugin::on_final`]. The plugin must subscribe to body bytes (the default). A body
//! with a `Content-Encoding` must be decoded before it is framed.

/// Longest SSE line kept while waiting for its end (1 MiB); a longer line is dropped (and
/// counted in [`SseDecoder::overflows`]), with the event it belonged to losing that field.
pub const MAX_LINE: usize = 1024 * 1024;

/// The SSE framing state of one response body: the unfinished line, and the event being built.
/// One per stream; `Default` makes a fresh one.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    skipping_long_line: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// How many lines longer than [`MAX_LINE`] were dropped so far. Non-zero means some event
    /// lost a field: a plugin that counts something from the events should say its figure may
    /// be short.
    pub overflows: u64,
}

impl SseDecoder {
    /// Feeds the next bytes of the body. `on_event(event name, data)` runs, in order, for each
    /// event these bytes complete (an event with no `data:` line is not dispatched; its `event:`
    /// name is forgotten). Bytes after the last line end are kept until the next call.
    pub fn push(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(Option<&str>, &str)) {
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
                self.line_done(head, on_event);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.line_done(&line, on_event);
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

    /// The body ended: dispatches the event still being built (a last line without its line end
    /// counts as a line, and an event without its blank line is still an event). The decoder is
    /// then empty and could frame another body.
    pub fn finish(&mut self, on_event: &mut impl FnMut(Option<&str>, &str)) {
        if !self.line.is_empty() && !self.skipping_long_line {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
        }
        self.skipping_long_line = false;
        self.dispatch(on_event);
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(Option<&str>, &str)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(Option<&str>, &str)) {
        let event = self.event.take();
        if !self.has_data {
            return;
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        on_event(event.as_deref(), &data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(body: &str, size: usize) -> Vec<(Option<String>, String)> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        let mut on =
            |e: Option<&str>, data: &str| out.push((e.map(str::to_owned), data.to_owned()));
        for c in body.as_bytes().chunks(size) {
            d.push(c, &mut on);
        }
        d.finish(&mut on);
        out
    }

    #[test]
    fn event_names_and_multiline_data_survive_any_chunking() {
        let body =
            "event: ping\ndata: {}\n\n: comment\ndata: a\ndata: b\n\nevent: x\r\ndata: 1\r\n";
        for size in 1..body.len() {
            assert_eq!(
                events(body, size),
                vec![
                    (Some("ping".into()), "{}".into()),
                    (None, "a\nb".into()),
                    (Some("x".into()), "1".into()),
                ],
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn an_event_name_without_data_does_not_leak_into_the_next_event() {
        assert_eq!(
            events("event: lonely\n\ndata: 2\n\n", 3),
            vec![(None, "2".into())]
        );
    }
}
