//! `--as <configured name>`: one built-in serving under several configured names. The `Hello`
//! carries the configured name and the built-in's own namespace comes back renamed, with the
//! host's gap report inside it.

use crate::harness;

use std::process::Stdio;

use bytes::Bytes;
use harness::spawn;
use ipc_protocol::{Chunk, Final, FinalOutcome, FromPlugin, RequestStart, ToPlugin, Value};

#[tokio::test]
async fn test_spin_as_spin2_says_hello_and_reports_as_spin2() {
    let mut front = spawn("test-spin", &["--as", "spin2"], Stdio::inherit()).await;
    assert_eq!(front.hello.plugin, "spin2");
    front
        .welcome(Value::map([("spin_us", Value::from(10u64))]))
        .await;
    front.feed(ToPlugin::RequestStart(RequestStart {
        stream_id: 7,
        seq: 0,
        stamp_ns: 1,
        request_id: None,
        headers: vec![],
    }));
    // seq 1 is missing: the host's `gaps` must land in the renamed namespace too.
    front.feed(ToPlugin::Chunk(Chunk {
        stream_id: 7,
        seq: 2,
        stamp_ns: 2,
        len: 3,
        bytes: Bytes::new(),
        end_of_stream: false,
        ack: false,
    }));
    front.feed(ToPlugin::Final(Final {
        stream_id: 7,
        seq: 3,
        stamp_ns: 3,
        call_id: 1,
        len: 0,
        bytes: Bytes::new(),
        trailers: vec![],
    }));
    front.flush().await;
    let reply = loop {
        if let FromPlugin::FinalReply(r) = front.recv().await {
            break r;
        }
    };
    let FinalOutcome::Metadata(md) = reply.outcome else {
        panic!("expected metadata, got {:?}", reply.outcome);
    };
    assert!(!md.contains_key("plugvisor.test-spin"), "{md:?}");
    let own = &md["plugvisor.spin2"];
    assert_eq!(own.get("events"), Some(&Value::from(3u64)), "{md:?}");
    assert_eq!(own.get("gaps"), Some(&Value::from(1u64)), "{md:?}");
}

#[test]
fn as_rejects_a_name_that_is_not_a_plugin_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plugvisor-plugin"))
        .args(["test-spin", "--as", "a/b", "--connect", "/nonexistent.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--as"));
}
