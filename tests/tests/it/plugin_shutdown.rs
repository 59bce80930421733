//! `Shutdown` reaches every plugin before its connection closes: one the front does not run
//! (`spawn = false`) gets the frame, with the front's grace, and is given that grace to close
//! the connection itself, stop after stop.

use std::time::Duration;

use supervisor::Config;
use tests::fake_plugin::{Behaviour, FakePlugin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_plugin_gets_shutdown_on_every_stop() {
    tests::init_tracing();
    for round in 0..12 {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "listen = \"unix:{}\"\nadmin_listen = \"\"\nruntime_dir = \"{}\"\n\
             shutdown_grace_ms = 300\n[plugins.ext]\nspawn = false\n",
            dir.path().join("ext_proc.sock").display(),
            dir.path().join("run").display(),
        );
        let config = Config::parse(&toml, "test").unwrap();
        let mut front = supervisor::start(config.clone()).await.unwrap();
        let plugin =
            FakePlugin::welcome(&config.plugin_socket("ext"), "ext", Behaviour::default()).await;
        assert!(front.wait_connected(Duration::from_secs(5)).await);
        front.stop().await;
        let shutdown = plugin.record.lock().unwrap().shutdown;
        assert!(
            shutdown.is_some(),
            "round {round}: the plugin got end-of-file without Shutdown"
        );
    }
}
