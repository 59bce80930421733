//! Runs the built `hello-plugin` binary against a fake front on a real Unix socket: what the
//! in-process player of `plugin_runner::testing` cannot show, that the binary's `main` connects,
//! says hello with its subscriptions, takes its config from `Welcome`, answers a final over the
//! socket, and exits 0 on `Shutdown`. The plugin's behaviour itself is tested in `src/main.rs`.

use std::process::Stdio;
use std::time::Duration;

use plugin_runner::protocol::{
    FinalOutcome, FrameReader, FrameWriter, FromPlugin, Shutdown, ToPlugin, Value, Welcome,
    PROTOCOL_VERSION,
};
use plugin_runner::testing::Stream;

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
    let mut read = async || {
        tokio::time::timeout(WAIT, reader.read::<FromPlugin>())
            .await
            .expect("the plugin answers in time")
    };

    let hello = match read().await {
        Ok(Some(FromPlugin::Hello(h))) => h,
        other => panic!("{other:?}"),
    };
    assert_eq!(hello.plugin, "hello");
    assert!(!hello.subscriptions.body_bytes);

    writer
        .feed(&ToPlugin::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            config: Value::map([("greeting", Value::from("hi"))]),
            budget_bytes: 8 << 20,
            metadata_max_bytes: 16 << 10,
            capabilities: vec!["replayed".into()],
        }))
        .unwrap();
    let request = Stream::new(3)
        .request(&[("x-request-id", "req-3")])
        .response(200, &[])
        .chunk([0u8; 100])
        .final_(b"");
    for event in request.messages(&hello.subscriptions) {
        writer.feed(&event).unwrap();
    }
    writer.flush().await.unwrap();

    // Flow-control credit may come first: the host reports what it has handled.
    let reply = loop {
        match read().await {
            Ok(Some(FromPlugin::FinalReply(r))) => break r,
            Ok(Some(FromPlugin::Credit(_))) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((reply.call_id, reply.stream_id), (3, 3));
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
