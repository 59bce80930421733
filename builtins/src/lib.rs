//! The built-in plugins of plugvisor, the `plugvisor-plugin` binary's `main` that picks one by
//! name, and the parts they share: the LLM provider parsers ([`usage_formats`]) and the
//! `Content-Encoding` decoders ([`decode`]).
//!
//! `usage`, `latency` and `metrics` serve production; `test-order`, `test-spin`, `test-crash` and
//! `test-hang` are test plugins for the test suite, benchmarks and fault drills, named as such.
//!
//! This crate is apart from the SDK (`plugin-runner`) so that a plugin built on the SDK does not
//! build what only these plugins need (CEL, an HTTP server for `/metrics`, Prometheus encoding,
//! gzip/brotli/zstd). The `plugvisor` front depends on it: it hosts the built-ins itself
//! (`plugvisor plugin <name>`, [`host_main`]) and checks their config with their own code
//! ([`validate`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod decode;
pub mod latency;
mod marker;
pub mod metrics;
pub mod test_crash;
pub mod test_hang;
pub mod test_order;
pub mod test_spin;
#[cfg(test)]
pub(crate) mod testing;
pub mod usage;
pub mod usage_formats;

use ipc_protocol::Value;

use plugin_runner::cli::Args;
use plugin_runner::{ConfigError, Exit, Plugin};

/// Every built-in plugin: name and one line of description.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "usage",
        "token usage of OpenAI, Anthropic and Gemini responses; costs and CEL attributes for Envoy",
    ),
    (
        "latency",
        "TTFT (first content-bearing event), TTFB, TPOT and duration from the front's stamps",
    ),
    (
        "metrics",
        "OpenTelemetry GenAI metrics (Prometheus form) on a loopback /metrics address",
    ),
    (
        "test-order",
        "test plugin: checks sequence order, digests the body (sha256); sleep_ms per chunk",
    ),
    (
        "test-spin",
        "test plugin: burns spin_us of CPU per event (benchmarks)",
    ),
    (
        "test-crash",
        "test plugin: crashes after N events or on a marker (fault drills)",
    ),
    (
        "test-hang",
        "test plugin: stops answering on a marker (fault drills)",
    ),
];

fn names() -> String {
    BUILTINS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a built-in plugin's config cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    /// No built-in plugin has this name.
    #[error("no built-in plugin is named `{0}` (built-in plugins: {names})", names = names())]
    UnknownPlugin(String),
    /// The plugin refuses its config; the message names the key inside `config`.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Checks `config` for the built-in plugin `name` with the same code that configures it when it
/// runs (`Plugin::configure` on a fresh plugin; for `metrics`, everything but binding the
/// address), so a config the front accepts is a config the plugin accepts. Logs nothing.
pub fn validate(name: &str, config: &Value) -> Result<(), ValidateError> {
    fn with<P: Plugin>(mut plugin: P, config: &Value) -> Result<(), ConfigError> {
        plugin.configure(config)
    }
    // Warnings of `configure` (e.g. test-hang without a marker) belong to the plugin's own log.
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    match name {
        "usage" => with(usage::UsagePlugin::default(), config)?,
        "latency" => with(latency::LatencyPlugin, config)?,
        "metrics" => metrics::parse_config(config).map(drop)?,
        "test-order" => with(test_order::TestOrderPlugin::default(), config)?,
        "test-spin" => with(test_spin::TestSpinPlugin::default(), config)?,
        "test-crash" => with(test_crash::TestCrashPlugin::default(), config)?,
        "test-hang" => with(test_hang::TestHangPlugin::default(), config)?,
        _ => return Err(ValidateError::UnknownPlugin(name.to_owned())),
    }
    Ok(())
}

/// The namespaces besides `plugvisor.<name>` that the built-in `name` writes with `config`: the
/// `usage` plugin's costs and attributes. The front lets a plugin write only its own namespace
/// and those its configuration grants, so what a built-in's config asks for is granted. Empty
/// for a config the plugin refuses (the front refuses that config anyway).
pub fn granted_namespaces(name: &str, config: &Value) -> Vec<String> {
    if name != "usage" {
        return Vec::new();
    }
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    let mut usage = usage::UsagePlugin::default();
    match usage.configure(config) {
        Ok(()) => usage.namespaces().into_iter().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

/// The whole `main` of the built-in plugin host (`plugvisor-plugin`), with `argv` (program name
/// first) as its command line: `<program> <plugin-name> --connect <socket> [...]`. The `plugvisor`
/// front calls it for `plugvisor plugin ...`, so one binary both serves and hosts the built-ins.
pub fn host_main<I, T>(argv: I) -> !
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    plugin_runner::cli::set_command_line(argv.into_iter().map(Into::into).collect());
    main()
}

/// The `main` of `plugvisor-plugin`: `plugvisor-plugin <plugin-name> --connect <socket path>`.
pub fn main() -> ! {
    let args = Args::parse_or_exit();
    if args.list {
        for (name, what) in BUILTINS {
            println!("{name:<12} {what}");
        }
        std::process::exit(0);
    }
    let Some(name) = args.plugin.clone() else {
        eprintln!(
            "error: name the plugin to run; built-in plugins: {}",
            names()
        );
        std::process::exit(Exit::Usage.code());
    };
    match name.as_str() {
        "usage" => plugin_runner::launch(usage::UsagePlugin::default(), &args, &name),
        "latency" => plugin_runner::launch(latency::LatencyPlugin, &args, &name),
        "metrics" => plugin_runner::launch(metrics::MetricsPlugin::default(), &args, &name),
        "test-order" => plugin_runner::launch(test_order::TestOrderPlugin::default(), &args, &name),
        "test-spin" => plugin_runner::launch(test_spin::TestSpinPlugin::default(), &args, &name),
        "test-crash" => plugin_runner::launch(test_crash::TestCrashPlugin::default(), &args, &name),
        "test-hang" => plugin_runner::launch(test_hang::TestHangPlugin::default(), &args, &name),
        _ => {
            eprintln!(
                "error: unknown plugin `{name}`; built-in plugins: {} (see --list)",
                names()
            );
            std::process::exit(Exit::Usage.code());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_runs_each_builtins_own_config_checks() {
        assert_eq!(validate("usage", &Value::Null), Ok(()));
        assert_eq!(
            validate("usage", &Value::map([("atributes", Value::List(vec![]))]))
                .unwrap_err()
                .to_string(),
            "config: unknown key `atributes` (known keys: format, attributes, costs, estimate_output_tokens)"
        );
        let bad_cel = Value::map([(
            "attributes",
            Value::List(vec![Value::map([
                ("namespace", Value::from("envoy.lb")),
                ("name", Value::from("cost")),
                ("expression", Value::from("usage.prompt_tokens +* 2")),
            ])]),
        )]);
        let e = validate("usage", &bad_cel).unwrap_err().to_string();
        assert!(e.contains("attributes[0].expression: invalid CEL"), "{e}");
        let e = validate("usage", &Value::map([("format", Value::from("cohere"))]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config.format: unknown format `cohere` (formats: auto, openai, openai-responses, anthropic, gemini, bedrock)"
        );
        let e = validate("latency", &Value::map([("x", Value::Int(1))])).unwrap_err();
        assert!(e.to_string().contains("unknown key `x`"), "{e}");
        let e = validate("test-hang", &Value::map([("scope", Value::from("all"))])).unwrap_err();
        assert!(e.to_string().contains("config.scope"), "{e}");
    }

    #[test]
    fn validate_checks_usage_costs_and_the_estimate_switch() {
        let costs = |kind: &str| {
            Value::map([(
                "costs",
                Value::List(vec![Value::map([
                    ("namespace", Value::from("envoy.lb")),
                    ("key", Value::from("tokens")),
                    ("type", Value::from(kind)),
                ])]),
            )])
        };
        assert_eq!(validate("usage", &costs("total")), Ok(()));
        assert_eq!(
            validate("usage", &costs("input_tokens + 4 * output_tokens")),
            Ok(())
        );
        let e = validate("usage", &costs("totl")).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "costs[0].type: CEL expression `totl` uses `totl`, which is not a variable"
            ),
            "{e}"
        );
        let e = validate("usage", &costs("output_tokens *"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("costs[0].type: invalid CEL expression"),
            "{e}"
        );
        let e = validate(
            "usage",
            &Value::map([("costs", Value::map([("namespace", Value::from("x"))]))]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config.costs must be a list of tables"),
            "{e}"
        );
        let e = validate(
            "usage",
            &Value::map([("estimate_output_tokens", Value::Int(1))]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "config.estimate_output_tokens must be true or false, got 1"
        );
        assert_eq!(
            validate(
                "usage",
                &Value::map([("estimate_output_tokens", Value::Bool(true))])
            ),
            Ok(())
        );
    }

    #[test]
    fn validate_checks_the_metrics_address_without_binding_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        assert_eq!(
            validate("metrics", &Value::map([("listen", Value::from(addr))])),
            Ok(())
        );
        let e = validate(
            "metrics",
            &Value::map([("listen", Value::from("localhost"))]),
        );
        assert!(e.unwrap_err().to_string().contains("config.listen"));
    }

    #[test]
    fn validate_checks_max_models_of_metrics_at_and_past_its_bound() {
        let max = metrics::MAX_MAX_MODELS as i64;
        let with = |n: i64| Value::map([("max_models", Value::Int(n))]);
        assert_eq!(validate("metrics", &with(max)), Ok(()));
        let e = validate("metrics", &with(max + 1)).unwrap_err().to_string();
        assert!(
            e.starts_with("config.max_models: 10001 is over 10000"),
            "{e}"
        );
        let e = validate("metrics", &Value::map([("max_models", Value::from("all"))]));
        assert!(e.unwrap_err().to_string().contains("max_models"));
    }

    #[test]
    fn an_unknown_name_lists_the_builtins() {
        let e = validate("usgae", &Value::Null).unwrap_err().to_string();
        assert!(
            e.starts_with("no built-in plugin is named `usgae`") && e.contains("usage, latency"),
            "{e}"
        );
    }
}
