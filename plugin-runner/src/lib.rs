//! The plugvisor plugin SDK.
//!
//! A plugin is a process that the plugvisor front feeds over one Unix socket: request starts,
//! response headers, body chunks, and a synchronous `Final` call whose answer (the plugin's
//! [`Metadata`]) ends up in Envoy's `dynamic_metadata`. This crate does everything but the
//! plugin's own logic: the handshake, per-stream *lanes* that run each stream's events strictly
//! in sequence order while different streams run in parallel on a bounded worker pool, gap and
//! partial-stream detection, panic isolation per stream, idle eviction, heartbeats, graceful
//! shutdown and logging. You implement [`Plugin`] and call [`run`] as your whole `main`.
//!
//! ```no_run
//! use plugin_runner::{EventCtx, Plugin, RequestStart, Chunk, Final, Metadata, Value};
//!
//! /// Counts the response bytes of each request.
//! #[derive(Clone)]
//! struct ByteCounter;
//!
//! #[derive(Default)]
//! struct Stream { started_ns: u64, bytes: u64 }
//!
//! impl Plugin for ByteCounter {
//!     type Stream = Stream;
//!     fn name(&self) -> &str { "byte-counter" }
//!     fn on_request_start(&self, s: &mut Stream, ctx: &EventCtx, _: &RequestStart) {
//!         s.started_ns = ctx.stamp_ns;
//!     }
//!     fn on_chunk(&self, s: &mut Stream, _: &EventCtx, chunk: &Chunk) {
//!         s.bytes += u64::from(chunk.len);
//!     }
//!     fn on_final(&self, s: &mut Stream, ctx: &EventCtx, last: &Final) -> Metadata {
//!         let bytes = s.bytes + u64::from(last.len);
//!         let ms = ctx.stamp_ns.saturating_sub(s.started_ns) as f64 / 1e6;
//!         let map = Value::map([("bytes", Value::from(bytes)), ("duration_ms", Value::from(ms))]);
//!         Metadata::from([("plugvisor.byte-counter".to_string(), map)])
//!     }
//! }
//!
//! fn main() { plugin_runner::run(ByteCounter) }
//! ```
//!
//! Run it as `byte-counter --connect /run/plugvisor/plugins/byte-counter.sock`, or let the
//! supervisor spawn it. `docs/plugins.md` describes the built-in plugins, their config and
//! metadata, and how the host behaves.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
mod credit;
pub mod host;
mod lanes;
pub mod logging;
mod plugin;
pub mod proctitle;
mod sequence;
pub mod sse;
pub mod testing;
pub mod trace;

/// The `bytes` crate, whose `Bytes` carries chunk bodies.
pub use bytes;
pub use config::{ConfigError, ConfigMap};
pub use host::{serve, Exit, HostOptions};
/// The wire protocol crate, re-exported so a plugin needs no second dependency.
pub use ipc_protocol as protocol;
pub use ipc_protocol::{
    Abort, AbortCause, AbortedFinal, Chunk, Final, Metadata, RequestStart, ResponseHeaders,
    StreamId, Subscriptions, Value,
};
pub use plugin::{EventCtx, Plugin};

/// The whole `main` of a plugin binary: parses the command line
/// (`[<name>] --connect <socket>`, see [`cli::Args`]), sets up logging and the process name,
/// serves the front until it shuts the plugin down or goes away, and exits with the status of
/// [`Exit`]. The name defaults to [`Plugin::name`].
///
/// `plugin` is a template: each connection to the front gets its own `plugin.clone()`,
/// configured from that connection's `Welcome` (one at start, one more after each `Reconnect`;
/// see [`serve`]). Derive `Clone` on an unconfigured plugin; state meant to outlive one
/// connection (a metrics registry, a port) goes behind an `Arc` that the clones share.
pub fn run<P: Plugin + Clone>(plugin: P) -> ! {
    let args = cli::Args::parse_or_exit();
    let name = args
        .plugin
        .clone()
        .unwrap_or_else(|| plugin.name().to_owned());
    if args.list {
        println!("{name}\tthis binary's plugin");
        std::process::exit(0);
    }
    launch(plugin, &args, &name)
}

/// Runs `plugin` under the name `name` with the options in already parsed `args`, then exits
/// the process: what [`run`] does after parsing. For a binary that hosts several plugins and picks
/// one by name (as `plugvisor-plugin` does with the built-ins, see `plugvisor-builtins`).
pub fn launch<P: Plugin + Clone>(plugin: P, args: &cli::Args, name: &str) -> ! {
    let opts = match args.host_options(name) {
        Ok(opts) => opts,
        Err(msg) => {
            eprintln!("error: {msg}");
            std::process::exit(Exit::Usage.code());
        }
    };
    // The configured name (`--as`), which is what the front and the operator know it by.
    logging::init_with(&opts.plugin, args.log_format);
    proctitle::set(&opts.plugin);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            std::process::exit(Exit::Failed.code());
        }
    };
    let exit = runtime.block_on(serve(plugin, opts));
    // Lane threads may still be inside a hook (a hung plugin): exiting the process ends them.
    std::process::exit(exit.code())
}
