"""Helpers shared by the SDK's tests: where the examples are, and quiet logs."""

import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(HERE)
EXAMPLES = os.path.join(SOURCE, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

try:
    import plugvisor
except ImportError:  # run from the source tree without installing: test the sources
    sys.path.insert(0, SOURCE)
    import plugvisor

#: Where the package under test lives (the installed one when installed).
PACKAGE_DIR = os.path.dirname(os.path.abspath(plugvisor.__file__))
if os.environ.get("PLUGVISOR_TEST_INSTALLED") == "1" and PACKAGE_DIR.startswith(SOURCE + os.sep):
    raise RuntimeError(f"PLUGVISOR_TEST_INSTALLED=1 but plugvisor comes from the source tree "
                       f"({PACKAGE_DIR}); run the tests from outside sdk/python")


def child_env(**extra: str) -> dict:
    """The environment for a plugin subprocess: it imports the same plugvisor as the tests."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(PACKAGE_DIR), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env

# The hosts under test log through the root logger; keep the test output readable.
logging.getLogger().addHandler(logging.NullHandler())
logging.getLogger().setLevel(logging.CRITICAL + 1)


def hexdump(text: str) -> bytes:
    """The bytes of a docs/protocol.md dump (`0000  10 00 ...  ascii` lines)."""
    out = bytearray()
    for line in text.strip().splitlines():
        parts = line.split("  ")
        out += bytes.fromhex(parts[1])
    return bytes(out)
