//! The `plugvisor` binary: parse arguments, install tracing, load the config, run the front.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use supervisor::Config;

/// Envoy ext_proc front that feeds plugin processes without making the stream wait.
#[derive(Parser)]
#[command(name = "plugvisor", version)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded default is used.
    #[arg(long, short, env = "PLUGVISOR_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit (0: valid, 64: invalid).
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
}

/// EX_USAGE / EX_CONFIG family: a bad configuration.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
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
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("plugvisor: {}", error_chain(&e));
                    ExitCode::from(EXIT_CONFIG)
                }
            };
        }
        Some(Command::DefaultConfig) => {
            print!("{}", supervisor::config::DEFAULT_CONFIG);
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLUGVISOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match &cli.config {
        Some(path) => Config::load(path),
        None => Config::default_config(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plugvisor: {}", error_chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("plugvisor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervisor::run(config, shutdown_signal())) {
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
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::warn!("SIGHUP: configuration reload is not supported yet; restart plugvisor to apply a new config");
            }
        }
    }
    tracing::info!("stopping");
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
