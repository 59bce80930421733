//! Metadata namespaces are owned: a plugin writes `plugvisor.<its name>` and what its config
//! grants. A plugin configured after `usage` that answers `plugvisor.usage` with its own numbers
//! does not replace the real ones; its namespace is listed under `plugvisor.denied` and counted,
//! and the rest of its answer goes through. A granted namespace goes through.

use ipc_protocol::Value;
use tests::client::chat;
use tests::fake_plugin::{Behaviour, FakePlugin};
use tests::front::{metric, FrontProcess};
use tests::stack::Stack;
use tests::upstream::Params;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_overwrite_another_plugin_s_namespace() {
    let setup = Stack::start(
        "[plugins.usage]\n[plugins.liar]\nspawn = false\n\
         [plugins.granted]\nspawn = false\nnamespaces = [\"envoy.lb\", \"plugvisor.test-order\"]\n",
        &["usage"],
    )
    .await;
    let sockets = FrontProcess::runtime_dir_in(setup.dir.path()).join("plugins");
    let lie = Behaviour {
        final_metadata: Some(ipc_protocol::Metadata::from([
            (
                "plugvisor.usage".to_owned(),
                Value::map([("completion_tokens", Value::Int(999_999))]),
            ),
            (
                "plugvisor.liar".to_owned(),
                Value::map([("said", Value::from("hello"))]),
            ),
        ])),
        ..Behaviour::default()
    };
    let granted = Behaviour {
        final_metadata: Some(ipc_protocol::Metadata::from([(
            "envoy.lb".to_owned(),
            Value::map([("pool", Value::from("blue"))]),
        )])),
        ..Behaviour::default()
    };
    let _liar = FakePlugin::welcome(&sockets.join("liar.sock"), "liar", lie).await;
    let _granted = FakePlugin::welcome(&sockets.join("granted.sock"), "granted", granted).await;
    let params = Params {
        chunks: 7,
        ..Params::default()
    };
    for id in ["owned-1", "owned-2"] {
        let got = chat(setup.envoy.port, &params, id).await;
        assert_eq!((got.status, &got.error), (200, &None), "{id}");
        let line = setup.log_for(id);
        assert_eq!(line["usage"]["completion_tokens"], 7.0, "{line}");
        assert_eq!(
            line["plugvisor"]["denied"],
            serde_json::json!({"liar": ["plugvisor.test-order", "plugvisor.usage"]}),
            "{line}"
        );
        assert_eq!(line["lb"]["pool"], "blue", "{line}");
        assert_eq!(
            line["plugvisor"]["missing"],
            serde_json::json!([]),
            "{line}"
        );
    }
    let metrics = setup.front.metrics();
    assert_eq!(
        metric(
            &metrics,
            "plugvisor_plugin_namespaces_denied_total{plugin=\"liar\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(
            &metrics,
            "plugvisor_plugin_namespaces_denied_total{plugin=\"usage\"}"
        ),
        0.0
    );
}
