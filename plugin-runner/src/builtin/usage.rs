//! `usage`: the request-attribute reporter. Reads token usage from LLM responses in every format
//! of [`crate::usage_formats`] (OpenAI Chat/Completions, OpenAI Responses, Anthropic Messages,
//! Gemini; SSE streams and plain JSON) and reports it under `plugvisor.usage`, plus configured
//! attributes computed with CEL over the usage (e.g. a request cost under `envoy.lb`). A
//! response without usage is reported as such, with a `reason`, never as zeros.
//!
//! Config: `format = "auto" | "openai" | "openai-responses" | "anthropic" | "gemini"` (default
//! `auto`: detected per response), and `attributes = [{namespace, name, expression,
//! condition?}]`. `expression` and `condition` are CEL with the variables `usage` (the token
//! types, plus the OpenAI-style `prompt_tokens`, `completion_tokens`, `cached_tokens` — 0 when
//! not reported), `model` (string, empty when unknown), `format` and `status` (the HTTP status,
//! 0 when unknown). A CEL syntax error or an unknown format is a config error.

use std::collections::HashMap;
use std::sync::Arc;

use cel::{Context, Program};
use ipc_protocol::{Chunk, Final, Metadata, ResponseHeaders, Value};

use crate::config::{ConfigError, ConfigMap};
use crate::plugin::{EventCtx, Plugin};
use crate::usage_formats::{Format, ResponseObserver, Usage};

/// The plugin's own metadata namespace.
pub const NAMESPACE: &str = "plugvisor.usage";

/// One configured attribute.
struct Attribute {
    namespace: String,
    name: String,
    expression: Program,
    condition: Option<Program>,
}

/// The `usage` plugin.
#[derive(Default)]
pub struct UsagePlugin {
    attributes: Vec<Arc<Attribute>>,
    /// `None`: detect the format of each response.
    format: Option<Format>,
}

/// Per-stream state of [`UsagePlugin`].
#[derive(Debug, Default)]
pub struct UsageStream {
    body: ResponseObserver,
    status: u16,
    /// Whether `body` was set up with the plugin's format (the state is created by `Default`).
    format_set: bool,
}

impl UsageStream {
    fn observer(&mut self, format: Option<Format>) -> &mut ResponseObserver {
        if !self.format_set {
            self.format_set = true;
            if format.is_some() {
                self.body.force_format(format);
            }
        }
        &mut self.body
    }
}

fn compile(
    table: &ConfigMap<'_>,
    key: &str,
    required: bool,
) -> Result<Option<Program>, ConfigError> {
    let Some(src) = table.str(key)? else {
        return if required {
            Err(ConfigError::new(format!(
                "{}.{key} is missing",
                table.path()
            )))
        } else {
            Ok(None)
        };
    };
    // The cel parser reports syntax errors as values, but guard against a parser panic too: a
    // config must never crash the plugin.
    let parsed = std::panic::catch_unwind(|| Program::compile(src));
    match parsed {
        Ok(Ok(program)) => Ok(Some(program)),
        Ok(Err(e)) => Err(ConfigError::new(format!(
            "{}.{key}: invalid CEL expression `{src}`: {e}",
            table.path()
        ))),
        Err(_) => Err(ConfigError::new(format!(
            "{}.{key}: invalid CEL expression `{src}`: the parser failed",
            table.path()
        ))),
    }
}

fn required_str(table: &ConfigMap<'_>, key: &str) -> Result<String, ConfigError> {
    match table.str(key)? {
        Some(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(ConfigError::new(format!(
            "{}.{key} is missing (a non-empty string)",
            table.path()
        ))),
    }
}

fn to_value(v: cel::Value) -> Option<Value> {
    Some(match v {
        cel::Value::Int(i) => Value::Int(i),
        cel::Value::UInt(u) => Value::from(u),
        cel::Value::Float(f) => Value::Float(f),
        cel::Value::String(s) => Value::String(s.to_string()),
        cel::Value::Bool(b) => Value::Bool(b),
        cel::Value::Null => Value::Null,
        _ => return None,
    })
}

impl UsagePlugin {
    fn evaluate(&self, usage: &Usage, model: &str, format: &str, status: u16, meta: &mut Metadata) {
        if self.attributes.is_empty() {
            return;
        }
        let cached = usage.cached_input_tokens.unwrap_or(0);
        let mut vars: HashMap<&str, cel::Value> = HashMap::new();
        vars.insert("input_tokens", usage.input_tokens.into());
        vars.insert("output_tokens", usage.output_tokens.into());
        vars.insert("total_tokens", usage.total_tokens.into());
        vars.insert("cached_input_tokens", cached.into());
        vars.insert(
            "cache_creation_input_tokens",
            usage.cache_creation_input_tokens.unwrap_or(0).into(),
        );
        vars.insert(
            "reasoning_tokens",
            usage.reasoning_tokens.unwrap_or(0).into(),
        );
        vars.insert("prompt_tokens", usage.input_tokens.into());
        vars.insert("completion_tokens", usage.output_tokens.into());
        vars.insert("cached_tokens", cached.into());
        let mut ctx = Context::default();
        ctx.add_variable_from_value("usage", vars);
        ctx.add_variable_from_value("model", model.to_owned());
        ctx.add_variable_from_value("format", format.to_owned());
        ctx.add_variable_from_value("status", i64::from(status));
        for attr in &self.attributes {
            if let Some(cond) = &attr.condition {
                match cond.execute(&ctx) {
                    Ok(cel::Value::Bool(true)) => {}
                    Ok(cel::Value::Bool(false)) => continue,
                    Ok(other) => {
                        tracing::warn!(attribute = %attr.name, result = ?other, "condition is not a bool; attribute skipped");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(attribute = %attr.name, error = %e, "condition failed; attribute skipped");
                        continue;
                    }
                }
            }
            match attr.expression.execute(&ctx).map(to_value) {
                Ok(Some(value)) => {
                    let entry = meta
                        .entry(attr.namespace.clone())
                        .or_insert_with(|| Value::Map(Default::default()));
                    if let Value::Map(m) = entry {
                        m.insert(attr.name.clone(), value);
                    }
                }
                Ok(None) => {
                    tracing::warn!(attribute = %attr.name, "expression result is not a scalar; attribute skipped")
                }
                Err(e) => {
                    tracing::warn!(attribute = %attr.name, error = %e, "expression failed; attribute skipped")
                }
            }
        }
    }
}

impl Plugin for UsagePlugin {
    type Stream = UsageStream;

    fn name(&self) -> &str {
        "usage"
    }

    fn configure(&mut self, config: &Value) -> Result<(), ConfigError> {
        let config = ConfigMap::new(config)?;
        config.deny_unknown(&["format", "attributes"])?;
        let format = match config.str("format")? {
            None | Some("auto") => None,
            Some(name) => Some(Format::from_name(name).ok_or_else(|| {
                ConfigError::new(format!(
                    "{}.format: unknown format `{name}` (formats: auto, {})",
                    config.path(),
                    Format::ALL.map(Format::name).join(", ")
                ))
            })?),
        };
        let mut attributes = Vec::new();
        for table in config.tables("attributes")? {
            table.deny_unknown(&["namespace", "name", "expression", "condition"])?;
            attributes.push(Arc::new(Attribute {
                namespace: required_str(&table, "namespace")?,
                name: required_str(&table, "name")?,
                expression: compile(&table, "expression", true)?.expect("required"),
                condition: compile(&table, "condition", false)?,
            }));
        }
        self.attributes = attributes;
        self.format = format;
        Ok(())
    }

    fn on_response_headers(&self, s: &mut UsageStream, _: &EventCtx, e: &ResponseHeaders) {
        s.status = e.status;
        if let Some(ct) = e.header("content-type") {
            s.body.set_content_type(ct);
        }
        if let Some(enc) = e.header("content-encoding") {
            s.body.set_content_encoding(enc);
        }
    }

    fn on_chunk(&self, s: &mut UsageStream, ctx: &EventCtx, c: &Chunk) {
        s.observer(self.format)
            .push(&c.bytes, c.len.into(), ctx.stamp_ns);
    }

    fn on_final(&self, s: &mut UsageStream, ctx: &EventCtx, f: &Final) -> Metadata {
        let body = s.observer(self.format);
        body.push(&f.bytes, f.len.into(), ctx.stamp_ns);
        body.finish(ctx.stamp_ns);
        let mut own = std::collections::BTreeMap::new();
        if let Some(u) = &s.body.usage {
            u.insert_into(&mut own);
        }
        let format = s.body.format().map(Format::name);
        if let Some(format) = format {
            own.insert("format".into(), Value::from(format));
        }
        if let Some(model) = &s.body.model {
            own.insert("model".into(), Value::from(model.as_str()));
        }
        if let Some(err) = s.body.upstream_error() {
            own.insert("error".into(), Value::from(err.message.as_str()));
            if let Some(kind) = &err.kind {
                own.insert("error_type".into(), Value::from(kind.as_str()));
            }
        }
        if let Some(reason) = s.body.no_usage_reason(s.status) {
            own.insert("reason".into(), Value::from(reason));
        }
        let mut meta = Metadata::from([(NAMESPACE.to_owned(), Value::Map(own))]);
        if let Some(usage) = &s.body.usage {
            let model = s.body.model.as_deref().unwrap_or("");
            self.evaluate(usage, model, format.unwrap_or(""), s.status, &mut meta);
        }
        meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::testing::{play, Played};
    use crate::usage_formats::tests::{CHAT_JSON, CHAT_STREAM, ERROR_JSON, RESPONSES_STREAM};

    fn configured(attrs: Vec<Value>) -> Result<UsagePlugin, ConfigError> {
        let mut p = UsagePlugin::default();
        p.configure(&Value::map([("attributes", Value::List(attrs))]))?;
        Ok(p)
    }

    fn cost_attr() -> Value {
        Value::map([
            ("namespace", Value::from("envoy.lb")),
            ("name", Value::from("x-gateway-inference-request-cost")),
            (
                "expression",
                Value::from("usage.prompt_tokens + 2 * usage.completion_tokens"),
            ),
        ])
    }

    #[test]
    fn streamed_usage_and_cel_cost_attribute() {
        let p = configured(vec![cost_attr()]).unwrap();
        let Played { meta, .. } = play(&p, CHAT_STREAM, 13, "text/event-stream");
        let own = &meta[NAMESPACE];
        assert_eq!(own.get("prompt_tokens"), Some(&Value::Int(17)));
        assert_eq!(own.get("completion_tokens"), Some(&Value::Int(7)));
        assert_eq!(own.get("total_tokens"), Some(&Value::Int(24)));
        assert_eq!(own.get("cached_tokens"), Some(&Value::Int(16)));
        assert_eq!(
            own.get("model"),
            Some(&Value::from("meta-llama/Llama-3.1-8B-Instruct"))
        );
        assert_eq!(
            meta["envoy.lb"].get("x-gateway-inference-request-cost"),
            Some(&Value::Int(17 + 2 * 7))
        );
    }

    #[test]
    fn responses_api_usage_is_reported_in_the_same_shape() {
        let p = UsagePlugin::default();
        let own = &play(&p, RESPONSES_STREAM, 97, "text/event-stream").meta[NAMESPACE];
        assert_eq!(own.get("prompt_tokens"), Some(&Value::Int(36)));
        assert_eq!(own.get("completion_tokens"), Some(&Value::Int(3)));
        assert_eq!(own.get("total_tokens"), Some(&Value::Int(39)));
    }

    #[test]
    fn non_streaming_json_body() {
        let p = configured(vec![cost_attr()]).unwrap();
        let meta = play(&p, CHAT_JSON, 64, "application/json").meta;
        assert_eq!(meta[NAMESPACE].get("total_tokens"), Some(&Value::Int(33)));
        assert_eq!(
            meta["envoy.lb"].get("x-gateway-inference-request-cost"),
            Some(&Value::Int(25 + 16))
        );
    }

    #[test]
    fn error_body_reports_the_error_and_no_attributes() {
        let p = configured(vec![cost_attr()]).unwrap();
        let meta = play(&p, ERROR_JSON, 64, "application/json").meta;
        assert!(meta[NAMESPACE].get("prompt_tokens").is_none());
        assert!(meta[NAMESPACE].get("error").is_some());
        assert!(!meta.contains_key("envoy.lb"));
    }

    #[test]
    fn condition_gates_an_attribute() {
        let mut big = cost_attr();
        if let Value::Map(m) = &mut big {
            m.insert("name".into(), Value::from("big"));
            m.insert("condition".into(), Value::from("usage.total_tokens > 1000"));
        }
        let mut small = cost_attr();
        if let Value::Map(m) = &mut small {
            m.insert("name".into(), Value::from("model"));
            m.insert("expression".into(), Value::from("model"));
            m.insert("condition".into(), Value::from("status == 200"));
        }
        let p = configured(vec![big, small]).unwrap();
        let meta = play(&p, CHAT_STREAM, 50, "text/event-stream").meta;
        let lb = &meta["envoy.lb"];
        assert!(lb.get("big").is_none());
        assert_eq!(
            lb.get("model"),
            Some(&Value::from("meta-llama/Llama-3.1-8B-Instruct"))
        );
    }

    #[test]
    fn format_accepts_auto_and_every_format_name_and_refuses_others() {
        for name in ["auto", "openai", "openai-responses", "anthropic", "gemini"] {
            let mut p = UsagePlugin::default();
            p.configure(&Value::map([("format", Value::from(name))]))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                p.format.map(Format::name),
                Format::from_name(name).map(Format::name)
            );
        }
        let err = UsagePlugin::default()
            .configure(&Value::map([("format", Value::from("OpenAI"))]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown format `OpenAI`"), "{err}");
    }

    #[test]
    fn bad_cel_is_a_config_error_carrying_the_parser_message() {
        let mut bad = cost_attr();
        if let Value::Map(m) = &mut bad {
            m.insert("expression".into(), Value::from("usage.prompt_tokens +* 2"));
        }
        let err = configured(vec![bad]).err().unwrap().to_string();
        assert!(
            err.starts_with("attributes[0].expression: invalid CEL expression"),
            "{err}"
        );
    }

    #[test]
    fn missing_keys_and_unknown_keys_are_config_errors() {
        let err = configured(vec![Value::map([("name", Value::from("x"))])])
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("attributes[0].namespace is missing"),
            "{err}"
        );
        let mut p = UsagePlugin::default();
        let err = p
            .configure(&Value::map([("atributes", Value::List(vec![]))]))
            .unwrap_err();
        assert!(err.to_string().contains("unknown key `atributes`"), "{err}");
    }
}
