//! A plugin run by someone else (`spawn = false`) that follows `Reconnect` moves on without a
//! gap: a reload that changes its config hands it over to a second connection of the same
//! process, with the new config, while streams flow through real Envoy; every response keeps
//! the plugin's whole metadata, the process is never restarted, and streams started after the
//! reload see the new config.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::client::{chat, Received};
use tests::front::FrontProcess;
use tests::stack::{self, Stack};
use tests::upstream::Params;

/// `usage` run by the test, `test-order` by the front; finals may wait for a handover.
const BEFORE: &str = "[plugins.usage]\nspawn = false\nfinal_timeout_ms = 5000\n\
                      [plugins.test-order]\nfinal_timeout_ms = 5000\n";

/// The same, with a cost table added to `usage`'s config: only a new connection has it. (No
/// `namespaces` key: a plugin run as its own unit is granted what the built-in of its name
/// writes with its config, as a spawned one is, so the cost reaches Envoy.)
const AFTER: &str = "[plugins.usage]\nspawn = false\nfinal_timeout_ms = 5000\n\
                     [[plugins.usage.config.costs]]\nnamespace = \"envoy.ratelimit\"\n\
                     key = \"tokens\"\ntype = \"total\"\n\
                     [plugins.test-order]\nfinal_timeout_ms = 5000\n";

/// A plugin host started by the test, stopped by pid when dropped.
pub struct External(Child);

impl External {
    /// `plugvisor-plugin <name> --connect <socket>`, logging to `log`.
    pub fn start(socket: &Path, name: &str, log: &Path) -> External {
        let log = std::fs::File::create(log).expect("plugin log");
        let child = Command::new(tests::bins::plugvisor_plugin())
            .arg(name)
            .arg("--connect")
            .arg(socket)
            .arg("--connect-wait")
            .arg("10s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start plugvisor-plugin");
        External(child)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Done = (String, Params, Instant, Received);

fn params(chunks: usize, delay_ms: u64) -> Params {
    Params {
        chunks,
        delay: Duration::from_millis(delay_ms),
        ..Params::default()
    }
}

/// `n` requests of `p`, started `gap` apart.
async fn requests(
    port: u16,
    tag: &str,
    n: usize,
    p: Params,
    gap: Duration,
) -> Vec<tokio::task::JoinHandle<Done>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let got = chat(port, &p, &id).await;
            (id, p, started, got)
        }));
        tokio::time::sleep(gap).await;
    }
    tasks
}

async fn join(tasks: Vec<tokio::task::JoinHandle<Done>>) -> Vec<Done> {
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.expect("request task"));
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_hands_an_external_plugin_to_its_new_connection_without_a_gap() {
    let stack = Stack::start(BEFORE, &["test-order"]).await;
    let sockets = FrontProcess::runtime_dir_in(stack.dir.path()).join("plugins");
    let log = stack.dir.path().join("usage-plugin.log");
    let mut plugin = External::start(&sockets.join("usage.sock"), "usage", &log);
    stack
        .front
        .wait_for_plugin("usage", Duration::from_secs(10), |p| p.state == "external")
        .await;
    let port = stack.envoy.port;

    // Long streams across the reload, and short ones before, during and after it.
    let long = requests(port, "long", 10, params(20, 100), Duration::from_millis(30)).await;
    let short = tokio::spawn(async move {
        join(requests(port, "short", 60, params(4, 10), Duration::from_millis(50)).await).await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| stack.front.reloaded(|| stack.front.reload(AFTER)));
    let reloaded = Instant::now();
    let long = join(long).await;
    let short = short.await.expect("short requests");

    let mut after = 0;
    for (id, p, started, got) in long.iter().chain(&short) {
        assert_eq!(got.status, 200, "{id}");
        assert!(got.body() == p.body(), "{id}: body differs");
        let line = stack.log_for(id);
        stack::assert_whole(&line, p);
        // A stream that started once the reload was done runs on the new connection, with the
        // new config; one that started before it keeps the old one.
        if *started > reloaded + Duration::from_millis(200) {
            after += 1;
            assert_eq!(
                line["costs"]["tokens"], line["usage"]["total_tokens"],
                "{id}: {line}"
            );
        }
        if *started < reloaded - Duration::from_millis(600) {
            assert!(line["costs"].is_null(), "{id}: {line}");
        }
    }
    assert!(after >= 20, "only {after} requests after the reload");

    // One process all along, now on its second connection; the first was closed, not shut down.
    assert!(
        plugin.running(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let status = stack.front.plugin_status("usage").await;
    assert_eq!(status.pid, Some(plugin.pid()), "{status:?}");
    let plugin_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        plugin_log.contains("config changed"),
        "the plugin logs why it reconnected: {plugin_log}"
    );
    let front_log = stack.front.log();
    assert!(
        front_log.contains("asking the plugin to reconnect"),
        "{front_log}"
    );
    assert!(!front_log.contains("plugin disconnected\""), "{front_log}");
}
