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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Ping, ToPlugin};

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
