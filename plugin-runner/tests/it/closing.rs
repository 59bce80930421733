//! How the host takes the front's end of its connection: a Unix socket closed with data unread
//! in it fails the peer's next read with `ECONNRESET` instead of end-of-file, and a front that
//! closes before it read the plugin's last `Credit` or `Pong` is gone all the same.

use crate::harness::{TempDir, WAIT};

use ipc_protocol::{
    Final, FrameReader, FrameWriter, FromPlugin, Metadata, Ping, ToPlugin, Value, Welcome,
};
use plugin_runner::{EventCtx, Exit, Plugin};
use tokio::net::UnixListener;

#[derive(Clone, Default)]
struct Quiet;

impl Plugin for Quiet {
    type Stream = ();
    fn name(&self) -> &str {
        "quiet"
    }
    fn on_final(&self, _: &mut (), _: &EventCtx, _: &Final) -> Metadata {
        Metadata::new()
    }
}

#[tokio::test]
async fn a_front_that_closes_with_answers_unread_is_an_end_of_file() {
    let dir = TempDir::new();
    let sock = dir.0.join("plugin.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let host = tokio::spawn(plugin_runner::serve(
        Quiet,
        plugin_runner::HostOptions::new("quiet".to_owned(), &sock),
    ));
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the plugin connects")
        .unwrap();
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    let hello = reader.read::<FromPlugin>().await.unwrap();
    assert!(matches!(hello, Some(FromPlugin::Hello(_))), "{hello:?}");
    writer
        .feed(&ToPlugin::Welcome(Welcome {
            protocol_version: ipc_protocol::PROTOCOL_VERSION,
            config: Value::Map(Default::default()),
            budget_bytes: 8 << 20,
            metadata_max_bytes: 16 << 10,
            capabilities: vec![],
        }))
        .unwrap();
    writer.feed(&ToPlugin::Ping(Ping { nonce: 1 })).unwrap();
    writer.flush().await.unwrap();
    // The Pong arrives, and nothing reads it; then the socket closes.
    tokio::time::timeout(WAIT, reader.get_ref().readable())
        .await
        .expect("the plugin answers the ping")
        .unwrap();
    drop((reader, writer));
    let exit = tokio::time::timeout(WAIT, host)
        .await
        .expect("the host ends")
        .unwrap();
    assert_eq!(exit, Exit::Clean);
}
