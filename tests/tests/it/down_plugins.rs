//! A plugin that cannot answer costs the streams nothing: when no process is on its way (stopped
//! by the operator, failed past its restart limit, restarting only after the deadline, external
//! and not connected), a stream's final reports it missing at once with that reason instead of
//! waiting out `final_timeout_ms`. Through real Envoy; the deadline is a minute, so a stream
//! that waited for it would not finish within the test's bound.

use std::time::Duration;

use supervisor::shell::control::{self, Request};
use tests::client::chat;
use tests::stack::Stack;
use tests::upstream::Params;

/// Well past what any of these streams may take: waiting for it fails the test.
const NOT_WAITED: Duration = Duration::from_secs(20);

/// One short stream; its access-log line, after checking its body reached the client whole and
/// in less than [`NOT_WAITED`].
async fn one_stream(setup: &Stack, id: &str) -> serde_json::Value {
    let p = Params {
        chunks: 5,
        ..Params::default()
    };
    let got = tokio::time::timeout(NOT_WAITED, chat(setup.envoy.port, &p, id))
        .await
        .unwrap_or_else(|_| panic!("{id}: the stream waited for a plugin nobody runs"));
    assert_eq!((got.status, &got.error), (200, &None), "{id}");
    assert!(got.body() == p.body(), "{id}: body differs");
    setup.log_for(id)
}

fn assert_missing(line: &serde_json::Value, plugin: &str, reason: &str) {
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([plugin]),
        "{line}"
    );
    assert_eq!(line["plugvisor"]["reasons"][plugin], reason, "{line}");
    // The other plugin's metadata is whole.
    assert_eq!(line["usage"]["completion_tokens"], 5.0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finals_do_not_wait_for_a_plugin_no_process_will_serve() {
    let setup = Stack::start(
        r#"
[plugins.usage]
final_timeout_ms = 60000
[plugins.test-order]
final_timeout_ms = 60000
max_restarts = 0
[plugins.external]
spawn = false
final_timeout_ms = 60000
"#,
        &["usage", "test-order"],
    )
    .await;
    let socket = setup.front.control_socket();

    // External, never connected.
    let line = one_stream(&setup, "external").await;
    assert_eq!(
        line["plugvisor"]["reasons"]["external"], "not_connected",
        "{line}"
    );

    // Stopped by the operator (the gdb workflow of docs/operations.md).
    let ask = |r: Request| {
        let socket = socket.clone();
        async move { control::request(&socket, &r).await.unwrap() }
    };
    let stop = ask(Request::Stop {
        plugin: "test-order".into(),
    })
    .await;
    assert!(stop.ok, "{stop:?}");
    let line = one_stream(&setup, "stopped").await;
    assert_eq!(
        line["plugvisor"]["reasons"]["test-order"], "stopped",
        "{line}"
    );
    assert_eq!(
        line["plugvisor"]["reasons"]["external"], "not_connected",
        "{line}"
    );

    // Failed past its restart limit (max_restarts = 0: the first crash gives up).
    let start = ask(Request::Start {
        plugin: "test-order".into(),
    })
    .await;
    assert!(start.ok, "{start:?}");
    let pid = tests::eventually_async("test-order up", Duration::from_secs(10), async || {
        let s = setup.front.plugin_status("test-order").await;
        match (s.state.as_str(), s.pid) {
            ("up", Some(pid)) => Ok(pid),
            _ => Err(format!("{s:?}")),
        }
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tests::eventually_async("test-order failed", Duration::from_secs(10), async || {
        let s = setup.front.plugin_status("test-order").await;
        if s.state == "failed" {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let line = one_stream(&setup, "gave-up").await;
    assert_eq!(
        line["plugvisor"]["reasons"]["test-order"], "gave_up",
        "{line}"
    );

    // Only the external one missing: the spawned ones answer again after a restart.
    let restart = ask(Request::Restart {
        plugin: "test-order".into(),
    })
    .await;
    assert!(restart.ok, "{restart:?}");
    tests::eventually_async("test-order up again", Duration::from_secs(10), async || {
        let s = setup.front.plugin_status("test-order").await;
        if s.state == "up" && s.connected {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    let line = one_stream(&setup, "back").await;
    assert_missing(&line, "external", "not_connected");
}
