"""The command line, exit codes and log lines of a plugin program run as a real process on a
real Unix socket."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest

import support
from plugvisor import Exit, cli
from plugvisor.testing import FakeFront
from plugvisor.wire import Refuse

CONFORMANCE = os.path.join(support.EXAMPLES, "conformance.py")


def parse(*argv):
    return cli.host_options(cli.parser().parse_args(list(argv)), "conformance")


class Parsing(unittest.TestCase):
    def test_the_front_s_command_line_parses_with_the_rust_defaults(self):
        o = parse("--connect", "/run/p/conformance.sock")
        self.assertEqual((o.plugin, o.runs, o.connect), ("conformance", None, "/run/p/conformance.sock"))
        self.assertGreaterEqual(o.workers, 1)
        self.assertEqual((o.idle_timeout, o.stuck_after, o.term_grace, o.connect_wait),
                         (300.0, 5.0, 5.0, 0.0))
        self.assertEqual((o.lane_queue_events, o.lane_queue_bytes), (4096, 16 * 1024 * 1024))

    def test_a_name_and_as_rename_like_the_built_ins(self):
        o = parse("conf", "--connect", "/s")
        self.assertEqual((o.plugin, o.runs), ("conf", None))
        o = parse("--as", "c2", "--connect", "/s")
        self.assertEqual((o.plugin, o.runs), ("c2", "conformance"))
        with self.assertRaises(cli.UsageError):
            parse("--as", "../x", "--connect", "/s")

    def test_missing_connect_and_bad_values_are_usage_errors(self):
        with self.assertRaises(cli.UsageError) as e:
            parse()
        self.assertIn("--connect", str(e.exception))
        for bad in (["--idle-timeout", "5 weeks"], ["--workers", "x"], ["--workers", "0"],
                    ["--bogus"]):
            with self.assertRaises(cli.UsageError, msg=bad):
                parse("--connect", "/s", *bad)

    def test_durations_take_the_usual_units(self):
        self.assertEqual(cli.parse_duration("250ms"), 0.25)
        self.assertEqual(cli.parse_duration("30"), 30.0)
        self.assertEqual(cli.parse_duration("5m"), 300.0)
        self.assertEqual(cli.parse_duration("1h"), 3600.0)


def run(*args, env=None, timeout=20):
    return subprocess.run([sys.executable, CONFORMANCE, *args], capture_output=True, text=True,
                          env=support.child_env(**(env or {})), timeout=timeout)


class Process(unittest.TestCase):
    def test_help_exits_0_and_bad_usage_exits_64(self):
        r = run("--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("--connect", r.stdout)
        self.assertIn("--as", r.stdout)
        r = run(env={"PLUGVISOR_CONNECT": ""})
        self.assertEqual(r.returncode, Exit.USAGE)
        self.assertIn("missing --connect", r.stderr)
        self.assertEqual(run("--connect", "/s", "--workers", "x").returncode, Exit.USAGE)
        r = run("--list")
        self.assertEqual((r.returncode, r.stdout), (0, "conformance\tthis program's plugin\n"))

    def test_an_unreachable_socket_exits_1(self):
        r = run("--connect", "/nonexistent/plugvisor.sock")
        self.assertEqual(r.returncode, Exit.FAILED)
        self.assertIn("cannot connect", r.stderr)

    def spawn(self, *args, env=None):
        listener, path = FakeFront.listen()
        self.addCleanup(shutil.rmtree, os.path.dirname(path), True)
        self.addCleanup(listener.close)
        proc = subprocess.Popen([sys.executable, CONFORMANCE, *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=support.child_env(PLUGVISOR_CONNECT=path, **(env or {})))

        def stop():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        self.addCleanup(stop)
        front = FakeFront.accept(listener)
        self.addCleanup(front.close)
        return proc, front

    def test_env_connect_serves_a_stream_and_end_of_file_exits_0(self):
        proc, front = self.spawn("conf9", env={"PLUGVISOR_SUPERVISED": "1"})
        hello = front.handshake()
        self.assertEqual((hello.plugin, hello.pid), ("conf9", proc.pid))
        front.request_start(1)
        reply = front.final(1, 1, b"abc")
        self.assertEqual(reply.metadata, {"plugvisor.conf9": {"seqs": [0, 1], "replayed": 0, "bytes": 3}})
        front.close()
        _, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, Exit.CLEAN, err)
        # Supervised, every line is `LEVEL target: message fields`, as the front parses it.
        lines = err.strip().splitlines()
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r"^(ERROR|WARN|INFO|DEBUG|TRACE) [^ ]+: \S")
        connected = [l for l in lines if "connected to the front" in l][0]
        self.assertRegex(connected, r"^INFO plugvisor\.host: connected to the front version=3 "
                                    r'subscriptions="request_start,response_headers,chunks,body_bytes,abort" ')
        self.assertIn("capabilities=\"replayed,aborted_final,reconnect,trace\"", connected)

    def test_a_refused_plugin_exits_78_with_the_reason_logged(self):
        proc, front = self.spawn()
        front.handshake(refuse=Refuse(1, "no plugin `conformance` in this front"))
        _, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, Exit.CONFIG)
        self.assertRegex(err, r"plugin=conformance pid=\d+ .* ERROR .*the front refused plugin "
                              r"`conformance`: no plugin `conformance` in this front code=\"UnknownPlugin\"")

    def test_shutdown_and_sigterm_exit_0(self):
        proc, front = self.spawn()
        front.handshake()
        front.shutdown(1000)
        proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, Exit.CLEAN)
        proc, front = self.spawn("--term-grace", "2s")
        front.handshake()
        front.request_start(1, headers=[("x-conformance-sleep-ms", "300")])
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, Exit.CLEAN, err)
        self.assertIn("SIGTERM; draining lanes", err)
        self.assertLess(time.monotonic() - started, 2.0)


if __name__ == "__main__":
    unittest.main()
