//! A plugin process that breaks the protocol on purpose, for the conformance kit's own tests:
//! `broken-plugin <MODE> [--connect SOCKET]` (else `PLUGVISOR_CONNECT`), announcing the name
//! `broken` and answering under `plugvisor.test-order` (it is [`tests::fake_plugin`] in a
//! process of its own). MODE is `good` (keeps the protocol), `no-credit`, `no-pong`,
//! `wrong-stream` (answers each final first naming another stream) or `ignore-shutdown`.
//! Exits 0 when it stops serving, 78 after a `Refuse`, 64 on bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

use tests::fake_plugin::{Behaviour, FakePlugin, Handshake};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!("usage: broken-plugin good|no-credit|no-pong|wrong-stream|ignore-shutdown [--connect SOCKET]");
        ExitCode::from(64)
    };
    let Some(mode) = args.first() else {
        return usage();
    };
    let mut behaviour = Behaviour::default();
    match mode.as_str() {
        "good" => {}
        "no-credit" => behaviour.no_credit = true,
        "no-pong" => behaviour.no_pong = true,
        "wrong-stream" => behaviour.wrong_stream_first = true,
        "ignore-shutdown" => behaviour.ignore_shutdown = true,
        _ => return usage(),
    }
    let socket = match args.iter().position(|a| a == "--connect") {
        Some(i) => args.get(i + 1).map(PathBuf::from),
        None => std::env::var_os("PLUGVISOR_CONNECT").map(PathBuf::from),
    };
    let Some(socket) = socket else {
        return usage();
    };
    match FakePlugin::connect(&socket, "broken", behaviour).await {
        Handshake::Welcome(plugin) => {
            plugin.finished().await;
            ExitCode::SUCCESS
        }
        Handshake::Refused(code, reason) => {
            eprintln!("refused: {code:?}: {reason}");
            ExitCode::from(78)
        }
    }
}
