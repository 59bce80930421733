//! Runs the built `hello-plugin` binary against a fake front on a real Unix socket: handshake,
//! one request, its final reply, and a clean exit on `Shutdown`.

use std::process::Stdio;
use std::time::Duration;

use plugin_runner::bytes::Bytes;
use plugin_runner::protocol::{
    Chunk, Final, FinalOutcome, FrameReader, FrameWriter, FromPlugin, RequestStart,
    ResponseHeaders, Shutdown, ToPlugin, Value, Welcome, PROTOCOL_VERSION,
};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn hello_plugin_greets_each_request_with_its_counts() {
    let dir = std::env::temp_dir().join(format!("hello-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("hello.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hello-plugin"))
        .arg("--connect")
        .arg(&sock)
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (rd, wr) = stream.into_split();
    let (mut reader, mut writer) = (FrameReader::new(rd), FrameWriter::new(wr));

    let hello = match tokio::time::timeout(WAIT, reader.read::<FromPlugin>())
        .await
        .unwrap()
    {
        Ok(Some(FromPlugin::Hello(h))) => h,
        other => panic!("{other:?}"),
    };
    assert_eq!(hello.plugin, "hello");
    assert!(!hello.subscriptions.body_bytes);

    let config = Value::map([("greeting", Value::from("hi"))]);
    let events = [
        ToPlugin::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            config,
            budget_bytes: 8 << 20,
            metadata_max_bytes: 16 << 10,
            capabilities: vec!["replayed".into()],
        }),
        ToPlugin::RequestStart(RequestStart {
            stream_id: 3,
            seq: 0,
            stamp_ns: 1,
            request_id: Some("req-3".into()),
            headers: vec![],
        }),
        ToPlugin::ResponseHeaders(ResponseHeaders {
            stream_id: 3,
            seq: 1,
            stamp_ns: 2,
            status: 200,
            headers: vec![],
        }),
        ToPlugin::Chunk(Chunk {
            stream_id: 3,
            seq: 2,
            stamp_ns: 3,
            len: 100,
            bytes: Bytes::new(),
            end_of_stream: false,
            ack: false,
        }),
        ToPlugin::Final(Final {
            stream_id: 3,
            seq: 3,
            stamp_ns: 4,
            call_id: 77,
            len: 0,
            bytes: Bytes::new(),
            trailers: vec![],
        }),
    ];
    for ev in &events {
        writer.feed(ev).unwrap();
    }
    writer.flush().await.unwrap();

    // Flow-control credit may come first: the host reports what it has handled.
    let reply = loop {
        match tokio::time::timeout(WAIT, reader.read::<FromPlugin>())
            .await
            .unwrap()
        {
            Ok(Some(FromPlugin::FinalReply(r))) => break r,
            Ok(Some(FromPlugin::Credit(_))) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((reply.call_id, reply.stream_id), (77, 3));
    let FinalOutcome::Metadata(meta) = reply.outcome else {
        panic!("{:?}", reply.outcome)
    };
    let own = &meta["plugvisor.hello"];
    assert_eq!(own.get("greeting"), Some(&Value::from("hi")));
    assert_eq!(own.get("request_id"), Some(&Value::from("req-3")));
    assert_eq!(own.get("status"), Some(&Value::Int(200)));
    assert_eq!(own.get("chunks"), Some(&Value::Int(1)));
    assert_eq!(own.get("bytes"), Some(&Value::Int(100)));

    writer
        .send(&ToPlugin::Shutdown(Shutdown { grace_ms: 1000 }))
        .await
        .unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
