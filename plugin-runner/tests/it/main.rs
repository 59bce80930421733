//! The plugin SDK's host from the outside, one module per behaviour, linked into one test binary
//! (`it`) so tokio and the host are linked once, not once per file. `harness` is the fake front
//! (also used by `plugvisor-builtins`' tests, which run the built-ins through the real
//! `plugvisor-plugin` binary). Run one module with `cargo test -p plugin-runner --test it replay::`.

mod harness;

mod closing;
mod lean;
mod reconnect;
mod replay;
mod trace;
mod worker_panics;
