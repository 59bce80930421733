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

impl ProtocolError {
    /// Whether the peer closed the connection with data of ours still unread in it: a Unix socket
    /// closed so fails the other side's next read with `ECONNRESET` instead of end-of-file. The
    /// peer is gone all the same; it is a close, not a broken connection.
    pub fn is_peer_reset(&self) -> bool {
        matches!(self, ProtocolError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset)
    }
}

#[cfg(test)]
mod tests {
    use crate::frame::FrameReader;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    /// A peer that closes with our bytes unread resets us; one that read everything gives us
    /// end-of-file. Both are the peer gone, and only the first is an error, named by
    /// `is_peer_reset`.
    #[tokio::test]
    async fn a_peer_closing_with_our_bytes_unread_is_a_reset_and_otherwise_end_of_file() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (rd, mut wr) = ours.into_split();
        wr.write_all(b"unread").await.unwrap();
        theirs.readable().await.unwrap();
        drop(theirs);
        let err = FrameReader::new(rd).read_frame().await.unwrap_err();
        assert!(err.is_peer_reset(), "{err:?}");

        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(FrameReader::new(ours).read_frame().await.unwrap().is_none());
    }
}
