//! `test-crash` (a test plugin, for fault drills): crashes after `after_events` events (counted
//! over the whole process) and/or on a body chunk containing `marker`. `mode = "exit"` (default)
//! ends the process at once with status 101, as a Rust panic outside a lane would;
//! `mode = "abort"` dies by SIGABRT; `mode = "panic"` panics inside the hook instead, which the
//! host catches per stream (that stream's final reply carries the error, the process lives on).
//! Metadata until then: `plugvisor.test-crash: {events}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipc_protocol::{Chunk, Final, Metadata, RequestStart, ResponseHeaders, Value};

use super::marker::MarkerScan;
use plugin_runner::{ConfigError, ConfigMap};
use plugin_runner::{EventCtx, Plugin};

/// The plugin's own metadata namespace.
pub const NAMESPACE: &str = "plugvisor.test-crash";

/// How `test-crash` fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashMode {
    /// `std::process::exit(101)`.
    #[default]
    Exit,
    /// `std::process::abort()` (SIGABRT).
    Abort,
    /// A panic in the hook, caught by the host.
    Panic,
}

/// The `test-crash` plugin.
#[derive(Debug, Default, Clone)]
pub struct TestCrashPlugin {
    after_events: Option<u64>,
    marker: Option<Vec<u8>>,
    mode: CrashMode,
    /// Counted over the whole process: every connection's instance shares it.
    events: Arc<AtomicU64>,
}

/// Per-stream state of [`TestCrashPlugin`].
#[derive(Debug, Default)]
pub struct TestCrashStream {
    events: u64,
    scan: MarkerScan,
}

impl TestCrashPlugin {
    fn event(&self, s: &mut TestCrashStream, ctx: &EventCtx, bytes: &[u8]) {
        s.events += 1;
        let n = self.events.fetch_add(1, Ordering::SeqCst) + 1;
        if self.after_events.is_some_and(|after| n >= after) {
            self.crash(ctx, &format!("reached {n} events"));
        }
        if let Some(marker) = &self.marker {
            if s.scan.feed(marker, bytes) {
                self.crash(ctx, "found the marker");
            }
        }
    }

    fn crash(&self, ctx: &EventCtx, why: &str) {
        tracing::error!(stream_id = ctx.stream_id, seq = ctx.seq, mode = ?self.mode, "test-crash: crashing on purpose: {why}");
        match self.mode {
            CrashMode::Exit => std::process::exit(101),
            CrashMode::Abort => std::process::abort(),
            CrashMode::Panic => panic!("test-crash: panicking on purpose: {why}"),
        }
    }
}

impl Plugin for TestCrashPlugin {
    type Stream = TestCrashStream;

    fn name(&self) -> &str {
        "test-crash"
    }

    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let config = ConfigMap::new(config)?;
        config.deny_unknown(&["after_events", "marker", "mode"])?;
        self.after_events = config.u64("after_events")?;
        self.marker = config
            .str("marker")?
            .filter(|m| !m.is_empty())
            .map(|m| m.as_bytes().to_vec());
        self.mode = match config.str("mode")? {
            None | Some("exit") => CrashMode::Exit,
            Some("abort") => CrashMode::Abort,
            Some("panic") => CrashMode::Panic,
            Some(other) => {
                return Err(ConfigError::new(format!(
                    "config.mode must be \"exit\", \"abort\" or \"panic\", got \"{other}\""
                )))
            }
        };
        if self.after_events.is_none() && self.marker.is_none() {
            tracing::warn!(
                "test-crash has neither `after_events` nor `marker`: it will never crash"
            );
        }
        Ok(())
    }

    fn on_request_start(&self, s: &mut TestCrashStream, ctx: &EventCtx, _: &RequestStart) {
        self.event(s, ctx, &[]);
    }

    fn on_response_headers(&self, s: &mut TestCrashStream, ctx: &EventCtx, _: &ResponseHeaders) {
        self.event(s, ctx, &[]);
    }

    fn on_chunk(&self, s: &mut TestCrashStream, ctx: &EventCtx, c: &Chunk) {
        self.event(s, ctx, &c.bytes);
    }

    fn on_final(&self, s: &mut TestCrashStream, ctx: &EventCtx, f: &Final) -> Metadata {
        self.event(s, ctx, &f.bytes);
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
    use plugin_runner::testing::{Player, Split, Stream};

    #[test]
    fn panic_mode_panics_on_the_marker_and_not_before() {
        let mut p = TestCrashPlugin::default();
        p.configure(&Value::map([
            ("marker", Value::from("BOOM")),
            ("mode", Value::from("panic")),
        ]))
        .unwrap();
        let p = Player::new(p);
        let meta = play(&p, "data: fine\n\n", 4, "text/event-stream").meta;
        assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(6)));
        let doomed = Stream::new(1)
            .request(&[])
            .body("data: BOOM\n\n", Split::Every(4))
            .final_(b"");
        let err = p.play(&doomed).error().map(str::to_owned);
        assert!(
            err.as_deref().is_some_and(|e| e.contains("on_chunk")),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_mode_is_a_config_error() {
        let mut p = TestCrashPlugin::default();
        let e = p
            .configure(&Value::map([("mode", Value::from("explode"))]))
            .unwrap_err();
        assert!(e.to_string().contains("config.mode"), "{e}");
    }
}
