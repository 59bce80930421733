//! `/healthz` of the real `plugvisor`: 200 `ok` while every `required` plugin is connected, 503
//! naming the ones that are not, whatever happens to the optional ones.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use supervisor::control::{self, Request};
use tests::front::FrontProcess;

/// Status code and body of `GET /healthz`.
fn healthz(front: &FrontProcess) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", front.admin_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (code, body)
}

async fn command(front: &FrontProcess, request: Request) {
    let answer = control::request(&front.control_socket(), &request)
        .await
        .expect("control socket answers");
    assert!(answer.ok, "{answer:?}");
}

async fn wait_healthz(front: &FrontProcess, code: u16) -> String {
    let start = Instant::now();
    loop {
        let (got, body) = healthz(front);
        if got == code {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "/healthz stays {got} {body:?}\n{}",
            front.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_naming_a_required_plugin_while_it_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(
        dir.path(),
        "[plugins.usage]\nrequired = true\n[plugins.latency]\n",
        &["usage", "latency"],
    );
    assert_eq!(healthz(&front), (200, "ok\n".to_owned()));

    // An optional plugin down: still healthy.
    command(
        &front,
        Request::Stop {
            plugin: "latency".into(),
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(healthz(&front).0, 200);

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
