//! The AWS event stream framing (`application/vnd.amazon.eventstream`), read incrementally: the
//! binary envelope Bedrock streams its responses in.
//!
//! A message is a 12-byte prelude (`total_length: u32 BE`, `headers_length: u32 BE`,
//! `prelude_crc: u32 BE`, the CRC32 of the first 8 bytes), the headers, the payload, and
//! `message_crc: u32 BE`, the CRC32 of everything before it. A header is `name_len: u8`, the
//! name, `value_type: u8` and a value whose size the type fixes (0 true, 1 false: none; 2 byte;
//! 3 short; 4 int; 5 long; 8 timestamp; 9 uuid) or gives (6 byte array, 7 string: a `u16 BE`
//! length first).
//!
//! [`EventStreamDecoder::push`] takes bytes cut anywhere and hands out each message once its last
//! byte came. Both CRCs are checked: a stream whose bytes were damaged cannot be trusted to say
//! where its next message starts, so the first bad CRC (or impossible length, or malformed
//! header) stops the decoder for good and [`EventStreamDecoder::error`] says why. A body that ends
//! inside a message is an error of [`EventStreamDecoder::finish`], never a short read in silence.
//!
//! Memory is bounded: a message is buffered whole up to [`MAX_MESSAGE`] bytes; a longer one is
//! checked (its CRC computed as it goes by) and dropped, and counted in
//! [`EventStreamDecoder::overflows`].

use std::fmt;

/// Longest message buffered to be read (1 MiB; Bedrock's are a few hundred bytes). A longer one is
/// dropped after its CRC is checked.
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// Prelude (12 bytes) plus message CRC (4 bytes): the smallest message.
const MIN_MESSAGE: usize = 16;
const PRELUDE: usize = 12;

/// A header's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// Types 0 and 1.
    Bool(bool),
    /// Types 2 (byte), 3 (short), 4 (int) and 5 (long), widened.
    Int(i64),
    /// Type 6.
    Bytes(Vec<u8>),
    /// Type 7; invalid UTF-8 is replaced, as a header value is only ever compared or shown.
    String(String),
    /// Type 8: milliseconds since the Unix epoch.
    Timestamp(i64),
    /// Type 9.
    Uuid([u8; 16]),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The headers, in their order on the wire.
    pub headers: Vec<(String, HeaderValue)>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// The value of the string header `name` (`:event-type`, `:message-type`, ...).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|(k, v)| match v {
            HeaderValue::String(s) if k == name => Some(s.as_str()),
            _ => None,
        })
    }
}

/// Why the decoder stopped. `at` is the offset of the message concerned in the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The prelude's CRC does not match its 8 bytes: its lengths cannot be trusted.
    #[error("prelude crc mismatch in the message at byte {at} (got {got:#010x}, computed {computed:#010x})")]
    PreludeCrc {
        /// Offset of the message.
        at: u64,
        /// The CRC on the wire.
        got: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// The message's CRC does not match its bytes.
    #[error("message crc mismatch in the message at byte {at} (got {got:#010x}, computed {computed:#010x})")]
    MessageCrc {
        /// Offset of the message.
        at: u64,
        /// The CRC on the wire.
        got: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// The prelude's lengths do not fit together.
    #[error("impossible lengths in the message at byte {at}: total {total}, headers {headers}")]
    Lengths {
        /// Offset of the message.
        at: u64,
        /// `total_length`.
        total: u32,
        /// `headers_length`.
        headers: u32,
    },
    /// A header runs past the headers, or has an unknown value type.
    #[error("malformed header in the message at byte {at}: {what}")]
    Header {
        /// Offset of the message.
        at: u64,
        /// What is wrong.
        what: String,
    },
    /// The body ended inside a message.
    #[error("the body ended inside the message at byte {at} ({have} of its {want} bytes came)")]
    Truncated {
        /// Offset of the message.
        at: u64,
        /// Bytes of it that came.
        have: u64,
        /// Its length (12, the prelude, when the prelude itself was cut).
        want: u64,
    },
}

/// Where the decoder is within the current message.
enum State {
    /// Gathering a prelude, then a whole message, in `buf`.
    Buffering,
    /// Passing over a message longer than [`MAX_MESSAGE`]: `left` bytes of it to come, the last
    /// four being its CRC (gathered in `crc`); the bytes before are hashed.
    Skipping {
        left: u64,
        total: u64,
        hasher: crc32fast::Hasher,
        crc: Vec<u8>,
    },
    /// A frame error stopped it.
    Failed(FrameError),
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Buffering => f.write_str("Buffering"),
            State::Skipping { left, total, .. } => {
                write!(f, "Skipping {{ left: {left}, total: {total} }}")
            }
            State::Failed(e) => write!(f, "Failed({e})"),
        }
    }
}

/// Reads AWS event stream messages out of bytes cut anywhere. See the module docs.
#[derive(Debug)]
pub struct EventStreamDecoder {
    state: State,
    /// The current message's bytes so far (at most [`MAX_MESSAGE`]).
    buf: Vec<u8>,
    /// Body offset of the current message.
    at: u64,
    /// Messages dropped for being longer than [`MAX_MESSAGE`].
    pub overflows: u64,
}

impl Default for EventStreamDecoder {
    fn default() -> Self {
        EventStreamDecoder {
            state: State::Buffering,
            buf: Vec::new(),
            at: 0,
            overflows: 0,
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl EventStreamDecoder {
    /// Reads `bytes`, calling `on_message` for every message they complete. After a frame error
    /// nothing more is read.
    pub fn push(&mut self, mut bytes: &[u8], on_message: &mut dyn FnMut(Message)) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Failed(_) => return,
                State::Skipping {
                    left,
                    total,
                    hasher,
                    crc,
                } => {
                    let take = bytes
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let (now, rest) = bytes.split_at(take);
                    bytes = rest;
                    // The bytes before the last four are hashed; the last four are the CRC.
                    let body_left = left.saturating_sub(4);
                    let hashed = now
                        .len()
                        .min(usize::try_from(body_left).unwrap_or(usize::MAX));
                    hasher.update(&now[..hashed]);
                    crc.extend_from_slice(&now[hashed..]);
                    *left -= take as u64;
                    if *left == 0 {
                        let computed = hasher.clone().finalize();
                        let got = be32(crc);
                        let at = self.at;
                        self.at += *total;
                        self.state = if got == computed {
                            State::Buffering
                        } else {
                            State::Failed(FrameError::MessageCrc { at, got, computed })
                        };
                    }
                }
                State::Buffering => {
                    let want = if self.buf.len() < PRELUDE {
                        PRELUDE
                    } else {
                        be32(&self.buf) as usize
                    };
                    let take = bytes.len().min(want - self.buf.len());
                    self.buf.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.buf.len() == PRELUDE && want == PRELUDE {
                        if let Err(e) = self.prelude() {
                            self.fail(e);
                        }
                    } else if self.buf.len() == want && want > PRELUDE {
                        match self.message() {
                            Ok(m) => on_message(m),
                            Err(e) => self.fail(e),
                        }
                    }
                }
            }
        }
    }

    fn fail(&mut self, e: FrameError) {
        self.buf = Vec::new();
        self.state = State::Failed(e);
    }

    /// Checks the prelude in `buf`; a message too long to buffer is skipped from here on.
    fn prelude(&mut self) -> Result<(), FrameError> {
        let at = self.at;
        let (total, headers) = (be32(&self.buf), be32(&self.buf[4..]));
        let got = be32(&self.buf[8..]);
        let computed = crc32fast::hash(&self.buf[..8]);
        if got != computed {
            return Err(FrameError::PreludeCrc { at, got, computed });
        }
        if (total as usize) < MIN_MESSAGE || headers as usize > total as usize - MIN_MESSAGE {
            return Err(FrameError::Lengths { at, total, headers });
        }
        if total as usize > MAX_MESSAGE {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&self.buf);
            self.overflows += 1;
            self.buf.clear();
            self.state = State::Skipping {
                left: u64::from(total) - PRELUDE as u64,
                total: u64::from(total),
                hasher,
                crc: Vec::with_capacity(4),
            };
        }
        Ok(())
    }

    /// The whole message in `buf`: checks its CRC and reads its headers.
    fn message(&mut self) -> Result<Message, FrameError> {
        let at = self.at;
        let buf = std::mem::take(&mut self.buf);
        let n = buf.len();
        self.at += n as u64;
        let got = be32(&buf[n - 4..]);
        let computed = crc32fast::hash(&buf[..n - 4]);
        if got != computed {
            return Err(FrameError::MessageCrc { at, got, computed });
        }
        let headers_len = be32(&buf[4..]) as usize;
        let headers = parse_headers(&buf[PRELUDE..PRELUDE + headers_len])
            .map_err(|what| FrameError::Header { at, what })?;
        Ok(Message {
            headers,
            payload: buf[PRELUDE + headers_len..n - 4].to_vec(),
        })
    }

    /// Why the decoder stopped, if it did.
    pub fn error(&self) -> Option<&FrameError> {
        match &self.state {
            State::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// The body ended: an error if it ended inside a message (or a frame error came before).
    pub fn finish(&mut self) -> Result<(), FrameError> {
        let at = self.at;
        let cut = match &self.state {
            State::Failed(e) => return Err(e.clone()),
            State::Buffering if self.buf.is_empty() => return Ok(()),
            State::Buffering => FrameError::Truncated {
                at,
                have: self.buf.len() as u64,
                want: if self.buf.len() < PRELUDE {
                    PRELUDE as u64
                } else {
                    u64::from(be32(&self.buf))
                },
            },
            State::Skipping { left, total, .. } => FrameError::Truncated {
                at,
                have: total - left,
                want: *total,
            },
        };
        self.fail(cut.clone());
        Err(cut)
    }
}

fn parse_headers(mut b: &[u8]) -> Result<Vec<(String, HeaderValue)>, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("{what} runs past the headers"));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let name_len = take(&mut b, 1, "a header name length")?[0] as usize;
        let name = String::from_utf8_lossy(take(&mut b, name_len, "a header name")?).into_owned();
        let kind = take(&mut b, 1, "a header value type")?[0];
        let mut fixed = |n: usize| take(&mut b, n, &format!("the value of `{name}`"));
        let value = match kind {
            0 => HeaderValue::Bool(true),
            1 => HeaderValue::Bool(false),
            2 => HeaderValue::Int(i64::from(fixed(1)?[0] as i8)),
            3 => HeaderValue::Int(i64::from(i16::from_be_bytes(
                fixed(2)?.try_into().expect("2 bytes"),
            ))),
            4 => HeaderValue::Int(i64::from(i32::from_be_bytes(
                fixed(4)?.try_into().expect("4 bytes"),
            ))),
            5 => HeaderValue::Int(i64::from_be_bytes(fixed(8)?.try_into().expect("8 bytes"))),
            8 => HeaderValue::Timestamp(i64::from_be_bytes(fixed(8)?.try_into().expect("8 bytes"))),
            9 => HeaderValue::Uuid(fixed(16)?.try_into().expect("16 bytes")),
            6 | 7 => {
                let len = u16::from_be_bytes(fixed(2)?.try_into().expect("2 bytes")) as usize;
                let v = fixed(len)?;
                if kind == 6 {
                    HeaderValue::Bytes(v.to_vec())
                } else {
                    HeaderValue::String(String::from_utf8_lossy(v).into_owned())
                }
            }
            other => return Err(format!("`{name}` has unknown value type {other}")),
        };
        out.push((name, value));
    }
    Ok(out)
}

/// Encodes one message: the inverse of the decoder, for tests and fixtures.
#[cfg(test)]
pub(crate) fn encode(headers: &[(&str, HeaderValue)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        match value {
            HeaderValue::Bool(true) => h.push(0),
            HeaderValue::Bool(false) => h.push(1),
            HeaderValue::Int(i) => {
                h.push(5);
                h.extend_from_slice(&i.to_be_bytes());
            }
            HeaderValue::Bytes(v) => {
                h.push(6);
                h.extend_from_slice(&(v.len() as u16).to_be_bytes());
                h.extend_from_slice(v);
            }
            HeaderValue::String(s) => {
                h.push(7);
                h.extend_from_slice(&(s.len() as u16).to_be_bytes());
                h.extend_from_slice(s.as_bytes());
            }
            HeaderValue::Timestamp(t) => {
                h.push(8);
                h.extend_from_slice(&t.to_be_bytes());
            }
            HeaderValue::Uuid(u) => {
                h.push(9);
                h.extend_from_slice(u);
            }
        }
    }
    let total = (PRELUDE + h.len() + payload.len() + 4) as u32;
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&out).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc32fast::hash(&out).to_be_bytes());
    out
}

#[cfg(test)]
mod tests;
