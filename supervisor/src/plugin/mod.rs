//! A plugin's owner side: one task per plugin that holds its socket, connections, config and
//! process.
//!
//! [`owner`] is that task and its handle, the one place a reload, a control command or the
//! front's stop reaches a plugin through; [`registry`] holds the owners in config order, and the
//! plugins that could not be started, which it retries; [`link`] holds the plugin's live and draining
//! connections (queue, flow-control window, replays, writer and reader) that the data path
//! sends through; [`accept`] binds its socket and runs the handshake; [`spawn`] starts its
//! process (the crate's process-control `unsafe`, between fork and exec); [`supervise`] is the
//! process part of a spawned plugin, driving the pure policy in [`restart`]. How these keep the
//! streams whole through restarts, reloads, hangs and crashes: docs/lifecycle.md.

pub mod accept;
pub mod link;
pub mod owner;
pub mod registry;
pub mod restart;
pub mod spawn;
pub mod supervise;
