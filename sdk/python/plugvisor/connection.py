"""Reading and writing frames on the front's socket.

:class:`FrameReader` keeps what ``recv`` returned in one buffer and cuts whole frames out of it:
"need more bytes" is ``None`` from :meth:`FrameReader.next_frame`, a close between two frames is a
clean end, a close inside a frame is a :class:`~plugvisor.wire.ProtocolError`, and a length over
the maximum is refused as soon as its prefix is read, before anything is reserved for it.

:class:`FrameWriter` is shared by every thread that answers the front (workers' final replies and
acks, the reader's pongs, credit): one lock keeps frames whole and in order on the socket.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any, Optional, Tuple

from .wire import DEFAULT_MAX_FRAME, PREFIX_LEN, ProtocolError, frame

_U32 = struct.Struct("<I")
_RECV = 256 * 1024


class FrameReader:
    """Whole frames from a stream socket."""

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0
        self.eof = False

    def next_frame(self) -> Optional[Tuple[bytes, int]]:
        """The next buffered frame as ``(payload, whole frame length)``, or ``None`` when the
        buffer holds no whole frame yet (call :meth:`fill`)."""
        avail = len(self._buf) - self._pos
        if avail < PREFIX_LEN:
            return None
        (length,) = _U32.unpack_from(self._buf, self._pos)
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes is over the {self.max_frame}-byte limit")
        if avail < PREFIX_LEN + length:
            return None
        start = self._pos + PREFIX_LEN
        payload = bytes(self._buf[start:start + length])
        self._pos = start + length
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > _RECV:
            del self._buf[:self._pos]
            self._pos = 0
        return payload, PREFIX_LEN + length

    def fill(self) -> bool:
        """Reads what the socket has (blocking until something or end-of-file). Returns
        ``False`` at a clean end of file; a close inside a frame raises."""
        data = self.sock.recv(_RECV)
        if not data:
            self.eof = True
            pending = len(self._buf) - self._pos
            if pending:
                raise ProtocolError(f"connection closed inside a frame ({pending} bytes of it read)")
            return False
        self._buf += data
        return True

    def read(self) -> Optional[Tuple[bytes, int]]:
        """Blocks for the next frame; ``None`` at a clean end of file."""
        while True:
            got = self.next_frame()
            if got is not None:
                return got
            if not self.fill():
                return None


class FrameWriter:
    """Writes whole frames from any thread; after a failed write everything is dropped (the
    front is gone and the reader will see the end of file)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self.failed = False

    def send(self, msg: Any) -> None:
        """Encodes and writes one message."""
        self.send_raw(frame(msg))

    def send_raw(self, data: bytes) -> None:
        """Writes one already encoded frame."""
        with self._lock:
            if self.failed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.failed = True
