//! The wire protocol between the plugvisor front and its plugin processes.
//!
//! This crate owns everything two processes must agree on and nothing else: the message types for
//! both directions ([`message`]), the JSON-like [`Value`] that plugin metadata is made of, the
//! payload codec ([`codec`], the only module that knows about bincode), the length-prefixed
//! framing with its size limit ([`frame`]), and the handshake and version rules ([`handshake`]).
//! It opens no sockets and spawns nothing: [`frame::FrameReader`] and [`frame::FrameWriter`] work
//! over any tokio `AsyncRead`/`AsyncWrite`; [`quiet_socket`] gives both ends the halves of a
//! connected Unix socket that do not wake their process when the peer reads.
//!
//! The byte-level format is specified in `docs/protocol.md` at the repository root, precisely
//! enough to write a plugin in another language.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
mod error;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod quiet_socket;
pub mod stamp;
mod value;

pub use error::ProtocolError;
pub use frame::{FrameReader, FrameWriter, DEFAULT_MAX_FRAME};
pub use handshake::{Limits, PROTOCOL_VERSION, SUPPORTED_VERSIONS};
pub use message::*;
pub use value::{Metadata, Value, MAX_VALUE_DEPTH};
