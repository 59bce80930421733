//! plugvisor's front: an Envoy `ext_proc` server that answers every message at once and feeds the
//! plugins, each its own process on its own Unix socket, through bounded queues; the end of a
//! response is a final RPC whose merged metadata goes back to Envoy as `dynamic_metadata`.
//!
//! The crate is these parts, one folder (or file) each, used in this direction only (`observe`
//! uses none of the others; `config` only `observe`; `plugin` and `data_path` never each other's
//! internals; `traces` and `records` are used by `data_path`, never the other way):
//! - [`config`]: the TOML schema, the embedded default, what loading checks, and the one
//!   published configuration ([`config::Published`]) every other part reads;
//! - [`data_path`]: what every request goes through: `ext_proc` (the gRPC service, one task per
//!   stream), `plugin_stream` (a stream's side of one plugin: sequence numbers, binding, replay
//!   journal), `metadata` (merging into `dynamic_metadata`);
//! - [`plugin`]: a plugin's owner side: `owner` (one task per plugin, the only way a reload, a
//!   command or the stop reaches it), `link` (its live and draining connections), `accept` (its
//!   socket and the handshake), `spawn` (starting its process), `supervise` (a spawned plugin's
//!   process part, driving the pure policy in `restart`), `registry` (the owners in config
//!   order, published to the data path as a list of links);
//! - [`shell`]: the service around them: `front` (start-up in named phases, the running front,
//!   its stop), `listeners` (the ext_proc and admin listeners, bound, from systemd or from an
//!   upgrade), `service` and `systemd` (running under systemd), `control` (the control socket
//!   behind `plugvisor status`), `reload` (applying a new configuration), `instance` (one front
//!   per runtime directory), `upgrade` (handing the listeners to a new binary and draining);
//! - [`records`]: usage records, one per request: `record` (the schema), `jsonl` (the JSON
//!   Lines file), `export` and `otlp` (OpenTelemetry logs over HTTP or gRPC), `spool` (the
//!   on-disk spool the export falls back on, shared by the fronts of an upgrade); the data path
//!   submits to it, the shell starts and stops it;
//! - [`traces`]: spans of the front's own work (one per request, one per plugin's final
//!   call): `context` (W3C `traceparent`, ids), `sampler`, `span` (what a traced stream
//!   gathers), the exporter; the data path hands it each traced stream's trace at its end;
//! - [`quiet_socket`]: the Unix stream connections of `plugin` and of the ext_proc listener, in
//!   halves that do not wake the front when the peer reads;
//! - [`otlp`]: the OTLP transports (HTTP/protobuf, gRPC) `records` and `traces` export with;
//! - [`observe`]: `metrics` (Prometheus and the admin server), `logging` (the log and its
//!   rate-limited warnings), `journal` (journald's native protocol), `probe` (liveness probes
//!   for the watchdog).
//!
//! Beside them, [`conformance`] is a tool for plugin authors (`plugvisor conformance`): the
//! front's side of the protocol, played against any plugin program case by case, with the
//! front's own limits.
//!
//! Unsafe code is denied everywhere but in `plugin::spawn`, which sets the parent-death signal
//! between fork and exec, and `shell::systemd`, which takes ownership of inherited and received
//! fds.
#![deny(unsafe_code)]

pub mod config;
pub mod conformance;
pub mod data_path;
pub mod observe;
pub mod otlp;
pub mod plugin;
pub mod quiet_socket;
pub mod records;
pub mod shell;
pub mod traces;

pub use config::Config;
pub use shell::front::{run, start, start_with, Inherited, RunError, Running};
