//! Measurement 9: what usage records and tracing cost. Three fronts with the embedded default
//! config on a Unix socket, each behind its own Envoy, side by side in interleaved rounds: one
//! with its usage records off (`[records] path = ""`) and no tracing, one as the default
//! (records to their JSONL file, no `[traces]`), one with `[traces]` also sending every
//! request's spans (the default sampler, `parentbased_always_on`: the streams carry no
//! `traceparent`, so each is a new, sampled trace) over OTLP/HTTP to a real receiver on the
//! host ([`crate::otlp::Collector`]). Per-chunk and end-of-response latency, and the front's CPU
//! per chunk, are compared; the spans the traced front exported and dropped are read from its
//! `/metrics`, so a run that traced nothing shows.

use std::path::Path;
use std::time::Duration;

use super::sse::{Ask, Ends};
use super::streaming::{self, Acc, Phase, Target};
use crate::envoy::http_get;
use crate::otlp::{Collector, Protocol};

/// `text` (a config) with a `[traces]` table sending to `collector`; checked by parsing it.
pub fn traces_on(collector: &Collector, text: &str) -> String {
    let on = format!("{text}\n[traces]\n{}", collector.traces_config());
    let parsed = supervisor::Config::parse(&on, "bench").expect("the edited default parses");
    assert!(
        parsed.traces.is_some_and(|t| t.off.is_none()),
        "[traces] did not turn tracing on (is OTEL_SDK_DISABLED or OTEL_TRACES_EXPORTER set?)"
    );
    on
}

/// `text` (a config) with its usage records off (`[records] path = ""`, no OTLP logs); checked by
/// parsing it.
pub fn records_off(text: &str) -> String {
    assert!(
        text.contains("\n[records]\n"),
        "the default config has no [records] table"
    );
    let off = text.replacen("\n[records]\n", "\n[records]\npath = \"\"\n", 1);
    let parsed = supervisor::Config::parse(&off, "bench").expect("the edited default parses");
    assert!(
        parsed.records.path.is_none() && parsed.records.otlp.is_none(),
        "records still go somewhere (is OTEL_EXPORTER_OTLP_ENDPOINT set?)"
    );
    off
}

/// One load shape's figures: records and tracing off, records on and tracing off, both on.
#[derive(Debug, Clone)]
pub struct TracesPhase {
    /// The load.
    pub phase: Phase,
    /// Records and tracing off; records on, tracing off; both on.
    pub accs: Vec<Acc>,
}

/// What measurement 9 found.
#[derive(Debug, Clone)]
pub struct TracesCost {
    /// Each load shape, in order.
    pub phases: Vec<TracesPhase>,
    /// Spans the traced front's exporter got the receiver to take.
    pub spans_exported: f64,
    /// Spans it dropped (`plugvisor_spans_dropped_total`, every reason).
    pub spans_dropped: f64,
}

/// Runs measurement 9: `rounds(paced)` interleaved rounds of each load shape.
pub async fn run(dir: &Path, upstream: u16, ends: &Ends, quick: bool) -> TracesCost {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("collector")).expect("dir");
    let collector =
        tokio::task::block_in_place(|| Collector::start(&dir.join("collector"), Protocol::Http));
    let on = |_: &[String], text: &str| traces_on(&collector, text);
    let targets: Vec<Target> = tokio::task::block_in_place(|| {
        vec![
            streaming::default_target_with(
                dir,
                "records-off",
                "default config, usage records off, tracing off",
                true,
                upstream,
                |_, text| records_off(text),
            ),
            streaming::default_target(
                dir,
                "traces-off",
                "default config, tracing off",
                true,
                upstream,
            ),
            streaming::default_target_with(
                dir,
                "traces-on",
                "default config, every request traced, OTLP/HTTP to a receiver on the host",
                true,
                upstream,
                on,
            ),
        ]
    });
    streaming::warm_up(&targets, ends).await;
    let paced = Ask {
        events: 200,
        size: 64,
        delay: Duration::from_millis(10),
    };
    let shapes = [
        Phase {
            name: "paced (200 events × 10 ms), concurrency 1",
            ask: paced,
            concurrency: 1,
            rounds: if quick { 2 } else { 8 },
        },
        Phase {
            name: "paced (200 events × 10 ms), concurrency 32",
            ask: paced,
            concurrency: 32,
            rounds: if quick { 2 } else { 6 },
        },
        Phase {
            name: "unpaced (1000 events), concurrency 8",
            ask: Ask {
                events: 1000,
                size: 64,
                delay: Duration::ZERO,
            },
            concurrency: 8,
            rounds: if quick { 1 } else { 3 },
        },
    ];
    let mut phases = Vec::new();
    for phase in shapes {
        eprintln!("bench: 9. {}", phase.name);
        let accs = streaming::run_phase(&targets, phase, ends).await;
        phases.push(TracesPhase { phase, accs });
    }
    // The last batch leaves within the exporter's 500 ms.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = targets[2]
        .admin_port
        .and_then(|p| http_get(p, "/metrics").ok())
        .unwrap_or_default();
    let spans_exported = super::counted(&text, "plugvisor_spans_exported_total");
    let spans_dropped: f64 = ["queue_full", "export_failed", "rejected", "stopped"]
        .iter()
        .map(|r| {
            super::counted(
                &text,
                &format!("plugvisor_spans_dropped_total{{reason=\"{r}\"}}"),
            )
        })
        .sum();
    drop(targets);
    drop(collector);
    TracesCost {
        phases,
        spans_exported,
        spans_dropped,
    }
}
