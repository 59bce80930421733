//! `test-order` (a test plugin): checks that a stream's events reach its hooks in sequence
//! order, and fingerprints the body. Metadata
//! `plugvisor.test-order: {events, out_of_order, gaps, bytes, sha256}` where `sha256` is the hex
//! digest of every body byte (chunks, then the final's bytes) in the order the hooks saw them.
//!
//! Config `sleep_ms` (default 0) makes every chunk hook sleep that long: a slow plugin that does
//! not burn CPU, for back-pressure tests (its backlog must stay in the front, not in the plugin).

use std::time::Duration;

use ipc_protocol::{Abort, Chunk, Final, Metadata, RequestStart, ResponseHeaders, Value};
use sha2::{Digest, Sha256};

use plugin_runner::{EventCtx, Plugin};

/// The plugin's own metadata namespace.
pub const NAMESPACE: &str = "plugvisor.test-order";

/// The `test-order` plugin.
#[derive(Debug, Default, Clone)]
pub struct TestOrderPlugin {
    sleep: Duration,
}

/// Per-stream state of [`TestOrderPlugin`].
#[derive(Debug, Default)]
pub struct TestOrderStream {
    last: Option<u32>,
    events: u64,
    out_of_order: u64,
    gaps: u64,
    bytes: u64,
    sha: Sha256,
}

impl TestOrderStream {
    fn see(&mut self, seq: u32) {
        self.events += 1;
        match self.last {
            Some(last) if seq <= last => self.out_of_order += 1,
            Some(last) => {
                self.gaps += u64::from(seq - last - 1);
                self.last = Some(seq);
            }
            // The first event: a stream first seen past its start is the host's `partial`.
            None => self.last = Some(seq),
        }
    }

    fn body(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        self.sha.update(bytes);
    }
}

impl Plugin for TestOrderPlugin {
    type Stream = TestOrderStream;

    fn name(&self) -> &str {
        "test-order"
    }

    fn configure(&mut self, config: &Value) -> Result<(), plugin_runner::ConfigError> {
        let config = plugin_runner::ConfigMap::new(config)?;
        config.deny_unknown(&["sleep_ms"])?;
        if let Some(ms) = config.u64("sleep_ms")? {
            self.sleep = Duration::from_millis(ms);
        }
        Ok(())
    }

    fn on_request_start(&self, s: &mut TestOrderStream, ctx: &EventCtx, _: &RequestStart) {
        s.see(ctx.seq);
    }

    fn on_response_headers(&self, s: &mut TestOrderStream, ctx: &EventCtx, _: &ResponseHeaders) {
        s.see(ctx.seq);
    }

    fn on_chunk(&self, s: &mut TestOrderStream, ctx: &EventCtx, c: &Chunk) {
        s.see(ctx.seq);
        s.body(&c.bytes);
        if !self.sleep.is_zero() {
            std::thread::sleep(self.sleep);
        }
    }

    fn quick_final(&self) -> bool {
        true
    }

    fn on_final(&self, s: &mut TestOrderStream, ctx: &EventCtx, f: &Final) -> Metadata {
        s.see(ctx.seq);
        s.body(&f.bytes);
        let sha = hex::encode(std::mem::take(&mut s.sha).finalize());
        Metadata::from([(
            NAMESPACE.to_owned(),
            Value::map([
                ("events", Value::from(s.events)),
                ("out_of_order", Value::from(s.out_of_order)),
                ("gaps", Value::from(s.gaps)),
                ("bytes", Value::from(s.bytes)),
                ("sha256", Value::from(sha)),
            ]),
        )])
    }

    fn on_abort(&self, s: &mut TestOrderStream, ctx: &EventCtx, _: &Abort) {
        s.see(ctx.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::play;
    use crate::usage_formats::tests::CHAT_STREAM;
    use plugin_runner::testing::Player;

    #[test]
    fn in_order_stream_has_no_reordering_and_the_body_digest() {
        let meta = play(
            &Player::new(TestOrderPlugin::default()),
            CHAT_STREAM,
            100,
            "text/event-stream",
        )
        .meta;
        let own = &meta[NAMESPACE];
        assert_eq!(own.get("out_of_order"), Some(&Value::Int(0)));
        assert_eq!(own.get("gaps"), Some(&Value::Int(0)));
        let chunks = CHAT_STREAM.len().div_ceil(100) as i64;
        assert_eq!(own.get("events"), Some(&Value::Int(3 + chunks)));
        let want = hex::encode(Sha256::digest(CHAT_STREAM.as_bytes()));
        assert_eq!(own.get("sha256"), Some(&Value::String(want)));
    }

    #[test]
    fn sleep_ms_slows_every_chunk_and_other_keys_are_refused() {
        let mut p = TestOrderPlugin::default();
        assert!(p
            .configure(&Value::map([("sleep", Value::Int(3))]))
            .is_err());
        p.configure(&Value::map([("sleep_ms", Value::Int(3))]))
            .unwrap();
        let start = std::time::Instant::now();
        play(&Player::new(p), "data: x\n\n", 100, "text/event-stream");
        assert!(start.elapsed() >= Duration::from_millis(3));
    }

    #[test]
    fn skips_and_repeats_are_counted() {
        let mut s = TestOrderStream::default();
        for seq in [0, 1, 4, 3, 5] {
            s.see(seq);
        }
        assert_eq!((s.gaps, s.out_of_order, s.events), (2, 1, 5));
    }
}
