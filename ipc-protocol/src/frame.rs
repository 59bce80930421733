//! Length-prefixed framing over any tokio byte stream.
//!
//! A frame is a `u32` little-endian payload length followed by that many payload bytes (one
//! message, see [`crate::codec`]). The length is checked against the reader's maximum before any
//! room is reserved for the payload, so a peer announcing a 4 GiB frame costs nothing.
//!
//! [`FrameReader`] reads as much as the socket has into one buffer and hands out frames from it,
//! so many small frames cost one `read`. [`FrameWriter`] encodes frames into one buffer and
//! writes them with one `write` when flushed, so a writer task that feeds every queued message
//! before flushing batches them into few syscalls. [`FrameWriter::feed_event`] leaves large
//! bodies where they are and writes them with the rest in one vectored write.
//!
//! As in mini-redis, a clean close between frames is `Ok(None)`; a close inside a frame is
//! [`ProtocolError::Truncated`].

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, MAX_FRAME_CEILING};
use crate::{ProtocolError, ToPlugin};

/// The default maximum payload size of one frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Bytes in the length prefix.
pub const PREFIX_LEN: usize = 4;

/// How much a writer buffers before a caller that batches should flush (256 KiB).
pub const BATCH_BYTES: usize = 256 * 1024;

const READ_CHUNK: usize = 64 * 1024;

fn clamp_max(max_frame: usize) -> usize {
    max_frame.min(MAX_FRAME_CEILING)
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_frame: usize,
    last_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader allowing frames up to [`DEFAULT_MAX_FRAME`].
    pub fn new(inner: R) -> Self {
        Self::with_max_frame(inner, DEFAULT_MAX_FRAME)
    }

    /// A reader allowing payloads up to `max_frame` bytes (capped at
    /// [`codec::MAX_FRAME_CEILING`]).
    pub fn with_max_frame(inner: R, max_frame: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_frame: clamp_max(max_frame),
            last_len: 0,
        }
    }

    /// Changes the largest payload accepted from now on (capped at
    /// [`codec::MAX_FRAME_CEILING`]), e.g. from a handshake's small limit to the one the
    /// connection serves with. Frames already buffered are checked against it too.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = clamp_max(max_frame);
    }

    /// The largest payload accepted.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// The next frame's payload; `Ok(None)` when the peer closed cleanly between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, ProtocolError> {
        loop {
            if let Some(frame) = self.parse_frame()? {
                return Ok(Some(frame));
            }
            let want = self.needed().saturating_sub(self.buf.len()).max(READ_CHUNK);
            self.buf.reserve(want);
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtocolError::Truncated {
                        expected: self.needed(),
                        got: self.buf.len(),
                    })
                };
            }
        }
    }

    /// The next message; `Ok(None)` when the peer closed cleanly between frames.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtocolError> {
        match self.read_frame().await? {
            Some(payload) => codec::decode_frame(&payload)
                .map(Some)
                .map_err(ProtocolError::Decode),
            None => Ok(None),
        }
    }

    /// The whole length (prefix included) of the frame last returned by
    /// [`FrameReader::read_frame`] or [`FrameReader::read`]: what that message counts against the
    /// flow-control window (see [`crate::Credit`]). 0 before the first frame.
    pub fn last_frame_len(&self) -> usize {
        self.last_len
    }

    /// Whether a complete frame is already buffered, so that [`FrameReader::read`] will not wait.
    pub fn has_buffered_frame(&self) -> bool {
        self.buf.len() >= PREFIX_LEN && self.buf.len() >= self.needed()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Total bytes the frame at the front of the buffer needs, prefix included (the prefix alone
    /// while it is incomplete).
    fn needed(&self) -> usize {
        if self.buf.len() < PREFIX_LEN {
            return PREFIX_LEN;
        }
        PREFIX_LEN + self.announced_len() as usize
    }

    fn announced_len(&self) -> u32 {
        u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
    }

    fn parse_frame(&mut self) -> Result<Option<Bytes>, ProtocolError> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let len = self.announced_len();
        if len as usize > self.max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len: len.into(),
                max: self.max_frame,
            });
        }
        if self.buf.len() < PREFIX_LEN + len as usize {
            return Ok(None);
        }
        self.buf.advance(PREFIX_LEN);
        self.last_len = PREFIX_LEN + len as usize;
        Ok(Some(self.buf.split_to(len as usize).freeze()))
    }
}

/// What a [`FrameWriter`] was fed, in order: `buf`'s runs with each spliced body in its place
/// (empty runs left out).
fn pieces<'a>(buf: &'a [u8], spliced: &'a [(usize, Bytes)]) -> Vec<&'a [u8]> {
    let mut pieces: Vec<&[u8]> = Vec::with_capacity(2 * spliced.len() + 1);
    let mut from = 0;
    for (at, body) in spliced {
        pieces.push(&buf[from..*at]);
        pieces.push(body);
        from = *at;
    }
    pieces.push(&buf[from..]);
    pieces.retain(|p| !p.is_empty());
    pieces
}

/// Writes frames to a byte stream, batching everything fed before a flush into one write.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// Bodies written from their own buffers: each goes at its offset in `buf`, in order.
    spliced: Vec<(usize, Bytes)>,
    spliced_bytes: usize,
    max_frame: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer refusing frames over [`DEFAULT_MAX_FRAME`].
    pub fn new(inner: W) -> Self {
        Self::with_max_frame(inner, DEFAULT_MAX_FRAME)
    }

    /// A writer refusing payloads over `max_frame` bytes (capped at
    /// [`codec::MAX_FRAME_CEILING`]).
    pub fn with_max_frame(inner: W, max_frame: usize) -> Self {
        FrameWriter {
            inner,
            buf: Vec::with_capacity(READ_CHUNK),
            spliced: Vec::new(),
            spliced_bytes: 0,
            max_frame: clamp_max(max_frame),
        }
    }

    /// Encodes `msg` as one frame at the end of the buffer, without writing anything yet.
    ///
    /// A message too large for a frame is refused and leaves the buffer as it was.
    pub fn feed<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtocolError> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; PREFIX_LEN]);
        let len = match codec::encode_into(msg, &mut self.buf) {
            Ok(len) => len,
            Err(e) => {
                self.buf.truncate(start);
                return Err(ProtocolError::Encode(e));
            }
        };
        self.finish_frame(start, len)
    }

    /// Sets the length prefix of the frame that starts at `start` in the buffer to `len`, or, if
    /// `len` is over the limit, removes the frame again and refuses it.
    fn finish_frame(&mut self, start: usize, len: usize) -> Result<(), ProtocolError> {
        if len > self.max_frame {
            self.buf.truncate(start);
            return Err(ProtocolError::FrameTooLarge {
                len: len as u64,
                max: self.max_frame,
            });
        }
        self.buf[start..start + PREFIX_LEN].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }

    /// Like [`FrameWriter::feed`] for a front → plugin message, but a body of at least
    /// [`codec::SPLICE_MIN`] bytes is not copied: the flush writes it from its own buffer, in the
    /// same vectored write as the frames around it. The bytes on the wire are the same.
    pub fn feed_event(&mut self, msg: &ToPlugin) -> Result<(), ProtocolError> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; PREFIX_LEN]);
        let (at, body) = match codec::encode_spliced(msg, &mut self.buf) {
            Ok(Some(parts)) => parts,
            Ok(None) => {
                self.buf.truncate(start);
                return self.feed(msg);
            }
            Err(e) => {
                self.buf.truncate(start);
                return Err(ProtocolError::Encode(e));
            }
        };
        self.finish_frame(start, self.buf.len() - start - PREFIX_LEN + body.len())?;
        self.spliced_bytes += body.len();
        self.spliced.push((at, body));
        Ok(())
    }

    /// Bytes fed but not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len() + self.spliced_bytes
    }

    /// Writes every fed frame, normally with one `write` (or one vectored write when bodies
    /// were spliced in), and flushes the stream.
    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        let result = if self.spliced.is_empty() {
            if self.buf.is_empty() {
                Ok(())
            } else {
                self.inner.write_all(&self.buf).await
            }
        } else {
            self.write_spliced().await
        };
        self.buf.clear();
        self.spliced.clear();
        self.spliced_bytes = 0;
        result?;
        self.inner.flush().await?;
        Ok(())
    }

    /// Writes `buf` with the spliced bodies in their places, as few vectored writes as the
    /// stream takes.
    async fn write_spliced(&mut self) -> std::io::Result<()> {
        let pieces = pieces(&self.buf, &self.spliced);
        let (mut index, mut offset) = (0, 0);
        while index < pieces.len() {
            // IOV_MAX is 1024 on Linux; batches are far smaller, but stay within it.
            let slices: Vec<IoSlice<'_>> = pieces[index..]
                .iter()
                .take(1024)
                .enumerate()
                .map(|(i, p)| IoSlice::new(if i == 0 { &p[offset..] } else { p }))
                .collect();
            let mut written = self.inner.write_vectored(&slices).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let left = pieces[index].len() - offset;
                if written >= left {
                    written -= left;
                    index += 1;
                    offset = 0;
                } else {
                    offset += written;
                    written = 0;
                }
            }
        }
        Ok(())
    }

    /// Removes the first `n` bytes of what was fed (they were written): from `buf` alone, or,
    /// with spliced bodies, by keeping what is left as one contiguous buffer (a partial write
    /// happens only when the socket is full, so the copy is rare).
    fn consume(&mut self, n: usize) {
        if n >= self.pending_bytes() {
            self.buf.clear();
            self.spliced.clear();
            self.spliced_bytes = 0;
        } else if self.spliced.is_empty() {
            self.buf.drain(..n);
        } else {
            let mut rest = Vec::with_capacity(self.pending_bytes() - n);
            let mut skip = n;
            for piece in pieces(&self.buf, &self.spliced) {
                let from = skip.min(piece.len());
                skip -= from;
                rest.extend_from_slice(&piece[from..]);
            }
            self.buf = rest;
            self.spliced.clear();
            self.spliced_bytes = 0;
        }
    }

    /// Feeds one message and flushes.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ProtocolError> {
        self.feed(msg)?;
        self.flush().await
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The wrapped stream, mutably (e.g. to shut it down).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl FrameWriter<crate::quiet_socket::WriteHalf> {
    /// Writes what the socket takes now, without waiting: `true` once everything fed has gone.
    /// What it does not take stays, in order, for the next call (or [`FrameWriter::flush`]);
    /// frames fed meanwhile go after it. For a writer shared behind a lock, which must not wait
    /// while holding it: wait for room with [`crate::quiet_socket::WriteHalf::room`] instead.
    pub fn try_flush(&mut self) -> std::io::Result<bool> {
        while self.pending_bytes() > 0 {
            let written = if self.spliced.is_empty() {
                self.inner.try_write(&self.buf)
            } else {
                // IOV_MAX is 1024 on Linux; what is left goes in the next round.
                let slices: Vec<IoSlice<'_>> = pieces(&self.buf, &self.spliced)
                    .into_iter()
                    .take(1024)
                    .map(IoSlice::new)
                    .collect();
                self.inner.try_write_vectored(&slices)
            };
            match written {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.consume(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(len: usize) -> Vec<u8> {
        let mut v = (len as u32).to_le_bytes().to_vec();
        v.resize(PREFIX_LEN + len, 7);
        v
    }

    #[tokio::test]
    async fn a_raised_limit_admits_frames_up_to_it_and_refuses_one_byte_more() {
        let mut wire = framed(100);
        wire.extend(framed(1000));
        wire.extend(framed(1001));
        let mut reader = FrameReader::with_max_frame(&wire[..], 100);
        assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 100);
        reader.set_max_frame(1000);
        assert_eq!(reader.max_frame(), 1000);
        assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 1000);
        assert!(matches!(
            reader.read_frame().await,
            Err(ProtocolError::FrameTooLarge {
                len: 1001,
                max: 1000
            })
        ));
    }

    #[tokio::test]
    async fn a_lowered_limit_applies_to_a_frame_already_buffered() {
        let mut wire = framed(10);
        wire.extend(framed(500));
        let mut reader = FrameReader::with_max_frame(&wire[..], 1000);
        assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 10);
        reader.set_max_frame(499);
        assert!(matches!(
            reader.read_frame().await,
            Err(ProtocolError::FrameTooLarge { len: 500, max: 499 })
        ));
    }

    fn chunk(seq: u32, len: usize) -> ToPlugin {
        ToPlugin::Chunk(crate::Chunk {
            stream_id: 1,
            seq,
            stamp_ns: 2,
            len: len as u32,
            bytes: Bytes::from(vec![(seq % 251) as u8; len]),
            end_of_stream: false,
            ack: false,
        })
    }

    /// `try_flush` on a socket that fills up: it says so instead of waiting, keeps what the
    /// socket did not take (also across spliced bodies and partial writes), and frames fed after
    /// it follow it; the peer reads exactly what `flush` writes.
    #[tokio::test]
    async fn try_flush_keeps_what_a_full_socket_did_not_take_in_order() {
        use tokio::io::AsyncReadExt;
        let messages: Vec<ToPlugin> = (0..400)
            .map(|i| chunk(i, if i % 3 == 0 { 9000 } else { 64 + i as usize }))
            .collect();
        let mut expected = FrameWriter::new(Vec::new());
        for m in &messages {
            expected.feed_event(m).unwrap();
        }
        expected.flush().await.unwrap();
        let expected = expected.get_ref().clone();

        let (front, peer) = tokio::net::UnixStream::pair().unwrap();
        let (_read, write) = crate::quiet_socket::split(front).unwrap();
        let mut peer = peer;
        let mut writer = FrameWriter::new(write);
        let (first, second) = messages.split_at(200);
        for m in first {
            writer.feed_event(m).unwrap();
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7000];
        let mut fed_rest = false;
        let mut full = 0;
        loop {
            let done = writer.try_flush().unwrap();
            if !done {
                full += 1;
                if !fed_rest {
                    // Fed while the first part waits: goes after it.
                    for m in second {
                        writer.feed_event(m).unwrap();
                    }
                    fed_rest = true;
                }
                let n = peer.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                continue;
            }
            if !fed_rest {
                for m in second {
                    writer.feed_event(m).unwrap();
                }
                fed_rest = true;
                continue;
            }
            break;
        }
        assert!(full > 0, "the socket never filled: the test proves nothing");
        assert_eq!(writer.pending_bytes(), 0);
        while got.len() < expected.len() {
            let n = peer.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes on the wire differ from flush's");
    }
}
