//! Logging: `tracing` records on stderr, human-readable, each line starting with the plugin name
//! and pid so that a supervisor merging several plugins' stderr (or a developer running one by
//! hand) always knows who spoke. Panics anywhere in the process become error records too.

use std::fmt;
use std::sync::OnceLock;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

static WHO: OnceLock<String> = OnceLock::new();

/// Prefixes every record with `plugin=<name> pid=<pid>` and then formats it as usual.
struct Tagged(Format);

impl<S, N> FormatEvent<S, N> for Tagged
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some(who) = WHO.get() {
            write!(writer, "{who} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the stderr subscriber (filter from `RUST_LOG`, default `info`) and a panic hook that
/// logs. Safe to call more than once: later calls only update the plugin name if unset.
pub fn init(plugin: &str) {
    let _ = WHO.set(format!("plugin={plugin} pid={}", std::process::id()));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(Tagged(Format::default().with_thread_names(true)))
        .try_init()
        .is_ok();
    if installed {
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = crate::lanes::panic_message(info.payload());
            let thread = std::thread::current();
            tracing::error!(
                thread = thread.name().unwrap_or("?"),
                %location,
                panic = %msg,
                "panic"
            );
        }));
    }
}
