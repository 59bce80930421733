//! The `[traces]` table: spans of the front's own work over OTLP ([`crate::traces`]). Off unless
//! an endpoint is configured, in the file or in the environment.
//!
//! The transport's keys follow the rule of `[records.otlp]` ([`super::otlp`]): the file wins,
//! key by key, over `OTEL_EXPORTER_OTLP_TRACES_*`, then `OTEL_EXPORTER_OTLP_*`. `sampler` and
//! `sampler_arg` likewise over `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, with the
//! OpenTelemetry specification's names and default (`parentbased_always_on`).
//!
//! A bad value in the file is refused with its key, as everywhere in the file. A sampler
//! variable plugvisor cannot use is not: the OpenTelemetry environment-variable specification
//! says an unrecognized enum value MUST be warned about and ignored, and an invalid
//! `OTEL_TRACES_SAMPLER_ARG` MUST be logged and otherwise ignored (as if unset), and a front
//! that refused to start over a variable meant for every OpenTelemetry SDK in the environment
//! would stop billing over a diagnostic. So those fall back to the default, with a warning.
//! `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` turn tracing off even when an
//! endpoint is configured; `OTEL_TRACES_EXPORTER` other than `otlp` (the default) or `none` is
//! refused: it names an exporter plugvisor does not have, and sending spans elsewhere than the
//! operator asked would be worse than not starting.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::otlp::{bad, resource, Bad, Env, OtlpTransport, RawTransport, Signal};

/// What decides a trace's fate when the request brings no sampled-or-not parent (or always, for
/// the samplers that are not parent-based).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// This fraction (0 to 1) of trace ids, decided from the trace id alone, so every
    /// participant with the same ratio decides alike.
    TraceIdRatio(f64),
}

/// `OTEL_TRACES_SAMPLER` and its argument, as the OpenTelemetry specification defines them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// `parentbased_*`: a request with a valid `traceparent` follows its sampled flag; only a
    /// request without one is left to `root`.
    pub parent_based: bool,
    /// The sampler for roots (or for every request, when not parent-based).
    pub root: RootSampler,
}

impl Sampler {
    /// The specification's default, `parentbased_always_on`.
    pub const DEFAULT: Sampler = Sampler {
        parent_based: true,
        root: RootSampler::AlwaysOn,
    };

    /// The name `OTEL_TRACES_SAMPLER` uses.
    pub fn name(&self) -> &'static str {
        match (self.parent_based, self.root) {
            (false, RootSampler::AlwaysOn) => "always_on",
            (false, RootSampler::AlwaysOff) => "always_off",
            (false, RootSampler::TraceIdRatio(_)) => "traceidratio",
            (true, RootSampler::AlwaysOn) => "parentbased_always_on",
            (true, RootSampler::AlwaysOff) => "parentbased_always_off",
            (true, RootSampler::TraceIdRatio(_)) => "parentbased_traceidratio",
        }
    }
}

/// Spans over OTLP, resolved from the file and the environment; `None` in [`super::Config`]
/// when no endpoint is configured.
#[derive(Debug, Clone, PartialEq)]
pub struct TracesConfig {
    /// Where and how spans are sent.
    pub transport: OtlpTransport,
    /// Which requests are traced.
    pub sampler: Sampler,
    /// Resource attributes, as the records' (`service.name` and OTEL_RESOURCE_ATTRIBUTES).
    pub resource: Vec<(String, String)>,
    /// Configured, but turned off by the environment: the variable that did
    /// (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`). No exporter runs.
    pub off: Option<&'static str>,
}

impl TracesConfig {
    /// The sampler new streams use, when spans are exported at all.
    pub fn active_sampler(&self) -> Option<Sampler> {
        self.off.is_none().then_some(self.sampler)
    }
}

/// The samplers, as the file or `OTEL_TRACES_SAMPLER` names them: whether parent-based, and its
/// root sampler when that takes a ratio (filled in later) or not.
fn sampler_named(name: &str) -> Result<(bool, Option<RootSampler>), String> {
    Ok(match name {
        "always_on" => (false, Some(RootSampler::AlwaysOn)),
        "always_off" => (false, Some(RootSampler::AlwaysOff)),
        "traceidratio" => (false, None),
        "parentbased_always_on" => (true, Some(RootSampler::AlwaysOn)),
        "parentbased_always_off" => (true, Some(RootSampler::AlwaysOff)),
        "parentbased_traceidratio" => (true, None),
        "jaeger_remote" | "parentbased_jaeger_remote" | "xray" => {
            return Err(format!(
                "sampler `{name}` is not supported by plugvisor; use always_on, always_off, \
                 traceidratio or their parentbased_ forms"
            ))
        }
        other => {
            return Err(format!(
                "unknown sampler `{other}`; use always_on, always_off, traceidratio, \
                 parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
            ))
        }
    })
}

/// `OTEL_SDK_DISABLED` and `OTEL_TRACES_EXPORTER`: what turns tracing off, if anything; warnings
/// go to `warnings`.
fn env_off(env: Env<'_>, warnings: &mut Vec<String>) -> Result<Option<&'static str>, Bad> {
    let var = |name| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let exporter_off = match var("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase()) {
        None => false,
        Some(v) if v == "otlp" => false,
        Some(v) if v == "none" => true,
        Some(other) => {
            return Err(bad(
                "$OTEL_TRACES_EXPORTER",
                None,
                format!(
                    "`{other}` is not a traces exporter plugvisor has; use otlp (the default) \
                     or none (no spans)"
                ),
            ))
        }
    };
    let disabled = match var("OTEL_SDK_DISABLED") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            warnings.push(format!(
                "OTEL_SDK_DISABLED=`{v}` is neither true nor false; taken as false, as the \
                 OpenTelemetry specification says"
            ));
            false
        }
    };
    Ok(if disabled {
        Some("OTEL_SDK_DISABLED=true")
    } else if exporter_off {
        Some("OTEL_TRACES_EXPORTER=none")
    } else {
        None
    })
}

/// `sampler_arg` as the file may write it: a number, or the text the variable would hold.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawArg {
    Float(f64),
    Int(i64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTraces {
    endpoint: Option<toml::Spanned<String>>,
    protocol: Option<toml::Spanned<String>>,
    headers: Option<BTreeMap<String, String>>,
    timeout_ms: Option<u64>,
    sampler: Option<toml::Spanned<String>>,
    sampler_arg: Option<toml::Spanned<RawArg>>,
}

impl RawTraces {
    /// Validates the table and resolves the environment; `None`: tracing is off. With the
    /// configuration, the variables it ignored, each as a warning (a sampler or argument
    /// plugvisor cannot use), for [`super::Config::warnings`].
    pub(super) fn resolve(self, env: Env<'_>) -> Result<Option<(TracesConfig, Vec<String>)>, Bad> {
        let transport = RawTransport {
            endpoint: self.endpoint,
            protocol: self.protocol,
            headers: self.headers,
            timeout_ms: self.timeout_ms,
        }
        .resolve("traces", Signal::Traces, env)?;
        let mut warnings = Vec::new();
        let off = env_off(env, &mut warnings)?;
        let default = Sampler::DEFAULT;
        // The name, and whether the file gave it (a bad one is refused) or the environment (a
        // bad one is warned about and ignored).
        let (parent_based, root) = match &self.sampler {
            Some(s) => {
                sampler_named(s.get_ref()).map_err(|m| bad("traces.sampler", Some(s.span()), m))?
            }
            None => match env("OTEL_TRACES_SAMPLER")
                .map(|v| v.trim().to_ascii_lowercase())
                .filter(|v| !v.is_empty())
            {
                None => (default.parent_based, Some(default.root)),
                Some(v) => sampler_named(&v).unwrap_or_else(|m| {
                    warnings.push(format!(
                        "OTEL_TRACES_SAMPLER ignored ({m}); using parentbased_always_on, as the \
                         OpenTelemetry specification says of a value an SDK does not recognize"
                    ));
                    (default.parent_based, Some(default.root))
                }),
            },
        };
        let root = match root {
            Some(root) => root,
            // The ratio samplers: the argument, from the file (refused if bad) or the
            // environment (ignored with a warning if bad, as if unset); 1 by default.
            None => RootSampler::TraceIdRatio(match &self.sampler_arg {
                Some(a) => {
                    let text = match a.get_ref() {
                        RawArg::Float(f) => f.to_string(),
                        RawArg::Int(i) => i.to_string(),
                        RawArg::Text(t) => t.clone(),
                    };
                    parse_ratio(&text).map_err(|m| bad("traces.sampler_arg", Some(a.span()), m))?
                }
                None => match env("OTEL_TRACES_SAMPLER_ARG").filter(|v| !v.trim().is_empty()) {
                    None => 1.0,
                    Some(v) => parse_ratio(&v).unwrap_or_else(|m| {
                        warnings.push(format!(
                            "OTEL_TRACES_SAMPLER_ARG ignored ({m}); using 1, as the \
                             OpenTelemetry specification says of an invalid argument"
                        ));
                        1.0
                    }),
                },
            }),
        };
        let sampler = Sampler { parent_based, root };
        let Some(transport) = transport else {
            return Ok(None);
        };
        let traces = TracesConfig {
            transport,
            sampler,
            resource: resource(env).map_err(|(key, m)| bad(key, None, m))?,
            off,
        };
        Ok(Some((traces, warnings)))
    }
}

/// A probability from 0 to 1, as `OTEL_TRACES_SAMPLER_ARG` gives it to the ratio samplers.
fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "`{text}` is not a sampling probability (a number from 0 to 1)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::otlp::{no_env, OtlpProtocol};
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    /// Variables for a case of a table.
    type Vars = &'static [(&'static str, &'static str)];

    fn resolve(text: &str, env: Env<'_>) -> Result<Option<TracesConfig>, Bad> {
        resolve_warned(text, env).map(|t| t.map(|(traces, _)| traces))
    }

    /// [`resolve`], with the warnings.
    fn resolve_warned(
        text: &str,
        env: Env<'_>,
    ) -> Result<Option<(TracesConfig, Vec<String>)>, Bad> {
        toml::from_str::<RawTraces>(text).unwrap().resolve(env)
    }

    #[test]
    fn traces_are_off_without_an_endpoint_and_on_with_one_from_the_file_or_the_environment() {
        assert!(resolve("", &no_env).ok().unwrap().is_none());
        // Another signal's endpoint is not ours.
        let logs = env_of(&[("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://c:4318")]);
        assert!(resolve("", &logs).ok().unwrap().is_none());

        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=k"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=generic"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_SERVICE_NAME", "gateway"),
        ]);
        let t = resolve("", &env).ok().unwrap().unwrap();
        assert_eq!(t.transport.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(t.transport.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(t.transport.headers, vec![("api-key".into(), "k".into())]);
        assert_eq!(t.transport.timeout, std::time::Duration::from_millis(2500));
        assert_eq!(
            t.sampler,
            Sampler {
                parent_based: true,
                root: RootSampler::TraceIdRatio(0.25)
            }
        );
        assert_eq!(t.resource, vec![("service.name".into(), "gateway".into())]);

        // The file wins key by key; what it leaves out still comes from the environment.
        let t = resolve(
            "endpoint = \"http://127.0.0.1:4317\"\nprotocol = \"grpc\"\nsampler = \"traceidratio\"\n",
            &env,
        )
        .ok()
        .unwrap()
        .unwrap();
        assert_eq!(t.transport.endpoint, "http://127.0.0.1:4317");
        assert_eq!(t.transport.protocol, OtlpProtocol::Grpc);
        assert_eq!(t.transport.headers, vec![("api-key".into(), "k".into())]);
        assert_eq!(t.sampler.root, RootSampler::TraceIdRatio(0.25));
        assert!(!t.sampler.parent_based);

        // A signal-specific endpoint is used as written; the file's too.
        let env = env_of(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/custom/traces",
        )]);
        let t = resolve("", &env).ok().unwrap().unwrap();
        assert_eq!(t.transport.endpoint, "http://c:4318/custom/traces");
        assert_eq!(t.sampler, Sampler::DEFAULT);
        let t = resolve("endpoint = \"http://c:4318\"\nsampler_arg = 1\n", &no_env)
            .ok()
            .unwrap()
            .unwrap();
        assert_eq!(t.transport.endpoint, "http://c:4318/v1/traces");
    }

    #[test]
    fn every_sampler_of_the_specification_that_plugvisor_supports_resolves_by_name() {
        let table: &[(&str, Option<&str>, Sampler)] = &[
            (
                "always_on",
                None,
                Sampler {
                    parent_based: false,
                    root: RootSampler::AlwaysOn,
                },
            ),
            (
                "always_off",
                None,
                Sampler {
                    parent_based: false,
                    root: RootSampler::AlwaysOff,
                },
            ),
            (
                "traceidratio",
                None,
                Sampler {
                    parent_based: false,
                    root: RootSampler::TraceIdRatio(1.0),
                },
            ),
            (
                "traceidratio",
                Some("0"),
                Sampler {
                    parent_based: false,
                    root: RootSampler::TraceIdRatio(0.0),
                },
            ),
            ("parentbased_always_on", None, Sampler::DEFAULT),
            (
                "parentbased_always_off",
                None,
                Sampler {
                    parent_based: true,
                    root: RootSampler::AlwaysOff,
                },
            ),
            (
                "parentbased_traceidratio",
                Some("0.5"),
                Sampler {
                    parent_based: true,
                    root: RootSampler::TraceIdRatio(0.5),
                },
            ),
            // An argument a sampler does not take is ignored, as the specification says.
            (
                "always_on",
                Some("x"),
                Sampler {
                    parent_based: false,
                    root: RootSampler::AlwaysOn,
                },
            ),
        ];
        for (name, arg, expected) in table {
            let text = format!(
                "endpoint = \"http://c:4318\"\nsampler = \"{name}\"\n{}",
                arg.map_or(String::new(), |a| format!("sampler_arg = \"{a}\"\n"))
            );
            let t = resolve(&text, &no_env).ok().unwrap().unwrap();
            assert_eq!(t.sampler, *expected, "{text}");
            assert_eq!(t.sampler.name(), *name);
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str)] = &[
            ("endpoint = \"c:4318\"", "traces.endpoint"),
            (
                "endpoint = \"http://c\"\nprotocol = \"http/json\"",
                "traces.protocol",
            ),
            (
                "endpoint = \"http://c\"\nheaders = { \"a b\" = \"1\" }",
                "traces.headers",
            ),
            ("sampler = \"sometimes\"", "traces.sampler"),
            ("sampler = \"jaeger_remote\"", "traces.sampler"),
            (
                "sampler = \"traceidratio\"\nsampler_arg = 1.5",
                "traces.sampler_arg",
            ),
            (
                "sampler = \"parentbased_traceidratio\"\nsampler_arg = \"-0.1\"",
                "traces.sampler_arg",
            ),
            (
                "sampler = \"traceidratio\"\nsampler_arg = \"half\"",
                "traces.sampler_arg",
            ),
        ];
        for (text, key) in cases {
            let Err(e) = resolve(text, &no_env) else {
                panic!("{text} accepted")
            };
            assert_eq!(&e.key, key, "{text}: {}", e.message);
        }
        let env = env_of(&[("OTEL_TRACES_EXPORTER", "console")]);
        let Err(e) = resolve("endpoint = \"http://c:4318\"", &env) else {
            panic!("an exporter plugvisor does not have accepted")
        };
        assert_eq!(e.key, "$OTEL_TRACES_EXPORTER");
        assert!(e.message.contains("otlp"), "{}", e.message);
        let env = env_of(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url")]);
        let Err(e) = resolve("", &env) else {
            panic!("bad env accepted")
        };
        assert_eq!(e.key, "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    }

    #[test]
    fn otel_sdk_disabled_and_exporter_none_turn_configured_traces_off_and_say_which() {
        let on = "endpoint = \"http://c:4318\"\n";
        let table: &[(Vars, Option<&str>, usize)] = &[
            (&[], None, 0),
            (
                &[("OTEL_SDK_DISABLED", "true")],
                Some("OTEL_SDK_DISABLED=true"),
                0,
            ),
            (
                &[("OTEL_SDK_DISABLED", "TRUE")],
                Some("OTEL_SDK_DISABLED=true"),
                0,
            ),
            (&[("OTEL_SDK_DISABLED", "false")], None, 0),
            (&[("OTEL_SDK_DISABLED", "")], None, 0),
            // Neither true nor false: false, with a warning.
            (&[("OTEL_SDK_DISABLED", "yes")], None, 1),
            (
                &[("OTEL_TRACES_EXPORTER", "none")],
                Some("OTEL_TRACES_EXPORTER=none"),
                0,
            ),
            (
                &[("OTEL_TRACES_EXPORTER", " None ")],
                Some("OTEL_TRACES_EXPORTER=none"),
                0,
            ),
            (&[("OTEL_TRACES_EXPORTER", "otlp")], None, 0),
            (&[("OTEL_TRACES_EXPORTER", "")], None, 0),
            (
                &[
                    ("OTEL_SDK_DISABLED", "true"),
                    ("OTEL_TRACES_EXPORTER", "none"),
                ],
                Some("OTEL_SDK_DISABLED=true"),
                0,
            ),
        ];
        for (vars, off, warnings) in table {
            let (t, said) = resolve_warned(on, &env_of(vars)).ok().unwrap().unwrap();
            assert_eq!(t.off, *off, "{vars:?}");
            assert_eq!(t.active_sampler().is_none(), off.is_some(), "{vars:?}");
            assert_eq!(said.len(), *warnings, "{vars:?}: {said:?}");
        }
        // Without an endpoint tracing is off anyway, and says nothing of the variables.
        let env = env_of(&[("OTEL_SDK_DISABLED", "true")]);
        assert!(resolve("", &env).ok().unwrap().is_none());
    }

    /// The decision documented in docs/configuration.md: a sampler variable plugvisor cannot use
    /// falls back to the default with a warning (the OpenTelemetry specification's MUST); the
    /// same value in the file is refused with its key.
    #[test]
    fn a_bad_sampler_variable_falls_back_with_a_warning_while_the_file_refuses_it() {
        let on = "endpoint = \"http://c:4318\"\n";
        let ratio = |p| Sampler {
            parent_based: false,
            root: RootSampler::TraceIdRatio(p),
        };
        let table: &[(Vars, Sampler, bool)] = &[
            (
                &[("OTEL_TRACES_SAMPLER", "sometimes")],
                Sampler::DEFAULT,
                true,
            ),
            (
                &[("OTEL_TRACES_SAMPLER", "jaeger_remote")],
                Sampler::DEFAULT,
                true,
            ),
            (&[("OTEL_TRACES_SAMPLER", "xray")], Sampler::DEFAULT, true),
            // Enum values are read case-insensitively; empty is unset.
            (
                &[("OTEL_TRACES_SAMPLER", "TraceIdRatio")],
                ratio(1.0),
                false,
            ),
            (&[("OTEL_TRACES_SAMPLER", "")], Sampler::DEFAULT, false),
            (
                &[
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ],
                ratio(1.0),
                true,
            ),
            (
                &[
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "half"),
                ],
                ratio(1.0),
                true,
            ),
            (
                &[
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
                ],
                ratio(0.5),
                false,
            ),
            // An argument the sampler does not take is not read, so not warned about.
            (
                &[
                    ("OTEL_TRACES_SAMPLER", "always_on"),
                    ("OTEL_TRACES_SAMPLER_ARG", "x"),
                ],
                Sampler {
                    parent_based: false,
                    root: RootSampler::AlwaysOn,
                },
                false,
            ),
        ];
        for (vars, sampler, warned) in table {
            let (t, said) = resolve_warned(on, &env_of(vars)).ok().unwrap().unwrap();
            assert_eq!(t.sampler, *sampler, "{vars:?}");
            assert_eq!(!said.is_empty(), *warned, "{vars:?}: {said:?}");
            if *warned {
                assert!(said[0].starts_with("OTEL_TRACES_SAMPLER"), "{said:?}");
            }
        }
        // The file's own value is refused, whatever the environment says.
        let env = env_of(&[("OTEL_TRACES_SAMPLER", "always_on")]);
        let Err(e) = resolve(&format!("{on}sampler = \"sometimes\"\n"), &env) else {
            panic!("a bad file sampler accepted")
        };
        assert_eq!(e.key, "traces.sampler");
    }
}
