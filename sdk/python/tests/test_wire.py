"""The codec against the exact bytes of docs/protocol.md, value round trips and limits."""

import math
import socket
import struct
import unittest

import support
from plugvisor import wire
from plugvisor.connection import FrameReader
from plugvisor.wire import (Abort, AbortedFinal, Chunk, Credit, Final, FinalReply, Hello, Ping,
                            ProtocolError, Pong, Replayed, Subscriptions, Welcome)

# The dumps of docs/protocol.md, "Annotated bytes", exactly as printed there.
HELLO = """
0000  1a 00 00 00 00 03 05 75 73 61 67 65 fb 92 10 01  .......usage....
0010  01 01 01 01 01 08 72 65 70 6c 61 79 65 64        ......replayed
"""
WELCOME = """
0000  16 00 00 00 00 03 06 00 fc 00 00 80 00 fb 00 40  ...............@
0010  01 08 72 65 70 6c 61 79 65 64                    ..replayed
"""
CHUNK = """
0000  23 00 00 00 04 07 02 fd cb 04 fb 71 1f 01 00 00  #..........q....
0010  13 13 64 61 74 61 3a 20 7b 22 69 64 22 3a 22 63  ..data:.{"id":"c
0020  31 22 7d 0a 0a 00 00                             1"}....
"""
REPLAYED = """
0000  24 00 00 00 09 04 07 02 fd cb 04 fb 71 1f 01 00  $...........q...
0010  00 13 13 64 61 74 61 3a 20 7b 22 69 64 22 3a 22  ...data:.{"id":"
0020  63 31 22 7d 0a 0a 00 00                          c1"}....
"""
CREDIT = """
0000  06 00 00 00 04 fc 40 42 0f 00                    ......@B..
"""

BODY = b'data: {"id":"c1"}\n\n'


def chunk() -> Chunk:
    return Chunk(7, 2, 1_234_567_890_123, 19, BODY, False, False)


class ProtocolDocDumps(unittest.TestCase):
    def test_hello_of_the_usage_plugin_matches_the_doc(self):
        hello = Hello(3, "usage", 4242, Subscriptions(), ["replayed"])
        self.assertEqual(wire.frame(hello), support.hexdump(HELLO))
        self.assertEqual(wire.decode_from_plugin(support.hexdump(HELLO)[4:]), hello)

    def test_a_version_2_hello_is_the_same_without_capabilities(self):
        # "payload length 16 (10 00 00 00), version 02, ending after the subscriptions"
        v3 = support.hexdump(HELLO)
        v2 = wire.frame(Hello(2, "usage", 4242, Subscriptions(), ["ignored at version 2"]))
        self.assertEqual(v2, b"\x10\x00\x00\x00\x00\x02" + v3[6:20])
        self.assertEqual(len(v2) - 4, 16)

    def test_welcome_with_an_empty_config_matches_the_doc(self):
        welcome = Welcome(3, {}, 8 * 1024 * 1024, 16 * 1024, ["replayed"])
        self.assertEqual(wire.frame(welcome), support.hexdump(WELCOME))
        self.assertEqual(wire.decode_to_plugin(support.hexdump(WELCOME)[4:]), welcome)

    def test_a_version_2_welcome_ends_after_metadata_max_bytes(self):
        v2 = Welcome(2, {}, 8 * 1024 * 1024, 16 * 1024, [])
        self.assertEqual(len(wire.encode(v2)), 12)
        self.assertEqual(wire.decode_to_plugin(wire.encode(v2)), v2)
        # The version 2 layout that protocol.md quoted before version 3 (config Null).
        old = bytes.fromhex("0b0000000002 00 fc00008000 fb0040".replace(" ", ""))
        self.assertEqual(wire.decode_to_plugin(old[4:]), Welcome(2, None, 8 << 20, 16384, []))

    def test_chunk_matches_the_doc_and_counts_39_bytes(self):
        data = support.hexdump(CHUNK)
        self.assertEqual(wire.frame(chunk()), data)
        self.assertEqual(wire.decode_to_plugin(data[4:]), chunk())
        self.assertEqual(len(data), 39)

    def test_replayed_chunk_matches_the_doc_and_counts_40_bytes(self):
        data = support.hexdump(REPLAYED)
        self.assertEqual(wire.frame(Replayed(chunk())), data)
        self.assertEqual(wire.decode_to_plugin(data[4:]), Replayed(chunk()))
        self.assertEqual(len(data), 40)

    def test_credit_matches_the_doc(self):
        self.assertEqual(wire.frame(Credit(1_000_000)), support.hexdump(CREDIT))

    def test_varint_4242_is_fb_92_10(self):
        out = bytearray()
        wire._varint(out, 4242)
        self.assertEqual(bytes(out), bytes.fromhex("fb9210"))


class Version3(unittest.TestCase):
    def test_hello_v3_appends_capabilities(self):
        hello = Hello(3, "usage", 4242, Subscriptions(), ["replayed"])
        v2 = wire.encode(Hello(2, "usage", 4242, Subscriptions(), []))
        self.assertEqual(wire.encode(hello), v2[:1] + b"\x03" + v2[2:] + b"\x01\x08replayed")
        self.assertEqual(wire.decode_from_plugin(wire.encode(hello)), hello)

    def test_welcome_trailing_capabilities_follow_the_welcome_s_own_version(self):
        v3 = Welcome(3, {}, 65536, 1024, ["replayed"])
        payload = wire.encode(v3)
        self.assertTrue(payload.endswith(b"\x01\x08replayed"))
        self.assertEqual(wire.decode_to_plugin(payload), v3)
        # A version 2 Welcome has no such field: the same bytes are trailing garbage there.
        with self.assertRaises(ProtocolError):
            wire.decode_to_plugin(b"\x00\x02" + payload[2:])
        v2 = Welcome(2, {}, 65536, 1024, [])
        self.assertEqual(wire.decode_to_plugin(wire.encode(v2)), v2)


class AbortedFinals(unittest.TestCase):
    """``ToPlugin`` 10: stream_id, seq, stamp_ns, call_id, cause, detail."""

    def test_exact_bytes_written_by_hand_from_the_layout(self):
        msg = AbortedFinal(7, 3, 5, 9, 0, "x")
        #          index stream seq stamp call cause detail: len 1, "x"
        payload = bytes([0x0a, 0x07, 0x03, 0x05, 0x09, 0x00, 0x01, 0x78])
        self.assertEqual(wire.encode(msg), payload)
        self.assertEqual(wire.frame(msg), b"\x08\x00\x00\x00" + payload)
        self.assertEqual(wire.decode_to_plugin(payload), msg)

    def test_wide_fields_and_every_cause_round_trip(self):
        for cause, name, snake in ((0, "ClientDisconnect", "client_disconnect"),
                                   (1, "UpstreamError", "upstream_error"),
                                   (2, "Timeout", "timeout"), (3, "Shutdown", "shutdown")):
            msg = AbortedFinal((1 << 64) - 1, (1 << 32) - 1, 1_234_567_890_123, 4242, cause,
                               "grpc status 1: cancelled — é")
            self.assertEqual(wire.decode_to_plugin(wire.encode(msg)), msg)
            self.assertEqual((msg.cause_name, msg.cause_str), (name, snake))
            abort = msg.as_abort()
            self.assertEqual(abort, Abort(msg.stream_id, msg.seq, msg.stamp_ns, cause, msg.detail))
            self.assertEqual((abort.cause_name, abort.cause_str), (name, snake))
        # The call id is a varint like every other field: 4242 is `fb 92 10`.
        self.assertEqual(wire.encode(AbortedFinal(1, 2, 3, 4242, 3, ""))[4:],
                         b"\xfb\x92\x10\x03\x00")

    def test_an_unknown_cause_truncation_and_trailing_bytes_are_errors(self):
        good = wire.encode(AbortedFinal(7, 3, 5, 9, 0, "x"))
        for bad in (good[:5] + b"\x04" + good[6:], good[:-1], good + b"\x00",
                    b"\x0a\x07\xfd" + b"\x00" * 8 + b"\x05\x09\x00\x00"):
            with self.assertRaises(ProtocolError, msg=bad.hex()):
                wire.decode_to_plugin(bad)

    def test_it_is_never_wrapped_in_replayed(self):
        payload = wire.encode(AbortedFinal(7, 3, 5, 9, 0, "x"))
        with self.assertRaises(ProtocolError) as e:
            wire.decode_to_plugin(b"\x09" + payload)
        self.assertIn("AbortedFinal", str(e.exception))
        with self.assertRaises(wire.EncodeError):
            wire.encode(Replayed(AbortedFinal(7, 3, 5, 9, 0, "x")))

    def test_it_is_a_per_stream_event_counted_for_credit_and_a_final_call(self):
        msg = AbortedFinal(7, 3, 5, 9, 0, "x")
        self.assertTrue(wire.counts_for_credit(msg))
        self.assertIn(AbortedFinal, wire.EVENT_TYPES)
        self.assertNotIn(AbortedFinal, wire.REPLAYABLE_EVENT_TYPES)
        self.assertEqual(wire.FINAL_TYPES, (Final, AbortedFinal))

    def test_the_sdk_announces_the_capability(self):
        self.assertEqual(wire.CAPABILITIES, ("replayed", "aborted_final", "reconnect", "trace"))
        hello = Hello(3, "usage", 4242, Subscriptions(), list(wire.CAPABILITIES))
        self.assertTrue(wire.encode(hello).endswith(
            b"\x04\x08replayed\x0daborted_final\x09reconnect\x05trace"))
        self.assertEqual(wire.decode_from_plugin(wire.encode(hello)), hello)


class Values(unittest.TestCase):
    def roundtrip(self, value):
        out = bytearray()
        wire.encode_value(out, value)
        r = wire._Reader(bytes(out))
        got = r.value()
        r.finish(None)
        return got, bytes(out)

    def test_every_kind_round_trips_and_ints_stay_apart_from_floats(self):
        value = {"null": None, "t": True, "f": False, "i": -3, "x": 2.5, "s": "héllo",
                 "l": [1, "two", [3.0]], "m": {"b": {}, "a": []},
                 "big": (1 << 63) - 1, "small": -(1 << 63), "inf": math.inf}
        got, _ = self.roundtrip(value)
        self.assertEqual(got, value)
        self.assertIsInstance(got["i"], int)
        self.assertIsInstance(got["l"][2][0], float)
        self.assertIs(got["t"], True)

    def test_layouts_are_bincode_standard(self):
        self.assertEqual(self.roundtrip(None)[1], b"\x00")
        self.assertEqual(self.roundtrip(True)[1], b"\x01\x01")
        self.assertEqual(self.roundtrip(-1)[1], b"\x02\x01")  # zigzag
        self.assertEqual(self.roundtrip(1)[1], b"\x02\x02")
        self.assertEqual(self.roundtrip(1.0)[1], b"\x03" + struct.pack("<d", 1.0))
        self.assertEqual(self.roundtrip("a")[1], b"\x04\x01a")
        self.assertEqual(self.roundtrip((1,))[1], b"\x05\x01\x02\x02")
        # Keys in ascending byte order, whatever the dict's order.
        self.assertEqual(self.roundtrip({"b": None, "a": None, "é": None})[1],
                         b"\x06\x03\x01a\x00\x01b\x00\x02\xc3\xa9\x00")

    def test_integers_outside_i64_and_foreign_types_do_not_encode(self):
        for bad in (1 << 63, -(1 << 63) - 1, object(), b"bytes", {1: "non-string key"}, {1, 2}):
            with self.assertRaises(wire.EncodeError, msg=repr(bad)):
                wire.encode_value(bytearray(), bad)

    def test_nesting_at_the_limit_passes_and_one_level_more_is_refused(self):
        # 64 levels: 63 lists around a Null (the Rust decoder counts every Value).
        value = None
        for _ in range(wire.MAX_VALUE_DEPTH - 1):
            value = [value]
        got, data = self.roundtrip(value)
        self.assertEqual(got, value)
        with self.assertRaises(wire.EncodeError):
            wire.encode_value(bytearray(), [value])
        with self.assertRaises(ProtocolError):
            wire._Reader(b"\x05\x01" + data).value()

    def test_a_hostile_deep_value_is_refused_not_a_recursion_error(self):
        payload = b"\x01\x01\x01\x00\x01\x01n" + b"\x05\x01" * 100_000 + b"\x00"
        with self.assertRaises(ProtocolError):
            wire.decode_from_plugin(payload)


class StrictDecoding(unittest.TestCase):
    def test_trailing_bytes_bad_bools_options_and_wide_varints_are_errors(self):
        good = wire.encode(chunk())
        for bad in (
            good + b"\x00",                    # trailing byte
            good[:-1] + b"\x02",               # bool 2
            good[:-5],                         # truncated
            b"\x07\xfe" + b"\x00" * 16,        # u128 marker for a u64
            b"\x04\x07\xfd" + b"\x00" * 8 + b"\x00" * 9,  # u64 marker for the u32 seq
            b"\x02\x01\x00\x00\x02\x01",        # Option tag 2
            b"\x0b",                            # unknown variant
            b"\x04\x07\x02\x00\x03\x05ab\x00\x00",  # a body longer than what is left
            b"\x04\x07\x02\x00\x03\x00\x00",          # no ack byte
        ):
            with self.assertRaises(ProtocolError, msg=bad.hex()):
                wire.decode_to_plugin(bad)

    def test_replayed_must_wrap_one_per_stream_event(self):
        for inner in (wire.encode(Ping(1)), wire.encode(Replayed(chunk())),
                      wire.encode(wire.Shutdown(1)), wire.encode(Welcome(3, {}, 1, 1, []))):
            with self.assertRaises(ProtocolError):
                wire.decode_to_plugin(b"\x09" + inner)
        with self.assertRaises(wire.EncodeError):
            wire.encode(Replayed(Ping(1)))

    def test_from_plugin_messages_round_trip(self):
        for msg in (FinalReply(1, 2, metadata={"plugvisor.x": {"n": 1}}),
                    FinalReply(3, 4, error="boom"), Pong(5, 2, [(7, 6000)]),
                    wire.Ack(9, 4), Credit(0)):
            self.assertEqual(wire.decode_from_plugin(wire.encode(msg)), msg)


class Frames(unittest.TestCase):
    def test_an_oversized_length_is_refused_before_its_payload_arrives(self):
        a, b = socket.socketpair()
        with a, b:
            reader = FrameReader(b, max_frame=1024)
            a.sendall(struct.pack("<I", 1025))
            with self.assertRaises(ProtocolError):
                reader.read()

    def test_frames_at_the_limit_and_split_across_reads_are_whole(self):
        a, b = socket.socketpair()
        with a, b:
            reader = FrameReader(b, max_frame=1024)
            data = struct.pack("<I", 1024) + b"x" * 1024 + wire.frame(Ping(1))
            a.sendall(data[:3])
            a.sendall(data[3:700])
            a.sendall(data[700:])
            self.assertEqual(reader.read(), (b"x" * 1024, 1028))
            self.assertEqual(reader.read()[0], wire.encode(Ping(1)))

    def test_close_between_frames_is_an_end_and_inside_one_an_error(self):
        a, b = socket.socketpair()
        with b:
            reader = FrameReader(b)
            a.sendall(wire.frame(Ping(1)))
            a.close()
            self.assertIsNotNone(reader.read())
            self.assertIsNone(reader.read())
        a, b = socket.socketpair()
        with b:
            reader = FrameReader(b)
            a.sendall(wire.frame(Ping(1))[:-1])
            a.close()
            with self.assertRaises(ProtocolError):
                reader.read()


if __name__ == "__main__":
    unittest.main()
