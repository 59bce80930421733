//! What a plugin adds to a request's trace (capability `trace`, see "Traces" in
//! `docs/protocol.md`): attributes for its final-call span and spans of its own.
//!
//! The host keeps one record per stream and makes it *current* on the thread that runs one of
//! the stream's hooks (like [`crate::EventCtx::is_replayed`]'s mark), so a hook records with
//! free functions and no handle:
//!
//! ```
//! use plugin_runner::trace;
//!
//! fn on_chunk_work() {
//!     let mut parse = trace::span("parse chunk");       // starts now, ends when dropped
//!     parse.attribute("bytes", 42u64);
//!     drop(parse);
//!     trace::attribute("myplugin.model", "gpt-4o");      // on the plugin's final-call span
//! }
//! # on_chunk_work();
//! ```
//!
//! Whatever a stream recorded goes to the front as one `Spans` message right before the
//! stream's final reply, and only when the front agreed on `trace` in its `Welcome`; otherwise
//! (and outside a hook, or in the hooks of a stream that was aborted or evicted) recording does
//! nothing and costs a thread-local lookup. A span must end inside the hook it started in: one
//! still open when the hook returns is ended there. For a span between two events, record it
//! with [`record_span`] and the events' `stamp_ns`. Times are `CLOCK_MONOTONIC` nanoseconds
//! ([`ipc_protocol::stamp::monotonic_now_ns`]), the clock of the events' stamps.
//!
//! Limits (the front's, kept here so nothing is sent for it to drop): at most [`MAX_SPANS`]
//! spans per stream and [`MAX_ATTRIBUTES`] attributes on the final-call span and on each span;
//! extra ones are dropped, with one warning per process. The host also drops a `Spans` whose
//! encoding is larger than `Welcome.metadata_max_bytes`, with a warning.

use std::cell::RefCell;

use ipc_protocol::{find_header, Header, PluginSpan, Spans, StreamId, Value};

/// Most spans one stream may send.
pub const MAX_SPANS: usize = 64;

/// Most attributes on the final-call span, and on each span.
pub const MAX_ATTRIBUTES: usize = 64;

thread_local! {
    /// The record of the stream whose hook this thread runs, when the connection agreed on
    /// `trace`.
    static CURRENT: RefCell<Option<Record>> = const { RefCell::new(None) };
}

/// The W3C trace context of a stream's request span, from the `traceparent` header the front
/// adds to `RequestStart.headers` (`00-<trace id>-<span id>-<flags>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id, 16 bytes (32 lowercase hex digits on the wire), never all zero.
    pub trace_id: [u8; 16],
    /// The request span's id, 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// The trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

impl TraceParent {
    /// Parses a version-00 `traceparent` value; `None` when it is not one.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let span_id: [u8; 8] = hex(span)?.try_into().ok()?;
        let flags: [u8; 1] = hex(flags)?.try_into().ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags: flags[0],
        })
    }

    /// The first `traceparent` header in `headers` (a `RequestStart`'s), parsed.
    pub fn from_headers(headers: &[Header]) -> Option<TraceParent> {
        find_header(headers, "traceparent").and_then(TraceParent::parse)
    }

    /// Whether the request is sampled (flags bit 0): the front drops an unsampled request's
    /// spans.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        to_hex(&self.span_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            self.flags
        )
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One stream's trace record, kept by its lane and current while one of its hooks runs.
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub(crate) stream_id: StreamId,
    pub(crate) traceparent: Option<TraceParent>,
    attributes: Vec<(String, Value)>,
    spans: Vec<PluginSpan>,
}

impl Record {
    pub(crate) fn new(stream_id: StreamId) -> Record {
        Record {
            stream_id,
            ..Record::default()
        }
    }

    /// The `Spans` message for the stream, or `None` when nothing was recorded.
    pub(crate) fn into_spans(self) -> Option<Spans> {
        if self.attributes.is_empty() && self.spans.is_empty() {
            return None;
        }
        Some(Spans {
            stream_id: self.stream_id,
            attributes: self.attributes,
            spans: self.spans,
        })
    }
}

/// Makes `record` current on this thread until [`Scope::take`] or drop (a panicking hook: the
/// record is then lost with the stream's failure).
pub(crate) struct Scope(());

impl Scope {
    pub(crate) fn enter(record: Option<Record>) -> Scope {
        CURRENT.with(|c| *c.borrow_mut() = record);
        Scope(())
    }

    /// The record back, with what the hook added.
    pub(crate) fn take(self) -> Option<Record> {
        CURRENT.with(|c| c.borrow_mut().take())
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

/// Warns once per process that a limit dropped something.
fn over_limit(what: &'static str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            max_spans = MAX_SPANS,
            max_attributes = MAX_ATTRIBUTES,
            "trace limit reached ({what}); the extra ones are dropped (warned once)"
        );
    }
}

fn push_attribute(list: &mut Vec<(String, Value)>, key: String, value: Value) {
    if let Some(slot) = list.iter_mut().find(|(k, _)| *k == key) {
        slot.1 = value;
    } else if list.len() < MAX_ATTRIBUTES {
        list.push((key, value));
    } else {
        over_limit("attributes");
    }
}

fn with_current<R>(f: impl FnOnce(&mut Record) -> R) -> Option<R> {
    CURRENT.with(|c| c.borrow_mut().as_mut().map(f))
}

/// Whether what a hook records now goes anywhere: this thread runs a hook of a stream on a
/// connection that agreed on `trace`. Use it to skip work done only for a trace.
pub fn is_recording() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

/// The request span's context of the stream whose hook runs on this thread (from its
/// `RequestStart`'s `traceparent`); `None` outside a hook, without `trace`, or when the front
/// sent none (its tracing is off).
pub fn traceparent() -> Option<TraceParent> {
    with_current(|r| r.traceparent).flatten()
}

/// Sets `key` on the plugin's span for this stream's final call (a later value for the same
/// key replaces the earlier one). Keys the front sets itself (`plugvisor.*`) are not replaced
/// there: name yours after your plugin (`myplugin.words`).
pub fn attribute(key: impl Into<String>, value: impl Into<Value>) {
    let (key, value) = (key.into(), value.into());
    with_current(|r| push_attribute(&mut r.attributes, key, value));
}

/// Records a finished span of this stream with explicit times (`CLOCK_MONOTONIC` ns; an
/// `end_ns` before `start_ns` is raised to it), e.g. between two events' `stamp_ns`.
pub fn record_span(
    name: impl Into<String>,
    start_ns: u64,
    end_ns: u64,
    attributes: Vec<(String, Value)>,
) {
    let mut span = PluginSpan {
        name: name.into(),
        start_ns,
        end_ns: end_ns.max(start_ns),
        attributes: Vec::new(),
    };
    for (k, v) in attributes {
        push_attribute(&mut span.attributes, k, v);
    }
    with_current(move |r| {
        if r.spans.len() < MAX_SPANS {
            r.spans.push(span);
        } else {
            over_limit("spans");
        }
    });
}

/// Starts a span of this stream now; it ends when the returned guard is dropped (or
/// [`SpanGuard::end`]), which must happen within the same hook.
pub fn span(name: impl Into<String>) -> SpanGuard {
    let recording = is_recording();
    SpanGuard {
        span: recording.then(|| PluginSpan {
            name: name.into(),
            start_ns: ipc_protocol::stamp::monotonic_now_ns(),
            end_ns: 0,
            attributes: Vec::new(),
        }),
    }
}

/// An open span ([`span`]); recorded when dropped.
#[must_use = "the span ends when this guard is dropped"]
#[derive(Debug)]
pub struct SpanGuard {
    /// `None` when nothing is recording: every call is then a no-op.
    span: Option<PluginSpan>,
}

impl SpanGuard {
    /// Sets an attribute of this span.
    pub fn attribute(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        if let Some(span) = &mut self.span {
            push_attribute(&mut span.attributes, key.into(), value.into());
        }
    }

    /// Ends the span now.
    pub fn end(self) {}
}

impl Drop for SpanGuard {
    fn drop(&mut self) {
        if let Some(span) = self.span.take() {
            record_span(
                span.name,
                span.start_ns,
                ipc_protocol::stamp::monotonic_now_ns(),
                span.attributes,
            );
        }
    }
}

/// Runs `f` with a fresh record for `stream_id` current on this thread, and returns what it
/// recorded as the `Spans` the host would send: for tests of a plugin's tracing outside the
/// host (the [`crate::testing::Player`] does this for whole streams).
pub fn recording<R>(stream_id: StreamId, f: impl FnOnce() -> R) -> (R, Option<Spans>) {
    let scope = Scope::enter(Some(Record::new(stream_id)));
    let out = f();
    let spans = scope.take().and_then(Record::into_spans);
    (out, spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_traceparent_parses_and_prints_back() {
        let tp = TraceParent::parse(TP).unwrap();
        assert_eq!(tp.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(tp.span_id_hex(), "b7ad6b7169203331");
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), TP);
        let headers = vec![("TraceParent".to_owned(), TP.to_owned())];
        assert_eq!(TraceParent::from_headers(&headers), Some(tp));
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn nothing_is_recorded_outside_a_hook() {
        assert!(!is_recording());
        attribute("k", 1u64);
        drop(span("s"));
        assert!(traceparent().is_none());
        let ((), spans) = recording(7, || {});
        assert_eq!(spans, None, "nothing recorded, nothing to send");
    }

    #[test]
    fn spans_and_attributes_are_recorded_for_the_current_stream() {
        let ((), spans) = recording(7, || {
            attribute("a", 1u64);
            attribute("a", 2u64);
            let mut s = span("work");
            s.attribute("n", "x");
            s.end();
            record_span("between", 10, 5, vec![]);
        });
        let spans = spans.unwrap();
        assert_eq!(spans.stream_id, 7);
        assert_eq!(spans.attributes, vec![("a".to_owned(), Value::from(2u64))]);
        assert_eq!(spans.spans.len(), 2);
        assert_eq!(spans.spans[0].name, "work");
        assert!(spans.spans[0].end_ns >= spans.spans[0].start_ns);
        assert_eq!(spans.spans[0].attributes, vec![("n".into(), "x".into())]);
        assert_eq!((spans.spans[1].start_ns, spans.spans[1].end_ns), (10, 10));
        assert!(!is_recording(), "the record does not outlive its scope");
    }

    #[test]
    fn limits_keep_the_first_64_and_drop_the_rest() {
        let ((), spans) = recording(1, || {
            for i in 0..=MAX_ATTRIBUTES {
                attribute(format!("k{i}"), i as u64);
            }
            for i in 0..=MAX_SPANS {
                let attrs = (0..=MAX_ATTRIBUTES)
                    .map(|j| (format!("a{j}"), Value::from(j as u64)))
                    .collect();
                record_span(format!("s{i}"), 1, 2, attrs);
            }
        });
        let spans = spans.unwrap();
        assert_eq!(spans.attributes.len(), MAX_ATTRIBUTES);
        assert_eq!(spans.attributes.last().unwrap().0, "k63");
        assert_eq!(spans.spans.len(), MAX_SPANS);
        assert_eq!(spans.spans.last().unwrap().name, "s63");
        assert!(spans
            .spans
            .iter()
            .all(|s| s.attributes.len() == MAX_ATTRIBUTES));
    }
}
