//! `demo-upstream`: the test suite's OpenAI-like streaming upstream as a standalone server, for
//! `examples/demo`. Usage: `demo-upstream <port>`; it prints `listening on 127.0.0.1:<port>` and
//! serves until killed. Requests choose chunk count and pacing with `x-test-*` headers (see
//! `tests::upstream::Params`); the defaults stream 12 tokens, 40 ms apart.
#![forbid(unsafe_code)]

use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(p)) => p,
        _ => {
            eprintln!("usage: demo-upstream <port>");
            std::process::exit(64);
        }
    };
    let defaults = tests::upstream::Params {
        chunks: 12,
        size: 0,
        delay: Duration::from_millis(40),
        ..Default::default()
    };
    let upstream = tests::upstream::Upstream::start_on(port, defaults).await;
    println!("listening on 127.0.0.1:{}", upstream.port);
    std::future::pending::<()>().await;
}
