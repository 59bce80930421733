//! The ext_proc data path: what every HTTP request through Envoy goes through.
//!
//! [`ext_proc`] is the gRPC service (one task per stream, the echo, the final RPC);
//! [`plugin_stream`] is a stream's side of one plugin (its sequence numbers, the connection it is
//! bound to, its replay journal); [`metadata`] turns the plugins' answers into Envoy's
//! `dynamic_metadata`, within Envoy's limits and the configured caps.

pub mod ext_proc;
pub mod metadata;
pub mod plugin_stream;
