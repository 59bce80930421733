//! The command line shared by `plugvisor-plugin` and every binary built on [`crate::run`]:
//! `<binary> [<plugin-name>] --connect <socket path> [tuning flags]`, parsed with `clap`.
//! Bad usage prints one clear message and exits 64 (`EX_USAGE`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use clap::Parser;

use crate::host::{Exit, HostOptions};

/// The environment variable that names the front's socket when `--connect` is not given; the
/// front sets it for every plugin it spawns.
pub const CONNECT_ENV: &str = "PLUGVISOR_CONNECT";

/// Command-line arguments of a plugin process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "plugvisor-plugin",
    version,
    about = "Runs one plugvisor plugin, fed by the front over a Unix socket.",
    after_help = "Exit codes: 0 clean exit (Shutdown or the front closed the socket), \
                  78 refused by the front or invalid config, 64 bad usage, 1 other errors."
)]
pub struct Args {
    /// The plugin to run (its name in the front's config).
    pub plugin: Option<String>,

    /// The front's socket for this plugin (e.g. /run/plugvisor/plugins/usage.sock).
    #[arg(long, value_name = "PATH", env = CONNECT_ENV)]
    pub connect: Option<PathBuf>,

    /// Log to journald (`auto`: when JOURNAL_STREAM is set, as under a front run by systemd),
    /// else to stderr as text or JSON.
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "PLUGVISOR_LOG_FORMAT",
        default_value = "auto"
    )]
    pub log_format: crate::logging::LogFormat,

    /// Run under this configured name instead of the plugin's own: the `Hello` carries it, and
    /// the plugin's namespace `plugvisor.<plugin>` is reported as `plugvisor.<NAME>`. Lets one
    /// built-in serve several configured plugins (`test-spin --as spin1`, `--as spin2`, ...).
    #[arg(long = "as", value_name = "NAME")]
    pub as_name: Option<String>,

    /// List the plugins this binary can run, one line each, and exit.
    #[arg(long)]
    pub list: bool,

    /// Worker threads running hooks (default: number of CPUs).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Drop the state of a stream that saw no event for this long and never got Final/Abort
    /// (e.g. `300s`, `5m`, `1500ms`).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Report a lane as stuck in Pong once one event has run for this long.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub stuck_after: Duration,

    /// Most events queued per stream; further droppable events are dropped (and show as gaps).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub lane_queue_events: usize,

    /// Most body bytes queued per stream.
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024 * 1024)]
    pub lane_queue_bytes: usize,

    /// On SIGTERM or SIGINT, let queued events finish for this long, then exit 0.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub term_grace: Duration,

    /// Keep retrying for this long while the front's socket is missing or refuses connections,
    /// e.g. a plugin unit started before plugvisor (`0s`: fail at once).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub connect_wait: Duration,
}

/// Parses `250ms`, `30s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 250ms, 30s, 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    }
}

/// A command line that replaces the process's own, set once by [`crate::host_main`].
static COMMAND_LINE: OnceLock<Vec<OsString>> = OnceLock::new();

/// Makes [`Args::parse_or_exit`] parse `argv` (program name first) instead of the process's
/// arguments. The `plugvisor` front hosts the built-in plugins itself (`plugvisor plugin <name>
/// --connect ...`): it hands over its command line without the `plugin` word. The first call wins.
pub(crate) fn set_command_line(argv: Vec<OsString>) {
    let _ = COMMAND_LINE.set(argv);
}

impl Args {
    /// Parses the process's arguments (or those given to [`crate::host_main`]); `--help`/`--version`
    /// print and exit 0, errors print and exit 64.
    pub fn parse_or_exit() -> Args {
        let parsed = match COMMAND_LINE.get() {
            Some(argv) => Args::try_parse_from(argv),
            None => Args::try_parse(),
        };
        match parsed {
            Ok(args) => args,
            Err(e) => {
                let code = if e.use_stderr() {
                    Exit::Usage
                } else {
                    Exit::Clean
                };
                let _ = e.print();
                std::process::exit(code.code())
            }
        }
    }

    /// The host options for running `plugin` (under its `--as` name, if given), or a usage
    /// message if `--connect` is missing or the `--as` name is not a plugin name.
    pub fn host_options(&self, plugin: &str) -> Result<HostOptions, String> {
        let configured = self.as_name.as_deref().unwrap_or(plugin);
        if configured.is_empty()
            || !configured
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "--as `{configured}`: a plugin name uses letters, digits, `-` and `_`"
            ));
        }
        let connect = self.connect.clone().ok_or_else(|| {
            format!(
                "missing --connect <socket path> (the front's socket for plugin `{configured}`)"
            )
        })?;
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        Ok(HostOptions {
            plugin: configured.to_owned(),
            runs: (configured != plugin).then(|| plugin.to_owned()),
            connect,
            workers,
            idle_timeout: self.idle_timeout,
            stuck_after: self.stuck_after,
            lane_queue_events: self.lane_queue_events.max(1),
            lane_queue_bytes: self.lane_queue_bytes,
            term_grace: self.term_grace,
            connect_wait: self.connect_wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn the_front_s_command_line_parses() {
        let args = Args::try_parse_from([
            "plugvisor-plugin",
            "usage",
            "--connect",
            "/run/p/usage.sock",
        ])
        .unwrap();
        let opts = args.host_options("usage").unwrap();
        assert_eq!(opts.connect, PathBuf::from("/run/p/usage.sock"));
        assert!(opts.workers >= 1);
        let args = Args::try_parse_from(["plugvisor-plugin", "usage"]).unwrap();
        assert!(args
            .host_options("usage")
            .unwrap_err()
            .contains("--connect"));
    }

    #[test]
    fn as_names_the_configured_plugin_and_keeps_the_built_in() {
        let parse = |name: &str| {
            Args::try_parse_from([
                "plugvisor-plugin",
                "test-spin",
                "--as",
                name,
                "--connect",
                "/run/p/spin1.sock",
            ])
            .unwrap()
            .host_options("test-spin")
        };
        let opts = parse("spin1").unwrap();
        assert_eq!(opts.plugin, "spin1");
        assert_eq!(opts.runs.as_deref(), Some("test-spin"));
        // Its own name renames nothing; a name that is not a plugin name is bad usage.
        assert_eq!(parse("test-spin").unwrap().runs, None);
        assert!(parse("../x").unwrap_err().contains("--as"));
    }
}
