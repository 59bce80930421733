//! W3C Trace Context: the `traceparent` and `tracestate` request headers a request's span is a
//! child of, parsed strictly (https://www.w3.org/TR/trace-context/), and the ids of new traces
//! and spans.
//!
//! An invalid `traceparent` (or more than one) is no parent at all: the request starts a new
//! trace, and its `tracestate` is ignored, as the specification says. An invalid `tracestate`
//! with a valid `traceparent` is dropped alone.

/// The parent a request's headers name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// Its trace.
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub span_id: [u8; 8],
    /// The caller's trace flags (bit 0: sampled).
    pub flags: u8,
    /// The `tracestate`, as received (combined with `,` over several headers), if valid.
    pub tracestate: String,
}

impl Parent {
    /// The caller recorded its span (the `sampled` flag).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The most list members `tracestate` may have.
const TRACESTATE_MEMBERS: usize = 32;

/// The parent `headers` (lowercase names, as the front keeps them) carry, if they carry a valid
/// one.
pub fn parent<'a>(headers: impl Iterator<Item = (&'a str, &'a str)>) -> Option<Parent> {
    let mut traceparent = None;
    let mut states: Vec<&str> = Vec::new();
    for (name, value) in headers {
        match name {
            "traceparent" => {
                let earlier = traceparent.replace(value);
                if earlier.is_some() {
                    // Two of them: which one the caller meant is unknowable.
                    return None;
                }
            }
            "tracestate" => states.push(value),
            _ => {}
        }
    }
    let (trace_id, span_id, flags) = traceparent_fields(traceparent?)?;
    let tracestate = states.join(",");
    let tracestate = if valid_tracestate(&tracestate) {
        tracestate
    } else {
        String::new()
    };
    Some(Parent {
        trace_id,
        span_id,
        flags,
        tracestate,
    })
}

/// `version-trace_id-parent_id-flags`, each field lowercase hex of its size; version `ff` and
/// all-zero ids invalid; version `00` exactly 55 characters, a later version at least that,
/// with anything after the flags behind a `-`.
pub fn traceparent_fields(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let v = value.trim_matches([' ', '\t']).as_bytes();
    if v.len() < 55 {
        return None;
    }
    let version = hex::<1>(&v[0..2])?[0];
    if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    if version == 0 && v.len() != 55 {
        return None;
    }
    if v.len() > 55 && v[55] != b'-' {
        return None;
    }
    let trace_id = hex::<16>(&v[3..35])?;
    let span_id = hex::<8>(&v[36..52])?;
    let flags = hex::<1>(&v[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags))
}

/// `N` bytes from `2N` lowercase hex digits.
fn hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// A list of at most 32 `key=value` members (empty members allowed), each key a simple or
/// multi-tenant (`tenant@system`) key of the allowed characters, each value 1 to 256 printable
/// characters without `,` or `=`, not ending in a space.
fn valid_tracestate(text: &str) -> bool {
    let members: Vec<&str> = text
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty())
        .collect();
    if members.len() > TRACESTATE_MEMBERS {
        return false;
    }
    let key_char = |c: u8| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/');
    let simple_key = |k: &[u8], max: usize| {
        !k.is_empty()
            && k.len() <= max
            && matches!(k[0], b'a'..=b'z' | b'0'..=b'9')
            && k.iter().all(|c| key_char(*c))
    };
    members.iter().all(|m| {
        let Some((key, value)) = m.split_once('=') else {
            return false;
        };
        let key_ok = match key.split_once('@') {
            None => simple_key(key.as_bytes(), 256),
            Some((tenant, system)) => {
                simple_key(tenant.as_bytes(), 241) && simple_key(system.as_bytes(), 14)
            }
        };
        let v = value.as_bytes();
        key_ok
            && !v.is_empty()
            && v.len() <= 256
            && v.iter()
                .all(|c| (0x20..=0x7e).contains(c) && *c != b',' && *c != b'=')
            && v.last() != Some(&b' ')
    })
}

/// A new trace id: 16 random bytes, not all zero.
pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

/// A new span id: 8 random bytes, not all zero.
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn one(value: &str) -> Option<Parent> {
        parent([("traceparent", value)].into_iter())
    }

    #[test]
    fn a_valid_traceparent_gives_its_ids_and_flags() {
        let p = one(VALID).unwrap();
        assert_eq!(
            p.trace_id,
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(p.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(p.sampled());
        assert!(!one(&VALID.replace("-01", "-00")).unwrap().sampled());
        // Other flags are kept; only bit 0 says sampled.
        let p = one(&VALID.replace("-01", "-03")).unwrap();
        assert_eq!((p.flags, p.sampled()), (3, true));
        // Surrounding optional white space is allowed.
        assert!(one(&format!(" {VALID}\t")).is_some());
        // A later version: at least 55 characters, more only behind a dash.
        assert!(one(&VALID.replacen("00", "01", 1)).is_some());
        assert!(one(&format!("{}-extra", VALID.replacen("00", "cc", 1))).is_some());
    }

    #[test]
    fn every_invalid_form_of_traceparent_is_no_parent() {
        let cases: &[(&str, String)] = &[
            ("empty", String::new()),
            ("too short", VALID[..54].to_owned()),
            ("version 00 too long", format!("{VALID}-x")),
            ("version 00 with one more character", format!("{VALID}0")),
            ("version ff", VALID.replacen("00", "ff", 1)),
            (
                "later version, no dash after the flags",
                format!("{}x", VALID.replacen("00", "01", 1)),
            ),
            ("uppercase trace id", VALID.replace("4bf92f", "4BF92F")),
            ("uppercase version", format!("0A{}", &VALID[2..])),
            ("non-hex in the trace id", VALID.replace("4bf92f", "4bg92f")),
            ("non-hex in the span id", VALID.replace("00f067", "00x067")),
            ("non-hex flags", VALID.replace("-01", "-0z")),
            (
                "all-zero trace id",
                VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            ),
            (
                "all-zero span id",
                VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),
            ),
            ("a missing dash", VALID.replacen('-', "_", 1)),
            (
                "a field one digit short",
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01x".to_owned(),
            ),
            (
                "a misplaced dash",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-701".to_owned(),
            ),
        ];
        for (what, value) in cases {
            assert_eq!(one(value), None, "{what}: {value}");
        }
        // Two traceparent headers: neither.
        assert_eq!(
            parent([("traceparent", VALID), ("traceparent", VALID)].into_iter()),
            None
        );
        // No traceparent: a tracestate alone is nothing.
        assert_eq!(parent([("tracestate", "a=b")].into_iter()), None);
    }

    #[test]
    fn tracestate_is_kept_with_its_traceparent_only_when_valid() {
        let with = |states: &[&'static str]| {
            let mut h = vec![("traceparent", VALID)];
            h.extend(states.iter().map(|s| ("tracestate", *s)));
            parent(h.into_iter()).unwrap().tracestate
        };
        assert_eq!(with(&["congo=t61rcWkgMzE"]), "congo=t61rcWkgMzE");
        // Several headers are one list.
        assert_eq!(
            with(&["congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7"]),
            "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        );
        assert_eq!(with(&["tenant@vendor=x, ,b=1"]), "tenant@vendor=x, ,b=1");
        for bad in [
            "Upper=1",
            "k",
            "k=",
            "k=a=b",
            "1tenant@Vendor=x",
            "k=\u{e9}",
        ] {
            assert_eq!(with(&[bad]), "", "{bad}");
        }
        let many: String = (0..33).map(|i| format!("k{i}=v,")).collect();
        assert_eq!(with(&[Box::leak(many.into_boxed_str())]), "");
        assert_eq!(with(&[]), "");
    }

    #[test]
    fn new_ids_are_random_nonzero_and_of_their_sizes() {
        let traces: std::collections::HashSet<[u8; 16]> =
            (0..1000).map(|_| new_trace_id()).collect();
        let spans: std::collections::HashSet<[u8; 8]> = (0..1000).map(|_| new_span_id()).collect();
        assert_eq!((traces.len(), spans.len()), (1000, 1000));
        assert!(!traces.contains(&[0; 16]) && !spans.contains(&[0; 8]));
        // Every byte position varies (no fixed prefix or counter).
        for i in 0..16 {
            let seen: std::collections::HashSet<u8> = traces.iter().map(|t| t[i]).collect();
            assert!(seen.len() > 100, "byte {i}: {}", seen.len());
        }
    }
}
