//! `test-hang` (a test plugin, for fault drills): stops answering when a body chunk contains
//! `marker`. `scope = "process"` (default) freezes the whole process (it stops itself with
//! SIGSTOP: no more pongs, no more replies, exactly what a heartbeat must catch; SIGKILL still
//! ends it); `scope = "lane"` blocks only that stream's hook forever, so the process keeps
//! answering pings and reports the lane in `Pong.stuck`. Metadata otherwise:
//! `plugvisor.test-hang: {events}`.

use ipc_protocol::{Chunk, Final, Metadata, Value};

use super::marker::MarkerScan;
use plugin_runner::{ConfigError, ConfigMap};
use plugin_runner::{EventCtx, Plugin};

/// The plugin's own metadata namespace.
pub const NAMESPACE: &str = "plugvisor.test-hang";

/// What `test-hang` freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HangScope {
    /// The whole process (SIGSTOP to itself).
    #[default]
    Process,
    /// Only the hook of the stream that carried the marker.
    Lane,
}

/// The `test-hang` plugin.
#[derive(Debug, Default, Clone)]
pub struct TestHangPlugin {
    marker: Option<Vec<u8>>,
    scope: HangScope,
}

/// Per-stream state of [`TestHangPlugin`].
#[derive(Debug, Default)]
pub struct TestHangStream {
    events: u64,
    scan: MarkerScan,
}

impl TestHangPlugin {
    fn check(&self, s: &mut TestHangStream, ctx: &EventCtx, bytes: &[u8]) {
        s.events += 1;
        let Some(marker) = &self.marker else { return };
        if !s.scan.feed(marker, bytes) {
            return;
        }
        tracing::error!(stream_id = ctx.stream_id, seq = ctx.seq, scope = ?self.scope, "test-hang: hanging on purpose");
        if self.scope == HangScope::Process {
            if let Err(e) = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP) {
                tracing::error!(error = %e, "cannot stop the process; hanging this lane instead");
            }
        }
        loop {
            std::thread::park();
        }
    }
}

impl Plugin for TestHangPlugin {
    type Stream = TestHangStream;

    fn name(&self) -> &str {
        "test-hang"
    }

    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let config = ConfigMap::new(config)?;
        config.deny_unknown(&["marker", "scope"])?;
        self.marker = config
            .str("marker")?
            .filter(|m| !m.is_empty())
            .map(|m| m.as_bytes().to_vec());
        self.scope = match config.str("scope")? {
            None | Some("process") => HangScope::Process,
            Some("lane") => HangScope::Lane,
            Some(other) => {
                return Err(ConfigError::new(format!(
                    "config.scope must be \"process\" or \"lane\", got \"{other}\""
                )))
            }
        };
        if self.marker.is_none() {
            tracing::warn!("test-hang has no `marker`: it will never hang");
        }
        Ok(())
    }

    fn on_chunk(&self, s: &mut TestHangStream, ctx: &EventCtx, c: &Chunk) {
        self.check(s, ctx, &c.bytes);
    }

    fn on_final(&self, s: &mut TestHangStream, ctx: &EventCtx, f: &Final) -> Metadata {
        self.check(s, ctx, &f.bytes);
        Metadata::from([(
            NAMESPACE.to_owned(),
            Value::map([("events", Value::from(s.events))]),
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::play;
    use plugin_runner::testing::Player;

    #[test]
    fn without_the_marker_it_answers_normally() {
        let mut p = TestHangPlugin::default();
        p.configure(&Value::map([
            ("marker", Value::from("HANG")),
            ("scope", Value::from("lane")),
        ]))
        .unwrap();
        let p = Player::new(p);
        let meta = play(&p, "data: fine\n\n", 3, "text/event-stream").meta;
        assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(5)));
        assert_eq!(p.plugin().scope, HangScope::Lane);
    }
}
