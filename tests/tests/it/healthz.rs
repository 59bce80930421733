//! `/healthz` of the real `plugvisor`: 200 `ok` while every `required` plugin is connected, 503
//! naming the ones that are not, whatever happens to the optional ones.

use std::time::Duration;

use supervisor::shell::control::{self, Request};
use tests::front::FrontProcess;

async fn command(front: &FrontProcess, request: Request) {
    let answer = control::request(&front.control_socket(), &request)
        .await
        .expect("control socket answers");
    assert!(answer.ok, "{answer:?}");
}

async fn wait_healthz(front: &FrontProcess, code: u16) -> String {
    let what = format!("/healthz {code}");
    tests::eventually_async(&what, Duration::from_secs(15), async || {
        let (got, body) = front.healthz();
        if got == code {
            Ok(body)
        } else {
            Err(format!("{got} {body:?}\n{}", front.log()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_naming_a_required_plugin_while_it_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(
        dir.path(),
        "[plugins.usage]\nrequired = true\n[plugins.latency]\n",
        &["usage", "latency"],
    );
    assert_eq!(front.healthz(), (200, "ok\n".to_owned()));

    // An optional plugin down: still healthy.
    command(
        &front,
        Request::Stop {
            plugin: "latency".into(),
        },
    )
    .await;
    // Given time to change, it does not: nothing to wait for.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(front.healthz().0, 200);

    command(
        &front,
        Request::Stop {
            plugin: "usage".into(),
        },
    )
    .await;
    let body = wait_healthz(&front, 503).await;
    assert_eq!(body, "required plugin(s) down: usage\n");

    command(
        &front,
        Request::Start {
            plugin: "usage".into(),
        },
    )
    .await;
    assert_eq!(wait_healthz(&front, 200).await, "ok\n");
}
