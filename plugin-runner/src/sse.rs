//! Server-sent events framing: turns body bytes, cut anywhere, into `(event name, data)` pairs.
//!
//! Every provider format here streams over SSE; only what the events mean differs. Lines split
//! across chunks are reassembled (Envoy splits and merges upstream writes freely), CRLF line ends
//! are accepted, comments (`: ping`) are skipped, and no more than one unfinished line is ever
//! held: a line longer than [`MAX_LINE`] is dropped and counted, and the next event still parses.

/// Longest SSE line kept while waiting for its end; longer lines are dropped (and counted).
pub const MAX_LINE: usize = 1024 * 1024;

/// One SSE decoder per response body.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    skipping_long_line: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// Lines longer than [`MAX_LINE`] that were dropped.
    pub overflows: u64,
}

impl SseDecoder {
    /// Feeds bytes; `on_event(event name, data)` runs for each event they complete.
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

    /// The body ended: an event left without its blank line is still dispatched.
    pub fn finish(&mut self, on_event: &mut impl FnMut(Option<&str>, &str)) {
        if !self.line.is_empty() && !self.skipping_long_line {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
        }
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
