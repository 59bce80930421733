//! `test-spin` (a test plugin, for benchmarks): burns `spin_us` microseconds of CPU (default
//! 1000) in every hook, to stand for a plugin with real work per event. Receives every event but
//! no body bytes. Metadata `plugvisor.test-spin: {events, spun_us}`.

use std::time::{Duration, Instant};

use ipc_protocol::{Chunk, Final, Metadata, RequestStart, ResponseHeaders, Subscriptions, Value};

use plugin_runner::{ConfigError, ConfigMap};
use plugin_runner::{EventCtx, Plugin};

/// The plugin's own metadata namespace.
pub const NAMESPACE: &str = "plugvisor.test-spin";

/// The `test-spin` plugin.
#[derive(Debug, Clone)]
pub struct TestSpinPlugin {
    spin: Duration,
}

impl Default for TestSpinPlugin {
    fn default() -> Self {
        TestSpinPlugin {
            spin: Duration::from_micros(1000),
        }
    }
}

/// Per-stream state of [`TestSpinPlugin`].
#[derive(Debug, Default)]
pub struct TestSpinStream {
    events: u64,
}

impl TestSpinPlugin {
    fn spin(&self, s: &mut TestSpinStream) {
        s.events += 1;
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < self.spin {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

impl Plugin for TestSpinPlugin {
    type Stream = TestSpinStream;

    fn name(&self) -> &str {
        "test-spin"
    }

    fn subscriptions(&self) -> Subscriptions {
        Subscriptions {
            body_bytes: false,
            ..Subscriptions::ALL
        }
    }

    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let config = ConfigMap::new(config)?;
        config.deny_unknown(&["spin_us"])?;
        if let Some(us) = config.u64("spin_us")? {
            self.spin = Duration::from_micros(us);
        }
        Ok(())
    }

    fn on_request_start(&self, s: &mut TestSpinStream, _: &EventCtx, _: &RequestStart) {
        self.spin(s);
    }

    fn on_response_headers(&self, s: &mut TestSpinStream, _: &EventCtx, _: &ResponseHeaders) {
        self.spin(s);
    }

    fn on_chunk(&self, s: &mut TestSpinStream, _: &EventCtx, _: &Chunk) {
        self.spin(s);
    }

    /// Quick when it does not spin: then its final runs on the reader thread like the built-in
    /// plugins' (the final RPC benchmark measures that path).
    fn quick_final(&self) -> bool {
        self.spin.is_zero()
    }

    fn on_final(&self, s: &mut TestSpinStream, _: &EventCtx, _: &Final) -> Metadata {
        self.spin(s);
        let spun = self.spin.as_micros() as u64 * s.events;
        Metadata::from([(
            NAMESPACE.to_owned(),
            Value::map([
                ("events", Value::from(s.events)),
                ("spun_us", Value::from(spun)),
            ]),
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::play;
    use plugin_runner::testing::Player;

    #[test]
    fn spins_the_configured_time_per_event() {
        let mut p = TestSpinPlugin::default();
        p.configure(&Value::map([("spin_us", Value::Int(2000))]))
            .unwrap();
        let subs = p.subscriptions();
        let start = Instant::now();
        let meta = play(&Player::new(p), "data: x\n\n", 100, "text/event-stream").meta;
        assert!(start.elapsed() >= Duration::from_micros(4 * 2000));
        assert_eq!(meta[NAMESPACE].get("events"), Some(&Value::Int(4)));
        assert!(!subs.body_bytes && subs.chunks);
    }
}
