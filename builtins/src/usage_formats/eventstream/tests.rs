use super::*;

fn decode_all(chunks: &[&[u8]]) -> (Vec<Message>, EventStreamDecoder) {
    let mut d = EventStreamDecoder::default();
    let mut out = Vec::new();
    for c in chunks {
        d.push(c, &mut |m| out.push(m));
    }
    (out, d)
}

fn string(s: &str) -> HeaderValue {
    HeaderValue::String(s.to_owned())
}

/// The empty message of the AWS event stream test suite (`encoded/positive/empty_message`):
/// its CRCs were computed by AWS's encoder, not by this crate.
const EMPTY_MESSAGE: [u8; 16] = [
    0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x05, 0xc2, 0x48, 0xeb, 0x7d, 0x98, 0xc8, 0xff,
];

/// `encoded/positive/int32_header` of the same suite: `event-type` (int32 40972) and the payload
/// `{'foo':'bar'}`.
const INT32_HEADER: [u8; 45] = [
    0x00, 0x00, 0x00, 0x2d, 0x00, 0x00, 0x00, 0x10, 0x41, 0xc4, 0x24, 0xb8, 0x0a, 0x65, 0x76, 0x65,
    0x6e, 0x74, 0x2d, 0x74, 0x79, 0x70, 0x65, 0x04, 0x00, 0x00, 0xa0, 0x0c, 0x7b, 0x27, 0x66, 0x6f,
    0x6f, 0x27, 0x3a, 0x27, 0x62, 0x61, 0x72, 0x27, 0x7d, 0x36, 0xf4, 0x80, 0xa0,
];

#[test]
fn the_aws_test_suite_messages_decode_and_encode_back() {
    let (msgs, mut d) = decode_all(&[&EMPTY_MESSAGE, &INT32_HEADER]);
    assert_eq!(d.finish(), Ok(()));
    assert_eq!(
        msgs,
        vec![
            Message {
                headers: vec![],
                payload: vec![]
            },
            Message {
                headers: vec![("event-type".into(), HeaderValue::Int(40972))],
                payload: b"{'foo':'bar'}".to_vec()
            }
        ]
    );
    assert_eq!(encode(&[], b""), EMPTY_MESSAGE);
}

#[test]
fn every_header_type_round_trips_cut_at_every_byte() {
    let headers = [
        (":event-type", string("contentBlockDelta")),
        ("t", HeaderValue::Bool(true)),
        ("f", HeaderValue::Bool(false)),
        ("l", HeaderValue::Int(-5_000_000_000)),
        ("b", HeaderValue::Bytes(vec![0, 1, 2])),
        ("ts", HeaderValue::Timestamp(1_700_000_000_000)),
        ("u", HeaderValue::Uuid([7; 16])),
    ];
    let one = encode(&headers, b"{\"a\":1}");
    let body = [one.clone(), one].concat();
    for at in 0..=body.len() {
        let (msgs, mut d) = decode_all(&[&body[..at], &body[at..]]);
        assert_eq!(d.finish(), Ok(()), "cut at {at}");
        assert_eq!(msgs.len(), 2, "cut at {at}");
        assert_eq!(msgs[1].header_str(":event-type"), Some("contentBlockDelta"));
        assert_eq!(msgs[1].headers.len(), headers.len());
        assert_eq!(msgs[1].headers[3].1, HeaderValue::Int(-5_000_000_000));
        assert_eq!(msgs[1].payload, b"{\"a\":1}");
    }
}

#[test]
fn byte_and_short_and_int_headers_are_read() {
    // type 2 (byte -1), 3 (short 300), 4 (int -2)
    let mut h = vec![1, b'a', 2, 0xff, 1, b'b', 3, 0x01, 0x2c, 1, b'c', 4];
    h.extend_from_slice(&(-2i32).to_be_bytes());
    let total = (12 + h.len() + 4) as u32;
    let mut m = total.to_be_bytes().to_vec();
    m.extend_from_slice(&(h.len() as u32).to_be_bytes());
    m.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
    m.extend_from_slice(&h);
    m.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
    let (msgs, _) = decode_all(&[&m]);
    let values: Vec<_> = msgs[0].headers.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(
        values,
        [
            HeaderValue::Int(-1),
            HeaderValue::Int(300),
            HeaderValue::Int(-2)
        ]
    );
}

#[test]
fn a_bad_message_crc_stops_the_decoder_for_good() {
    let good = encode(&[(":event-type", string("chunk"))], b"{}");
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 6] ^= 0x20; // a payload byte
    let (msgs, mut d) = decode_all(&[&good, &bad, &good]);
    assert_eq!(msgs.len(), 1);
    let e = d.finish().unwrap_err();
    assert!(
        matches!(e, FrameError::MessageCrc { at, .. } if at == good.len() as u64),
        "{e}"
    );
    assert!(e.to_string().starts_with(&format!(
        "message crc mismatch in the message at byte {}",
        good.len()
    )));
}

#[test]
fn a_bad_prelude_crc_is_caught_before_its_length_is_believed() {
    let mut m = encode(&[], b"{}");
    m[3] = 0xff; // total_length now says 255
    let (msgs, d) = decode_all(&[&m]);
    assert!(msgs.is_empty());
    assert!(matches!(
        d.error(),
        Some(FrameError::PreludeCrc { at: 0, .. })
    ));
}

#[test]
fn lengths_that_cannot_be_and_headers_past_their_end_are_errors() {
    let prelude = |total: u32, headers: u32| {
        let mut p = total.to_be_bytes().to_vec();
        p.extend_from_slice(&headers.to_be_bytes());
        p.extend_from_slice(&crc32fast::hash(&p).to_be_bytes());
        p
    };
    let (_, d) = decode_all(&[&prelude(15, 0)]);
    assert!(matches!(
        d.error(),
        Some(FrameError::Lengths { total: 15, .. })
    ));
    let (_, d) = decode_all(&[&prelude(20, 5)]);
    assert!(matches!(
        d.error(),
        Some(FrameError::Lengths { headers: 5, .. })
    ));
    // A string header claiming 10 bytes where 2 are left.
    let mut m = prelude(12 + 7 + 4, 7);
    m.extend_from_slice(&[1, b'x', 7, 0, 10, b'a', b'b']);
    m.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
    let (_, d) = decode_all(&[&m]);
    assert_eq!(
        d.error().map(ToString::to_string).as_deref(),
        Some("malformed header in the message at byte 0: the value of `x` runs past the headers")
    );
    let mut m = prelude(12 + 3 + 4, 3);
    m.extend_from_slice(&[1, b'x', 42]);
    m.extend_from_slice(&crc32fast::hash(&m).to_be_bytes());
    let (_, d) = decode_all(&[&m]);
    assert!(d
        .error()
        .unwrap()
        .to_string()
        .ends_with("`x` has unknown value type 42"));
}

#[test]
fn a_body_ending_inside_a_message_is_truncated_not_short() {
    let m = encode(&[(":event-type", string("metadata"))], b"{\"usage\":{}}");
    let (_, mut d) = decode_all(&[&m[..5]]);
    assert_eq!(
        d.finish(),
        Err(FrameError::Truncated {
            at: 0,
            have: 5,
            want: 12
        })
    );
    let body = [m.clone(), m[..20].to_vec()].concat();
    let (msgs, mut d) = decode_all(&[&body]);
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        d.finish().unwrap_err().to_string(),
        format!(
            "the body ended inside the message at byte {} (20 of its {} bytes came)",
            m.len(),
            m.len()
        )
    );
}

#[test]
fn a_message_at_the_limit_is_read_and_one_byte_longer_is_checked_and_dropped() {
    let overhead = encode(&[], b"").len();
    let at_limit = encode(&[], &vec![b'x'; MAX_MESSAGE - overhead]);
    assert_eq!(at_limit.len(), MAX_MESSAGE);
    let past = encode(&[], &vec![b'y'; MAX_MESSAGE + 1 - overhead]);
    let small = encode(&[(":event-type", string("metadata"))], b"{}");
    let body = [at_limit, past.clone(), small].concat();
    for cut in [1, 7, 4096, MAX_MESSAGE + 3] {
        let chunks: Vec<&[u8]> = body.chunks(cut).collect();
        let (msgs, mut d) = decode_all(&chunks);
        assert_eq!(d.finish(), Ok(()), "chunks of {cut}");
        assert_eq!(msgs.len(), 2, "chunks of {cut}");
        assert_eq!(msgs[0].payload.len(), MAX_MESSAGE - overhead);
        assert_eq!(msgs[1].header_str(":event-type"), Some("metadata"));
        assert_eq!(d.overflows, 1);
        assert!(d.buf.capacity() <= 2 * MAX_MESSAGE);
    }
    // The dropped message's CRC is still checked.
    let mut bad = past;
    let n = bad.len();
    bad[n - 1] ^= 1;
    let (_, mut d) = decode_all(&[&bad]);
    assert!(matches!(
        d.finish(),
        Err(FrameError::MessageCrc { at: 0, .. })
    ));
    // And a body ending inside it is truncated.
    let (_, mut d) = decode_all(&[&bad[..MAX_MESSAGE]]);
    assert!(matches!(
        d.finish(),
        Err(FrameError::Truncated { have, .. }) if have == MAX_MESSAGE as u64
    ));
}
