//! Framing and codec behaviour over real byte streams: round trips, malformed input, batching.

use crate::support;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use ipc_protocol::codec;
use ipc_protocol::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

fn frame_of(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[tokio::test]
async fn every_message_round_trips_through_a_unix_socket() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let mut writer = FrameWriter::new(a);
    let mut reader = FrameReader::new(b);
    for msg in support::every_to_plugin() {
        writer.send(&msg).await.unwrap();
        let got: ToPlugin = reader.read().await.unwrap().unwrap();
        assert_eq!(got, msg);
    }
    for msg in support::every_from_plugin() {
        writer.send(&msg).await.unwrap();
        let got: FromPlugin = reader.read().await.unwrap().unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test]
async fn clean_close_between_frames_is_none() {
    let bytes = frame_of(&codec::encode(&ToPlugin::Ping(Ping { nonce: 1 })).unwrap());
    let mut reader = FrameReader::new(&bytes[..]);
    assert!(reader.read::<ToPlugin>().await.unwrap().is_some());
    assert!(reader.read::<ToPlugin>().await.unwrap().is_none());
}

#[tokio::test]
async fn close_inside_a_frame_is_truncated() {
    let bytes = frame_of(&codec::encode(&ToPlugin::Ping(Ping { nonce: 1 })).unwrap());
    for cut in 1..bytes.len() {
        let mut reader = FrameReader::new(&bytes[..cut]);
        match reader.read::<ToPlugin>().await {
            Err(ProtocolError::Truncated { got, .. }) => assert_eq!(got, cut),
            other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
        }
    }
}

/// A stream that announces a 4 GiB - 1 frame and then would block forever: the reader must fail
/// on the prefix alone, without reserving room for the payload and without waiting for it.
struct HugeAnnouncement {
    sent: bool,
    capacity_seen: usize,
}

impl AsyncRead for HugeAnnouncement {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.capacity_seen = self.capacity_seen.max(buf.capacity());
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        buf.put_slice(&u32::MAX.to_le_bytes());
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn oversized_length_is_refused_before_allocating() {
    let mut reader = FrameReader::with_max_frame(
        HugeAnnouncement {
            sent: false,
            capacity_seen: 0,
        },
        1024,
    );
    let err = reader.read_frame().await.unwrap_err();
    assert!(
        matches!(err, ProtocolError::FrameTooLarge { len, max: 1024 } if len == u32::MAX as u64),
        "{err:?}"
    );
    // The only buffer ever offered to the stream is the initial read chunk, not 4 GiB.
    assert!(reader.get_ref().capacity_seen <= 128 * 1024);
}

#[tokio::test]
async fn default_max_frame_is_16_mib() {
    let bytes = ((DEFAULT_MAX_FRAME + 1) as u32).to_le_bytes();
    let mut reader = FrameReader::new(&bytes[..]);
    assert!(matches!(
        reader.read_frame().await,
        Err(ProtocolError::FrameTooLarge { max, .. }) if max == DEFAULT_MAX_FRAME
    ));
}

#[tokio::test]
async fn valid_length_with_undecodable_body_is_a_decode_error() {
    // Variant 2 (RequestStart) followed by bytes that end in the middle of its fields.
    let bytes = frame_of(&[2, 7]);
    let mut reader = FrameReader::new(&bytes[..]);
    assert!(matches!(
        reader.read::<ToPlugin>().await,
        Err(ProtocolError::Decode(_))
    ));
}

#[tokio::test]
async fn unknown_variant_tag_is_a_decode_error() {
    let bytes = frame_of(&[200]);
    let mut reader = FrameReader::new(&bytes[..]);
    let err = reader.read::<FromPlugin>().await.unwrap_err();
    assert!(matches!(err, ProtocolError::Decode(_)), "{err:?}");
}

#[tokio::test]
async fn empty_payload_is_a_decode_error() {
    let bytes = frame_of(&[]);
    let mut reader = FrameReader::new(&bytes[..]);
    assert!(matches!(
        reader.read::<ToPlugin>().await,
        Err(ProtocolError::Decode(_))
    ));
}

#[tokio::test]
async fn deeply_nested_value_is_refused_not_a_stack_overflow() {
    // FinalReply{call_id 1, stream 1, Metadata{"n": List[List[List[...]]]}}, 100k levels deep.
    let mut payload = vec![1u8, 1, 1, 0, 1, 1, b'n'];
    for _ in 0..100_000 {
        payload.extend_from_slice(&[5, 1]); // Value::List, one element
    }
    payload.push(0); // innermost Value::Null
    let bytes = frame_of(&payload);
    let mut reader = FrameReader::new(&bytes[..]);
    let err = reader.read::<FromPlugin>().await.unwrap_err();
    assert!(matches!(err, ProtocolError::Decode(_)), "{err:?}");
    // And nesting at the limit still decodes.
    let mut value = Value::Null;
    for _ in 0..MAX_VALUE_DEPTH - 1 {
        value = Value::List(vec![value]);
    }
    let mut metadata = Metadata::new();
    metadata.insert("n".into(), value);
    let msg = FromPlugin::FinalReply(FinalReply {
        call_id: 1,
        stream_id: 1,
        outcome: FinalOutcome::Metadata(metadata),
    });
    let decoded: FromPlugin = codec::decode(&codec::encode(&msg).unwrap()).unwrap();
    assert_eq!(decoded, msg);
}

#[tokio::test]
async fn random_garbage_is_an_error_never_a_panic() {
    // A small deterministic xorshift so the test needs no seed handling.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2_000 {
        let len = (next() % 64) as usize;
        let mut payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if !payload.is_empty() {
            payload[0] %= 12; // hit real variant tags too, not only unknown ones
        }
        let bytes = frame_of(&payload);
        let mut reader = FrameReader::new(&bytes[..]);
        let _ = reader.read::<ToPlugin>().await;
        let mut reader = FrameReader::new(&bytes[..]);
        let _ = reader.read::<FromPlugin>().await;
        // Raw garbage including the prefix.
        let raw: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let mut reader = FrameReader::with_max_frame(&raw[..], 4096);
        while let Ok(Some(_)) = reader.read::<ToPlugin>().await {}
    }
}

#[tokio::test]
async fn many_frames_in_one_read() {
    let mut bytes = Vec::new();
    let msgs = support::every_to_plugin();
    for m in &msgs {
        bytes.extend(frame_of(&codec::encode(m).unwrap()));
    }
    // A slice reader hands out everything at once.
    let mut reader = FrameReader::new(&bytes[..]);
    for m in &msgs {
        assert!(reader.has_buffered_frame() || m == &msgs[0]);
        assert_eq!(&reader.read::<ToPlugin>().await.unwrap().unwrap(), m);
    }
    assert!(reader.read::<ToPlugin>().await.unwrap().is_none());
}

#[tokio::test]
async fn one_frame_split_over_many_reads() {
    let msg = support::every_to_plugin().remove(4);
    let bytes = frame_of(&codec::encode(&msg).unwrap());
    let mut builder = tokio_test_reader(&bytes);
    let mut reader = FrameReader::new(&mut builder);
    assert_eq!(reader.read::<ToPlugin>().await.unwrap().unwrap(), msg);
    assert!(reader.read::<ToPlugin>().await.unwrap().is_none());
}

/// A reader that returns one byte per read call.
fn tokio_test_reader(bytes: &[u8]) -> OneByteAtATime {
    OneByteAtATime {
        bytes: bytes.to_vec(),
        pos: 0,
    }
}

struct OneByteAtATime {
    bytes: Vec<u8>,
    pos: usize,
}

impl AsyncRead for OneByteAtATime {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.bytes.len() {
            let b = self.bytes[self.pos];
            self.pos += 1;
            buf.put_slice(&[b]);
        }
        Poll::Ready(Ok(()))
    }
}

/// Counts `poll_write` calls that wrote something.
#[derive(Default)]
struct CountingWriter {
    writes: usize,
    bytes: Vec<u8>,
}

impl AsyncWrite for CountingWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes += 1;
        self.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn queued_frames_are_written_in_one_syscall() {
    let mut writer = FrameWriter::new(CountingWriter::default());
    let msgs = support::every_to_plugin();
    for m in &msgs {
        writer.feed(m).unwrap();
    }
    writer.flush().await.unwrap();
    assert_eq!(writer.get_ref().writes, 1);
    let written = writer.get_ref().bytes.clone();
    let mut reader = FrameReader::new(&written[..]);
    for m in &msgs {
        assert_eq!(&reader.read::<ToPlugin>().await.unwrap().unwrap(), m);
    }
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_and_leaves_the_writer_usable() {
    let mut writer = FrameWriter::with_max_frame(CountingWriter::default(), 64);
    let big = ToPlugin::Chunk(Chunk {
        stream_id: 1,
        seq: 0,
        stamp_ns: 0,
        len: 1000,
        bytes: vec![7u8; 1000].into(),
        end_of_stream: false,
        ack: false,
    });
    assert!(matches!(
        writer.feed(&big),
        Err(ProtocolError::FrameTooLarge { max: 64, .. })
    ));
    assert_eq!(writer.pending_bytes(), 0);
    writer
        .send(&ToPlugin::Ping(Ping { nonce: 5 }))
        .await
        .unwrap();
    let mut reader = FrameReader::new(&writer.get_ref().bytes[..]);
    assert_eq!(
        reader.read::<ToPlugin>().await.unwrap(),
        Some(ToPlugin::Ping(Ping { nonce: 5 }))
    );
}

#[tokio::test]
async fn frames_survive_a_real_socket_under_load() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let n = 20_000u32;
    let writer_task = tokio::spawn(async move {
        let mut writer = FrameWriter::new(a);
        for seq in 0..n {
            writer
                .feed(&ToPlugin::Chunk(Chunk {
                    stream_id: 1,
                    seq,
                    stamp_ns: seq as u64,
                    len: 64,
                    bytes: vec![seq as u8; (seq % 300) as usize].into(),
                    end_of_stream: false,
                    ack: false,
                }))
                .unwrap();
            if seq % 37 == 0 {
                writer.flush().await.unwrap();
            }
        }
        writer.flush().await.unwrap();
        writer.get_mut().shutdown().await.unwrap();
    });
    let mut reader = FrameReader::new(b);
    let mut expected = 0;
    while let Some(msg) = reader.read::<ToPlugin>().await.unwrap() {
        match msg {
            ToPlugin::Chunk(c) => {
                assert_eq!(c.seq, expected);
                assert_eq!(c.bytes.len(), (expected % 300) as usize);
                expected += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(expected, n);
    writer_task.await.unwrap();
}

/// Takes at most `limit` bytes per call, vectored or not, and counts the calls.
struct Trickle {
    limit: usize,
    calls: usize,
    bytes: Vec<u8>,
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.calls += 1;
        let n = buf.len().min(self.limit);
        self.bytes.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.calls += 1;
        let mut left = self.limit;
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(left);
            self.bytes.extend_from_slice(&b[..take]);
            n += take;
            left -= take;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn big_chunk(seq: u32, len: usize) -> ToPlugin {
    ToPlugin::Chunk(Chunk {
        stream_id: 5,
        seq,
        stamp_ns: 99,
        len: len as u32,
        bytes: (0..len).map(|i| (i * 7) as u8).collect::<Vec<u8>>().into(),
        end_of_stream: false,
        ack: false,
    })
}

#[tokio::test]
async fn large_bodies_are_written_in_place_and_arrive_byte_identical() {
    let msgs = vec![
        big_chunk(0, 65_536),
        ToPlugin::Ping(Ping { nonce: 1 }),
        big_chunk(1, 100),
        big_chunk(2, 20_000),
        ToPlugin::Final(Final {
            stream_id: 5,
            seq: 3,
            stamp_ns: 100,
            call_id: 8,
            len: 70_000,
            bytes: vec![3u8; 70_000].into(),
            trailers: vec![("t".into(), "v".into())],
        }),
    ];
    // The bytes `feed` would have written, frame after frame.
    let mut plain = FrameWriter::new(Vec::new());
    for m in &msgs {
        plain.feed(m).unwrap();
    }
    let expected_len = plain.pending_bytes();
    plain.flush().await.unwrap();
    let expected = plain.get_ref().clone();

    for limit in [usize::MAX, 7_000, 1] {
        let mut writer = FrameWriter::new(Trickle {
            limit,
            calls: 0,
            bytes: Vec::new(),
        });
        for m in &msgs {
            writer.feed_event(m).unwrap();
        }
        assert_eq!(writer.pending_bytes(), expected_len);
        writer.flush().await.unwrap();
        assert_eq!(writer.pending_bytes(), 0);
        assert!(writer.get_ref().bytes == expected, "limit {limit}");
        if limit == usize::MAX {
            assert_eq!(writer.get_ref().calls, 1, "one vectored write");
        }
    }

    // And through a real socket into a reader.
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let sent = msgs.clone();
    let writer_task = tokio::spawn(async move {
        let mut writer = FrameWriter::new(a);
        for m in &sent {
            writer.feed_event(m).unwrap();
        }
        writer.flush().await.unwrap();
    });
    let mut reader = FrameReader::new(b);
    for m in &msgs {
        assert_eq!(&reader.read::<ToPlugin>().await.unwrap().unwrap(), m);
    }
    writer_task.await.unwrap();
}

#[tokio::test]
async fn a_spliced_body_over_the_limit_is_refused_and_leaves_the_writer_usable() {
    let mut writer = FrameWriter::with_max_frame(Vec::new(), 20_000);
    assert!(matches!(
        writer.feed_event(&big_chunk(0, 30_000)),
        Err(ProtocolError::FrameTooLarge { max: 20_000, .. })
    ));
    assert_eq!(writer.pending_bytes(), 0);
    writer.feed_event(&big_chunk(1, 17_000)).unwrap();
    writer.flush().await.unwrap();
    let bytes = writer.get_ref().clone();
    let mut reader = FrameReader::new(&bytes[..]);
    assert_eq!(
        reader.read::<ToPlugin>().await.unwrap(),
        Some(big_chunk(1, 17_000))
    );
    assert!(reader.read::<ToPlugin>().await.unwrap().is_none());
}
