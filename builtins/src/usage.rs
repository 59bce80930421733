//! `usage`: the request-attribute reporter. Reads token usage from LLM responses in every format
//! of [`crate::usage_formats`] (OpenAI Chat/Completions, OpenAI Responses, Anthropic Messages,
//! Gemini, Bedrock; SSE streams, AWS event streams and plain JSON) and reports it under `plugvisor.usage`, plus configured
//! costs and attributes computed from it for Envoy (rate limiting, routing, access logs). A
//! response without usage is reported as such, with a `reason`, never as zeros.
//!
//! Config (docs/plugins.md has the operator's version):
//! - `format = "auto" | "openai" | "openai-responses" | "anthropic" | "gemini" | "bedrock"`
//!   (default `auto`: detected per response).
//! - `costs = [{namespace, key, type}]`: integers ≥ 0 for Envoy's rate-limit `hits_addend`.
//!   `type` is a [`TokenType`] name or a CEL expression over the [variables](#cel-variables).
//!   A cost that cannot be computed for a stream (no usage, a token type the estimate lacks, a
//!   failing or non-integer expression) is left out of its namespace and explained under
//!   `plugvisor.usage.cost_errors["<namespace>:<key>"]`.
//! - `attributes = [{namespace, name, expression, condition?}]`: any scalar computed with CEL,
//!   best-effort (a failing expression skips the attribute with a warning). Kept from before
//!   `costs`; `costs` is the strict form for numbers Envoy counts.
//! - `estimate_output_tokens = false`: when a stream ends without usage (and without an error),
//!   report the number of content-bearing streamed deltas as `output_tokens`, with
//!   `estimated = true` next to the `reason`.
//!
//! # CEL variables
//! `input_tokens`, `cached_input_tokens`, `cache_creation_input_tokens`, `output_tokens`,
//! `reasoning_tokens`, `total_tokens` (a detail the provider did not report is 0; with an
//! estimate only `output_tokens` exists); `usage` (a map of the same, plus the OpenAI-style
//! `prompt_tokens`, `completion_tokens`, `cached_tokens`); `model` (string, empty when
//! unknown), `format`, `status` (the HTTP status, 0 when unknown), `estimated` (bool) and
//! `headers` (response headers by lowercase name, repeated ones joined with `, `).

use std::collections::{BTreeMap, HashMap};

use std::sync::Arc;

use cel::{Context, ExecutionError, Program};
use ipc_protocol::{AbortedFinal, Chunk, Final, Metadata, RequestStart, ResponseHeaders, Value};

use crate::usage_formats::{Format, ResponseObserver, Usage};
use plugin_runner::{ConfigError, ConfigMap};
use plugin_runner::{EventCtx, Plugin};

/// The plugin's own metadata namespace.
pub const NAMESPACE: &str = "plugvisor.usage";

/// The keys the plugin writes under [`NAMESPACE`]; a cost or attribute may not take them.
const OWN_KEYS: [&str; 18] = [
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "format",
    "model",
    "error",
    "error_type",
    "reason",
    "estimated",
    "cost_errors",
    "status",
    "cause",
];

/// Largest cost reported: Envoy carries metadata numbers as doubles, which hold every integer
/// up to 2^53 exactly and no larger one.
pub const MAX_COST: i64 = 1 << 53;

/// A token type, as `costs[].type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Every prompt token, cached and cache-creation ones included.
    Input,
    /// Prompt tokens served from the provider's cache.
    CachedInput,
    /// Prompt tokens written to the provider's cache (Anthropic).
    CacheCreationInput,
    /// Every generated token, reasoning included.
    Output,
    /// Generated tokens spent on reasoning.
    Reasoning,
    /// Input + output, or the total the upstream reported.
    Total,
}

impl TokenType {
    /// Every token type.
    pub const ALL: [TokenType; 6] = [
        TokenType::Input,
        TokenType::CachedInput,
        TokenType::CacheCreationInput,
        TokenType::Output,
        TokenType::Reasoning,
        TokenType::Total,
    ];

    /// The name used in `costs[].type`.
    pub fn name(self) -> &'static str {
        match self {
            TokenType::Input => "input",
            TokenType::CachedInput => "cached_input",
            TokenType::CacheCreationInput => "cache_creation_input",
            TokenType::Output => "output",
            TokenType::Reasoning => "reasoning",
            TokenType::Total => "total",
        }
    }

    /// The CEL variable and metadata key: the name + `_tokens`.
    pub fn variable(self) -> &'static str {
        match self {
            TokenType::Input => "input_tokens",
            TokenType::CachedInput => "cached_input_tokens",
            TokenType::CacheCreationInput => "cache_creation_input_tokens",
            TokenType::Output => "output_tokens",
            TokenType::Reasoning => "reasoning_tokens",
            TokenType::Total => "total_tokens",
        }
    }

    /// The token type named `name` (see [`TokenType::name`]).
    pub fn from_name(name: &str) -> Option<TokenType> {
        TokenType::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The token counts a stream ended with.
#[derive(Debug, Clone, Copy)]
enum Tokens {
    /// Reported by the upstream.
    Reported(Usage),
    /// No final usage came: `output_tokens` counted from the content deltas (or the output
    /// reported so far, if larger), and `input_tokens` when the response reported it up front.
    Estimated {
        output_tokens: i64,
        input_tokens: Option<i64>,
    },
}

impl Tokens {
    /// The count of `t`, `None` when an estimate does not know it. A detail the upstream did not
    /// report (no cache hit, no reasoning) is 0.
    fn get(&self, t: TokenType) -> Option<i64> {
        match self {
            Tokens::Reported(u) => Some(match t {
                TokenType::Input => u.input_tokens,
                TokenType::CachedInput => u.cached_input_tokens.unwrap_or(0),
                TokenType::CacheCreationInput => u.cache_creation_input_tokens.unwrap_or(0),
                TokenType::Output => u.output_tokens,
                TokenType::Reasoning => u.reasoning_tokens.unwrap_or(0),
                TokenType::Total => u.total_tokens,
            }),
            Tokens::Estimated {
                output_tokens,
                input_tokens,
            } => match t {
                TokenType::Output => Some(*output_tokens),
                TokenType::Input => *input_tokens,
                TokenType::Total => input_tokens.map(|i| i + output_tokens),
                _ => None,
            },
        }
    }
}

/// What the CEL expressions of one stream see.
struct Facts<'a> {
    tokens: Tokens,
    model: &'a str,
    format: &'a str,
    status: u16,
    headers: &'a [(String, String)],
}

/// CEL's standard functions, registered once: building them is most of the cost of a fresh
/// `Context::default()`, which each final would otherwise pay. Each evaluation's variables live
/// in a scope of its own over this one.
static ROOT: std::sync::LazyLock<Context<'static, 'static>> =
    std::sync::LazyLock::new(Context::default);

impl Facts<'_> {
    /// The CEL context: see the module docs for the variables.
    fn context(&self) -> Context<'static, 'static> {
        let mut usage: HashMap<&str, cel::Value> = HashMap::new();
        let mut ctx = ROOT.new_inner_scope();
        for t in TokenType::ALL {
            if let Some(n) = self.tokens.get(t) {
                usage.insert(t.variable(), n.into());
                ctx.add_variable_from_value(t.variable(), n);
            }
        }
        for (alias, t) in [
            ("prompt_tokens", TokenType::Input),
            ("completion_tokens", TokenType::Output),
            ("cached_tokens", TokenType::CachedInput),
        ] {
            if let Some(n) = self.tokens.get(t) {
                usage.insert(alias, n.into());
            }
        }
        let mut headers: HashMap<String, String> = HashMap::new();
        for (name, value) in self.headers {
            headers
                .entry(name.clone())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(value);
                })
                .or_insert_with(|| value.clone());
        }
        ctx.add_variable_from_value("usage", usage);
        ctx.add_variable_from_value("model", self.model.to_owned());
        ctx.add_variable_from_value("format", self.format.to_owned());
        ctx.add_variable_from_value("status", i64::from(self.status));
        ctx.add_variable_from_value("estimated", matches!(self.tokens, Tokens::Estimated { .. }));
        ctx.add_variable_from_value("headers", headers);
        ctx
    }
}

/// Why an estimate cannot give a token type: it knows the output, and the input only when the
/// response reported it before it ended.
const ESTIMATE_KNOWS: &str = "the usage is estimated (the response ended without its final \
     counts), which gives output tokens, and input tokens only where the response reported them \
     before it ended";

/// What a cost counts. A compiled program is shared (`Arc`): `cel::Program` is not `Clone`,
/// and a clone of a configured plugin needs none of its own.
#[derive(Clone)]
enum CostType {
    Token(TokenType),
    Cel(Arc<Program>),
}

/// One configured cost.
#[derive(Clone)]
struct Cost {
    namespace: String,
    key: String,
    kind: CostType,
}

impl Cost {
    /// The cost for one stream, or why there is none (a lowercase fragment for the metadata).
    fn compute(&self, tokens: Tokens, facts: &Context<'_, '_>) -> Result<i64, String> {
        let value = match &self.kind {
            CostType::Token(t) => tokens
                .get(*t)
                .ok_or_else(|| format!("{} unknown: {ESTIMATE_KNOWS}", t.variable()))?,
            CostType::Cel(program) => match program.execute(facts) {
                Ok(cel::Value::Int(i)) => i,
                Ok(cel::Value::UInt(u)) => i64::try_from(u).unwrap_or(i64::MAX),
                Ok(cel::Value::Float(f)) => {
                    return Err(format!(
                        "the expression gave a double ({f}); costs are integers: wrap it in int()"
                    ))
                }
                Ok(other) => {
                    return Err(format!(
                        "the expression gave a {}, not an integer",
                        other.type_of()
                    ))
                }
                Err(
                    ExecutionError::UndeclaredReference(name) | ExecutionError::NoSuchKey(name),
                ) if matches!(tokens, Tokens::Estimated { .. }) && name.ends_with("_tokens") => {
                    return Err(format!("{name} unknown: {ESTIMATE_KNOWS}"));
                }
                Err(e) => return Err(format!("the expression failed: {e}")),
            },
        };
        if value < 0 {
            Err(format!("the cost is negative ({value})"))
        } else if value > MAX_COST {
            Err(format!(
                "the cost {value} is over {MAX_COST}, the largest integer Envoy's metadata carries \
                 exactly"
            ))
        } else {
            Ok(value)
        }
    }
}

/// One configured attribute.
#[derive(Clone)]
struct Attribute {
    namespace: String,
    name: String,
    expression: Arc<Program>,
    condition: Option<Arc<Program>>,
}

/// The `usage` plugin.
#[derive(Default, Clone)]
pub struct UsagePlugin {
    attributes: Vec<Attribute>,
    costs: Vec<Cost>,
    /// `None`: detect the format of each response.
    format: Option<Format>,
    estimate_output_tokens: bool,
}

/// Per-stream state of [`UsagePlugin`].
#[derive(Debug, Default)]
pub struct UsageStream {
    body: ResponseObserver,
    status: u16,
    /// Response headers, lowercase names; kept only when costs or attributes may read them.
    headers: Vec<(String, String)>,
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

fn compile_src(path: &str, key: &str, src: &str) -> Result<Program, ConfigError> {
    // The cel parser reports syntax errors as values, but guard against a parser panic too: a
    // config must never crash the plugin.
    match std::panic::catch_unwind(|| Program::compile(src)) {
        Ok(Ok(program)) => Ok(program),
        Ok(Err(e)) => Err(ConfigError::new(format!(
            "{path}.{key}: invalid CEL expression `{src}`: {e}"
        ))),
        Err(_) => Err(ConfigError::new(format!(
            "{path}.{key}: invalid CEL expression `{src}`: the parser failed"
        ))),
    }
}

fn compile(
    table: &ConfigMap<'_>,
    key: &str,
    required: bool,
) -> Result<Option<Program>, ConfigError> {
    match table.str(key)? {
        Some(src) => compile_src(table.path(), key, src).map(Some),
        None if required => Err(ConfigError::new(format!(
            "{}.{key} is missing",
            table.path()
        ))),
        None => Ok(None),
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

/// The names a CEL expression may use, for error messages.
const VARIABLES: &str = "input_tokens, cached_input_tokens, cache_creation_input_tokens, \
                         output_tokens, reasoning_tokens, total_tokens, usage, model, format, \
                         status, estimated, headers";

/// Refuses a cost expression that names a variable that does not exist (a typo would otherwise
/// fail every stream): runs it once over sample facts and rejects only undeclared references.
fn check_variables(path: &str, src: &str, program: &Program) -> Result<(), ConfigError> {
    let sample = Facts {
        tokens: Tokens::Reported(Usage {
            input_tokens: 1,
            output_tokens: 1,
            total_tokens: 2,
            ..Usage::default()
        }),
        model: "",
        format: "",
        status: 200,
        headers: &[],
    };
    match program.execute(&sample.context()) {
        Err(ExecutionError::UndeclaredReference(name)) => Err(ConfigError::new(format!(
            "{path}.type: CEL expression `{src}` uses `{name}`, which is not a variable \
             (variables: {VARIABLES}); token types by name: {}",
            TokenType::ALL.map(TokenType::name).join(", ")
        ))),
        _ => Ok(()),
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

/// Puts `key = value` into `namespace` of `meta`.
fn put(meta: &mut Metadata, namespace: &str, key: &str, value: Value) {
    let entry = meta
        .entry(namespace.to_owned())
        .or_insert_with(|| Value::Map(Default::default()));
    if let Value::Map(m) = entry {
        m.insert(key.to_owned(), value);
    }
}

impl UsagePlugin {
    fn configure_costs(&mut self, config: &ConfigMap<'_>) -> Result<(), ConfigError> {
        let mut costs = Vec::new();
        for table in config.tables("costs")? {
            table.deny_unknown(&["namespace", "key", "type"])?;
            let namespace = required_str(&table, "namespace")?;
            let key = required_str(&table, "key")?;
            let src = required_str(&table, "type")?;
            let kind = match TokenType::from_name(&src) {
                Some(t) => CostType::Token(t),
                None => {
                    let program = compile_src(table.path(), "type", &src).map_err(|e| {
                        ConfigError::new(format!(
                            "{e} (a token type is one of: {})",
                            TokenType::ALL.map(TokenType::name).join(", ")
                        ))
                    })?;
                    check_variables(table.path(), &src, &program)?;
                    CostType::Cel(Arc::new(program))
                }
            };
            costs.push(Cost {
                namespace,
                key,
                kind,
            });
        }
        self.costs = costs;
        Ok(())
    }

    /// The namespaces its configured costs and attributes write into, besides its own: what the
    /// front must let it write (see [`super::granted_namespaces`]).
    pub fn namespaces(&self) -> std::collections::BTreeSet<&str> {
        let costs = self.costs.iter().map(|c| c.namespace.as_str());
        let attributes = self.attributes.iter().map(|a| a.namespace.as_str());
        costs.chain(attributes).collect()
    }

    /// Refuses two outputs with the same `namespace:key`, and outputs that would overwrite the
    /// plugin's own keys or land in the front's own namespace.
    fn check_targets(&self) -> Result<(), ConfigError> {
        let targets = self
            .costs
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("costs[{i}]"), &c.namespace, &c.key))
            .chain(
                self.attributes
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("attributes[{i}]"), &a.namespace, &a.name)),
            );
        let mut seen: HashMap<(&str, &str), String> = HashMap::new();
        for (path, ns, key) in targets {
            if ns == "plugvisor" {
                return Err(ConfigError::new(format!(
                    "{path}.namespace: `plugvisor` is the front's own namespace; pick another \
                     (e.g. envoy.lb)"
                )));
            }
            if ns == NAMESPACE && OWN_KEYS.contains(&key.as_str()) {
                return Err(ConfigError::new(format!(
                    "{path}: `{NAMESPACE}:{key}` is a key the plugin writes itself; pick another key"
                )));
            }
            if let Some(first) = seen.insert((ns, key), path.clone()) {
                return Err(ConfigError::new(format!(
                    "{path}: `{ns}:{key}` is already written by {first}"
                )));
            }
        }
        Ok(())
    }

    /// Writes every cost into its namespace, or its reason into `cost_errors`.
    fn write_costs(
        &self,
        tokens: Option<Tokens>,
        no_usage: Option<&str>,
        ctx: Option<&Context<'_, '_>>,
        own: &mut BTreeMap<String, Value>,
        meta: &mut Metadata,
    ) {
        let mut errors = BTreeMap::new();
        for cost in &self.costs {
            let result = match (tokens, ctx) {
                (Some(tokens), Some(ctx)) => cost.compute(tokens, ctx),
                _ => Err(format!("no usage: {}", no_usage.unwrap_or("none reported"))),
            };
            match result {
                Ok(v) => put(meta, &cost.namespace, &cost.key, Value::Int(v)),
                Err(why) => {
                    errors.insert(format!("{}:{}", cost.namespace, cost.key), Value::from(why));
                }
            }
        }
        if !errors.is_empty() {
            own.insert("cost_errors".into(), Value::Map(errors));
        }
    }

    fn write_attributes(&self, ctx: &Context<'_, '_>, meta: &mut Metadata) {
        for attr in &self.attributes {
            if let Some(cond) = &attr.condition {
                match cond.execute(ctx) {
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
            match attr.expression.execute(ctx).map(to_value) {
                Ok(Some(value)) => put(meta, &attr.namespace, &attr.name, value),
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
        config.deny_unknown(&["format", "attributes", "costs", "estimate_output_tokens"])?;
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
            attributes.push(Attribute {
                namespace: required_str(&table, "namespace")?,
                name: required_str(&table, "name")?,
                expression: Arc::new(compile(&table, "expression", true)?.expect("required")),
                condition: compile(&table, "condition", false)?.map(Arc::new),
            });
        }
        let mut next = UsagePlugin {
            attributes,
            costs: Vec::new(),
            format,
            estimate_output_tokens: config.bool("estimate_output_tokens")?.unwrap_or(false),
        };
        next.configure_costs(&config)?;
        next.check_targets()?;
        *self = next;
        Ok(())
    }

    /// Bedrock names the model in the request path only.
    fn on_request_start(&self, s: &mut UsageStream, _: &EventCtx, e: &RequestStart) {
        if let Some(path) = ipc_protocol::find_header(&e.headers, ":path") {
            s.body.set_request_path(path);
        }
    }

    fn on_response_headers(&self, s: &mut UsageStream, _: &EventCtx, e: &ResponseHeaders) {
        s.status = e.status;
        if let Some(ct) = e.header("content-type") {
            s.body.set_content_type(ct);
        }
        if let Some(enc) = e.header("content-encoding") {
            s.body.set_content_encoding(enc);
        }
        if !self.costs.is_empty() || !self.attributes.is_empty() {
            s.headers = e
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect();
        }
    }

    fn on_chunk(&self, s: &mut UsageStream, ctx: &EventCtx, c: &Chunk) {
        s.observer(self.format)
            .push(&c.bytes, c.len.into(), ctx.stamp_ns);
    }

    /// Parsing what is left and evaluating the costs: no I/O, no waiting.
    fn quick_final(&self) -> bool {
        true
    }

    fn quick_events(&self) -> bool {
        true
    }

    fn on_final(&self, s: &mut UsageStream, ctx: &EventCtx, f: &Final) -> Metadata {
        let body = s.observer(self.format);
        body.push(&f.bytes, f.len.into(), ctx.stamp_ns);
        body.finish(ctx.stamp_ns);
        self.report(s, None)
    }

    /// The stream ended without a response end: what was read so far, with the input tokens a
    /// format reports up front (Anthropic's `message_start`) and the output estimated from the
    /// content that reached the front, `estimated = true`, `status = "aborted"` and the cause.
    fn on_aborted_final(&self, s: &mut UsageStream, ctx: &EventCtx, a: &AbortedFinal) -> Metadata {
        s.observer(self.format).finish(ctx.stamp_ns);
        self.report(s, Some(a))
    }
}

/// The usage of a stream that ended without its final counts, written into `own` with
/// `estimated = true`: the output is the larger of the content deltas that reached the front and
/// the output the response reported so far; the input (and so the total) only when the response
/// reported it up front (Anthropic's `message_start`, each Gemini chunk's cumulative counts).
fn estimate(body: &ResponseObserver, own: &mut BTreeMap<String, Value>) -> Tokens {
    let content = i64::try_from(body.content_events).unwrap_or(i64::MAX);
    let pending = body.pending_usage();
    let output_tokens = content.max(pending.map_or(0, |u| u.output_tokens));
    own.insert("output_tokens".into(), Value::Int(output_tokens));
    own.insert("completion_tokens".into(), Value::Int(output_tokens));
    if let Some(input) = pending.map(|u| u.input_tokens) {
        own.insert("input_tokens".into(), Value::Int(input));
        own.insert("prompt_tokens".into(), Value::Int(input));
        own.insert("total_tokens".into(), Value::Int(input + output_tokens));
    }
    own.insert("estimated".into(), Value::Bool(true));
    Tokens::Estimated {
        output_tokens,
        input_tokens: pending.map(|u| u.input_tokens),
    }
}

impl UsagePlugin {
    /// The stream's metadata once its body is finished; `aborted` for a stream that ended
    /// without a response end.
    fn report(&self, s: &UsageStream, aborted: Option<&AbortedFinal>) -> Metadata {
        let body = &s.body;
        let mut own = BTreeMap::new();
        if let Some(a) = aborted {
            own.insert("status".into(), Value::from("aborted"));
            own.insert("cause".into(), Value::from(a.cause.as_str()));
        }
        if let Some(u) = &body.usage {
            u.insert_into(&mut own);
        }
        let format = body.format().map(Format::name);
        if let Some(format) = format {
            own.insert("format".into(), Value::from(format));
        }
        if let Some(model) = &body.model {
            own.insert("model".into(), Value::from(model.as_str()));
        }
        let error = body.typed_error(s.status);
        if let Some(err) = &error {
            own.insert("error".into(), Value::from(err.message.as_str()));
            if let Some(kind) = &err.kind {
                own.insert("error_type".into(), Value::from(kind.as_str()));
            }
        }
        let reason = match aborted {
            Some(a) if body.usage.is_none() => Some(format!(
                "the stream ended before the response did ({}): the usage is what reached the \
                 front, the output estimated from its content",
                a.cause.as_str()
            )),
            _ => body.no_usage_reason(s.status),
        };
        if let Some(reason) = &reason {
            own.insert("reason".into(), Value::from(reason.as_str()));
        }
        let tokens = match body.usage {
            Some(u) => Some(Tokens::Reported(u)),
            // An aborted stream is billed for what the client got: the input the response
            // reported up front, the output its content shows, even without the option.
            None if aborted.is_some() && error.is_none() => Some(estimate(body, &mut own)),
            // A stream that ended without its usage: the counts it reported so far (Gemini
            // repeats them cumulatively), else its content deltas.
            None if self.estimate_output_tokens
                && error.is_none()
                && body.is_sse()
                && (body.content_events > 0 || body.pending_usage().is_some()) =>
            {
                Some(estimate(body, &mut own))
            }
            None => None,
        };
        let mut meta = Metadata::new();
        // Without costs or attributes (the default config) nothing reads the CEL variables.
        let evaluates = !self.costs.is_empty() || !self.attributes.is_empty();
        let ctx = tokens.filter(|_| evaluates).map(|tokens| {
            Facts {
                tokens,
                model: body.model.as_deref().unwrap_or(""),
                format: format.unwrap_or(""),
                status: s.status,
                headers: &s.headers,
            }
            .context()
        });
        self.write_costs(tokens, reason.as_deref(), ctx.as_ref(), &mut own, &mut meta);
        if let Some(ctx) = &ctx {
            self.write_attributes(ctx, &mut meta);
        }
        meta.insert(NAMESPACE.to_owned(), Value::Map(own));
        meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{play, play_response, Played};
    use crate::usage_formats::tests::{CHAT_JSON, CHAT_STREAM, ERROR_JSON, RESPONSES_STREAM};
    use plugin_runner::testing::Player;

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

    /// Plays `sse` cut into `chunks` pieces, keeps the first `keep` of them, and ends the stream
    /// with an aborted final.
    fn play_aborted(
        sse: &str,
        keep: usize,
        cause: ipc_protocol::AbortCause,
    ) -> plugin_runner::testing::Played {
        use plugin_runner::testing::{Split, Stream};
        let player = Player::new(UsagePlugin::default());
        let events: Vec<&[u8]> = Split::SseEvents.apply(sse.as_bytes());
        let stream = Stream::new(3)
            .request(&[(":path", "/v1/messages")])
            .response(200, &[("content-type", "text/event-stream")])
            .chunks(events.into_iter().take(keep))
            .aborted_final(cause);
        player.play(&stream)
    }

    #[test]
    fn an_aborted_stream_reports_the_input_it_saw_and_estimates_the_output_it_sent() {
        let anthropic = include_str!("../tests/fixtures/usage/anthropic_stream.sse");
        // message_start, content_block_start, ping, then two deltas: the client left there.
        let played = play_aborted(anthropic, 5, ipc_protocol::AbortCause::ClientDisconnect);
        let own = played.own();
        let get = |k: &str| own.get(k).cloned();
        assert_eq!(get("status"), Some(Value::from("aborted")));
        assert_eq!(get("cause"), Some(Value::from("client_disconnect")));
        assert_eq!(get("estimated"), Some(Value::Bool(true)));
        // Input with the cache reads and writes, as the format counts it (25 + 1800 + 4200).
        assert_eq!(get("input_tokens"), Some(Value::Int(6025)), "{own:?}");
        assert_eq!(get("output_tokens"), Some(Value::Int(2)), "{own:?}");
        assert_eq!(get("total_tokens"), Some(Value::Int(6027)), "{own:?}");
        assert!(get("reason").is_some(), "{own:?}");

        // OpenAI reports nothing up front: the output alone, estimated, never a silent zero.
        let openai = include_str!("../tests/fixtures/usage/openai_chat_stream.sse");
        let played = play_aborted(openai, 3, ipc_protocol::AbortCause::UpstreamError);
        let own = played.own();
        assert_eq!(own.get("cause"), Some(&Value::from("upstream_error")));
        assert_eq!(own.get("estimated"), Some(&Value::Bool(true)));
        assert!(own.get("input_tokens").is_none(), "{own:?}");
        assert!(
            matches!(own.get("output_tokens"), Some(&Value::Int(n)) if n > 0),
            "{own:?}"
        );

        // Aborted after the whole response (usage and all) came: the reported numbers stand.
        let whole = play_aborted(
            anthropic,
            usize::MAX,
            ipc_protocol::AbortCause::ClientDisconnect,
        );
        let own = whole.own();
        assert_eq!(own.get("status"), Some(&Value::from("aborted")));
        assert!(own.get("estimated").is_none(), "{own:?}");
    }

    #[test]
    fn streamed_usage_and_cel_cost_attribute() {
        let p = Player::new(configured(vec![cost_attr()]).unwrap());
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
        let p = Player::new(UsagePlugin::default());
        let own = &play(&p, RESPONSES_STREAM, 97, "text/event-stream").meta[NAMESPACE];
        assert_eq!(own.get("prompt_tokens"), Some(&Value::Int(36)));
        assert_eq!(own.get("completion_tokens"), Some(&Value::Int(3)));
        assert_eq!(own.get("total_tokens"), Some(&Value::Int(39)));
    }

    #[test]
    fn non_streaming_json_body() {
        let p = Player::new(configured(vec![cost_attr()]).unwrap());
        let meta = play(&p, CHAT_JSON, 64, "application/json").meta;
        assert_eq!(meta[NAMESPACE].get("total_tokens"), Some(&Value::Int(33)));
        assert_eq!(
            meta["envoy.lb"].get("x-gateway-inference-request-cost"),
            Some(&Value::Int(25 + 16))
        );
    }

    #[test]
    fn error_body_reports_the_error_and_no_attributes() {
        let p = Player::new(configured(vec![cost_attr()]).unwrap());
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
        let p = Player::new(configured(vec![big, small]).unwrap());
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

    const NO_USAGE_STREAM: &str =
        include_str!("../tests/fixtures/usage/openai_chat_stream_no_usage.sse");

    fn cost(namespace: &str, key: &str, kind: &str) -> Value {
        Value::map([
            ("namespace", Value::from(namespace)),
            ("key", Value::from(key)),
            ("type", Value::from(kind)),
        ])
    }

    fn with_costs(costs: Vec<Value>, estimate: bool) -> Result<UsagePlugin, ConfigError> {
        let mut p = UsagePlugin::default();
        p.configure(&Value::map([
            ("costs", Value::List(costs)),
            ("estimate_output_tokens", Value::Bool(estimate)),
        ]))?;
        Ok(p)
    }

    /// Plays `body` whole with this status and these headers besides `content-type`.
    fn respond(
        p: &Player<UsagePlugin>,
        body: &str,
        status: u16,
        ct: &str,
        extra: &[(&str, &str)],
    ) -> Metadata {
        let mut headers = vec![("content-type", ct)];
        headers.extend_from_slice(extra);
        play_response(p, &[body], status, &headers).meta
    }

    fn cost_error(meta: &Metadata, target: &str) -> String {
        match meta[NAMESPACE]
            .get("cost_errors")
            .and_then(|e| e.get(target))
        {
            Some(Value::String(s)) => s.clone(),
            other => panic!("no cost error for {target}: {other:?} in {meta:?}"),
        }
    }

    #[test]
    fn every_token_type_is_a_cost_and_unreported_details_are_zero() {
        let costs = TokenType::ALL
            .map(|t| cost("envoy.lb", t.name(), t.name()))
            .to_vec();
        let p = Player::new(with_costs(costs, false).unwrap());
        let meta = respond(&p, CHAT_STREAM, 200, "text/event-stream", &[]);
        let lb = &meta["envoy.lb"];
        for (t, want) in [
            ("input", 17),
            ("cached_input", 16),
            ("cache_creation_input", 0),
            ("output", 7),
            ("reasoning", 0),
            ("total", 24),
        ] {
            assert_eq!(lb.get(t), Some(&Value::Int(want)), "{t}");
        }
        assert!(meta[NAMESPACE].get("cost_errors").is_none(), "{meta:?}");
    }

    #[test]
    fn a_cel_cost_reads_tokens_model_status_and_response_headers() {
        let p = Player::new(
            with_costs(
                vec![cost(
                    "envoy.lb",
                    "weighted",
                    "(input_tokens - cached_input_tokens) + 4 * output_tokens \
                 + (model.startsWith('meta-llama/') ? 1000 : 0) \
                 + (headers['x-tier'] == 'gold' ? 0 : 10000) + status",
                )],
                false,
            )
            .unwrap(),
        );
        let meta = respond(
            &p,
            CHAT_STREAM,
            200,
            "text/event-stream",
            &[("X-Tier", "gold")],
        );
        assert_eq!(
            meta["envoy.lb"].get("weighted"),
            Some(&Value::Int(1 + 4 * 7 + 1000 + 200))
        );
    }

    #[test]
    fn a_response_without_usage_writes_no_cost_and_says_why() {
        let p = Player::new(with_costs(vec![cost("envoy.lb", "tokens", "total")], false).unwrap());
        let meta = play(&p, ERROR_JSON, 64, "application/json").meta;
        assert!(!meta.contains_key("envoy.lb"), "{meta:?}");
        let why = cost_error(&meta, "envoy.lb:tokens");
        assert!(why.starts_with("no usage: upstream error"), "{why}");

        let meta = respond(&p, NO_USAGE_STREAM, 200, "text/event-stream", &[]);
        assert!(!meta.contains_key("envoy.lb"), "{meta:?}");
        assert!(meta[NAMESPACE].get("estimated").is_none());
        assert!(meta[NAMESPACE].get("output_tokens").is_none());
        assert_eq!(
            cost_error(&meta, "envoy.lb:tokens"),
            "no usage: no usage in the openai stream (the request needs stream_options.include_usage)"
        );
    }

    #[test]
    fn estimate_counts_content_deltas_and_only_output_costs_are_written() {
        let p = Player::new(
            with_costs(
                vec![
                    cost("envoy.lb", "out", "output"),
                    cost("envoy.lb", "in", "input"),
                    cost("envoy.lb", "cel", "output_tokens * 3"),
                    cost("envoy.lb", "cel_in", "input_tokens + output_tokens"),
                ],
                true,
            )
            .unwrap(),
        );
        let meta = respond(&p, NO_USAGE_STREAM, 200, "text/event-stream", &[]);
        let own = &meta[NAMESPACE];
        // Three chunks have choices, but only one delivers text.
        assert_eq!(own.get("output_tokens"), Some(&Value::Int(1)));
        assert_eq!(own.get("completion_tokens"), Some(&Value::Int(1)));
        assert_eq!(own.get("estimated"), Some(&Value::Bool(true)));
        assert!(own.get("input_tokens").is_none() && own.get("total_tokens").is_none());
        assert!(
            own.get("reason").is_some(),
            "the missing usage is still explained"
        );
        assert_eq!(meta["envoy.lb"].get("out"), Some(&Value::Int(1)));
        assert_eq!(meta["envoy.lb"].get("cel"), Some(&Value::Int(3)));
        assert!(meta["envoy.lb"].get("in").is_none());
        assert!(cost_error(&meta, "envoy.lb:in")
            .starts_with("input_tokens unknown: the usage is estimated"));
        assert_eq!(
            cost_error(&meta, "envoy.lb:cel_in"),
            format!("input_tokens unknown: {ESTIMATE_KNOWS}")
        );
    }

    #[test]
    fn no_estimate_for_errors_json_bodies_or_streams_without_content() {
        let p = Player::new(with_costs(vec![], true).unwrap());
        let error_stream = include_str!("../tests/fixtures/usage/anthropic_error_stream.sse");
        let meta = respond(&p, error_stream, 200, "text/event-stream", &[]);
        assert!(meta[NAMESPACE].get("estimated").is_none(), "{meta:?}");
        let meta = respond(&p, ERROR_JSON, 400, "application/json", &[]);
        assert!(meta[NAMESPACE].get("estimated").is_none(), "{meta:?}");
        let empty = "data: {\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: [DONE]\n\n";
        let meta = respond(&p, empty, 200, "text/event-stream", &[]);
        assert!(meta[NAMESPACE].get("estimated").is_none(), "{meta:?}");
    }

    #[test]
    fn a_cost_must_be_an_integer_from_zero_to_2_pow_53() {
        let p = Player::new(
            with_costs(
                vec![
                    cost("c", "at_max", &format!("{MAX_COST} + output_tokens - 7")),
                    cost("c", "past_max", &format!("{MAX_COST} + output_tokens - 6")),
                    cost("c", "zero", "output_tokens - 7"),
                    cost("c", "negative", "output_tokens - 8"),
                    cost("c", "double", "double(output_tokens) * 0.5"),
                    cost("c", "int_of_double", "int(double(output_tokens) * 0.5)"),
                    cost("c", "uint", "uint(output_tokens)"),
                    cost("c", "string", "model"),
                    cost("c", "missing_header", "headers['x-none'] == 'a' ? 1 : 2"),
                ],
                false,
            )
            .unwrap(),
        );
        let meta = respond(&p, CHAT_STREAM, 200, "text/event-stream", &[]);
        let c = &meta["c"];
        assert_eq!(c.get("at_max"), Some(&Value::Int(MAX_COST)));
        assert_eq!(c.get("zero"), Some(&Value::Int(0)));
        assert_eq!(c.get("int_of_double"), Some(&Value::Int(3)));
        assert_eq!(c.get("uint"), Some(&Value::Int(7)));
        for key in ["past_max", "negative", "double", "string", "missing_header"] {
            assert!(c.get(key).is_none(), "{key}");
        }
        assert_eq!(
            cost_error(&meta, "c:past_max"),
            format!("the cost {} is over {MAX_COST}, the largest integer Envoy's metadata carries exactly", MAX_COST + 1)
        );
        assert_eq!(cost_error(&meta, "c:negative"), "the cost is negative (-1)");
        assert_eq!(
            cost_error(&meta, "c:double"),
            "the expression gave a double (3.5); costs are integers: wrap it in int()"
        );
        assert_eq!(
            cost_error(&meta, "c:string"),
            "the expression gave a string, not an integer"
        );
        let why = cost_error(&meta, "c:missing_header");
        assert!(
            why.starts_with("the expression failed: ") && why.contains("x-none"),
            "{why}"
        );
    }

    #[test]
    fn a_non_2xx_without_an_error_object_is_a_typed_error() {
        let p = Player::new(with_costs(vec![cost("envoy.lb", "t", "total")], true).unwrap());
        let meta = respond(
            &p,
            "upstream connect error or disconnect/reset before headers.\n reset reason: overflow",
            503,
            "text/plain",
            &[],
        );
        let own = &meta[NAMESPACE];
        assert_eq!(own.get("error_type"), Some(&Value::from("http_503")));
        assert_eq!(
            own.get("error"),
            Some(&Value::from(
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            ))
        );
        assert_eq!(own.get("reason"), Some(&Value::from("upstream status 503")));
        assert!(own.get("estimated").is_none() && own.get("output_tokens").is_none());
        assert!(!meta.contains_key("envoy.lb"));

        let long = "x".repeat(crate::usage_formats::MAX_ERROR_BODY + 1);
        let meta = respond(&p, &long, 502, "text/html", &[]);
        let Some(Value::String(msg)) = meta[NAMESPACE].get("error") else {
            panic!("{meta:?}")
        };
        assert_eq!(msg.len(), crate::usage_formats::MAX_ERROR_BODY);
        let meta = respond(&p, "", 500, "text/plain", &[]);
        assert_eq!(
            meta[NAMESPACE].get("error"),
            Some(&Value::from("upstream status 500"))
        );
    }

    #[test]
    fn a_vllm_flat_error_chunk_mid_stream_is_the_upstream_error() {
        let p = Player::new(with_costs(vec![], true).unwrap());
        let body = "data: {\"object\":\"chat.completion.chunk\",\"model\":\"Qwen/Qwen3-8B\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                    data: {\"object\":\"error\",\"message\":\"The decoder prompt cannot be empty\",\"type\":\"BadRequestError\",\"param\":null,\"code\":400}\n\n\
                    data: [DONE]\n\n";
        let own = &respond(&p, body, 200, "text/event-stream", &[])[NAMESPACE];
        assert_eq!(
            own.get("error"),
            Some(&Value::from("The decoder prompt cannot be empty"))
        );
        assert_eq!(own.get("error_type"), Some(&Value::from("BadRequestError")));
        assert_eq!(own.get("reason"), Some(&Value::from("upstream error")));
        assert!(own.get("estimated").is_none());
    }

    #[test]
    fn cost_config_errors_name_the_key_and_the_fix() {
        let err = |costs: Vec<Value>| with_costs(costs, false).err().unwrap().to_string();
        let e = err(vec![cost("envoy.lb", "x", "inptu")]);
        assert!(
            e.starts_with(
                "costs[0].type: CEL expression `inptu` uses `inptu`, which is not a variable"
            ) && e.contains("token types by name: input, cached_input"),
            "{e}"
        );
        let e = err(vec![cost("envoy.lb", "x", "input_tokens +* 2")]);
        assert!(
            e.starts_with("costs[0].type: invalid CEL expression `input_tokens +* 2`")
                && e.ends_with("(a token type is one of: input, cached_input, cache_creation_input, output, reasoning, total)"),
            "{e}"
        );
        let e = err(vec![
            cost("envoy.lb", "x", "output"),
            cost("envoy.lb", "x", "input"),
        ]);
        assert_eq!(e, "costs[1]: `envoy.lb:x` is already written by costs[0]");
        let e = err(vec![cost(NAMESPACE, "input_tokens", "input")]);
        assert!(e.contains("is a key the plugin writes itself"), "{e}");
        let e = err(vec![cost("plugvisor", "x", "input")]);
        assert!(
            e.starts_with("costs[0].namespace: `plugvisor` is the front's own"),
            "{e}"
        );
        let e = err(vec![Value::map([
            ("namespace", Value::from("a")),
            ("type", Value::from("input")),
        ])]);
        assert_eq!(e, "costs[0].key is missing (a non-empty string)");
        let e = err(vec![cost("", "x", "input")]);
        assert_eq!(e, "costs[0].namespace is missing (a non-empty string)");
        let e = err(vec![Value::map([
            ("namespace", Value::from("a")),
            ("key", Value::from("b")),
            ("type", Value::from("input")),
            ("cel", Value::from("1")),
        ])]);
        assert!(e.starts_with("costs[0]: unknown key `cel`"), "{e}");
        // A cost and an attribute may not write the same key either.
        let mut p = UsagePlugin::default();
        let e = p
            .configure(&Value::map([
                (
                    "costs",
                    Value::List(vec![cost(
                        "envoy.lb",
                        "x-gateway-inference-request-cost",
                        "total",
                    )]),
                ),
                ("attributes", Value::List(vec![cost_attr()])),
            ]))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "attributes[0]: `envoy.lb:x-gateway-inference-request-cost` is already written by costs[0]");
        let e = p
            .configure(&Value::map([(
                "estimate_output_tokens",
                Value::from("yes"),
            )]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "config.estimate_output_tokens must be true or false, got \"yes\""
        );
    }

    #[test]
    fn a_refused_config_leaves_the_running_one_in_place() {
        let mut p = with_costs(vec![cost("envoy.lb", "t", "total")], true).unwrap();
        assert!(p
            .configure(&Value::map([("costs", Value::from("x"))]))
            .is_err());
        assert_eq!(p.costs.len(), 1);
        assert!(p.estimate_output_tokens);
    }
}
