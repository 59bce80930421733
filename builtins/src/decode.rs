//! `Content-Encoding` decoding for plugins that read response bodies: gzip, deflate, br and zstd.
//!
//! The front never decodes (the client gets the upstream's bytes untouched); a plugin that wants
//! the decoded body runs one [`Decoder`] per response and feeds it the chunks as they come. Each
//! decoder is streaming: a chunk is decoded as far as its bytes go, and the rest waits in the
//! decoder's own state for the next chunk, so a body split anywhere decodes to the same bytes.
//!
//! Everything is bounded. One chunk may decode to at most the decoder's limit
//! ([`MAX_DECODED_PER_CHUNK`] by default): past it the decoder stops with
//! [`DecodeError::TooLarge`] (a decompression bomb costs that much work, never unbounded memory:
//! output goes to the caller in pieces of at most 32 KiB). The windows the formats may ask for
//! are capped too: zstd frames needing more than an 8 MiB window (`2^23`, what RFC 9659 lets an
//! HTTP decoder refuse) are refused, brotli's large-window extension is off (16 MiB at most), and
//! a gzip header (optional name and comment fields) may take at most 64 KiB.
//!
//! Crates: `flate2` (pure-Rust inflate, plus its CRC-32 for the gzip trailer),
//! `brotli-decompressor` (the decoder half of Dropbox's brotli port) and `zstd` (libzstd, the
//! reference implementation). The gzip framing (RFC 1952: header, members, trailer) is here.

use std::fmt;

use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
use flate2::{Crc, Decompress, FlushDecompress, Status};

/// Most bytes one chunk may decode to (by default); past it the body is not decoded further.
///
/// Big enough for any real chunk: a whole non-streamed body is read only up to
/// [`crate::usage_formats::MAX_JSON_BODY`] (8 MiB) anyway, and a streamed chunk decodes to a
/// few kilobytes. A chunk of a decompression bomb (a megabyte of gzip can inflate to a
/// gigabyte) stops here.
pub const MAX_DECODED_PER_CHUNK: usize = 16 * 1024 * 1024;

/// Largest gzip header (with its optional extra field, file name and comment) accepted.
pub const MAX_GZIP_HEADER: usize = 64 * 1024;

/// zstd frames whose window is over `2^ZSTD_WINDOW_LOG_MAX` bytes are refused (RFC 9659: 8 MiB).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Size of the buffer decoded output goes through.
const PIECE: usize = 32 * 1024;

/// A content coding this module decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `gzip` (and its alias `x-gzip`), RFC 1952, one or more members.
    Gzip,
    /// `deflate`: the zlib format (RFC 1950) as HTTP specifies it, or raw deflate (RFC 1951) as
    /// some servers send it; told apart by the zlib header.
    Deflate,
    /// `br`, brotli (RFC 7932).
    Brotli,
    /// `zstd`, Zstandard (RFC 8878), one or more frames.
    Zstd,
}

impl Encoding {
    /// Every encoding, in the order the docs list them.
    pub const ALL: [Encoding; 4] = [
        Encoding::Gzip,
        Encoding::Deflate,
        Encoding::Brotli,
        Encoding::Zstd,
    ];

    /// The `Content-Encoding` token.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
        }
    }

    /// Reads a `Content-Encoding` header value: `Ok(None)` when the body is not encoded (empty or
    /// `identity`), the encoding when it is one this module decodes, and an error naming the
    /// value otherwise (an unknown coding, or several codings stacked).
    pub fn from_header(value: &str) -> Result<Option<Encoding>, DecodeError> {
        let codings: Vec<String> = value
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity")
            .collect();
        match codings.as_slice() {
            [] => Ok(None),
            [one] => match one.as_str() {
                "gzip" | "x-gzip" => Ok(Some(Encoding::Gzip)),
                "deflate" => Ok(Some(Encoding::Deflate)),
                "br" => Ok(Some(Encoding::Brotli)),
                "zstd" => Ok(Some(Encoding::Zstd)),
                _ => Err(DecodeError::Unsupported(value.trim().to_owned())),
            },
            _ => Err(DecodeError::Stacked(value.trim().to_owned())),
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a body is not (or no longer) decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The `Content-Encoding` is none this module decodes.
    #[error("unsupported content-encoding `{0}` (decoded: gzip, deflate, br, zstd)")]
    Unsupported(String),
    /// More than one coding was applied (`gzip, br`); only one is decoded.
    #[error("stacked content-encodings `{0}` are not decoded (one of gzip, deflate, br, zstd is)")]
    Stacked(String),
    /// One chunk decoded to more than the limit: the body is likely a decompression bomb.
    #[error("one {encoding} chunk decodes to more than {limit} bytes (a decompression bomb?); the rest of the body is not decoded")]
    TooLarge {
        /// The body's encoding.
        encoding: Encoding,
        /// The per-chunk limit.
        limit: usize,
    },
    /// The bytes are not valid in the encoding.
    #[error("corrupt {encoding} body: {detail}")]
    Corrupt {
        /// The body's encoding.
        encoding: Encoding,
        /// What the decoder found wrong.
        detail: String,
    },
    /// The body ended in the middle of the encoded stream.
    #[error("the {encoding} body ended before its encoded stream did (truncated)")]
    Truncated {
        /// The body's encoding.
        encoding: Encoding,
    },
}

/// One response body's decoder. See the module docs.
pub struct Decoder {
    encoding: Encoding,
    codec: Codec,
    limit: usize,
    piece: Box<[u8]>,
    /// Input was seen (an empty body with a `Content-Encoding` is not truncated).
    started: bool,
    /// Set once decoding failed: every later call returns it.
    failed: Option<DecodeError>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("encoding", &self.encoding)
            .field("limit", &self.limit)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder for `encoding` with the default per-chunk limit, [`MAX_DECODED_PER_CHUNK`].
    pub fn new(encoding: Encoding) -> Decoder {
        Decoder::with_limit(encoding, MAX_DECODED_PER_CHUNK)
    }

    /// A decoder whose [`Decoder::push`] emits at most `limit` bytes per call.
    pub fn with_limit(encoding: Encoding, limit: usize) -> Decoder {
        let codec = match encoding {
            Encoding::Gzip => Codec::Gzip(Gzip::default()),
            Encoding::Deflate => Codec::Deflate(Deflate::default()),
            Encoding::Brotli => Codec::Brotli(Brotli::default()),
            Encoding::Zstd => Codec::Zstd(Zstd::new()),
        };
        Decoder {
            encoding,
            codec,
            limit,
            piece: vec![0; PIECE].into_boxed_slice(),
            started: false,
            failed: None,
        }
    }

    /// The encoding decoded.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Decodes one chunk, handing the output to `out` in pieces of at most 32 KiB. Past the
    /// limit, `out` has received exactly `limit` bytes and the error is
    /// [`DecodeError::TooLarge`]. After any error the decoder stays failed.
    pub fn push(
        &mut self,
        mut input: &[u8],
        out: &mut impl FnMut(&[u8]),
    ) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if input.is_empty() {
            return Ok(());
        }
        self.started = true;
        let mut emitted = 0usize;
        loop {
            // One byte of room past the limit tells "exactly at the limit" from "over it".
            let room = PIECE.min(self.limit - emitted + 1);
            let piece = &mut self.piece[..room];
            let (used, made) = match self.codec.step(input, piece) {
                Ok(step) => step,
                Err(detail) => {
                    return Err(self.fail(DecodeError::Corrupt {
                        encoding: self.encoding,
                        detail,
                    }))
                }
            };
            input = &input[used..];
            if emitted + made > self.limit {
                out(&self.piece[..self.limit - emitted]);
                return Err(self.fail(DecodeError::TooLarge {
                    encoding: self.encoding,
                    limit: self.limit,
                }));
            }
            if made > 0 {
                out(&self.piece[..made]);
                emitted += made;
            }
            // A full piece may leave output waiting inside the codec, even with no input left.
            if made == room {
                continue;
            }
            if input.is_empty() {
                return Ok(());
            }
            if used == 0 && made == 0 {
                return Err(self.fail(DecodeError::Corrupt {
                    encoding: self.encoding,
                    detail: "the decoder made no progress".into(),
                }));
            }
        }
    }

    /// The body ended: an error if decoding failed or the encoded stream is incomplete.
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.started && !self.codec.complete() {
            return Err(self.fail(DecodeError::Truncated {
                encoding: self.encoding,
            }));
        }
        Ok(())
    }

    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.failed = Some(e.clone());
        e
    }
}

enum Codec {
    Gzip(Gzip),
    Deflate(Deflate),
    Brotli(Brotli),
    Zstd(Zstd),
}

impl Codec {
    /// Decodes from `input` into `out`: (input bytes used, output bytes made), or what is wrong.
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize), String> {
        match self {
            Codec::Gzip(c) => c.step(input, out),
            Codec::Deflate(c) => c.step(input, out),
            Codec::Brotli(c) => c.step(input, out),
            Codec::Zstd(c) => c.step(input, out),
        }
    }

    /// Whether the input so far ends at the end of a complete stream.
    fn complete(&self) -> bool {
        match self {
            Codec::Gzip(c) => matches!(c.state, GzipState::Between),
            Codec::Deflate(c) => c.done,
            Codec::Brotli(c) => c.done,
            Codec::Zstd(c) => c.frame_done,
        }
    }
}

/// Runs raw inflate or zlib over `input`: (used, made, stream ended).
fn inflate(
    z: &mut Decompress,
    input: &[u8],
    out: &mut [u8],
) -> Result<(usize, usize, bool), String> {
    let (in0, out0) = (z.total_in(), z.total_out());
    let status = z
        .decompress(input, out, FlushDecompress::None)
        .map_err(|e| e.to_string())?;
    Ok((
        (z.total_in() - in0) as usize,
        (z.total_out() - out0) as usize,
        status == Status::StreamEnd,
    ))
}

#[derive(Default)]
enum GzipState {
    /// Reading a member's header (the bytes so far).
    Header(Vec<u8>),
    /// Inflating a member's data.
    Data,
    /// Reading a member's CRC-32 and size (the bytes so far).
    Trailer(Vec<u8>),
    /// Between members: the body may end here, or another member start.
    #[default]
    Between,
}

/// gzip (RFC 1952): members of header, raw deflate data and trailer, one after another.
struct Gzip {
    state: GzipState,
    inflate: Decompress,
    crc: Crc,
    members: u64,
}

impl Default for Gzip {
    fn default() -> Self {
        Gzip {
            state: GzipState::Header(Vec::new()),
            inflate: Decompress::new(false),
            crc: Crc::new(),
            members: 0,
        }
    }
}

/// The length of the gzip header at the start of `buf`, `None` while incomplete.
fn gzip_header_len(buf: &[u8]) -> Result<Option<usize>, String> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    if buf.len() >= 2 && buf[..2] != [0x1f, 0x8b] {
        return Err("not a gzip member (bad magic bytes)".into());
    }
    if buf.len() >= 3 && buf[2] != 8 {
        return Err(format!("unknown gzip compression method {}", buf[2]));
    }
    if buf.len() < 10 {
        return Ok(None);
    }
    let flags = buf[3];
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let Some(len) = buf.get(at..at + 2) else {
            return Ok(None);
        };
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            match buf
                .get(at..)
                .and_then(|rest| rest.iter().position(|&b| b == 0))
            {
                Some(nul) => at += nul + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    Ok((buf.len() >= at).then_some(at))
}

impl Gzip {
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize), String> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match &mut self.state {
                GzipState::Between => {
                    if rest.is_empty() {
                        return Ok((used, 0));
                    }
                    self.state = GzipState::Header(Vec::new());
                }
                GzipState::Header(buf) => {
                    let before = buf.len();
                    let take = rest.len().min(MAX_GZIP_HEADER + 1 - before);
                    buf.extend_from_slice(&rest[..take]);
                    match gzip_header_len(buf)? {
                        Some(len) if len > MAX_GZIP_HEADER => {
                            return Err(format!("gzip header over {MAX_GZIP_HEADER} bytes"));
                        }
                        Some(len) => {
                            used += len - before;
                            self.inflate.reset(false);
                            self.crc.reset();
                            self.state = GzipState::Data;
                        }
                        None if buf.len() > MAX_GZIP_HEADER => {
                            return Err(format!("gzip header over {MAX_GZIP_HEADER} bytes"));
                        }
                        None => return Ok((used + take, 0)),
                    }
                }
                GzipState::Data => {
                    let (u, made, end) = inflate(&mut self.inflate, rest, out)?;
                    self.crc.update(&out[..made]);
                    used += u;
                    if end {
                        self.state = GzipState::Trailer(Vec::with_capacity(8));
                    }
                    if made > 0 || !end {
                        return Ok((used, made));
                    }
                }
                GzipState::Trailer(buf) => {
                    let take = rest.len().min(8 - buf.len());
                    buf.extend_from_slice(&rest[..take]);
                    used += take;
                    if buf.len() < 8 {
                        return Ok((used, 0));
                    }
                    let crc = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    let size = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    if crc != self.crc.sum() {
                        return Err("gzip CRC-32 mismatch".into());
                    }
                    if size != self.crc.amount() {
                        return Err("gzip size mismatch".into());
                    }
                    self.members += 1;
                    self.state = GzipState::Between;
                }
            }
        }
    }
}

/// HTTP `deflate`: zlib, or raw deflate when the first two bytes are not a zlib header.
#[derive(Default)]
struct Deflate {
    /// The first bytes, kept until there are two to look at.
    head: Vec<u8>,
    inflate: Option<Decompress>,
    done: bool,
}

/// Whether two bytes start a zlib stream: deflate method, a window of at most 32 KiB, and the
/// header check (RFC 1950 section 2.2).
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

impl Deflate {
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize), String> {
        if self.done {
            return match input.is_empty() {
                true => Ok((0, 0)),
                false => Err("data after the end of the deflate stream".into()),
            };
        }
        let mut used = 0;
        if self.inflate.is_none() {
            used = input.len().min(2 - self.head.len());
            self.head.extend_from_slice(&input[..used]);
            if self.head.len() < 2 {
                return Ok((used, 0));
            }
            let zlib = is_zlib_header(self.head[0], self.head[1]);
            self.inflate = Some(Decompress::new(zlib));
        }
        let Some(z) = self.inflate.as_mut() else {
            return Ok((used, 0));
        };
        if !self.head.is_empty() {
            // The two bytes looked at are the stream's first: inflate them before the rest.
            let (u, made, end) = inflate(z, &self.head, out)?;
            self.head.drain(..u);
            self.done = end;
            if made > 0 || !self.head.is_empty() || end {
                return Ok((used, made));
            }
        }
        let (u, made, end) = inflate(z, &input[used..], out)?;
        self.done = end;
        Ok((used + u, made))
    }
}

/// brotli, without the large-window extension.
struct Brotli {
    state: Box<BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>>,
    done: bool,
}

impl Default for Brotli {
    fn default() -> Self {
        Brotli {
            state: Box::new(BrotliState::new_strict(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            )),
            done: false,
        }
    }
}

impl Brotli {
    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize), String> {
        if self.done {
            return match input.is_empty() {
                true => Ok((0, 0)),
                false => Err("data after the end of the brotli stream".into()),
            };
        }
        let (mut avail_in, mut in_at) = (input.len(), 0);
        let (mut avail_out, mut out_at, mut total) = (out.len(), 0, 0);
        let result = BrotliDecompressStream(
            &mut avail_in,
            &mut in_at,
            input,
            &mut avail_out,
            &mut out_at,
            out,
            &mut total,
            &mut *self.state,
        );
        match result {
            BrotliResult::ResultFailure => {
                Err(format!("invalid brotli data ({:?})", self.state.error_code))
            }
            BrotliResult::ResultSuccess => {
                self.done = true;
                if in_at < input.len() {
                    return Err("data after the end of the brotli stream".into());
                }
                Ok((in_at, out_at))
            }
            BrotliResult::NeedsMoreInput | BrotliResult::NeedsMoreOutput => Ok((in_at, out_at)),
        }
    }
}

/// zstd, one or more frames, windows up to 8 MiB.
struct Zstd {
    decoder: Result<zstd::stream::raw::Decoder<'static>, String>,
    /// The input so far ends at the end of a frame.
    frame_done: bool,
}

impl Zstd {
    fn new() -> Zstd {
        use zstd::stream::raw::DParameter;
        let decoder = zstd::stream::raw::Decoder::new()
            .and_then(|mut d| {
                d.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))?;
                Ok(d)
            })
            .map_err(|e| format!("cannot create a zstd decoder: {e}"));
        Zstd {
            decoder,
            frame_done: false,
        }
    }

    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize), String> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let decoder = self.decoder.as_mut().map_err(|e| e.clone())?;
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        let hint = decoder
            .run(&mut inb, &mut outb)
            .map_err(|e| e.to_string())?;
        let (used, made) = (inb.pos(), outb.pos());
        if used > 0 || made > 0 {
            // 0: a frame is complete and all of it was flushed out.
            self.frame_done = hint == 0;
        }
        Ok((used, made))
    }
}

#[cfg(test)]
mod tests;
