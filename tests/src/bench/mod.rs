//! The benchmark harness behind `cargo run --release -p tests --bin bench` (see
//! `docs/benchmarks.md`): a stamped SSE upstream and client ([`sse`]), Envoy with or without the
//! ext_proc filter ([`envoy`]), the reference echo ext_proc server ([`echo`]), the streaming
//! comparison through Envoy ([`streaming`]), the IPC limits ([`ipc`]), memory under a frozen
//! plugin ([`memory`]), the data path's seams ([`data_path`]), restart latency ([`restart`]), tracing's cost ([`traces`]), /proc readings ([`procfs`]), statistics
//! ([`stats`]) and the chart ([`plot`]).

pub mod data_path;
pub mod default_config;
pub mod echo;
pub mod envoy;
pub mod ipc;
pub mod journal;
pub mod lifecycle;
pub mod memory;
pub mod peers;
pub mod plot;
pub mod procfs;
pub mod restart;
pub mod sse;
pub mod stats;
pub mod streaming;
pub mod traces;

/// A counter or gauge from a text exposition, 0 while its series is absent: a series of a
/// labelled family appears at its first update, and a benchmark reads counts (drops, restarts,
/// queue peaks) that may never have moved. Tests read [`crate::front::metric`], which panics
/// instead.
pub fn counted(text: &str, series: &str) -> f64 {
    crate::front::try_metric(text, series).unwrap_or(0.0)
}
