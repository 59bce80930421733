//! The `[traces]` table: spans of the front's own work over OTLP ([`crate::traces`]). Off unless
//! an endpoint is configured, in the file or in the environment.
//!
//! The transport's keys follow the rule of `[records.otlp]` ([`super::otlp`]): the file wins,
//! key by key, over `OTEL_EXPORTER_OTLP_TRACES_*`, then `OTEL_EXPORTER_OTLP_*`. `sampler` and
//! `sampler_arg` likewise over `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, with the
//! OpenTelemetry specification's names and default (`parentbased_always_on`).

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
    /// Validates the table and resolves the environment; `None`: tracing is off.
    pub(super) fn resolve(self, env: Env<'_>) -> Result<Option<TracesConfig>, Bad> {
        let transport = RawTransport {
            endpoint: self.endpoint,
            protocol: self.protocol,
            headers: self.headers,
            timeout_ms: self.timeout_ms,
        }
        .resolve("traces", Signal::Traces, env)?;
        let (name, name_key, name_span) = match &self.sampler {
            Some(s) => (
                s.get_ref().clone(),
                "traces.sampler".to_owned(),
                Some(s.span()),
            ),
            None => match env("OTEL_TRACES_SAMPLER") {
                Some(v) => (v.trim().to_owned(), "$OTEL_TRACES_SAMPLER".to_owned(), None),
                None => ("parentbased_always_on".to_owned(), String::new(), None),
            },
        };
        let arg = match &self.sampler_arg {
            Some(a) => Some((
                match a.get_ref() {
                    RawArg::Float(f) => f.to_string(),
                    RawArg::Int(i) => i.to_string(),
                    RawArg::Text(t) => t.clone(),
                },
                "traces.sampler_arg".to_owned(),
                Some(a.span()),
            )),
            None => env("OTEL_TRACES_SAMPLER_ARG")
                .map(|v| (v, "$OTEL_TRACES_SAMPLER_ARG".to_owned(), None)),
        };
        let ratio = || -> Result<f64, Bad> {
            match &arg {
                // The specification's default for the ratio samplers.
                None => Ok(1.0),
                Some((text, key, span)) => parse_ratio(text).map_err(|m| bad(key, span.clone(), m)),
            }
        };
        let sampler = match name.as_str() {
            "always_on" => Sampler {
                parent_based: false,
                root: RootSampler::AlwaysOn,
            },
            "always_off" => Sampler {
                parent_based: false,
                root: RootSampler::AlwaysOff,
            },
            "traceidratio" => Sampler {
                parent_based: false,
                root: RootSampler::TraceIdRatio(ratio()?),
            },
            "parentbased_always_on" => Sampler::DEFAULT,
            "parentbased_always_off" => Sampler {
                parent_based: true,
                root: RootSampler::AlwaysOff,
            },
            "parentbased_traceidratio" => Sampler {
                parent_based: true,
                root: RootSampler::TraceIdRatio(ratio()?),
            },
            "jaeger_remote" | "parentbased_jaeger_remote" | "xray" => {
                return Err(bad(
                    &name_key,
                    name_span,
                    format!(
                        "sampler `{name}` is not supported by plugvisor; use always_on, \
                         always_off, traceidratio or their parentbased_ forms"
                    ),
                ))
            }
            other => {
                return Err(bad(
                    &name_key,
                    name_span,
                    format!(
                        "unknown sampler `{other}`; use always_on, always_off, traceidratio, \
                         parentbased_always_on, parentbased_always_off or \
                         parentbased_traceidratio"
                    ),
                ))
            }
        };
        let Some(transport) = transport else {
            return Ok(None);
        };
        Ok(Some(TracesConfig {
            transport,
            sampler,
            resource: resource(env).map_err(|(key, m)| bad(key, None, m))?,
        }))
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

    fn resolve(text: &str, env: Env<'_>) -> Result<Option<TracesConfig>, Bad> {
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
        let env = env_of(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ]);
        let Err(e) = resolve("", &env) else {
            panic!("bad env accepted")
        };
        assert_eq!(e.key, "$OTEL_TRACES_SAMPLER_ARG");
        let env = env_of(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url")]);
        let Err(e) = resolve("", &env) else {
            panic!("bad env accepted")
        };
        assert_eq!(e.key, "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    }
}
