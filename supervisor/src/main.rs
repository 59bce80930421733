//! The `plugvisor` binary: parse arguments, install tracing, load the config, run the front.
#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use supervisor::observe::logging::error_chain;
use supervisor::plugin::spawn;
use supervisor::shell::upgrade;
use supervisor::Config;

/// jemalloc, not glibc's malloc: after a burst of streams ends, glibc kept the memory (10 000
/// idle streams took the front from 24 MiB to 157 MiB, and it stayed there), while jemalloc's
/// background threads return it to the system once it has been unused for its decay time.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Envoy ext_proc front that feeds plugin processes without making the stream wait.
#[derive(Parser)]
#[command(
    name = "plugvisor",
    version,
    after_help = "Without a command, plugvisor serves: the ext_proc front on `listen` and its \
                  plugins, from --config or the embedded default (`plugvisor default-config`). \
                  SIGTERM/SIGINT drain and stop, SIGHUP reloads the config, SIGUSR2 upgrades \
                  (as `plugvisor upgrade`). PLUGVISOR_LISTEN and PLUGVISOR_ADMIN_LISTEN (`off` \
                  to disable) override the config's `listen` and `admin_listen`, e.g. to run a \
                  second front beside one on the default ports. The control \
                  commands talk to a running plugvisor through <runtime_dir>/control.sock. \
                  Exit codes (sysexits): 0 ok, 1 failure, 2 bad usage, 66 config file unreadable, 78 bad configuration."
)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded default is used.
    #[arg(long, short, env = "PLUGVISOR_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log to journald (`auto`: when JOURNAL_STREAM is set), else to stderr as text or JSON.
    #[arg(
        long,
        value_enum,
        env = "PLUGVISOR_LOG_FORMAT",
        default_value = "auto",
        global = true
    )]
    log_format: supervisor::observe::logging::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit (0: valid, 78: invalid, 66: unreadable).
    ///
    /// Everything that can be known before starting is checked: each key, built-in plugins'
    /// configs, commands, users and groups. What is valid but likely wrong (a config the built-in
    /// of a `spawn = false` plugin's name would refuse, an `OTEL_*` variable that is ignored) is
    /// printed as a warning, with exit 0.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Print the runtime directory (control and plugin sockets) of --config or the default.
    ///
    /// `runtime_dir` if set, else `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR/plugvisor`,
    /// `/run/plugvisor` for root, else `/tmp/plugvisor-<uid>`: e.g.
    /// `"$(plugvisor runtime-dir)/plugins/usage.sock"`.
    RuntimeDir,
    /// Show each plugin's state, pid, uptime, restarts, last exit, queue depth and drops.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Start a stopped or failed plugin.
    Start {
        /// The plugin's name in the config.
        plugin: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Stop a plugin and keep it stopped; its socket stays and accepts a hand-started instance.
    Stop {
        /// The plugin's name in the config.
        plugin: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Restart a plugin (stop its process gracefully, start a new one); revives a failed one.
    Restart {
        /// The plugin's name in the config.
        plugin: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Reload the running front's config file (as SIGHUP) and say what it applied.
    ///
    /// Every changed key either applies now (to new streams, or at once) or is named with what
    /// applies it (a restart, or `plugvisor upgrade`). Exits 0 when the file was applied whole;
    /// 1 when it was refused (the running configuration stays) or a plugin could not be started.
    Reload {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Upgrade the running front to the binary now on disk, without breaking a stream.
    ///
    /// The running front starts the new binary with its own arguments and passes it the
    /// ext_proc and admin listeners; once the new front's plugins are up it serves new requests,
    /// and the old front finishes its streams (up to upgrade_drain_ms) and exits. Exits 0 once
    /// the new front serves; 1 if it failed (it is then killed and the old front serves on).
    Upgrade {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Check that a plugin program keeps the plugin protocol, case by case.
    ///
    /// Plays the front's side of docs/protocol.md against CMD, started afresh for each case with
    /// `{socket}` in ARGS replaced by a socket the kit listens on and PLUGVISOR_CONNECT set to it.
    /// Prints one line per case, `PASS <case>` or `FAIL <case>: <why>`, and exits 0 only when
    /// every case passes (1 otherwise). Example:
    /// `plugvisor conformance --name wordcount -- python3 wordcount.py --connect {socket}`.
    Conformance {
        /// The name the plugin announces in its Hello (the name it is configured under).
        #[arg(long, default_value = "conformance")]
        name: String,
        /// Also run the SDK cases (ordering, parallel streams, gaps, partial, replays, a hook
        /// that throws, aborted finals, trace) against an SDK's conformance plugin; on by default
        /// for the name `conformance`.
        #[arg(long)]
        sdk: Option<bool>,
        /// A namespace the plugin may write besides plugvisor.<name> (as plugins.<name>.namespaces
        /// grants it); repeat for more.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// How long a final reply, a Pong or an exit asked for may take, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        deadline_ms: u64,
        /// Print the results as one JSON array instead of lines.
        #[arg(long)]
        json: bool,
        /// The plugin's program and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
}

/// Where the running front's control socket is.
#[derive(clap::Args)]
struct ControlArg {
    /// The control socket (default: `control.sock` in the runtime directory of --config, or of
    /// the embedded default).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

impl ControlArg {
    fn socket(&self, config: Option<&PathBuf>) -> Result<PathBuf, supervisor::config::ConfigError> {
        if let Some(path) = &self.control {
            return Ok(path.clone());
        }
        let config = match config {
            Some(path) => Config::load(path),
            None => Config::default_config(),
        };
        config.map(|c| c.control_socket())
    }
}

/// Sends one request to the running front and prints its answer.
fn control(
    control: &ControlArg,
    config: Option<&PathBuf>,
    request: supervisor::shell::control::Request,
    json: bool,
) -> ExitCode {
    let socket = match control.socket(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("plugvisor: {}", error_chain(&e));
            return config_exit(&e);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("plugvisor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervisor::shell::control::request(&socket, &request)) {
        Err(e) => {
            eprintln!("plugvisor: {}", error_chain(&e));
            ExitCode::FAILURE
        }
        Ok(answer) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&answer).unwrap_or_default()
            );
            if answer.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(answer) if !answer.ok => {
            eprintln!("plugvisor: {}", answer.error.unwrap_or_default());
            ExitCode::FAILURE
        }
        Ok(answer) => {
            if let Some(plugins) = &answer.plugins {
                print!("{}", supervisor::shell::control::render_status(plugins));
            }
            if let Some(records) = &answer.records {
                println!("{}", records.line());
            }
            if let Some(traces) = &answer.traces {
                println!("{}", traces.line());
            }
            if let Some(message) = &answer.message {
                println!("{message}");
            }
            ExitCode::SUCCESS
        }
    }
}

/// Runs the conformance kit and prints its cases; 0 only when all pass.
fn conformance(opts: supervisor::conformance::Options, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("plugvisor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes = runtime.block_on(supervisor::conformance::run(&opts, |outcome| {
        if !json {
            println!("{outcome}");
        }
    }));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcomes).unwrap_or_default()
        );
    }
    if outcomes.iter().all(|o| o.pass) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// sysexits' EX_CONFIG: a configuration that does not load.
const EXIT_CONFIG: u8 = 78;
/// sysexits' EX_NOINPUT: the configuration file cannot be read.
const EXIT_NOINPUT: u8 = 66;

/// The exit status for a configuration that does not load: EX_NOINPUT when the file cannot be
/// read, EX_CONFIG when it is not valid.
fn config_exit(e: &supervisor::config::ConfigError) -> ExitCode {
    match e {
        supervisor::config::ConfigError::Read { .. } => ExitCode::from(EXIT_NOINPUT),
        _ => ExitCode::from(EXIT_CONFIG),
    }
}

fn main() -> ExitCode {
    // Purge unused pages from background threads, so memory goes back while the front is idle
    // too (without them jemalloc purges only when it allocates again).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("plugvisor: cannot start jemalloc's background purging: {e}");
    }
    // `plugvisor plugin <name> --connect <socket> ...` hosts a built-in plugin: the front spawns
    // itself this way when a plugin has no `command`. Taken before clap sees the front's own
    // options, so the plugin's command line is exactly that of `plugvisor-plugin`.
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(spawn::PLUGIN_SUBCOMMAND)) {
        plugvisor_builtins::host_main(
            std::iter::once(OsString::from("plugvisor plugin")).chain(std::env::args_os().skip(2)),
        );
    }
    // An upgrade runs this executable twice: once to start the new front and say its pid, then
    // the new front itself, which finds the old one's handover socket in its environment. Both
    // are read before any thread exists, so the variables can be removed safely.
    if std::env::var_os(upgrade::LAUNCH_ENV).is_some() {
        upgrade::launch_main();
    }
    let handover = std::env::var_os(upgrade::SOCKET_ENV).map(PathBuf::from);
    std::env::remove_var(upgrade::SOCKET_ENV);
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => {
            return match Config::load(&file) {
                Ok(c) => {
                    println!(
                        "{}: ok ({} plugin{}: {})",
                        file.display(),
                        c.plugins.len(),
                        if c.plugins.len() == 1 { "" } else { "s" },
                        c.plugins
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    for warning in &c.warnings {
                        eprintln!("plugvisor: warning: {warning}");
                    }
                    if let Some(traces) = &c.traces {
                        if let Some(var) = traces.off {
                            println!("traces: off ({var} in the environment; [traces] ignored)");
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("plugvisor: {}", error_chain(&e));
                    config_exit(&e)
                }
            };
        }
        Some(Command::Conformance {
            name,
            sdk,
            namespaces,
            deadline_ms,
            json,
            command,
        }) => {
            return conformance(
                supervisor::conformance::Options {
                    sdk: sdk.unwrap_or(name == "conformance"),
                    name,
                    command,
                    namespaces,
                    deadline: std::time::Duration::from_millis(deadline_ms),
                },
                json,
            );
        }
        Some(Command::DefaultConfig) => {
            print!("{}", supervisor::config::DEFAULT_CONFIG);
            return ExitCode::SUCCESS;
        }
        Some(Command::RuntimeDir) => {
            let config = match &cli.config {
                Some(path) => Config::load(path),
                None => Config::default_config(),
            };
            return match config {
                Ok(c) => {
                    println!("{}", c.runtime_dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("plugvisor: {}", error_chain(&e));
                    config_exit(&e)
                }
            };
        }
        Some(Command::Status { json, control: c }) => {
            return control(
                &c,
                cli.config.as_ref(),
                supervisor::shell::control::Request::Status,
                json,
            );
        }
        Some(Command::Start { plugin, control: c }) => {
            return control(
                &c,
                cli.config.as_ref(),
                supervisor::shell::control::Request::Start { plugin },
                false,
            );
        }
        Some(Command::Stop { plugin, control: c }) => {
            return control(
                &c,
                cli.config.as_ref(),
                supervisor::shell::control::Request::Stop { plugin },
                false,
            );
        }
        Some(Command::Restart { plugin, control: c }) => {
            return control(
                &c,
                cli.config.as_ref(),
                supervisor::shell::control::Request::Restart { plugin },
                false,
            );
        }
        Some(Command::Reload { control: c }) => {
            return control(
                &c,
                cli.config.as_ref(),
                supervisor::shell::control::Request::Reload,
                false,
            );
        }
        Some(Command::Upgrade { control: c }) => {
            return control(
                &c,
                cli.config.as_ref(),
                supervisor::shell::control::Request::Upgrade,
                false,
            );
        }
        None => {}
    }
    supervisor::observe::logging::init(cli.log_format);
    // Before the config: a broken config is one of the crash loops this stops.
    if let Some(failures) = supervisor::shell::crash_loop::tripped() {
        return match supervisor::shell::crash_loop::hold(failures, cli.config.as_deref()) {
            Ok(supervisor::shell::crash_loop::Held::Stopped) => ExitCode::SUCCESS,
            // EX_TEMPFAIL: a failure, so `Restart=on-failure` starts a fresh front.
            Ok(supervisor::shell::crash_loop::Held::Fixed) => ExitCode::from(75),
            Err(e) => {
                tracing::error!("cannot hold the listener: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match &cli.config {
        Some(path) => Config::load(path),
        None => Config::default_config(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plugvisor: {}", error_chain(&e));
            return config_exit(&e);
        }
    };
    // Said once here rather than with every restart of the plugin it will cost.
    for problem in config.plugins.iter().filter_map(spawn::command_problem) {
        tracing::error!("{problem}");
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("plugvisor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervisor::shell::service::run_with(
        config,
        cli.config.clone(),
        shutdown_signal(),
        handover,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    // SIGHUP (reload) is handled by supervisor::shell::service::run.
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
}
