//! Protocol versions and capabilities between the real front and a plugin: a version 3 plugin
//! agrees on `replayed` and gets its streams replayed after a reconnect; a version 2 plugin is
//! welcomed at version 2 with no capabilities, is never sent a `Replayed` frame, and a stream
//! that moved to it ends partial, said so in its metadata.

use std::time::Duration;

use tests::client::chat;
use tests::fake_plugin::{Behaviour, FakePlugin, Handshake};
use tests::inproc::{InProc, Options};
use tests::upstream::Params;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_plugin_that_agreed_on_replayed_is_sent_replayed_frames() {
    for protocol_2 in [false, true] {
        let behaviour = Behaviour {
            protocol_2,
            ..Behaviour::default()
        };
        let mut setup = InProc::start(Options {
            plugins: vec![(
                "order".into(),
                "final_timeout_ms = 5000".into(),
                behaviour.clone(),
            )],
            ..Options::default()
        })
        .await;
        let agreed = setup.plugins[0].record.lock().unwrap().agreed.clone();
        let expected = if protocol_2 {
            (2, vec![])
        } else {
            // Every capability the fake announces (all the protocol knows but `reconnect`, which
            // it does not follow) is agreed.
            (
                ipc_protocol::PROTOCOL_VERSION,
                ipc_protocol::handshake::capability::KNOWN
                    .iter()
                    .filter(|c| **c != ipc_protocol::handshake::capability::RECONNECT)
                    .map(|c| (*c).to_owned())
                    .collect(),
            )
        };
        assert_eq!(agreed, Some(expected));

        let params = Params {
            chunks: 20,
            delay: Duration::from_millis(20),
            ..Params::default()
        };
        let id = format!("moved-v{}", if protocol_2 { 2 } else { 3 });
        let (port, p, rid) = (setup.envoy.port, params.clone(), id.clone());
        let client = tokio::spawn(async move { chat(port, &p, &rid).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        // The plugin's process "dies" mid-stream; another connects in its place.
        drop(setup.plugins.remove(0));
        let socket = setup.dir.path().join("run/plugins/order.sock");
        let next = tests::eventually_async(
            "the replacement is welcomed",
            Duration::from_secs(5),
            async || match FakePlugin::connect(&socket, "order", behaviour.clone()).await {
                Handshake::Welcome(p) => Ok(p),
                Handshake::Refused(code, reason) => Err(format!("{code:?}: {reason}")),
            },
        )
        .await;
        let got = client.await.unwrap();
        assert_eq!((got.status, &got.error), (200, &None), "{id}");
        assert!(got.body() == params.body(), "{id}: body differs");
        let line = setup.log_for(&id);
        let replayed = next.record.lock().unwrap().replayed;
        if protocol_2 {
            assert_eq!(replayed, 0, "a version 2 plugin got Replayed frames");
            assert!(
                line["test_order"]["gaps"].as_f64().unwrap() > 0.0,
                "the stream must end partial: {line}"
            );
        } else {
            assert!(replayed > 0, "nothing was replayed");
            assert_eq!(line["test_order"]["gaps"], 0.0, "{line}");
        }
        setup.plugins.push(next);
        setup.stop().await;
    }
}

/// A client that leaves mid-stream: a plugin that agreed on `aborted_final` is asked for the
/// stream's final anyway (and answers); one speaking version 2 gets `Abort`, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_plugin_that_agreed_on_aborted_final_is_asked_for_an_aborted_stream_s_final() {
    for protocol_2 in [false, true] {
        let setup = InProc::start(Options {
            plugins: vec![(
                "order".into(),
                String::new(),
                Behaviour {
                    protocol_2,
                    ..Behaviour::default()
                },
            )],
            ..Options::default()
        })
        .await;
        let params = Params {
            chunks: 50,
            delay: Duration::from_millis(20),
            ..Params::default()
        };
        let port = setup.envoy.port;
        let client = tokio::spawn(async move { chat(port, &params, "leaves").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.abort();
        let record = setup.plugins[0].record.clone();
        tests::eventually(
            "the plugin heard of the end",
            Duration::from_secs(10),
            || !record.lock().unwrap().aborted.is_empty(),
        );
        let (aborted, finals) = {
            let r = record.lock().unwrap();
            (r.aborted.clone(), r.aborted_finals)
        };
        assert_eq!(aborted[0].1, ipc_protocol::AbortCause::ClientDisconnect);
        assert_eq!(finals, usize::from(!protocol_2), "protocol 2: {protocol_2}");
        setup.stop().await;
    }
}
