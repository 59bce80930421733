//! plugvisor's integration tests, one module per behaviour, linked into one test binary (`it`):
//! each binary links tokio, tonic, hyper and the whole front, so one binary instead of twenty is
//! most of the suite's build time. Run one module with `cargo test -p tests --test it cli::`.
//!
//! All modules' tests run in parallel in one process (as many at once as there are CPUs): a test
//! must not set process-wide state (environment variables, the working directory) nor bind a
//! fixed port, path or name. The two that serve the embedded default move it off its fixed
//! ports with `PLUGVISOR_LISTEN`/`PLUGVISOR_ADMIN_LISTEN`; containers are named
//! `<prefix>-<pid>-<n>` by `tests::nspawn`.

mod cli;
mod conformance;
mod data_path;
mod down_plugins;
mod front_with_envoy;
mod handshake_limits;
mod healthz;
mod idle_streams;
mod lifecycle;
mod namespaces;
mod one_instance;
mod operations_doc;
mod plugin_log_levels;
mod plugin_output;
mod plugin_shutdown;
mod protocol_versions;
mod python_sdk;
mod readme;
mod real_plugins;
mod reconnect;
mod records;
mod records_drill;
mod reload_failures;
mod reload_policy;
mod supervision;
mod systemd_operations;
mod systemd_service;
mod systemd_units;
mod traces;
mod upgrade;
mod usage_envoy;
mod whole_or_loud;
mod workers;
