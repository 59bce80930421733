"""Capability ``trace``: what hooks record in ``ctx.trace`` goes out as one ``Spans`` right
before the stream's final reply (``Final`` or ``AbortedFinal``), with the request's
``traceparent`` readable from every hook; nothing without the capability, nothing for an aborted
stream, nothing over ``metadata_max_bytes``; the limits hold; the wire form round-trips."""

import unittest

import support  # noqa: F401  (sets up the import path)
import plugvisor
from plugvisor import trace, wire
from plugvisor.testing import FakeFront
from plugvisor.trace import MAX_ATTRIBUTES, MAX_SPANS, StreamTrace, TraceParent
from plugvisor.wire import FinalReply, PluginSpan, Reconnect, Spans

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Tracer(plugvisor.Plugin):
    """The request span's id on its final-call span, a span per chunk, a big attribute on a
    chunk saying ``big``."""

    name = "tracer"

    def new_stream(self):
        return {"chunks": 0}

    def on_chunk(self, stream, ctx, chunk):
        with ctx.trace.span("tracer.chunk") as span:
            span.attribute("bytes", chunk.len)
            if chunk.bytes == b"big":
                ctx.trace.attribute("tracer.big", "x" * 2000)
        stream["chunks"] += 1

    def on_final(self, stream, ctx, final):
        if ctx.trace.traceparent is not None:
            ctx.trace.attribute("tracer.parent", ctx.trace.traceparent.span_id)
        ctx.trace.attribute("tracer.chunks", stream["chunks"])
        return {self.namespace: {"chunks": stream["chunks"]}}

    def on_aborted_final(self, stream, ctx, event):
        ctx.trace.attribute("tracer.aborted", True)
        return {}


def run_stream(front, sid, chunks=(b"ab", b"c")):
    front.request_start(sid, headers=[("traceparent", TRACEPARENT)])
    for i, body in enumerate(chunks, 1):
        front.chunk(sid, i, body)
    return front.final(sid, len(chunks) + 1)


class Trace(unittest.TestCase):
    def test_spans_come_right_before_the_final_reply_when_trace_is_agreed(self):
        with FakeFront.start(Tracer()) as front:
            self.assertIn("trace", front.hello.capabilities)
            self.assertIn("trace", front.welcome.capabilities)
            run_stream(front, 1)
            spans = front.spans(1)  # checks it came before the FinalReply
            self.assertEqual(spans.attributes, [("tracer.parent", "b7ad6b7169203331"),
                                                ("tracer.chunks", 2)])
            self.assertEqual([s.name for s in spans.spans], ["tracer.chunk"] * 2)
            for span, n in zip(spans.spans, (2, 1)):
                self.assertGreater(span.start_ns, 0)
                self.assertGreaterEqual(span.end_ns, span.start_ns)
                self.assertEqual(span.attributes, [("bytes", n)])
            # An aborted final's record goes too; a plain abort's is dropped with its stream.
            front.request_start(2)
            front.abort(2, 1)
            front.request_start(3)
            front.chunk(3, 1, b"x")
            front.aborted_final(3, 2, cause=1)
            self.assertEqual(front.spans(3).attributes[0], ("tracer.aborted", True))
            front.ping(1)
            self.assertEqual([m.stream_id for m in front.received if isinstance(m, Spans)],
                             [1, 3])
            self.assertEqual(front.violations, [])

    def test_nothing_is_sent_without_the_capability(self):
        with FakeFront.start(Tracer(), capabilities=("replayed", "aborted_final")) as front:
            self.assertIsNotNone(run_stream(front, 1).metadata)
            front.ping(1)
            self.assertFalse(any(isinstance(m, Spans) for m in front.received))

    def test_spans_over_metadata_max_bytes_are_dropped_and_the_reply_still_goes(self):
        with FakeFront.start(Tracer(), metadata_max_bytes=1024) as front:
            self.assertIsNotNone(run_stream(front, 1, chunks=(b"big",)).metadata)
            run_stream(front, 2)
            self.assertEqual(front.spans(2).stream_id, 2)
            self.assertEqual([m.stream_id for m in front.received if isinstance(m, Spans)],
                             [2])


class Examples(unittest.TestCase):
    def test_wordcount_puts_its_count_on_the_final_call_span(self):
        from wordcount import WordCount

        with FakeFront.start(WordCount()) as front:
            front.chunk(1, 0, b'data: {"choices":[{"delta":{"content":"two words"}}]}\n\n')
            self.assertEqual(front.final(1, 1).metadata, {"plugvisor.wordcount": {"words": 2}})
            self.assertEqual(front.spans(1).attributes, [("wordcount.words", 2)])

    def test_the_conformance_plugin_traces_its_event_count_and_a_span(self):
        from conformance import Conformance

        with FakeFront.start(Conformance()) as front:
            run_stream(front, 1)
            spans = front.spans(1)
            self.assertEqual(spans.attributes, [("conformance.events", 4),
                                                ("conformance.traceparent", TRACEPARENT)])
            self.assertEqual([s.name for s in spans.spans], ["conformance.final"])


class Recording(unittest.TestCase):
    def test_limits_keep_the_first_64_and_drop_the_rest(self):
        t = StreamTrace(7)
        for i in range(MAX_ATTRIBUTES + 1):
            t.attribute(f"k{i}", i)
        t.attribute("k0", "again")  # a known key is replaced, not added
        attrs = [(f"a{j}", j) for j in range(MAX_ATTRIBUTES + 1)]
        for i in range(MAX_SPANS + 1):
            t.record_span(f"s{i}", 10, 5, attrs)
        spans = t.to_spans()
        self.assertEqual(len(spans.attributes), MAX_ATTRIBUTES)
        self.assertEqual(spans.attributes[0], ("k0", "again"))
        self.assertEqual(len(spans.spans), MAX_SPANS)
        self.assertEqual(spans.spans[-1].name, "s63")
        self.assertEqual((spans.spans[0].start_ns, spans.spans[0].end_ns), (10, 10))
        self.assertTrue(all(len(s.attributes) == MAX_ATTRIBUTES for s in spans.spans))

    def test_nothing_is_recorded_without_the_capability(self):
        t = trace.NOT_RECORDING
        t.attribute("k", 1)
        with t.span("s") as span:
            span.attribute("a", 1)
        self.assertIsNone(t.to_spans())
        self.assertIsNone(StreamTrace(1).to_spans(), "nothing recorded, nothing to send")
        self.assertIs(plugvisor.EventCtx(1, 0, 0).trace, trace.NOT_RECORDING)

    def test_a_traceparent_parses_and_prints_back(self):
        tp = TraceParent.parse(TRACEPARENT)
        self.assertEqual(tp, TraceParent("0af7651916cd43dd8448eb211c80319c",
                                         "b7ad6b7169203331", 1))
        self.assertTrue(tp.sampled)
        self.assertEqual(str(tp), TRACEPARENT)
        self.assertEqual(TraceParent.from_headers([("TraceParent", TRACEPARENT)]), tp)
        for bad in ("", "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                    "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x"):
            self.assertIsNone(TraceParent.parse(bad), bad)

    def test_spans_at_the_cap_as_a_whole_frame_pass_and_one_byte_over_are_dropped(self):
        from plugvisor.host import _spans_fit

        spans = Spans(7, [("k", "v" * 100)], [])
        n = len(wire.frame(spans))
        self.assertTrue(_spans_fit(spans, n))
        self.assertFalse(_spans_fit(spans, n - 1))

    def test_spans_and_reconnect_round_trip_on_the_wire(self):
        spans = Spans(7, [("a", 1), ("b", {"c": [1.5, None]})],
                      [PluginSpan("s", 1, 2, [("k", "v")])])
        payload = wire.encode(spans)
        self.assertEqual(payload[:2], b"\x05\x07")  # FromPlugin 5, stream 7
        self.assertEqual(wire.decode_from_plugin(payload), spans)
        payload = wire.encode(Reconnect("config changed"))
        self.assertEqual(payload, b"\x0b\x0econfig changed")  # ToPlugin 11
        self.assertEqual(wire.decode_to_plugin(payload), Reconnect("config changed"))


if __name__ == "__main__":
    unittest.main()
