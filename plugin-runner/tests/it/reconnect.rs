//! `Reconnect` through the real host: a second connection with the same `Hello`, a new plugin
//! instance configured from its own `Welcome`, the old connection still served until the front
//! closes it, the process ending with its last connection (78 after a refused reconnection), a
//! second `Reconnect` ignored while one is under way, and `Shutdown` on one connection draining
//! them all.

use std::time::Duration;

use crate::harness::{self, serve_in_process, Front};

use bytes::Bytes;
use ipc_protocol::{
    Final, FinalOutcome, FromPlugin, Metadata, Ping, Reconnect, RefuseCode, RequestStart, Shutdown,
    ToPlugin, Value,
};
use plugin_runner::{ConfigError, ConfigMap, EventCtx, Exit, Plugin};

/// Answers every final with its configured greeting, so a reply says which instance ran it.
#[derive(Clone, Default)]
struct Greeter {
    greeting: String,
}

impl Plugin for Greeter {
    type Stream = ();
    fn name(&self) -> &str {
        "greeter"
    }
    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let config = ConfigMap::new(config)?;
        config.deny_unknown(&["greeting"])?;
        self.greeting = config.str("greeting")?.unwrap_or("none").to_owned();
        Ok(())
    }
    fn on_final(&self, _: &mut (), _: &EventCtx, _: &Final) -> Metadata {
        Metadata::from([(
            "plugvisor.greeter".to_owned(),
            Value::map([("greeting", Value::from(self.greeting.as_str()))]),
        )])
    }
}

const CAPS: &[&str] = &["replayed", "aborted_final", "reconnect"];

fn config(greeting: &str) -> Value {
    Value::map([("greeting", Value::from(greeting))])
}

fn start(id: u64) -> ToPlugin {
    ToPlugin::RequestStart(RequestStart {
        stream_id: id,
        seq: 0,
        stamp_ns: 1,
        request_id: None,
        headers: vec![],
    })
}

fn fin(id: u64) -> ToPlugin {
    ToPlugin::Final(Final {
        stream_id: id,
        seq: 1,
        stamp_ns: 2,
        call_id: id + 100,
        len: 0,
        bytes: Bytes::new(),
        trailers: vec![],
    })
}

fn reconnect() -> ToPlugin {
    ToPlugin::Reconnect(Reconnect {
        reason: "config changed".into(),
    })
}

/// The greeting of the next final reply on `front`, which must answer stream `id`.
async fn greeting_of(front: &mut Front, id: u64) -> String {
    loop {
        match front.recv().await {
            FromPlugin::FinalReply(r) => {
                assert_eq!((r.call_id, r.stream_id), (id + 100, id));
                let FinalOutcome::Metadata(md) = r.outcome else {
                    panic!("{:?}", r.outcome)
                };
                return match md["plugvisor.greeter"].get("greeting") {
                    Some(Value::String(g)) => g.clone(),
                    other => panic!("{other:?}"),
                };
            }
            FromPlugin::Pong(_) => {}
            other => panic!("expected a final reply, got {other:?}"),
        }
    }
}

async fn pongs(front: &mut Front, nonce: u64) {
    front.send_now(ToPlugin::Ping(Ping { nonce })).await;
    loop {
        if let FromPlugin::Pong(p) = front.recv().await {
            assert_eq!(p.nonce, nonce);
            return;
        }
    }
}

/// A welcomed first connection and, after a `Reconnect` on it, the second one with its `Hello`
/// read (not answered yet).
async fn reconnected() -> (Front, Front) {
    let mut old = serve_in_process(Greeter::default(), 2).await;
    assert!(
        old.hello.capabilities.iter().any(|c| c == "reconnect"),
        "{:?}",
        old.hello.capabilities
    );
    old.welcome_caps(config("old"), CAPS).await;
    old.send_now(reconnect()).await;
    let new = old.accept_next().await;
    (old, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_serves_a_new_instance_while_the_old_connection_finishes_its_streams() {
    let mut old = serve_in_process(Greeter::default(), 2).await;
    old.welcome_caps(config("old"), CAPS).await;
    // A stream in flight on the old connection when the front asks for a new one.
    old.send_now(start(1)).await;
    old.send_now(reconnect()).await;
    let mut new = old.accept_next().await;
    assert_eq!(
        new.hello, old.hello,
        "the same Hello: name, pid, subscriptions, capabilities"
    );
    assert_eq!(new.hello.pid, std::process::id());
    new.welcome_caps(config("new"), CAPS).await;

    // The old connection still answers its stream's final, with the old instance.
    old.send_now(fin(1)).await;
    assert_eq!(greeting_of(&mut old, 1).await, "old");
    pongs(&mut old, 1).await;
    // Streams on the new connection use the new config.
    new.send_now(start(2)).await;
    new.send_now(fin(2)).await;
    assert_eq!(greeting_of(&mut new, 2).await, "new");

    // The front closes the old connection: the process lives on the new one.
    old.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !old.host_finished(),
        "EOF on the old connection ended the process"
    );
    pongs(&mut new, 2).await;
    new.send_now(start(3)).await;
    new.send_now(fin(3)).await;
    assert_eq!(greeting_of(&mut new, 3).await, "new");

    // Its last connection closed: the process ends, cleanly.
    new.close().await;
    assert_eq!(old.host_exit().await, Exit::Clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reconnection_keeps_the_old_connection_and_the_process_then_exits_78() {
    let (mut old, mut new) = reconnected().await;
    new.refuse(RefuseCode::BadConfig, "the kit refuses it")
        .await;
    old.send_now(start(1)).await;
    old.send_now(fin(1)).await;
    assert_eq!(greeting_of(&mut old, 1).await, "old");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!old.host_finished());
    old.close().await;
    assert_eq!(old.host_exit().await, Exit::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_new_instance_rejects_counts_as_refused() {
    let (mut old, mut new) = reconnected().await;
    new.welcome_caps(Value::map([("greting", Value::from("typo"))]), CAPS)
        .await;
    pongs(&mut old, 7).await;
    old.close().await;
    assert_eq!(old.host_exit().await, Exit::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reconnect_while_one_is_under_way_is_ignored() {
    let (mut old, mut new) = reconnected().await;
    old.send_now(reconnect()).await;
    assert!(
        !old.connects_within(Duration::from_millis(300)).await,
        "a third connection while the second was not yet welcomed"
    );
    new.welcome_caps(config("new"), CAPS).await;
    pongs(&mut new, 1).await;
    // Once the second is welcomed, a new Reconnect is followed again.
    new.send_now(reconnect()).await;
    let mut third = old.accept_next().await;
    third.welcome_caps(config("third"), CAPS).await;
    third.send_now(start(5)).await;
    third.send_now(fin(5)).await;
    assert_eq!(greeting_of(&mut third, 5).await, "third");
    for front in [&mut old, &mut new, &mut third] {
        front.close().await;
    }
    assert_eq!(old.host_exit().await, Exit::Clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_one_connection_drains_every_connection_and_exits_0() {
    let (mut old, mut new) = reconnected().await;
    new.welcome_caps(config("new"), CAPS).await;
    // The host serves it (a Shutdown during its handshake would abandon it).
    pongs(&mut new, 1).await;
    new.send_now(start(2)).await;
    old.send_now(ToPlugin::Shutdown(Shutdown { grace_ms: 5000 }))
        .await;
    // Within the grace, the other connection still reads, runs and answers.
    new.send_now(fin(2)).await;
    assert_eq!(greeting_of(&mut new, 2).await, "new");
    let exit = tokio::time::timeout(harness::WAIT, async {
        while !old.host_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(exit.is_ok(), "the process did not exit after Shutdown");
    assert_eq!(old.host_exit().await, Exit::Clean);
}
