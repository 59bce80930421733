#!/usr/bin/env python3
"""conformance: the SDK conformance plugin (a Rust twin implements the same contract).

Subscribes to request starts, response headers, chunks with body bytes, and aborts. Every hook
(request start, response headers, chunk, final, aborted final) appends the event's seq to the
stream's ``seqs``, counts replayed events into ``replayed`` and adds chunk/final ``len`` to
``bytes``. Request headers steer it:

- ``x-conformance-sleep-ms: N`` (N <= 10000): every hook of that stream, the abort hook
  included, sleeps N ms first;
- ``x-conformance-fail: HOOK`` (request_start, response_headers, chunk or final): that hook
  raises; ``final`` fails the final of an aborted stream too.

The final returns ``{"plugvisor.<name>": {"seqs": [...], "replayed": n, "bytes": n}}``, plus
what the SDK adds (``gaps``, ``partial``). The final of an aborted stream (``AbortedFinal``)
returns the same map plus ``"aborted": "<cause>"`` (``client_disconnect``, ``upstream_error``,
``timeout``, ``shutdown``).

With the capability ``trace`` agreed, the final (and the aborted final) sets the attribute
``conformance.events`` (how many of the stream's events its hooks ran) on its final-call span and
records one span, ``conformance.final``, around its own work; when the SDK found a
``traceparent`` in the stream's ``RequestStart``, it also sets ``conformance.traceparent`` to it
(as text), so a test can see which request span the plugin was told of.
"""

import time

import plugvisor

MAX_SLEEP_MS = 10000
HOOKS = ("request_start", "response_headers", "chunk", "final")


class Conformance(plugvisor.Plugin):
    name = "conformance"
    subscriptions = plugvisor.Subscriptions(request_start=True, response_headers=True,
                                            chunks=True, body_bytes=True, abort=True)

    def new_stream(self):
        return {"seqs": [], "replayed": 0, "bytes": 0, "sleep_ms": 0, "fail": None}

    def hook(self, stream, ctx, name, nbytes=0):
        if stream["sleep_ms"]:
            time.sleep(stream["sleep_ms"] / 1000.0)
        if stream["fail"] == name:
            raise RuntimeError(f"x-conformance-fail: {name}")
        stream["seqs"].append(ctx.seq)
        stream["replayed"] += 1 if ctx.is_replayed else 0
        stream["bytes"] += nbytes

    def on_request_start(self, stream, ctx, event):
        sleep = event.header("x-conformance-sleep-ms")
        if sleep is not None and sleep.strip().isdigit():
            stream["sleep_ms"] = min(int(sleep), MAX_SLEEP_MS)
        fail = event.header("x-conformance-fail")
        if fail in HOOKS:
            stream["fail"] = fail
        self.hook(stream, ctx, "request_start")

    def on_response_headers(self, stream, ctx, event):
        self.hook(stream, ctx, "response_headers")

    def on_chunk(self, stream, ctx, chunk):
        self.hook(stream, ctx, "chunk", chunk.len)

    def report(self, stream, ctx, aborted=None):
        with ctx.trace.span("conformance.final"):
            ctx.trace.attribute("conformance.events", len(stream["seqs"]))
            if ctx.trace.traceparent is not None:
                ctx.trace.attribute("conformance.traceparent", str(ctx.trace.traceparent))
        own = {"seqs": stream["seqs"], "replayed": stream["replayed"], "bytes": stream["bytes"]}
        if aborted is not None:
            own["aborted"] = aborted
        return {self.namespace: own}

    def on_final(self, stream, ctx, final):
        self.hook(stream, ctx, "final", final.len)
        return self.report(stream, ctx)

    def on_aborted_final(self, stream, ctx, event):
        self.hook(stream, ctx, "final")
        return self.report(stream, ctx, aborted=event.cause_str)

    def on_abort(self, stream, ctx, event):
        if stream["sleep_ms"]:
            time.sleep(stream["sleep_ms"] / 1000.0)


if __name__ == "__main__":
    plugvisor.run(Conformance())
