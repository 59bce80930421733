//! The one error type of the protocol crate.

use std::io;

/// What can go wrong reading, writing or negotiating the protocol.
///
/// Every variant is an error of one connection only: the caller logs it, counts it and closes that
/// connection. None of them is a reason to stop serving other connections.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A frame announced a payload larger than the configured maximum. Nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The length the peer announced.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {expected} bytes received)")]
    Truncated {
        /// Bytes the frame (prefix included) needed.
        expected: usize,
        /// Bytes that arrived before the close.
        got: usize,
    },
    /// A complete frame whose payload is not a valid message.
    #[error("undecodable frame payload")]
    Decode(#[source] crate::codec::CodecError),
    /// A message could not be encoded (only possible for messages larger than the frame limit).
    #[error("cannot encode message")]
    Encode(#[source] crate::codec::CodecError),
    /// The underlying socket failed.
    #[error("i/o error on the plugin connection")]
    Io(#[from] io::Error),
    /// The plugin speaks a protocol version this front does not support.
    #[error(
        "plugin speaks protocol version {plugin}, this front supports {min}..={max}; \
         upgrade the older side"
    )]
    UnsupportedVersion {
        /// The version the plugin announced.
        plugin: u32,
        /// Oldest version the front supports.
        min: u32,
        /// Newest version the front supports.
        max: u32,
    },
    /// A `Replayed` message wrapped something other than one per-stream event.
    #[error("Replayed wraps {inner}; only RequestStart, ResponseHeaders, Chunk, Final or Abort may be replayed")]
    BadReplay {
        /// The kind of the wrapped message.
        inner: &'static str,
    },
}
