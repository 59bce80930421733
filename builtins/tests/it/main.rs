//! The built-in plugins and the `plugvisor-plugin` binary from the outside, one module per
//! behaviour, linked into one test binary (`it`). `harness` is the SDK's fake front (shared with
//! `plugin-runner`'s own tests, hence the path); `usage_play` plays recorded bodies through the
//! `usage` plugin; the recorded bodies stay in `tests/fixtures/`. Run one module with
//! `cargo test -p plugvisor-builtins --test it host::`.

#[path = "../../../plugin-runner/tests/it/harness/mod.rs"]
mod harness;
mod usage_play;

mod as_name;
mod host;
mod usage_bedrock_fixtures;
mod usage_compressed;
mod usage_golden;
