"""Capability ``reconnect`` against a fake front listening on a socket path: a second
connection with the same ``Hello``, a new plugin instance per connection, the old connection
served until the front closes it, the process ending with its last connection (78 after a
refused reconnection), a second ``Reconnect`` ignored while one is under way, and ``Shutdown``
on one connection draining them all."""

import os
import socket
import threading
import time
import unittest

import support  # noqa: F401  (sets up the import path)
import plugvisor
from plugvisor import Exit
from plugvisor.testing import FakeFront
from plugvisor.wire import Refuse


class Greeter(plugvisor.Plugin):
    """Answers every final with its configured greeting, so a reply names its instance."""

    name = "greeter"

    def __init__(self):
        self.greeting = None

    def configure(self, config):
        unknown = set(config) - {"greeting"}
        if unknown:
            raise plugvisor.ConfigError(f"unknown key {sorted(unknown)[0]}")
        self.greeting = config.get("greeting", "none")

    def on_final(self, stream, ctx, final):
        return {self.namespace: {"greeting": self.greeting}}


def greeting(front, sid):
    front.request_start(sid)
    reply = front.final(sid, 1)
    return reply.metadata["plugvisor.greeter"]["greeting"]


def reconnected(config="old"):
    old = FakeFront.start_listening(Greeter(), config={"greeting": config})
    old.reconnect("config changed")
    return old, old.accept_next()


class Reconnect(unittest.TestCase):
    def test_a_new_instance_serves_the_new_connection_while_the_old_one_finishes(self):
        template = Greeter()
        old = FakeFront.start_listening(template, config={"greeting": "old"})
        self.assertIn("reconnect", old.hello.capabilities)
        self.assertIn("reconnect", old.welcome.capabilities)
        old.request_start(1)  # in flight when the front asks for a new connection
        old.reconnect("config changed")
        new = old.accept_next()
        hello = new.handshake(config={"greeting": "new"})
        self.assertEqual(hello, old.hello, "the same Hello: name, pid, subscriptions, caps")
        self.assertEqual(hello.pid, os.getpid())
        # The old connection still answers its stream, with the old instance.
        self.assertEqual(old.final(1, 1).metadata["plugvisor.greeter"]["greeting"], "old")
        old.ping(1)
        self.assertEqual(greeting(new, 2), "new")
        self.assertEqual(template.greeting, "old", "the first connection's instance is the "
                                                  "plugin given to serve")
        # The front closes the old connection: the process lives on the new one.
        old.close()
        time.sleep(0.2)
        self.assertTrue(old.thread.is_alive(), "EOF on the old connection ended the process")
        new.ping(2)
        self.assertEqual(greeting(new, 3), "new")
        # Its last connection closed: exit 0.
        new.close()
        self.assertEqual(old.wait_exit(), Exit.CLEAN)
        self.assertEqual(old.violations + new.violations, [])

    def test_a_refused_reconnection_keeps_the_old_connection_and_then_exits_78(self):
        old, new = reconnected()
        new.handshake(refuse=Refuse(3, "the fake front refuses it"))
        self.assertEqual(greeting(old, 1), "old")
        time.sleep(0.1)
        self.assertTrue(old.thread.is_alive())
        old.close()
        self.assertEqual(old.wait_exit(), Exit.CONFIG)
        new.close()

    def test_a_config_the_new_instance_rejects_counts_as_refused(self):
        old, new = reconnected()
        new.handshake(config={"greting": "typo"})
        old.ping(7)
        self.assertEqual(greeting(old, 1), "old", "the old instance kept its config")
        old.close()
        self.assertEqual(old.wait_exit(), Exit.CONFIG)
        new.close()

    def test_a_second_reconnect_while_one_is_under_way_is_ignored(self):
        old, new = reconnected()
        old.reconnect("again")
        with self.assertRaises(socket.timeout):
            old.accept_next(timeout=0.3)
        new.handshake(config={"greeting": "new"})
        new.ping(1)
        # Once welcomed, a new Reconnect is followed again.
        new.reconnect("once more")
        third = old.accept_next()
        third.handshake(config={"greeting": "third"})
        self.assertEqual(greeting(third, 5), "third")
        for front in (old, new, third):
            front.close()
        self.assertEqual(old.wait_exit(), Exit.CLEAN)

    def test_shutdown_on_one_connection_drains_every_connection_and_exits_0(self):
        old, new = reconnected()
        new.handshake(config={"greeting": "new"})
        new.ping(1)  # the host serves it (a Shutdown during its handshake would abandon it)
        new.request_start(2)
        new.wait_credit(new.written)  # the stream started before the Shutdown
        old.shutdown(5000)
        # Within the grace, the other connection still runs and answers its stream.
        self.assertEqual(new.final(2, 1).metadata["plugvisor.greeter"]["greeting"], "new")
        self.assertEqual(old.wait_exit(5), Exit.CLEAN)
        self.assertTrue(new.closed())
        old.close()
        new.close()

    def test_a_plugin_that_cannot_be_copied_does_not_announce_reconnect(self):
        class Locked(Greeter):
            def __init__(self):
                super().__init__()
                self.lock = threading.Lock()  # deepcopy refuses it

        front = FakeFront.start_listening(Locked())
        self.assertNotIn("reconnect", front.hello.capabilities)
        self.assertEqual(greeting(front, 1), "none")
        front.close()
        self.assertEqual(front.wait_exit(), Exit.CLEAN)

    def test_new_instance_can_share_state_between_connections(self):
        class Counting(Greeter):
            def __init__(self, shared=None):
                super().__init__()
                self.shared = shared if shared is not None else {"instances": 0}
                self.shared["instances"] += 1

            def new_instance(self):
                return Counting(self.shared)

        template = Counting()
        old = FakeFront.start_listening(template, config={"greeting": "old"})
        old.reconnect()
        new = old.accept_next()
        new.handshake(config={"greeting": "new"})
        self.assertEqual(greeting(new, 1), "new")
        # The template, the pristine copy taken at start, and the new connection's instance.
        self.assertEqual(template.shared["instances"], 3)
        old.close()
        new.close()
        self.assertEqual(old.wait_exit(), Exit.CLEAN)


if __name__ == "__main__":
    unittest.main()
