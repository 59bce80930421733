//! The data path against a real Envoy 1.40: the echo is a pass-through that no plugin, no message
//! and no limit can break. Every body mode carries the body byte for byte; the last chunk's bytes
//! reach the client without waiting for a plugin's final answer; metadata that Envoy would choke
//! on (too deep, too large) is left out with a reason while the body and the other plugins'
//! metadata pass; a message over `max_message_bytes` fails its stream with a gRPC error instead of
//! truncating it; streams past `max_streams` are echoed without plugins and say so.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value as PbValue};
use ipc_protocol::Value;
use supervisor::data_path::metadata::MAX_DEPTH;
use tests::bench::echo::Echo;
use tests::client::chat;
use tests::envoy::{Envoy, EnvoyOptions};
use tests::fake_plugin::Behaviour;
use tests::front::metric;
use tests::inproc::{InProc, Options};
use tests::upstream::{Params, Upstream};

/// A value nested `levels` deep as `supervisor::data_path::metadata::depth` counts it (a scalar is 1).
fn nested(levels: usize) -> Value {
    (1..levels).fold(Value::Int(1), |v, _| Value::map([("k", v)]))
}

fn plugin(
    name: &str,
    extra: &str,
    metadata: Option<Vec<(&str, Value)>>,
) -> (String, String, Behaviour) {
    // Granted what it answers: these tests are about the limits, not the grants.
    let grants: Vec<String> = metadata
        .iter()
        .flatten()
        .map(|(k, _)| format!("{k:?}"))
        .chain(["\"plugvisor.test-order\"".to_owned()])
        .collect();
    let extra = format!("namespaces = [{}]\n{extra}", grants.join(", "));
    let behaviour = Behaviour {
        final_metadata: metadata.map(|m| {
            m.into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<BTreeMap<_, _>>()
        }),
        ..Behaviour::default()
    };
    (name.to_owned(), extra, behaviour)
}

/// Envoy's own edge, without plugvisor: a reply whose metadata nests 33 levels passes, 34 fails
/// the ext_proc stream and cuts the client's response. `MAX_DEPTH` stays well below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_metadata_nested_33_levels_and_fails_the_stream_at_34() {
    const { assert!(MAX_DEPTH * 2 <= 33) };
    for (levels, passes) in [(33usize, true), (34, false)] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("echo.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let Some(Kind::StructValue(namespace)) =
            supervisor::data_path::metadata::to_pb(&nested(levels)).kind
        else {
            panic!("a map")
        };
        let echo = Echo {
            end_metadata: Some(Struct {
                fields: [(
                    "envoy.lb".to_owned(),
                    PbValue {
                        kind: Some(Kind::StructValue(namespace)),
                    },
                )]
                .into(),
            }),
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ExternalProcessorServer::new(echo))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let upstream = Upstream::start().await;
        let envoy = tokio::task::block_in_place(|| {
            Envoy::start(
                dir.path(),
                &EnvoyOptions {
                    ext_proc: format!("unix:{}", sock.display()),
                    upstream_port: upstream.port,
                    ..EnvoyOptions::default()
                },
            )
        });
        let got = chat(envoy.port, &Params::default(), "deep").await;
        let line =
            tokio::task::block_in_place(|| envoy.access_log_for("deep", Duration::from_secs(5)));
        if passes {
            assert_eq!(got.error, None, "{levels} levels: {line}");
            assert!(line["lb"]["k"].is_object(), "{levels} levels: {line}");
        } else {
            assert!(got.error.is_some(), "{levels} levels passed: {line}");
            assert!(line["lb"].is_null(), "{levels} levels: {line}");
        }
        drop(envoy);
        server.abort();
    }
}

/// Through the front: answers at the depth limit pass; one level past it, at the protocol's own
/// limit, over the plugin's size cap, or past what is left of the stream's cap, they are left out
/// whole and named with their reason. The body and the other plugins' metadata are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_past_any_limit_is_left_out_with_its_reason_and_nothing_else_is() {
    let text = |n: usize| Value::from("z".repeat(n));
    let setup = InProc::start(Options {
        plugins: vec![
            plugin("order", "", None),
            plugin(
                "at",
                "",
                Some(vec![(
                    "envoy.lb",
                    Value::map([
                        ("deep", nested(MAX_DEPTH - 1)),
                        ("", Value::from("empty key")),
                        ("ключ", Value::from("значение")),
                        ("a.b", Value::Bool(true)),
                        ("nan", Value::Float(f64::NAN)),
                    ]),
                )]),
            ),
            plugin(
                "past",
                "",
                Some(vec![("ns.past", Value::map([("v", nested(MAX_DEPTH))]))]),
            ),
            plugin("deepest", "", Some(vec![("ns.deepest", nested(60))])),
            plugin(
                "big",
                "",
                Some(vec![("ns.big", Value::map([("s", text(20_000))]))]),
            ),
            plugin(
                "fill1",
                "metadata_max_bytes = 48000",
                Some(vec![("ns.fill1", Value::map([("s", text(40_000))]))]),
            ),
            plugin(
                "fill2",
                "metadata_max_bytes = 48000",
                Some(vec![("ns.fill2", Value::map([("s", text(40_000))]))]),
            ),
        ],
        ..Options::default()
    })
    .await;
    let params = Params {
        chunks: 8,
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "limits").await;
    assert_eq!(got.error, None);
    assert_eq!(got.body(), params.body());
    let line = setup.log_for("limits");
    assert_eq!(line["test_order"]["gaps"], 0.0, "{line}");
    assert_eq!(line["lb"]["ключ"], "значение", "{line}");
    assert_eq!(line["lb"][""], "empty key", "{line}");
    assert!(line["lb"]["nan"].is_null(), "{line}");
    let mut deepest = &line["lb"]["deep"];
    for _ in 1..MAX_DEPTH - 1 {
        deepest = &deepest["k"];
    }
    assert_eq!(*deepest, 1.0, "{line}");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!(["past", "deepest", "big", "fill2"]),
        "{line}"
    );
    assert_eq!(
        line["plugvisor"]["reasons"],
        serde_json::json!({"past": "too_deep", "deepest": "too_deep", "big": "too_large", "fill2": "stream_full"}),
        "{line}"
    );
    let metrics = setup.front.metrics().encode();
    for (plugin, reason) in [
        ("past", "too_deep"),
        ("big", "too_large"),
        ("fill2", "stream_full"),
    ] {
        let series = format!(
            "plugvisor_plugin_finals_missing_total{{plugin=\"{plugin}\",reason=\"{reason}\"}} 1"
        );
        assert!(metrics.contains(&series), "{series} not in\n{metrics}");
    }
    setup.stop().await;
}

async fn last_bytes_do_not_wait(upstream_h2: bool, stream: bool) {
    let hang = Behaviour {
        hang_finals: true,
        ..Behaviour::default()
    };
    let setup = InProc::start(Options {
        plugins: vec![
            ("order".into(), String::new(), Behaviour::default()),
            ("hang".into(), "final_timeout_ms = 3000".into(), hang),
        ],
        upstream_h2,
        ..Options::default()
    })
    .await;
    let params = Params {
        chunks: 5,
        stream,
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "last").await;
    assert_eq!(got.error, None);
    assert_eq!(
        got.body(),
        params.body(),
        "h2 {upstream_h2}, stream {stream}"
    );
    // Every byte, the last chunk's included, was there before the end of the response, which
    // waited for the hanging plugin's 3 s deadline.
    let last_data = got.chunks.last().expect("data").0;
    assert!(got.total >= Duration::from_secs(3), "{:?}", got.total);
    assert!(
        last_data + Duration::from_secs(2) < got.total,
        "last bytes at {last_data:?}, end at {:?}",
        got.total
    );
    let line = setup.log_for("last");
    assert_eq!(
        line["plugvisor"]["reasons"],
        serde_json::json!({"hang": "timeout"}),
        "{line}"
    );
    assert_eq!(line["test_order"]["gaps"], 0.0, "{line}");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_tokens_of_an_h2_upstream_reach_the_client_before_a_hanging_final_ends() {
    last_bytes_do_not_wait(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_body_reaches_the_client_before_a_hanging_final_ends() {
    last_bytes_do_not_wait(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_mode_carries_the_body_and_says_what_the_plugins_saw() {
    for mode in [
        "STREAMED",
        "BUFFERED",
        "BUFFERED_PARTIAL",
        "FULL_DUPLEX_STREAMED",
        "NONE",
    ] {
        let setup = InProc::new(mode, &[("order", "", Behaviour::default())]).await;
        let params = Params {
            chunks: 6,
            delay: Duration::from_millis(2),
            ..Params::default()
        };
        let got = chat(setup.envoy.port, &params, "mode").await;
        assert_eq!((got.status, &got.error), (200, &None), "{mode}");
        assert_eq!(got.body(), params.body(), "{mode}");
        let line = setup.log_for("mode");
        if mode == "NONE" {
            // Headers only: no body events, and no end of response to answer with metadata.
            assert!(line["test_order"].is_null(), "{mode}: {line}");
        } else {
            assert_eq!(
                line["plugvisor"]["missing"],
                serde_json::json!([]),
                "{mode}: {line}"
            );
            assert_eq!(line["test_order"]["gaps"], 0.0, "{mode}: {line}");
            assert_eq!(line["test_order"]["out_of_order"], 0.0, "{mode}: {line}");
        }
        assert_eq!(setup.front.metrics().stream_errors.get(), 0, "{mode}");
        setup.stop().await;
    }
}

/// Envoy with 64 MiB buffers sends a buffered body as one message: 5 MiB is under the default
/// `max_message_bytes` (8 MiB) and passes whole; 20 MiB is refused with a gRPC error, counted,
/// and the client sees a failed response, never a 200 with a cut body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_bytes_fails_its_stream_instead_of_truncating_it() {
    let setup = InProc::start(Options {
        body_mode: "BUFFERED",
        // A 5 MiB event through a debug build on a loaded machine: not a test of the deadline.
        plugins: vec![(
            "order".into(),
            "final_timeout_ms = 5000".into(),
            Behaviour::default(),
        )],
        buffer_limit_bytes: Some(64 << 20),
        ..Options::default()
    })
    .await;
    let body = |mib: usize| Params {
        chunks: 1,
        size: mib << 20,
        stream: false,
        ..Params::default()
    };
    let five = body(5);
    let got = chat(setup.envoy.port, &five, "five").await;
    assert_eq!((got.status, &got.error), (200, &None));
    assert!(got.body() == five.body(), "5 MiB body differs");
    let line = setup.log_for("five");
    assert_eq!(
        line["plugvisor"]["missing"],
        serde_json::json!([]),
        "{line}"
    );
    assert_eq!(setup.front.metrics().messages_too_large.get(), 0);

    let twenty = body(20);
    let got = chat(setup.envoy.port, &twenty, "twenty").await;
    assert!(
        got.status != 200 || got.error.is_some(),
        "a 20 MiB message came back as a complete 200 ({} bytes)",
        got.body().len()
    );
    assert!(got.body() != twenty.body());
    assert_eq!(setup.front.metrics().messages_too_large.get(), 1);
    assert!(setup.front.metrics().stream_errors.get() >= 1);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_max_streams_are_echoed_without_plugins_and_say_so() {
    let setup = InProc::start(Options {
        top: "max_streams = 2".into(),
        plugins: vec![("order".into(), String::new(), Behaviour::default())],
        ..Options::default()
    })
    .await;
    let params = Params {
        chunks: 10,
        delay: Duration::from_millis(60),
        ..Params::default()
    };
    let port = setup.envoy.port;
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let params = params.clone();
            tokio::spawn(async move { chat(port, &params, &format!("shed-{i}")).await })
        })
        .collect();
    for r in requests {
        let got = r.await.unwrap();
        assert_eq!(got.error, None);
        assert_eq!(got.body(), params.body());
    }
    let mut shed = 0;
    for i in 0..6 {
        let line = setup.log_for(&format!("shed-{i}"));
        match line["plugvisor"]["reasons"]["order"].as_str() {
            Some("max_streams") => {
                shed += 1;
                assert!(line["test_order"].is_null(), "{line}");
            }
            None => assert_eq!(line["test_order"]["gaps"], 0.0, "{line}"),
            other => panic!("unexpected reason {other:?}: {line}"),
        }
    }
    assert_eq!(shed, 4);
    assert_eq!(setup.front.metrics().streams_shed.get(), 4);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_timeout_fails_only_streams_silent_past_it() {
    let setup = InProc::start(Options {
        top: "idle_stream_timeout_ms = 400".into(),
        plugins: vec![("order".into(), String::new(), Behaviour::default())],
        ..Options::default()
    })
    .await;
    let lively = Params {
        chunks: 4,
        delay: Duration::from_millis(100),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &lively, "lively").await;
    assert_eq!((got.status, &got.error), (200, &None));
    assert_eq!(got.body(), lively.body());
    let silent = Params {
        chunks: 3,
        delay: Duration::from_millis(1500),
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &silent, "silent").await;
    assert!(
        got.status != 200 || got.error.is_some(),
        "a silent stream was not ended"
    );
    assert_eq!(setup.front.metrics().stream_errors.get(), 1);
    let record = setup.plugins[0].record.clone();
    tests::eventually_async(
        "an abort for the ended stream",
        Duration::from_secs(3),
        async || !record.lock().unwrap().aborted.is_empty(),
    )
    .await;
    assert_eq!(
        record.lock().unwrap().aborted[0].1,
        ipc_protocol::AbortCause::Timeout
    );
    setup.stop().await;
}

#[tokio::test]
async fn accepted_ext_proc_tcp_connections_have_nodelay() {
    use tokio_stream::StreamExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Box::pin(supervisor::shell::listeners::nodelay_incoming(listener));
    let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accepted = incoming.next().await.unwrap().unwrap();
    assert!(accepted.nodelay().unwrap());
}

/// A final reply naming another stream than its call's is refused and counted; the call takes
/// the right one that follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_reply_for_another_stream_is_refused_and_counted() {
    let setup = InProc::new(
        "FULL_DUPLEX_STREAMED",
        &[(
            "order",
            "",
            Behaviour {
                wrong_stream_first: true,
                ..Behaviour::default()
            },
        )],
    )
    .await;
    let params = Params {
        chunks: 3,
        ..Params::default()
    };
    for id in ["wrong-1", "wrong-2"] {
        let got = chat(setup.envoy.port, &params, id).await;
        assert_eq!((got.status, &got.error), (200, &None), "{id}");
        let line = setup.log_for(id);
        assert!(
            line["test_order"]["lie"].is_null(),
            "the lie was taken: {line}"
        );
        assert_eq!(line["test_order"]["gaps"], 0.0, "{line}");
        assert_eq!(
            line["plugvisor"]["missing"],
            serde_json::json!([]),
            "{line}"
        );
    }
    let text = setup.front.metrics().encode();
    assert_eq!(
        metric(
            &text,
            "plugvisor_plugin_replies_refused_total{plugin=\"order\",reason=\"wrong_stream\"}"
        ),
        2.0
    );
    setup.stop().await;
}

/// A plugin that answers pings but stops sending `Credit`, so its window stays full, is hung for
/// the data path: it is disconnected once that lasts past `hang_timeout_ms` and
/// `stuck_timeout_ms`, and the streams go on without it (whole bodies, its metadata missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_sends_no_credit_is_treated_as_hung() {
    let setup = InProc::start(Options {
        top: "ping_interval_ms = 50".into(),
        plugins: vec![(
            "order".into(),
            "budget_bytes = 65536\nhang_timeout_ms = 300\nstuck_timeout_ms = 300\nfinal_timeout_ms = 200"
                .into(),
            Behaviour {
                no_credit: true,
                ..Behaviour::default()
            },
        )],
        ..Options::default()
    })
    .await;
    // More than the 64 KiB window: the writer holds an event for room that never comes.
    let params = Params {
        chunks: 8,
        size: 16 * 1024,
        ..Params::default()
    };
    let got = chat(setup.envoy.port, &params, "no-credit").await;
    assert_eq!((got.status, &got.error), (200, &None));
    assert!(got.body() == params.body(), "body differs");
    let link = setup.front.links()[0].clone();
    tests::eventually("the plugin disconnected", Duration::from_secs(10), || {
        !link.is_connected()
    });
    setup.stop().await;
}
