use std::io::Write;

use super::*;

/// `data` encoded as `encoding`, by the encoders of the same libraries' other halves.
pub(crate) fn encode(encoding: Encoding, data: &[u8]) -> Vec<u8> {
    match encoding {
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Encoding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Encoding::Brotli => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(data).unwrap();
            }
            out
        }
        Encoding::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Decodes `chunks` one push each; the output, or the error with the output before it.
fn decode(d: &mut Decoder, chunks: &[&[u8]]) -> (Vec<u8>, Result<(), DecodeError>) {
    let mut out = Vec::new();
    for c in chunks {
        if let Err(e) = d.push(c, &mut |piece| out.extend_from_slice(piece)) {
            return (out, Err(e));
        }
    }
    let end = d.finish();
    (out, end)
}

/// A body like an SSE stream: compressible, but not trivially.
fn sample(len: usize) -> Vec<u8> {
    let mut s = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while s.len() < len {
        s.extend_from_slice(
            format!("data: {{\"i\":{i},\"t\":\"tok{}\"}}\n\n", i * 7919 % 1009).as_bytes(),
        );
        i += 1;
    }
    s.truncate(len);
    s
}

#[test]
fn every_encoding_decodes_whole_split_anywhere_and_byte_by_byte() {
    let data = sample(3000);
    for enc in Encoding::ALL {
        let body = encode(enc, &data);
        let (out, end) = decode(&mut Decoder::new(enc), &[&body]);
        assert_eq!(
            (out.as_slice(), end),
            (data.as_slice(), Ok(())),
            "{enc} whole"
        );
        for at in 1..body.len() {
            let (a, b) = body.split_at(at);
            let (out, end) = decode(&mut Decoder::new(enc), &[a, b]);
            assert!(out == data && end.is_ok(), "{enc} split at {at}: {end:?}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (out, end) = decode(&mut Decoder::new(enc), &bytes);
        assert!(out == data && end.is_ok(), "{enc} byte by byte: {end:?}");
    }
}

#[test]
fn output_larger_than_one_piece_comes_out_whole() {
    let data = sample(PIECE * 5 + 123);
    for enc in Encoding::ALL {
        let (out, end) = decode(&mut Decoder::new(enc), &[&encode(enc, &data)]);
        assert!(out == data && end.is_ok(), "{enc}: {end:?}");
    }
}

#[test]
fn a_chunk_may_decode_to_exactly_the_limit_and_not_one_byte_more() {
    let data = sample(PIECE * 2 + 17);
    for enc in Encoding::ALL {
        let body = encode(enc, &data);
        let (out, end) = decode(&mut Decoder::with_limit(enc, data.len()), &[&body]);
        assert_eq!(end, Ok(()), "{enc} at the limit");
        assert_eq!(out, data, "{enc} at the limit");

        let limit = data.len() - 1;
        let mut d = Decoder::with_limit(enc, limit);
        let (out, end) = decode(&mut d, &[&body]);
        assert_eq!(
            end,
            Err(DecodeError::TooLarge {
                encoding: enc,
                limit
            }),
            "{enc} past the limit"
        );
        assert_eq!(out, data[..limit], "{enc}: exactly the limit is emitted");
        // The decoder stays failed.
        let again = d.push(b"more", &mut |_| panic!("no output after a failure"));
        assert!(matches!(again, Err(DecodeError::TooLarge { .. })));
    }
}

/// `events` encoded as one stream, flushed after each event the way a server compressing an SSE
/// stream does: one compressed chunk per event.
fn encode_flushed(encoding: Encoding, events: &[Vec<u8>]) -> Vec<Vec<u8>> {
    fn run<W: Write>(
        mut w: W,
        events: &[Vec<u8>],
        taken: impl Fn(&mut W) -> Vec<u8>,
    ) -> (W, Vec<Vec<u8>>) {
        let mut chunks = Vec::new();
        for e in events {
            w.write_all(e).unwrap();
            w.flush().unwrap();
            chunks.push(taken(&mut w));
        }
        (w, chunks)
    }
    match encoding {
        Encoding::Gzip => {
            let w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let (w, mut chunks) = run(w, events, |w| std::mem::take(w.get_mut()));
            chunks.push(w.finish().unwrap());
            chunks
        }
        Encoding::Deflate => {
            let w = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            let (w, mut chunks) = run(w, events, |w| std::mem::take(w.get_mut()));
            chunks.push(w.finish().unwrap());
            chunks
        }
        Encoding::Brotli => {
            let w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
            let (w, mut chunks) = run(w, events, |w| std::mem::take(w.get_mut()));
            chunks.push(w.into_inner());
            chunks
        }
        Encoding::Zstd => {
            let w = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            let (w, mut chunks) = run(w, events, |w| std::mem::take(w.get_mut()));
            chunks.push(w.finish().unwrap());
            chunks
        }
    }
}

#[test]
fn the_limit_is_per_chunk_so_a_long_stream_of_small_chunks_passes() {
    let events: Vec<Vec<u8>> = (0..10).map(|i| sample(3000 + i)).collect();
    let data = events.concat();
    for enc in Encoding::ALL {
        let chunks = encode_flushed(enc, &events);
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        // Each chunk decodes to one ~3 KB event; the whole body is 30 KB.
        let (out, end) = decode(&mut Decoder::with_limit(enc, 4 * 1024), &chunks);
        assert!(out == data && end.is_ok(), "{enc}: {end:?}");
    }
}

#[test]
fn a_gzip_bomb_stops_at_the_default_limit() {
    let zeros = vec![0u8; MAX_DECODED_PER_CHUNK];
    let at = encode(Encoding::Gzip, &zeros);
    let mut n = 0usize;
    let mut d = Decoder::new(Encoding::Gzip);
    assert_eq!(d.push(&at, &mut |p| n += p.len()), Ok(()));
    assert_eq!(n, MAX_DECODED_PER_CHUNK);
    assert_eq!(d.finish(), Ok(()));

    let mut past = zeros;
    past.push(0);
    let past = encode(Encoding::Gzip, &past);
    assert!(past.len() < 64 * 1024, "a bomb is small: {}", past.len());
    let mut n = 0usize;
    let e = Decoder::new(Encoding::Gzip)
        .push(&past, &mut |p| n += p.len())
        .unwrap_err();
    assert_eq!(n, MAX_DECODED_PER_CHUNK);
    assert_eq!(
        e.to_string(),
        "one gzip chunk decodes to more than 16777216 bytes (a decompression bomb?); the rest of the body is not decoded"
    );
}

#[test]
fn a_truncated_body_is_an_error_at_the_end() {
    let data = sample(500);
    for enc in Encoding::ALL {
        let body = encode(enc, &data);
        for cut in [1, 4, body.len() / 2] {
            let (_, end) = decode(&mut Decoder::new(enc), &[&body[..body.len() - cut]]);
            assert_eq!(
                end,
                Err(DecodeError::Truncated { encoding: enc }),
                "{enc} cut {cut}"
            );
        }
    }
}

#[test]
fn an_empty_body_is_not_truncated() {
    for enc in Encoding::ALL {
        assert_eq!(decode(&mut Decoder::new(enc), &[b""]).1, Ok(()), "{enc}");
    }
}

#[test]
fn corrupt_bodies_are_errors_that_say_what_is_wrong() {
    let data = sample(500);
    let mut gz = encode(Encoding::Gzip, &data);
    let n = gz.len();
    gz[n - 6] ^= 0xff; // inside the CRC-32
    let e = decode(&mut Decoder::new(Encoding::Gzip), &[&gz])
        .1
        .unwrap_err();
    assert_eq!(e.to_string(), "corrupt gzip body: gzip CRC-32 mismatch");

    let e = decode(&mut Decoder::new(Encoding::Gzip), &[b"not gzip at all"])
        .1
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "corrupt gzip body: not a gzip member (bad magic bytes)"
    );

    for enc in [Encoding::Zstd, Encoding::Deflate] {
        let mut body = encode(enc, &data);
        let body_len = body.len();
        for b in &mut body[..body_len.min(8)] {
            *b ^= 0x5a;
        }
        let e = decode(&mut Decoder::new(enc), &[&body]).1.unwrap_err();
        assert!(
            matches!(&e, DecodeError::Corrupt { encoding, .. } if *encoding == enc),
            "{enc}: {e:?}"
        );
    }
    // brotli has no checksum: a damaged stream shows as corrupt or as cut short, never as Ok.
    let mut br = encode(Encoding::Brotli, &data);
    br[0] ^= 0x5a;
    assert!(decode(&mut Decoder::new(Encoding::Brotli), &[&br])
        .1
        .is_err());

    let mut trailing = encode(Encoding::Zstd, &data);
    trailing.extend_from_slice(b"junk");
    assert!(decode(&mut Decoder::new(Encoding::Zstd), &[&trailing])
        .1
        .is_err());
    let mut trailing = encode(Encoding::Brotli, &data);
    trailing.extend_from_slice(b"junk");
    let e = decode(&mut Decoder::new(Encoding::Brotli), &[&trailing])
        .1
        .unwrap_err();
    assert!(e.to_string().contains("data after the end"), "{e}");
}

#[test]
fn gzip_members_and_zstd_frames_follow_one_another() {
    for enc in [Encoding::Gzip, Encoding::Zstd] {
        let mut body = encode(enc, b"first half, ");
        body.extend(encode(enc, b"second half"));
        for at in 1..body.len() {
            let (a, b) = body.split_at(at);
            let (out, end) = decode(&mut Decoder::new(enc), &[a, b]);
            assert_eq!(out, b"first half, second half", "{enc} split at {at}");
            assert_eq!(end, Ok(()), "{enc} split at {at}");
        }
    }
}

#[test]
fn gzip_headers_with_extra_name_and_comment_fields_are_skipped() {
    let mut e = flate2::GzBuilder::new()
        .filename("fixture.json")
        .comment("a comment")
        .extra(vec![1, 2, 3, 4])
        .write(Vec::new(), flate2::Compression::fast());
    e.write_all(b"{\"ok\":true}").unwrap();
    let body = e.finish().unwrap();
    for at in 1..body.len() {
        let (a, b) = body.split_at(at);
        let (out, end) = decode(&mut Decoder::new(Encoding::Gzip), &[a, b]);
        assert_eq!(
            (out.as_slice(), end),
            (&b"{\"ok\":true}"[..], Ok(())),
            "split at {at}"
        );
    }
}

#[test]
fn a_gzip_header_may_take_64_kib_and_not_more() {
    for (name_len, ok) in [(MAX_GZIP_HEADER - 11, true), (MAX_GZIP_HEADER - 10, false)] {
        // 10 fixed bytes + the name + its NUL.
        let mut e = flate2::GzBuilder::new()
            .filename("n".repeat(name_len))
            .write(Vec::new(), flate2::Compression::fast());
        e.write_all(b"x").unwrap();
        let body = e.finish().unwrap();
        let (out, end) = decode(&mut Decoder::new(Encoding::Gzip), &[&body]);
        if ok {
            assert_eq!((out.as_slice(), end), (&b"x"[..], Ok(())));
        } else {
            assert_eq!(
                end.unwrap_err().to_string(),
                "corrupt gzip body: gzip header over 65536 bytes"
            );
        }
    }
}

#[test]
fn deflate_is_zlib_or_raw_deflate() {
    let data = sample(700);
    let raw = raw_deflate(&data);
    let zlib = encode(Encoding::Deflate, &data);
    for body in [raw, zlib] {
        for at in 1..body.len() {
            let (a, b) = body.split_at(at);
            let (out, end) = decode(&mut Decoder::new(Encoding::Deflate), &[a, b]);
            assert!(out == data && end.is_ok(), "split at {at}: {end:?}");
        }
    }
}

#[test]
fn zstd_frames_needing_a_window_over_8_mib_are_refused() {
    use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};
    let data = sample(4096);
    let frame = |window_log: u32| {
        // A streamed frame declares its window (its size is not known up front).
        let mut enc = Encoder::new(3).unwrap();
        enc.set_parameter(CParameter::WindowLog(window_log))
            .unwrap();
        enc.set_parameter(CParameter::ContentSizeFlag(false))
            .unwrap();
        let mut out = vec![0u8; 16 * 1024];
        let mut ob = OutBuffer::around(&mut out[..]);
        enc.run(&mut InBuffer::around(&data), &mut ob).unwrap();
        while enc.finish(&mut ob, true).unwrap() != 0 {}
        let n = ob.pos();
        out.truncate(n);
        out
    };
    let (out, end) = decode(
        &mut Decoder::new(Encoding::Zstd),
        &[&frame(ZSTD_WINDOW_LOG_MAX)],
    );
    assert!(out == data && end.is_ok(), "{end:?}");
    let e = decode(
        &mut Decoder::new(Encoding::Zstd),
        &[&frame(ZSTD_WINDOW_LOG_MAX + 1)],
    )
    .1
    .unwrap_err();
    assert!(
        matches!(&e, DecodeError::Corrupt { encoding: Encoding::Zstd, detail } if detail.contains("memory")),
        "{e:?}"
    );
}

#[test]
fn content_encoding_headers_are_read_like_http_says() {
    for (value, want) in [
        ("", Ok(None)),
        ("identity", Ok(None)),
        ("gzip", Ok(Some(Encoding::Gzip))),
        (" GZIP ", Ok(Some(Encoding::Gzip))),
        ("x-gzip", Ok(Some(Encoding::Gzip))),
        ("deflate", Ok(Some(Encoding::Deflate))),
        ("br", Ok(Some(Encoding::Brotli))),
        ("zstd", Ok(Some(Encoding::Zstd))),
        ("identity, br", Ok(Some(Encoding::Brotli))),
        ("compress", Err(DecodeError::Unsupported("compress".into()))),
        ("gzip, br", Err(DecodeError::Stacked("gzip, br".into()))),
    ] {
        assert_eq!(Encoding::from_header(value), want, "{value:?}");
    }
    assert_eq!(
        Encoding::from_header("compress").unwrap_err().to_string(),
        "unsupported content-encoding `compress` (decoded: gzip, deflate, br, zstd)"
    );
}
