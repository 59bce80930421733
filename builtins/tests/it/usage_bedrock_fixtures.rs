//! The Bedrock bodies under `tests/fixtures/usage/*.eventstream` are their readable sources
//! (`tests/fixtures/eventstream/<name>.json`) encoded by `encode.py` beside them: a source edited
//! without re-running the script fails here, before a golden file can pin a stale body.

use crate::usage_play::fixtures;

use base64::Engine as _;
use plugvisor_builtins::usage_formats::eventstream::{EventStreamDecoder, FrameError, Message};
use serde_json::{json, Value as Json};

/// What message `m` of a source says: its first header, message type and payload.
fn expected(m: &Json) -> (&'static str, String, &'static str, Json) {
    if let Some(inner) = m.get("chunk") {
        let mut payload = json!({"bytes": inner.clone()});
        if let Some(p) = m.get("p") {
            payload["p"] = p.clone();
        }
        ("event", "chunk".into(), ":event-type", payload)
    } else if let Some(kind) = m.get("exception").and_then(Json::as_str) {
        (
            "exception",
            kind.into(),
            ":exception-type",
            m["payload"].clone(),
        )
    } else {
        let name = m["event"].as_str().expect("event name").to_owned();
        ("event", name, ":event-type", m["payload"].clone())
    }
}

/// A decoded message's payload, with a chunk's base64 `bytes` decoded to its JSON.
fn payload(m: &Message) -> Json {
    let mut json: Json = serde_json::from_slice(&m.payload).expect("json payload");
    if let Some(b) = json.get("bytes").and_then(Json::as_str) {
        let inner = base64::engine::general_purpose::STANDARD
            .decode(b)
            .expect("base64");
        json["bytes"] = serde_json::from_slice(&inner).expect("inner json");
    }
    json
}

#[test]
fn every_bedrock_body_is_its_readable_source_encoded() {
    let mut sources: Vec<_> = std::fs::read_dir(fixtures().join("eventstream"))
        .expect("sources")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    sources.sort();
    assert!(sources.len() >= 6, "{sources:?}");
    for path in sources {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let source: Json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let body = std::fs::read(fixtures().join(format!("usage/{name}.eventstream")))
            .unwrap_or_else(|e| panic!("{name}.eventstream ({e}): run encode.py"));
        let mut d = EventStreamDecoder::default();
        let mut got = Vec::new();
        d.push(&body, &mut |m| got.push(m));
        let end = d.finish();
        let messages = source["messages"].as_array().expect("messages");
        // A damaged body decodes up to the damaged message, which fails as the source says.
        let damaged = ["truncate", "corrupt"].into_iter().find_map(|k| {
            source
                .get(k)
                .map(|d| (k, d["message"].as_u64().unwrap() as usize))
        });
        let intact = match damaged {
            None => {
                assert_eq!(end, Ok(()), "{name}");
                messages.len()
            }
            Some(("truncate", i)) => {
                assert!(
                    matches!(end, Err(FrameError::Truncated { .. })),
                    "{name}: {end:?}"
                );
                i
            }
            Some((_, i)) => {
                assert!(
                    matches!(end, Err(FrameError::MessageCrc { .. })),
                    "{name}: {end:?}"
                );
                i
            }
        };
        assert_eq!(got.len(), intact, "{name}: messages decoded");
        for (i, (m, want)) in got.iter().zip(messages).enumerate() {
            let (kind, first, first_name, want_payload) = expected(want);
            let at = format!("{name} message {i}");
            assert_eq!(m.header_str(first_name), Some(first.as_str()), "{at}");
            assert_eq!(m.header_str(":message-type"), Some(kind), "{at}");
            assert_eq!(
                m.header_str(":content-type"),
                Some("application/json"),
                "{at}"
            );
            assert_eq!(payload(m), want_payload, "{at}");
        }
    }
}
