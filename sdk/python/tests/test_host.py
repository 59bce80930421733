"""The host against a fake front over a real socket pair: ordering, gaps, replays, credit,
pings, exceptions, metadata cap, shutdown and end of file."""

import select
import socket
import threading
import time
import unittest
from unittest import mock

import support
import plugvisor
import plugvisor.host
from plugvisor import Exit, HostOptions, Subscriptions
from plugvisor.connection import FrameReader
from plugvisor.testing import FakeFront
from plugvisor import wire
from plugvisor.wire import Abort, AbortedFinal, Refuse

from conformance import Conformance
from wordcount import WordCount


def opts(name="conformance", **kw):
    kw.setdefault("workers", 4)
    return HostOptions(plugin=name, **kw)


class Recorder(plugvisor.Plugin):
    """Records every hook with its context; optional per-hook delay and gates."""

    name = "recorder"

    def __init__(self, delay=0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.gates = {}  # (stream_id, seq) -> threading.Event the hook waits for

    def new_stream(self):
        return []

    def _hook(self, stream, ctx, kind):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            gate = self.gates.get((ctx.stream_id, ctx.seq))
            if gate is not None:
                gate.wait(10)
            if self.delay:
                time.sleep(self.delay)
            stream.append((kind, ctx.seq, ctx.gap, ctx.partial, ctx.is_replayed))
        finally:
            with self.lock:
                self.running -= 1

    def on_request_start(self, stream, ctx, event):
        self._hook(stream, ctx, "start")

    def on_response_headers(self, stream, ctx, event):
        self._hook(stream, ctx, "headers")

    def on_chunk(self, stream, ctx, chunk):
        self._hook(stream, ctx, "chunk")

    def on_final(self, stream, ctx, final):
        self._hook(stream, ctx, "final")
        return {self.namespace: {"events": [list(e) for e in stream]}}


def events(reply):
    return [tuple(e) for e in reply.metadata["plugvisor.recorder"]["events"]]


class Handshake(unittest.TestCase):
    def test_hello_speaks_version_3_with_its_capabilities(self):
        with FakeFront.start(WordCount(), options=opts("wordcount")) as front:
            self.assertEqual(front.hello.protocol_version, 3)
            self.assertEqual(front.hello.plugin, "wordcount")
            # Served on a socket it was given, with no path to reconnect to: no `reconnect`.
            self.assertEqual(front.hello.capabilities, ["replayed", "aborted_final", "trace"])
            self.assertEqual(front.welcome.capabilities, ["replayed", "aborted_final", "trace"])
            self.assertEqual(front.hello.subscriptions,
                             Subscriptions(False, False, True, True, False))

    def test_a_version_2_welcome_without_capabilities_is_served(self):
        with FakeFront.start(Recorder(), version=2) as front:
            front.request_start(1)
            self.assertEqual(events(front.final(1, 1)), [("start", 0, 0, False, False),
                                                        ("final", 1, 0, False, False)])

    def test_a_refuse_exits_78(self):
        front = FakeFront.start(Recorder(), refuse=Refuse(1, "no plugin `recorder` here"))
        self.assertEqual(front.wait_exit(), Exit.CONFIG)
        front.close()

    def test_a_rejected_config_exits_78_and_a_good_one_is_applied(self):
        class Picky(Recorder):
            def configure(self, config):
                if "greeting" not in config:
                    raise plugvisor.ConfigError("config.greeting is missing")
                self.greeting = config["greeting"]

        front = FakeFront.start(Picky(), config={})
        self.assertEqual(front.wait_exit(), Exit.CONFIG)
        front.close()
        plugin = Picky()
        with FakeFront.start(plugin, config={"greeting": "bonjour"}) as front:
            front.ping(1)
            self.assertEqual(plugin.greeting, "bonjour")

    def test_the_front_closing_before_welcome_is_a_failure(self):
        front = FakeFront.start(Recorder(), handshake=False)
        front.close()
        self.assertEqual(front.wait_exit(), Exit.FAILED)


class Ordering(unittest.TestCase):
    def test_each_stream_runs_in_sequence_order_while_streams_run_in_parallel(self):
        plugin = Recorder(delay=0.002)
        streams, chunks = 12, 8
        with FakeFront.start(plugin, options=opts("recorder", workers=4)) as front:
            for seq in range(chunks + 1):
                for sid in range(1, streams + 1):
                    if seq == 0:
                        front.request_start(sid)
                    else:
                        front.chunk(sid, seq, b"x")
            calls = {sid: front.send_final(sid, chunks + 1, call_id=100 + sid)
                     for sid in range(1, streams + 1)}
            for sid, call in calls.items():
                reply = front.final_reply(call)
                self.assertEqual((reply.call_id, reply.stream_id), (100 + sid, sid))
                self.assertEqual([e[1] for e in events(reply)], list(range(chunks + 2)))
            self.assertGreater(plugin.max_running, 1, "streams ran one at a time")
            self.assertLessEqual(plugin.max_running, 4, "more hooks at once than workers")
            self.assertEqual(front.violations, [])


class GapsAndPartial(unittest.TestCase):
    def test_skipped_numbers_are_gaps_in_ctx_and_in_the_namespace(self):
        with FakeFront.start(Recorder()) as front:
            front.request_start(1)
            front.chunk(1, 1)
            front.chunk(1, 4)
            reply = front.final(1, 5)
            self.assertEqual([(e[1], e[2]) for e in events(reply)], [(0, 0), (1, 0), (4, 2), (5, 0)])
            self.assertEqual(reply.metadata["plugvisor.recorder"]["gaps"], 2)
            self.assertNotIn("partial", reply.metadata["plugvisor.recorder"])

    def test_a_stream_first_seen_past_its_start_is_partial(self):
        with FakeFront.start(Recorder()) as front:
            front.chunk(1, 3)
            reply = front.final(1, 4)
            self.assertTrue(all(e[3] for e in events(reply)))
            self.assertIs(reply.metadata["plugvisor.recorder"]["partial"], True)
            # Seq 0 but not a RequestStart, with request starts subscribed: partial too.
            front.chunk(2, 0)
            self.assertIs(front.final(2, 1).metadata["plugvisor.recorder"]["partial"], True)

    def test_gaps_are_added_to_a_namespace_the_plugin_did_not_write(self):
        class Silent(Recorder):
            def on_final(self, stream, ctx, final):
                return {"envoy.lb": {"k": 1}}

        with FakeFront.start(Silent()) as front:
            front.request_start(1)
            reply = front.final(1, 3)
            self.assertEqual(reply.metadata, {"envoy.lb": {"k": 1}, "plugvisor.recorder": {"gaps": 2}})


class Replays(unittest.TestCase):
    def test_replayed_events_run_like_live_ones_and_are_marked(self):
        with FakeFront.start(Recorder()) as front:
            front.request_start(1, replayed=True)
            front.chunk(1, 1, b"a", replayed=True)
            front.chunk(1, 2, b"b")
            reply = front.final(1, 3)
            self.assertEqual(events(reply), [("start", 0, 0, False, True), ("chunk", 1, 0, False, True),
                                             ("chunk", 2, 0, False, False), ("final", 3, 0, False, False)])
            self.assertEqual(set(reply.metadata["plugvisor.recorder"]), {"events"})

    def test_a_journal_that_lost_its_start_is_partial(self):
        with FakeFront.start(Conformance()) as front:
            front.chunk(1, 2, b"abc", replayed=True)
            reply = front.final(1, 3, b"d", replayed=True)
            self.assertEqual(reply.metadata["plugvisor.conformance"],
                             {"seqs": [2, 3], "replayed": 2, "bytes": 4, "partial": True})


class Credit(unittest.TestCase):
    def test_every_event_frame_is_credited_once_the_lanes_are_idle(self):
        with FakeFront.start(Recorder(), budget_bytes=1 << 20) as front:
            front.request_start(1, headers=[("a", "b")])
            front.response_headers(1, 1)
            front.chunk(1, 2, b"x" * 1000, replayed=True)
            front.final(1, 3)
            front.ping(1)  # connection messages never count
            front.wait_credit(front.written)
            time.sleep(0.05)
            self.assertEqual(front.credits[-1], front.written)
            self.assertEqual(front.violations, [])

    def test_a_quarter_of_the_budget_is_reported_while_other_work_still_runs(self):
        plugin = Recorder()
        gate = threading.Event()
        plugin.gates[(1, 0)] = gate
        with FakeFront.start(plugin, budget_bytes=4000, options=opts("recorder", workers=2)) as front:
            front.request_start(1)  # holds one worker until the gate opens
            sent = sum(front.chunk(2, seq, b"y" * 100) for seq in range(12))
            self.assertGreaterEqual(sent, 1000)
            front.wait_credit(1000)  # a quarter of 4000, while stream 1 is still running
            self.assertFalse(gate.is_set())
            self.assertLess(front.credits[-1], front.written)
            gate.set()
            front.wait_credit(front.written)
            self.assertEqual(front.violations, [])

    def test_events_dropped_at_a_full_lane_are_credited_and_show_as_a_gap(self):
        plugin = Recorder()
        gate = threading.Event()
        plugin.gates[(1, 0)] = gate
        with FakeFront.start(plugin, options=opts("recorder", lane_queue_events=2)) as front:
            front.request_start(1)
            time.sleep(0.05)  # running, so the lane's queue is empty
            for seq in (1, 2, 3, 4):
                front.chunk(1, seq, b"z")
            call = front.send_final(1, 5)  # finals are never dropped
            time.sleep(0.05)
            gate.set()
            reply = front.final_reply(call)
            self.assertEqual([e[1] for e in events(reply)], [0, 1, 2, 5])
            self.assertEqual(reply.metadata["plugvisor.recorder"]["gaps"], 2)
            front.wait_credit(front.written)
            self.assertEqual(front.violations, [])


class Heartbeats(unittest.TestCase):
    def test_pings_are_answered_while_every_worker_is_busy_with_the_stuck_lanes(self):
        plugin = Recorder()
        gates = {sid: threading.Event() for sid in (1, 2)}
        for sid, gate in gates.items():
            plugin.gates[(sid, 0)] = gate
        with FakeFront.start(plugin, options=opts("recorder", workers=2, stuck_after=0.05)) as front:
            front.request_start(1)
            front.request_start(2)
            front.chunk(1, 1, b"queued behind the busy hook")
            time.sleep(0.1)
            started = time.monotonic()
            pong = front.ping(42)
            self.assertLess(time.monotonic() - started, 1.0)
            self.assertEqual(pong.active_streams, 2)
            self.assertEqual([sid for sid, _ in pong.stuck], [1, 2])
            self.assertTrue(all(ms >= 50 for _, ms in pong.stuck))
            for gate in gates.values():
                gate.set()
            front.final(1, 2)
            front.final(2, 1)
            self.assertEqual(front.ping(43).active_streams, 0)


class Exceptions(unittest.TestCase):
    def test_an_exception_fails_only_its_stream_and_skips_its_later_hooks(self):
        with FakeFront.start(Conformance()) as front:
            front.request_start(1, headers=[("x-conformance-fail", "response_headers")])
            front.request_start(2)
            front.response_headers(1, 1)
            front.response_headers(2, 1)
            front.chunk(1, 2, b"abc")
            bad = front.final(1, 3)
            good = front.final(2, 2)
            self.assertIsNone(bad.metadata)
            self.assertIn("raised in on_response_headers (seq 1)", bad.error)
            self.assertIn("RuntimeError: x-conformance-fail: response_headers", bad.error)
            self.assertEqual(good.metadata["plugvisor.conformance"]["seqs"], [0, 1, 2])
            self.assertEqual(front.ping(1).active_streams, 0)

    def test_every_hook_of_the_conformance_plugin_can_fail(self):
        for hook in ("request_start", "response_headers", "chunk", "final"):
            with FakeFront.start(Conformance()) as front:
                front.request_start(1, headers=[("X-Conformance-Fail", hook)])
                front.response_headers(1, 1)
                front.chunk(1, 2)
                reply = front.final(1, 3)
                self.assertIn(f"x-conformance-fail: {hook}", reply.error or "", hook)

    def test_a_failing_new_stream_or_a_bad_return_is_that_stream_s_error(self):
        class Broken(Recorder):
            def new_stream(self):
                raise KeyError("state")

        class NoReturn(Recorder):
            def on_final(self, stream, ctx, final):
                return None

        class BadValue(Recorder):
            def on_final(self, stream, ctx, final):
                return {self.namespace: {"set": {1, 2}}}

        for plugin, want in ((Broken(), "raised in new_stream (seq 0): KeyError"),
                             (NoReturn(), "on_final returned None"),
                             (BadValue(), "metadata not encodable")):
            with FakeFront.start(plugin) as front:
                front.request_start(1)
                self.assertIn(want, front.final(1, 1).error or "")
                front.request_start(2)
                self.assertIn(want, front.final(2, 1).error or "")


class MetadataCap(unittest.TestCase):
    def test_metadata_at_the_cap_passes_and_one_byte_over_is_an_error(self):
        class Sized(Recorder):
            size = 0

            def on_final(self, stream, ctx, final):
                return {"plugvisor.recorder": {"k": "v" * self.size}}

        at = len(b"\x01\x12plugvisor.recorder\x06\x01\x01k\x04") + 1 + 300  # varint 300: 3 bytes
        at += 2
        plugin = Sized()
        plugin.size = 300
        with FakeFront.start(plugin, metadata_max_bytes=at) as front:
            front.request_start(1)
            self.assertEqual(front.final(1, 1).metadata, {"plugvisor.recorder": {"k": "v" * 300}})
            plugin.size = 301
            front.request_start(2)
            reply = front.final(2, 1)
            self.assertIsNone(reply.metadata)
            self.assertTrue(reply.error.startswith(
                f"metadata of {at + 1} bytes is over metadata_max_bytes ({at}); plugin `recorder`"),
                reply.error)


class Lifecycle(unittest.TestCase):
    def test_shutdown_finishes_in_flight_streams_answers_their_finals_and_exits_0(self):
        with FakeFront.start(Recorder(delay=0.05)) as front:
            for sid in (1, 2):
                front.request_start(sid)
                front.chunk(sid, 1, b"x")
            calls = [front.send_final(sid, 2) for sid in (1, 2)]
            front.shutdown(5000)
            started = time.monotonic()
            for call in calls:
                self.assertIsNotNone(front.final_reply(call).metadata)
            self.assertEqual(front.wait_exit(), Exit.CLEAN)
            self.assertLess(time.monotonic() - started, 2.0, "waited for the whole grace")

    def test_shutdown_does_not_end_the_connection_under_a_reply_on_its_way(self):
        # The last step of a final reply before the socket (its metadata checked against the
        # cap) made slow: the hook is done, yet the connection must not end, however idle its
        # lanes look, before the reply is written.
        check = plugvisor.host.check_metadata

        def slow_check(*args, **kw):
            time.sleep(0.2)
            return check(*args, **kw)

        with mock.patch("plugvisor.host.check_metadata", slow_check):
            with FakeFront.start(Recorder()) as front:
                front.request_start(1)
                call = front.send_final(1, 1)
                front.shutdown(5000)
                self.assertIsNotNone(front.final_reply(call).metadata)
                self.assertEqual(front.wait_exit(), Exit.CLEAN)

    def test_shutdown_takes_no_new_streams_and_ends_at_its_grace(self):
        plugin = Recorder()
        plugin.gates[(1, 0)] = threading.Event()  # never opened: a hung hook
        with FakeFront.start(plugin) as front:
            front.request_start(1)
            front.shutdown(200)
            call = front.send_final(9, 0)
            reply = front.final_reply(call)
            self.assertIn("shutting down", reply.error)
            started = time.monotonic()
            self.assertEqual(front.wait_exit(5), Exit.CLEAN)
            self.assertLess(time.monotonic() - started, 2.0)
            self.assertTrue(front.closed())

    def test_end_of_file_exits_0_at_once_even_with_a_hook_running(self):
        plugin = Recorder()
        plugin.gates[(1, 0)] = threading.Event()
        front = FakeFront.start(plugin)
        front.request_start(1)
        time.sleep(0.05)
        front.close()
        started = time.monotonic()
        self.assertEqual(front.wait_exit(5), Exit.CLEAN)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_a_front_that_closes_with_answers_unread_is_an_end_of_file(self):
        # A Unix socket closed with data unread in it fails the peer's next read with
        # ECONNRESET, not end-of-file: the front is gone all the same, and the plugin exits 0.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        exited = []
        host = threading.Thread(
            target=lambda: exited.append(plugvisor.serve(Recorder(), opts(), sock=theirs)),
            daemon=True)
        host.start()
        reader = FrameReader(ours)
        self.assertIsInstance(wire.decode_from_plugin(reader.read()[0]), wire.Hello)
        ours.sendall(wire.frame(wire.Welcome(3, {}, 8 << 20, 16384, [])))
        ours.sendall(wire.frame(wire.Ping(1)))
        # Its Pong arrives, and nothing reads it.
        self.assertTrue(select.select([ours], [], [], 5)[0], "no Pong")
        ours.close()
        host.join(5)
        theirs.close()
        self.assertEqual(exited, [Exit.CLEAN])

    def test_abort_frees_the_stream_and_inline_chunks_are_acked(self):
        with FakeFront.start(Recorder()) as front:
            front.request_start(1)
            front.chunk(1, 1, b"x", ack=True)
            front.ack(1, 1)
            front.abort(1, 2, cause=0, detail="client went away")
            front.wait_credit(front.written)
            self.assertEqual(front.ping(1).active_streams, 0)

    def test_as_renames_the_namespace_with_the_host_s_additions(self):
        with FakeFront.start(Conformance(), options=opts(name="conf2", runs="conformance")) as front:
            self.assertEqual(front.hello.plugin, "conf2")
            front.chunk(1, 1, b"ab")
            reply = front.final(1, 2)
            self.assertEqual(reply.metadata, {"plugvisor.conf2": {
                "seqs": [1, 2], "replayed": 0, "bytes": 2, "partial": True}})


class AbortRecorder(Recorder):
    """A Recorder that keeps what its default ``on_aborted_final`` passed to ``on_abort``."""

    def __init__(self):
        super().__init__()
        self.aborts = []

    def on_abort(self, stream, ctx, event):
        self._hook(stream, ctx, "abort")
        self.aborts.append((ctx.stream_id, ctx.seq, ctx.gap, event, list(stream)))


class AbortedFinals(unittest.TestCase):
    def test_the_hook_s_metadata_is_the_answer_after_every_earlier_event_with_annotations(self):
        with FakeFront.start(Conformance()) as front:
            front.request_start(1, headers=[("x-conformance-sleep-ms", "5")])
            front.response_headers(1, 1)
            front.chunk(1, 2, b"abc")
            front.chunk(1, 4, b"de")  # seq 3 dropped by the front: a gap
            reply = front.aborted_final(1, 5, cause=1, detail="upstream reset", call_id=77)
            self.assertEqual((reply.call_id, reply.stream_id, reply.error), (77, 1, None))
            self.assertEqual(reply.metadata, {"plugvisor.conformance": {
                "seqs": [0, 1, 2, 4, 5], "replayed": 0, "bytes": 5, "aborted": "upstream_error",
                "gaps": 1}})
            # A stream first seen mid-way is partial, like for a Final; every cause is named.
            for cause, name in enumerate(("client_disconnect", "upstream_error", "timeout",
                                          "shutdown")):
                sid = 10 + cause
                front.chunk(sid, 2, b"x", replayed=True)
                reply = front.aborted_final(sid, 3, cause=cause)
                self.assertEqual(reply.metadata, {"plugvisor.conformance": {
                    "seqs": [2, 3], "replayed": 1, "bytes": 1, "aborted": name,
                    "partial": True}})
            self.assertEqual(front.ping(1).active_streams, 0)
            front.wait_credit(front.written)
            self.assertEqual(front.violations, [])

    def test_the_default_hook_runs_on_abort_and_answers_empty_metadata(self):
        plugin = AbortRecorder()
        plugin.subscriptions = Subscriptions(abort=False)  # an AbortedFinal comes all the same
        with FakeFront.start(plugin) as front:
            front.request_start(1)
            front.chunk(1, 1, b"x")
            reply = front.aborted_final(1, 2, cause=2, detail="deadline", stamp_ns=1234,
                                        call_id=5)
            self.assertEqual((reply.call_id, reply.stream_id, reply.metadata, reply.error),
                             (5, 1, {}, None))
            self.assertEqual(plugin.aborts, [(1, 2, 0, Abort(1, 2, 1234, 2, "deadline"),
                                              [("start", 0, 0, False, False),
                                               ("chunk", 1, 0, False, False),
                                               ("abort", 2, 0, False, False)])])
            # With gaps (and a lost start) the host's annotations are the whole answer.
            front.request_start(2)
            reply = front.aborted_final(2, 3, cause=0)
            self.assertEqual(reply.metadata, {"plugvisor.recorder": {"gaps": 2}})
            reply = front.aborted_final(3, 4, cause=3)
            self.assertEqual(reply.metadata, {"plugvisor.recorder": {"partial": True}})
            self.assertEqual(front.ping(1).active_streams, 0)

    def test_an_exception_answers_an_error_for_that_stream_only(self):
        class Boom(Recorder):
            def on_aborted_final(self, stream, ctx, event):
                if ctx.stream_id == 1:
                    raise ValueError("cannot count an aborted stream")
                return {self.namespace: {"n": len(stream)}}

        with FakeFront.start(Boom()) as front:
            for sid in (1, 2):
                front.request_start(sid)
                front.chunk(sid, 1, b"x")
            bad = front.aborted_final(1, 2)
            good = front.aborted_final(2, 2)
            self.assertIsNone(bad.metadata)
            self.assertEqual(bad.stream_id, 1)
            self.assertIn("raised in on_aborted_final (seq 2): ValueError: cannot count an "
                          "aborted stream", bad.error)
            self.assertEqual(good.metadata, {"plugvisor.recorder": {"n": 2}})
            self.assertEqual(front.ping(1).active_streams, 0)  # the failed stream is freed too
            front.request_start(1)  # the same stream id later is a new stream
            self.assertEqual(events(front.final(1, 1)), [("start", 0, 0, False, False),
                                                        ("final", 1, 0, False, False)])
        # An earlier hook's exception, or the final hook's: as for a Final.
        with FakeFront.start(Conformance()) as front:
            for sid, hook in ((1, "chunk"), (2, "final")):
                front.request_start(sid, headers=[("x-conformance-fail", hook)])
                front.chunk(sid, 1)
                reply = front.aborted_final(sid, 2)
                on = "on_aborted_final" if hook == "final" else "on_chunk"
                self.assertIn(f"raised in {on}", reply.error or "", hook)

        class NoReturn(Recorder):
            def on_aborted_final(self, stream, ctx, event):
                return None

        with FakeFront.start(NoReturn()) as front:
            self.assertIn("on_aborted_final returned None", front.aborted_final(1, 0).error)

    def test_the_metadata_cap_and_as_apply_as_for_a_final(self):
        class Big(Recorder):
            def on_aborted_final(self, stream, ctx, event):
                return {self.namespace: {"k": "v" * 100}, "envoy.lb": {"cause": event.cause_str}}

        with FakeFront.start(Big(), metadata_max_bytes=64) as front:
            reply = front.aborted_final(1, 0)
            self.assertIsNone(reply.metadata)
            self.assertIn("is over metadata_max_bytes (64)", reply.error)
        with FakeFront.start(Big(), options=opts(name="rec2", runs="recorder")) as front:
            reply = front.aborted_final(1, 2, cause=3)
            self.assertEqual(reply.metadata, {"plugvisor.rec2": {"k": "v" * 100, "partial": True},
                                              "envoy.lb": {"cause": "shutdown"}})

    def test_it_counts_against_the_window_by_its_whole_frame(self):
        with FakeFront.start(Recorder(), budget_bytes=1 << 20) as front:
            front.request_start(1)
            front.wait_credit(front.written)
            before = front.written
            front.aborted_final(1, 1, detail="d" * 300, stamp_ns=5, call_id=9)
            # 4 + (index, stream, seq, stamp, call, cause: 6 bytes; detail: fb 2c 01 + 300)
            self.assertEqual(front.written - before, 4 + 6 + 3 + 300)
            self.assertEqual(front.written - before,
                             len(wire.frame(AbortedFinal(1, 1, 5, 9, 0, "d" * 300))))
            front.wait_credit(front.written)
            time.sleep(0.05)
            self.assertEqual(front.credits[-1], front.written)
            self.assertEqual(front.violations, [])

    def test_a_late_aborted_final_after_the_stream_s_final_answers_an_error(self):
        plugin = Recorder()
        gate = threading.Event()
        plugin.gates[(1, 0)] = gate
        with FakeFront.start(plugin) as front:
            front.request_start(1)
            time.sleep(0.05)
            final = front.send_final(1, 1)
            late = front.send_aborted_final(1, 2, cause=0)
            time.sleep(0.05)
            gate.set()
            self.assertIsNotNone(front.final_reply(final).metadata)
            reply = front.final_reply(late)
            self.assertEqual((reply.stream_id, reply.error), (1, "stream had already ended"))
            front.wait_credit(front.written)
            self.assertEqual(front.violations, [])

    def test_while_shutting_down_a_new_stream_s_aborted_final_is_answered(self):
        plugin = Recorder()
        plugin.gates[(1, 0)] = threading.Event()
        with FakeFront.start(plugin) as front:
            front.request_start(1)
            front.shutdown(200)
            reply = front.aborted_final(9, 0)
            self.assertIn("shutting down", reply.error)
            self.assertEqual(front.wait_exit(5), Exit.CLEAN)

    def test_a_replayed_around_an_aborted_final_is_a_protocol_error(self):
        front = FakeFront.start(Recorder())
        payload = b"\x09" + wire.encode(AbortedFinal(1, 0, 5, 1, 0, ""))
        front.sock.sendall(len(payload).to_bytes(4, "little") + payload)
        self.assertEqual(front.wait_exit(5), Exit.FAILED)
        front.close()

    def test_the_fake_front_sends_it_only_when_agreed(self):
        with FakeFront.start(Recorder(), capabilities=("replayed",)) as front:
            self.assertEqual(front.welcome.capabilities, ["replayed"])
            with self.assertRaises(AssertionError):
                front.send_aborted_final(1, 0)
        with FakeFront.start(Recorder(), version=2) as front:
            with self.assertRaises(AssertionError):
                front.send_aborted_final(1, 0)


class WordCountExample(unittest.TestCase):
    def sse(self, *deltas, done=True):
        import json
        body = b"".join(b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": d}}]}).encode()
                        + b"\n\n" for d in deltas)
        return body + (b"data: [DONE]\n\n" if done else b"")

    def test_words_are_counted_across_split_events_and_deltas(self):
        body = self.sse("Hello", " wor", "ld, this is", " a test.\n", "Bye")
        with FakeFront.start(WordCount(), options=opts("wordcount")) as front:
            for split in (1, 7, 13, len(body) // 2, len(body) - 1):
                sid = split
                front.chunk(sid, 0, body[:split])
                front.chunk(sid, 1, body[split:])
                self.assertEqual(front.final(sid, 2).metadata, {"plugvisor.wordcount": {"words": 7}})
            # Byte at a time, the last event only in the final's body, CRLF line ends.
            crlf = body.replace(b"\n", b"\r\n")
            for i in range(len(crlf) - 20):
                front.chunk(1000, i, crlf[i:i + 1])
            reply = front.final(1000, len(crlf) - 20, crlf[-20:])
            self.assertEqual(reply.metadata, {"plugvisor.wordcount": {"words": 7}})

    def test_an_aborted_stream_reports_the_words_of_the_events_received(self):
        body = self.sse("Hello", " wor", "ld, this is", done=False)
        cut = self.sse(" a test", done=False)[:-4]  # the client left inside this event
        with FakeFront.start(WordCount(), options=opts("wordcount")) as front:
            front.chunk(1, 0, body[:10])
            front.chunk(1, 1, body[10:] + cut)
            reply = front.aborted_final(1, 2, cause=0)
            self.assertEqual(reply.metadata, {"plugvisor.wordcount": {
                "words": 4, "aborted": "client_disconnect"}})
            reply = front.aborted_final(2, 0, cause=1)
            self.assertEqual(reply.metadata, {"plugvisor.wordcount": {
                "words": 0, "aborted": "upstream_error"}})


if __name__ == "__main__":
    unittest.main()
