//! The payload codec: how one message becomes the bytes inside a frame.
//!
//! This is the only module that names bincode, so the payload format can be swapped by changing
//! this file alone. The format is bincode 2.0.1's standard configuration driven through serde:
//! little endian, variable-length integers, enum variants as a varint index, strings and byte
//! buffers as a varint length followed by the bytes. `docs/protocol.md` spells out every layout.
//!
//! Decoding is strict: the message must use the whole payload (trailing bytes are an error), and
//! strings or byte buffers that claim more than [`MAX_FRAME_CEILING`] bytes are refused before
//! bincode allocates room for them.

use serde::{de::DeserializeOwned, Serialize};

/// The largest frame any configuration may allow (64 MiB). It bounds what bincode may claim for
/// one string or byte buffer while decoding, whatever a hostile length prefix says.
pub const MAX_FRAME_CEILING: usize = 64 * 1024 * 1024;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_CEILING>,
>;

const CONFIG: Config = bincode::config::standard().with_limit::<MAX_FRAME_CEILING>();

/// A payload could not be encoded or decoded. The cause is kept as its source.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// bincode rejected the bytes (unknown variant tag, bad UTF-8, too short, too deep, ...).
    #[error("{0}")]
    Invalid(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The message ended before the payload did.
    #[error("{trailing} unexpected bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        trailing: usize,
    },
}

/// Appends the encoding of `msg` to `buf`.
pub fn encode_into<T: Serialize>(msg: &T, buf: &mut Vec<u8>) -> Result<usize, CodecError> {
    bincode::serde::encode_into_std_write(msg, buf, CONFIG)
        .map_err(|e| CodecError::Invalid(Box::new(e)))
}

/// The length of `msg`'s encoding, computed without encoding it into memory (a body is counted,
/// not copied). A frame of `msg` is this plus [`crate::frame::PREFIX_LEN`] bytes long.
pub fn encoded_len<T: Serialize>(msg: &T) -> Result<usize, CodecError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, CONFIG)
        .map_err(|e| CodecError::Invalid(Box::new(e)))?;
    Ok(size.bytes_written)
}

/// The encoding of `msg` as a new buffer.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::new();
    encode_into(msg, &mut buf)?;
    Ok(buf)
}

/// Decodes one message that must fill `payload` exactly.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, CONFIG)
        .map_err(|e| CodecError::Invalid(Box::new(e)))?;
    if used != payload.len() {
        return Err(CodecError::TrailingBytes {
            trailing: payload.len() - used,
        });
    }
    Ok(msg)
}

/// Decodes one message that must fill `frame` exactly, like [`decode`], but a `Chunk` or `Final`
/// body of at least [`SPLICE_MIN`] bytes is not copied: it comes out as a slice of `frame`
/// sharing its allocation ([`shared_body`]). Smaller bodies are copied, so a plugin that keeps a
/// small chunk never pins a whole read buffer.
pub fn decode_frame<T: DeserializeOwned>(frame: &bytes::Bytes) -> Result<T, CodecError> {
    let _current = shared_body::Current::set(frame);
    let (msg, used) = bincode::serde::borrow_decode_from_slice(&frame[..], CONFIG)
        .map_err(|e| CodecError::Invalid(Box::new(e)))?;
    if used != frame.len() {
        return Err(CodecError::TrailingBytes {
            trailing: frame.len() - used,
        });
    }
    Ok(msg)
}

/// The serde form of an event body (`#[serde(with = "crate::codec::shared_body")]`): encoded as
/// a byte buffer, as `Bytes` itself is; decoded by [`decode_frame`] without a copy when it is
/// large, by anything else as a copy.
pub mod shared_body {
    use std::cell::RefCell;

    use bytes::Bytes;
    use serde::{Deserializer, Serializer};

    thread_local! {
        /// The frame [`super::decode_frame`] is decoding on this thread.
        static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    }

    /// Holds the frame being decoded for the length of one decode.
    pub(super) struct Current;

    impl Current {
        pub(super) fn set(frame: &Bytes) -> Current {
            FRAME.with(|f| *f.borrow_mut() = Some(frame.clone()));
            Current
        }
    }

    impl Drop for Current {
        fn drop(&mut self) {
            FRAME.with(|f| *f.borrow_mut() = None);
        }
    }

    /// Serializes a body as a byte buffer.
    pub fn serialize<S: Serializer>(body: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(body)
    }

    /// Deserializes a body: a large one borrowed from the frame being decoded is shared with
    /// it, anything else is copied.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte buffer")
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Bytes, E> {
                if v.len() >= super::SPLICE_MIN {
                    let shared = FRAME.with(|f| {
                        let frame = f.borrow();
                        let frame = frame.as_ref()?;
                        let inside = frame.as_ptr_range();
                        (inside.start <= v.as_ptr() && v.as_ptr_range().end <= inside.end)
                            .then(|| frame.slice_ref(v))
                    });
                    if let Some(body) = shared {
                        return Ok(body);
                    }
                }
                Ok(Bytes::copy_from_slice(v))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::copy_from_slice(v))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes::from(out))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// Bodies at least this large are not copied into the write buffer (see [`encode_spliced`]).
pub const SPLICE_MIN: usize = 4 * 1024;

/// Encodes a front → plugin event whose body is large without copying the body: appends to
/// `out` the encoding of `msg` minus the body's bytes and returns where in `out` the body must be
/// spliced back (with the body itself, a cheap clone of its `Bytes`). Writing `out[..at]`, the
/// body, then `out[at..]` gives exactly [`encode`]'s bytes. Returns `None`, appending nothing,
/// for messages without a body of at least [`SPLICE_MIN`] bytes.
///
/// This relies on the layout documented in `docs/protocol.md`: a struct is its fields one after
/// another, and a byte buffer is a varint length followed by the bytes. The body is the only
/// variable-size field of `Chunk` before its two trailing bools, and of `Final` before its
/// trailers.
pub fn encode_spliced(
    msg: &crate::ToPlugin,
    out: &mut Vec<u8>,
) -> Result<Option<(usize, bytes::Bytes)>, CodecError> {
    use crate::ToPlugin;
    let (stub, body, tail_len) = match msg {
        ToPlugin::Chunk(c) if c.bytes.len() >= SPLICE_MIN => {
            let mut stub = c.clone();
            stub.bytes = bytes::Bytes::new();
            // end_of_stream and ack: one byte each.
            (ToPlugin::Chunk(stub), c.bytes.clone(), 2)
        }
        ToPlugin::Final(f) if f.bytes.len() >= SPLICE_MIN => {
            let mut stub = f.clone();
            stub.bytes = bytes::Bytes::new();
            let tail_len = encode(&f.trailers)?.len();
            (ToPlugin::Final(stub), f.bytes.clone(), tail_len)
        }
        _ => return Ok(None),
    };
    let encoded = encode(&stub)?;
    // The empty body's length, a one-byte varint 0, sits just before the tail.
    let zero_at = encoded.len() - tail_len - 1;
    debug_assert_eq!(encoded[zero_at], 0);
    out.extend_from_slice(&encoded[..zero_at]);
    encode_into(&(body.len() as u64), out)?;
    let at = out.len();
    out.extend_from_slice(&encoded[zero_at + 1..]);
    Ok(Some((at, body)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Ping, ToPlugin};

    #[test]
    fn a_large_body_decodes_as_a_slice_of_the_frame_and_a_small_one_as_a_copy() {
        use crate::message::Chunk;
        for (len, shared) in [(SPLICE_MIN - 1, false), (SPLICE_MIN, true), (100_000, true)] {
            let body = bytes::Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>());
            let msg = ToPlugin::Chunk(Chunk {
                stream_id: 7,
                seq: 1,
                stamp_ns: 2,
                len: len as u32,
                bytes: body.clone(),
                end_of_stream: false,
                ack: true,
            });
            let frame = bytes::Bytes::from(encode(&msg).unwrap());
            let decoded: ToPlugin = decode_frame(&frame).unwrap();
            assert_eq!(decoded, msg, "len {len}");
            let ToPlugin::Chunk(c) = decoded else {
                unreachable!()
            };
            let range = frame.as_ptr_range();
            let inside = range.contains(&c.bytes.as_ptr());
            assert_eq!(inside, shared, "len {len}");
            // The plain decoder gives the same message, always copied.
            assert_eq!(decode::<ToPlugin>(&frame).unwrap(), msg);
        }
        // Trailing bytes are refused here too.
        let mut bytes = encode(&ToPlugin::Ping(Ping { nonce: 1 })).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode_frame::<ToPlugin>(&bytes::Bytes::from(bytes)),
            Err(CodecError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn spliced_encoding_is_the_plain_encoding() {
        use crate::message::{Chunk, Final};
        for len in [SPLICE_MIN - 1, SPLICE_MIN, SPLICE_MIN + 1, 65_536, 250_000] {
            let body = bytes::Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>());
            let msgs = [
                ToPlugin::Chunk(Chunk {
                    stream_id: u64::MAX,
                    seq: 70_000,
                    stamp_ns: 123_456_789,
                    len: len as u32,
                    bytes: body.clone(),
                    end_of_stream: true,
                    ack: false,
                }),
                ToPlugin::Final(Final {
                    stream_id: 3,
                    seq: 9,
                    stamp_ns: 1,
                    call_id: 77,
                    len: len as u32,
                    bytes: body.clone(),
                    trailers: vec![("grpc-status".into(), "0".into()), ("x".into(), "y".into())],
                }),
            ];
            for msg in msgs {
                let plain = encode(&msg).unwrap();
                let mut out = vec![0xAA]; // something already buffered
                match encode_spliced(&msg, &mut out).unwrap() {
                    None => {
                        assert!(len < SPLICE_MIN);
                        assert_eq!(out, vec![0xAA]);
                    }
                    Some((at, spliced)) => {
                        let mut joined = out[1..at].to_vec();
                        joined.extend_from_slice(&spliced);
                        joined.extend_from_slice(&out[at..]);
                        assert_eq!(joined, plain, "{} bytes", len);
                        assert!(out.len() < 64, "the body was not copied");
                    }
                }
            }
        }
        assert!(
            encode_spliced(&ToPlugin::Ping(Ping { nonce: 1 }), &mut Vec::new())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        use crate::message::Chunk;
        for len in [0, 1, 300, SPLICE_MIN, 70_000] {
            let msg = ToPlugin::Chunk(Chunk {
                stream_id: 9,
                seq: 1,
                stamp_ns: u64::MAX,
                len: len as u32,
                bytes: bytes::Bytes::from(vec![7u8; len]),
                end_of_stream: false,
                ack: true,
            });
            assert_eq!(encoded_len(&msg).unwrap(), encode(&msg).unwrap().len());
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&ToPlugin::Ping(Ping { nonce: 1 })).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<ToPlugin>(&bytes),
            Err(CodecError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn a_string_claiming_more_than_the_ceiling_is_refused_without_allocating() {
        // Variant 1 (Refuse), code 0, then a string whose varint length is u64::MAX / 2.
        let mut bytes = vec![1u8, 0, 253];
        bytes.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        let err = decode::<ToPlugin>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Invalid(_)), "{err:?}");
    }
}
