//! The built-in plugins of `plugvisor-plugin`, and the binary's `main` that picks one by name.
//!
//! `usage`, `latency` and `metrics` serve production; `test-order`, `test-spin`, `test-crash` and
//! `test-hang` are test plugins for the test suite, benchmarks and fault drills, named as such.

pub mod latency;
mod marker;
pub mod metrics;
pub mod test_crash;
pub mod test_hang;
pub mod test_order;
pub mod test_spin;
#[cfg(test)]
pub(crate) mod testing;
pub mod usage;

use crate::cli::Args;
use crate::host::Exit;

/// Every built-in plugin: name and one line of description.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "usage",
        "token usage of OpenAI-compatible responses, plus CEL-computed attributes",
    ),
    (
        "latency",
        "TTFT, TPOT, chunk/event counts and duration from the front's stamps",
    ),
    (
        "metrics",
        "Prometheus histograms and counters on a loopback /metrics address",
    ),
    (
        "test-order",
        "test plugin: checks sequence order, digests the body (sha256); sleep_ms per chunk",
    ),
    (
        "test-spin",
        "test plugin: burns spin_us of CPU per event (benchmarks)",
    ),
    (
        "test-crash",
        "test plugin: crashes after N events or on a marker (fault drills)",
    ),
    (
        "test-hang",
        "test plugin: stops answering on a marker (fault drills)",
    ),
];

fn names() -> String {
    BUILTINS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `main` of `plugvisor-plugin`: `plugvisor-plugin <plugin-name> --connect <socket path>`.
pub fn main() -> ! {
    let args = Args::parse_or_exit();
    if args.list {
        for (name, what) in BUILTINS {
            println!("{name:<12} {what}");
        }
        std::process::exit(0);
    }
    let Some(name) = args.plugin.clone() else {
        eprintln!(
            "error: name the plugin to run; built-in plugins: {}",
            names()
        );
        std::process::exit(Exit::Usage.code());
    };
    match name.as_str() {
        "usage" => crate::launch(usage::UsagePlugin::default(), &args, &name),
        "latency" => crate::launch(latency::LatencyPlugin, &args, &name),
        "metrics" => crate::launch(metrics::MetricsPlugin::default(), &args, &name),
        "test-order" => crate::launch(test_order::TestOrderPlugin::default(), &args, &name),
        "test-spin" => crate::launch(test_spin::TestSpinPlugin::default(), &args, &name),
        "test-crash" => crate::launch(test_crash::TestCrashPlugin::default(), &args, &name),
        "test-hang" => crate::launch(test_hang::TestHangPlugin::default(), &args, &name),
        _ => {
            eprintln!(
                "error: unknown plugin `{name}`; built-in plugins: {} (see --list)",
                names()
            );
            std::process::exit(Exit::Usage.code());
        }
    }
}
