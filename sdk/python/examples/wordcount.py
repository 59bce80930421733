#!/usr/bin/env python3
"""wordcount: counts the words the model streamed.

Reads an OpenAI-compatible SSE stream (``data: {...}`` events, ``data: [DONE]`` at the end) and
counts the whitespace-separated words of every ``choices[].delta.content``. An event may be split
across chunks: the unfinished tail of one chunk waits for the next. Reports
``{"plugvisor.wordcount": {"words": N}}`` (plus ``gaps``/``partial`` when the host saw them).
A stream that ended without a response end (the client left, the upstream failed) reports the
words of the events the client did receive, plus ``"aborted": "<cause>"`` (``client_disconnect``,
``upstream_error``, ``timeout``, ``shutdown``); an event cut off mid-way is not counted.
When the front traces requests (capability ``trace``), the count also goes on the plugin's span
of the request's trace as the attribute ``wordcount.words``.
"""

import json

import plugvisor


class WordCount(plugvisor.Plugin):
    name = "wordcount"
    subscriptions = plugvisor.Subscriptions(request_start=False, response_headers=False,
                                            chunks=True, body_bytes=True, abort=False)

    def new_stream(self):
        # Unfinished SSE text, the last word-in-progress flag, and the count so far.
        return {"pending": b"", "words": 0, "in_word": False}

    def on_chunk(self, stream, ctx, chunk):
        self.feed(stream, chunk.bytes)

    def on_final(self, stream, ctx, final):
        self.feed(stream, final.bytes + b"\n\n")  # the stream ended: its last event is complete
        ctx.trace.attribute("wordcount.words", stream["words"])
        return {self.namespace: {"words": stream["words"]}}

    def on_aborted_final(self, stream, ctx, event):
        # No "\n\n" here: an event cut off by the abort never reached the client whole.
        return {self.namespace: {"words": stream["words"], "aborted": event.cause_str}}

    def feed(self, stream, data):
        buf = (stream["pending"] + data).replace(b"\r\n", b"\n")
        *events, stream["pending"] = buf.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]" or not payload:
                    continue
                try:
                    choices = json.loads(payload).get("choices") or []
                except (ValueError, AttributeError):
                    continue  # not a completion event (a comment, an error object): no words
                for choice in choices:
                    text = (choice.get("delta") or {}).get("content") or ""
                    self.count(stream, text)

    @staticmethod
    def count(stream, text):
        # Words may continue across deltas ("Hel" + "lo"), so track whether one is open.
        for ch in text:
            if ch.isspace():
                stream["in_word"] = False
            elif not stream["in_word"]:
                stream["in_word"] = True
                stream["words"] += 1


if __name__ == "__main__":
    plugvisor.run(WordCount())
