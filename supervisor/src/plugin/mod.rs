//! A plugin's owner side: its connections and its process.
//!
//! [`link`] holds the plugin's live and draining connections (queue, flow-control window,
//! replays, writer and reader); [`accept`] binds its socket and runs the handshake; [`spawn`]
//! starts its process (the crate's process-control `unsafe`, between fork and exec);
//! [`supervise`] watches and restarts it, driving the pure policy in [`restart`]. How these keep
//! the streams whole through restarts, reloads, hangs and crashes: docs/lifecycle.md.

pub mod accept;
pub mod link;
pub mod restart;
pub mod spawn;
pub mod supervise;
