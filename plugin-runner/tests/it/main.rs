//! The plugin SDK and the `plugvisor-plugin` host from the outside, one module per behaviour,
//! linked into one test binary (`it`) so tokio and the host are linked once, not once per file.
//! `harness` is the fake front and `usage_play` plays recorded bodies through the `usage`
//! plugin; the recorded bodies stay in `tests/fixtures/`. Run one module with
//! `cargo test -p plugin-runner --test it host::`.

mod harness;
mod usage_play;

mod as_name;
mod host;
mod replay;
mod usage_compressed;
mod usage_golden;
mod worker_panics;
