//! The `usage` plugin through real Envoy: an upstream serves the recorded provider bodies of
//! `builtins/tests/fixtures/usage/` (SSE one event per HTTP chunk, JSON whole), the front
//! runs the `usage` plugin with the config that docs/plugins.md shows, and Envoy runs
//! `examples/envoy.yaml` plus the rate-limit pieces of the same page, talking to a recording
//! rate-limit service. For every format, Envoy's access log must hold exactly the metadata of the
//! fixture's golden file, and the rate-limit service must be charged the `tokens` cost (or, for
//! a response without usage, not be called). Bodies compressed by the `gzip` and `zstd` tools
//! reach the client as sent and give the plain body's golden metadata.
//!
//! Bedrock's event streams are served one message per HTTP chunk to the Bedrock request paths
//! (the model id is read there). Envoy 1.40's own AI extraction (`ai_protocol_manager`) knows
//! OpenAI chat and responses, Anthropic Messages and Gemini only, so the Bedrock numbers are
//! checked against the fixtures' known totals: their golden files.
//!
//! The same Envoy runs that extraction too, observe-only, beside ext_proc: wherever it reports
//! usage, the plugin's input, output and total tokens and model must be the same
//! ([`NATIVE_DIFFERS`] lists the one stream where they differ on purpose).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value as Json};
use tests::envoy::{Envoy, EnvoyOptions};
use tests::front::FrontProcess;

/// One fixture served through Envoy, and the golden file its access-log line must match.
struct Case {
    fixture: &'static str,
    golden: &'static str,
    status: u16,
    content_type: &'static str,
    /// The fixture is stored encoded so (sent with this `Content-Encoding`).
    encoding: Option<&'static str>,
    /// The request path (Bedrock's names the model).
    path: &'static str,
}

const SSE: &str = "text/event-stream";
const JSON: &str = "application/json";
const EVENTSTREAM: &str = "application/vnd.amazon.eventstream";

const fn case(fixture: &'static str, golden: &'static str, content_type: &'static str) -> Case {
    Case {
        fixture,
        golden,
        status: 200,
        content_type,
        encoding: None,
        path: "/v1/any",
    }
}

/// A Bedrock event stream, requested at `path`.
const fn bedrock(fixture: &'static str, golden: &'static str, path: &'static str) -> Case {
    Case {
        path,
        ..case(fixture, golden, EVENTSTREAM)
    }
}

const CONVERSE_CLAUDE: &str =
    "/model/us.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse-stream";

/// A fixture compressed by the `gzip` or `zstd` tool: its golden file is the plain body's.
const fn compressed(
    fixture: &'static str,
    golden: &'static str,
    content_type: &'static str,
    encoding: &'static str,
) -> Case {
    Case {
        encoding: Some(encoding),
        ..case(fixture, golden, content_type)
    }
}

/// Every format streamed and as JSON, vLLM and SGLang, errors, and streams without usage (the
/// docs' config estimates, so their golden files are the `_estimated` ones).
const CASES: &[Case] = &[
    case("openai_chat_stream.sse", "openai_chat_stream", SSE),
    case("openai_chat.json", "openai_chat_json", JSON),
    case("openai_completions.json", "openai_completions_json", JSON),
    case(
        "openai_responses_stream.sse",
        "openai_responses_stream",
        SSE,
    ),
    case("openai_responses.json", "openai_responses_json", JSON),
    case("anthropic_stream.sse", "anthropic_stream", SSE),
    case("anthropic.json", "anthropic_json", JSON),
    case("anthropic_error_stream.sse", "anthropic_error_stream", SSE),
    case("gemini_stream.sse", "gemini_stream", SSE),
    case("gemini.json", "gemini_json", JSON),
    case(
        "vllm_completions_stream.sse",
        "vllm_completions_stream",
        SSE,
    ),
    case(
        "vllm_chat_reasoning_stream.sse",
        "vllm_chat_reasoning_stream",
        SSE,
    ),
    case(
        "sglang_chat_reasoning_stream.sse",
        "sglang_chat_reasoning_stream",
        SSE,
    ),
    case("vllm_error_stream.sse", "vllm_error_stream_estimate", SSE),
    case(
        "vllm_chat_reasoning_stream_no_usage.sse",
        "vllm_chat_reasoning_stream_no_usage_estimated",
        SSE,
    ),
    case(
        "gemini_stream_truncated.sse",
        "gemini_stream_truncated_estimated",
        SSE,
    ),
    Case {
        status: 429,
        ..case("openai_error.json", "openai_error_json", JSON)
    },
    Case {
        status: 503,
        ..case("proxy_503.txt", "proxy_503", "text/plain")
    },
    compressed("openai_chat.json.gz", "openai_chat_json", JSON, "gzip"),
    compressed(
        "../compressed/anthropic_stream.sse.gz",
        "anthropic_stream",
        SSE,
        "gzip",
    ),
    compressed(
        "../compressed/openai_responses_stream.sse.zst",
        "openai_responses_stream",
        SSE,
        "zstd",
    ),
    bedrock(
        "bedrock_converse_stream.eventstream",
        "bedrock_converse_stream",
        CONVERSE_CLAUDE,
    ),
    bedrock(
        "bedrock_invoke_claude_stream.eventstream",
        "bedrock_invoke_claude_stream",
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke-with-response-stream",
    ),
    bedrock(
        "bedrock_invoke_llama_stream.eventstream",
        "bedrock_invoke_llama_stream",
        "/model/meta.llama3-8b-instruct-v1%3A0/invoke-with-response-stream",
    ),
    bedrock(
        "bedrock_converse_exception.eventstream",
        "bedrock_converse_exception_estimate",
        "/model/mistral.mistral-large-2407-v1%3A0/converse-stream",
    ),
    bedrock(
        "bedrock_converse_stream_truncated.eventstream",
        "bedrock_converse_stream_truncated_estimated",
        CONVERSE_CLAUDE,
    ),
    bedrock(
        "bedrock_converse_stream_bad_crc.eventstream",
        "bedrock_converse_stream_bad_crc_estimated",
        CONVERSE_CLAUDE,
    ),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn fixtures() -> PathBuf {
    workspace().join("builtins/tests/fixtures/usage")
}

/// The fenced block that follows the marker `<!-- tested: {marker} -->` in docs/plugins.md.
fn doc_block(marker: &str) -> String {
    let doc = std::fs::read_to_string(workspace().join("docs/plugins.md")).expect("docs");
    let start = doc
        .find(&format!("<!-- tested: {marker}"))
        .unwrap_or_else(|| panic!("docs/plugins.md lost the `{marker}` block"));
    let mut lines = doc[start..].lines().skip(1);
    assert!(
        lines.next().is_some_and(|l| l.starts_with("```")),
        "{marker}: a fenced block must follow the marker"
    );
    lines
        .take_while(|l| !l.starts_with("```"))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn indent(block: &str, by: usize) -> String {
    block.lines().map(|l| format!("{:by$}{l}\n", "")).collect()
}

/// `examples/envoy.yaml` (which already receives and logs `envoy.ratelimit` as `costs`) plus
/// the docs' rate-limit filter, route and cluster (on `rls_port`), and access-log fields for
/// exactly what `hits_addend` reads and for the tenant.
fn add_rate_limiting(yaml: String, rls_port: u16) -> String {
    let mut yaml = yaml;
    let mut swap = |from: &str, to: String| {
        assert!(yaml.contains(from), "examples/envoy.yaml lost `{from}`");
        yaml = yaml.replacen(from, &to, 1);
    };
    let router = "          - name: envoy.filters.http.router\n";
    swap(
        router,
        format!("{}{router}", indent(&doc_block("ratelimit-filter"), 10)),
    );
    swap(
        "              - match: { prefix: \"/\" }\n                route: { cluster: llm, timeout: 300s }\n",
        indent(&doc_block("ratelimit-route"), 14),
    );
    let lb = "                  lb: \"%DYNAMIC_METADATA(envoy.lb)%\"\n";
    swap(
        lb,
        format!(
            "{lb}                  hits: \"%DYNAMIC_METADATA(envoy.ratelimit:tokens)%\"\n                  \
             tenant: \"%REQ(X-TENANT)%\"\n"
        ),
    );
    let cluster = doc_block("ratelimit-cluster");
    assert!(cluster.contains("port_value: 8081"), "{cluster}");
    let cluster = cluster.replace("port_value: 8081", &format!("port_value: {rls_port}"));
    yaml.push_str(&indent(&cluster, 2));
    yaml
}

/// Adds Envoy 1.40's own usage extraction (the AI Protocol Manager filter, observe-only) next to
/// ext_proc, logged as `native`, so every response is counted by both.
fn add_native_usage(yaml: String) -> String {
    let router = "          - name: envoy.filters.http.router\n";
    let lb = "                  lb: \"%DYNAMIC_METADATA(envoy.lb)%\"\n";
    assert!(
        yaml.contains(router) && yaml.contains(lb),
        "examples/envoy.yaml changed"
    );
    yaml.replacen(
        router,
        &format!(
            "          - name: envoy.filters.http.ai_protocol_manager\n            typed_config:\n              \
             \"@type\": type.googleapis.com/envoy.extensions.filters.http.ai_protocol_manager.v3.AiProtocolManager\n              \
             response_handling: {{ token_usage: {{ include_unconfigured_routes: true }} }}\n{router}"
        ),
        1,
    )
    .replacen(
        lb,
        &format!("{lb}{}", native_fields()),
        1,
    )
}

/// Streams whose usage Envoy's own extraction reports differently, and why. Everywhere else
/// the two agree on input, output and total tokens and the model, or Envoy has no record (a
/// format it does not know: Bedrock, the legacy completions API; a compressed body; no usage).
const NATIVE_DIFFERS: &[(&str, &str)] = &[(
    "anthropic_error_stream",
    "the stream ends in an `overloaded_error` event: Envoy reports the usage of `message_start` \
     as if it were the response's, the plugin reports no usage and the error (`reason`, \
     `error_type`), so a billing pipeline sees the failure",
)];

/// Whether Envoy's own record in `line` disagrees with the plugin's `plugvisor.usage` where it
/// should not (see [`NATIVE_DIFFERS`]).
fn native_differs(golden: &str, line: &Json) -> Option<String> {
    let native = |f: &str| line[format!("native_{f}")].as_str().map(str::to_owned);
    let native_out = native("output_tokens")?;
    if NATIVE_DIFFERS.iter().any(|(g, _)| *g == golden) {
        return None;
    }
    let usage = &line["usage"];
    let number = |j: &Json| j.as_f64().map(|n| (n as u64).to_string());
    let pairs = [
        (
            "input_tokens",
            native("input_tokens"),
            number(&usage["input_tokens"]),
        ),
        (
            "output_tokens",
            Some(native_out),
            number(&usage["output_tokens"]),
        ),
        (
            "total_tokens",
            native("total_tokens"),
            number(&usage["total_tokens"]),
        ),
        (
            "model",
            native("model"),
            usage["model"].as_str().map(str::to_owned),
        ),
    ];
    let wrong: Vec<String> = pairs
        .iter()
        .filter(|(_, envoy, plugin)| envoy != plugin)
        .map(|(f, envoy, plugin)| format!("{f}: Envoy {envoy:?}, plugin {plugin:?}"))
        .collect();
    (!wrong.is_empty()).then(|| {
        format!(
            "Envoy's own usage extraction disagrees: {}",
            wrong.join("; ")
        )
    })
}

/// The access-log fields of Envoy's own record: 1.40 publishes it only as typed metadata
/// (`envoy.data.ai.v3.TokenUsage`), which the log reads through CEL.
fn native_fields() -> String {
    ["input_tokens", "output_tokens", "total_tokens", "model"]
        .iter()
        .map(|f| {
            format!(
                "                  native_{f}: \"%CEL(metadata.typed_filter_metadata['envoy.ai.token_usage'].{f})%\"\n"
            )
        })
        .collect()
}

/// One rate-limit request as the service saw it.
#[derive(Debug, Clone)]
struct Charged {
    domain: String,
    tenant: String,
    /// The descriptor's hits, else the request's.
    hits: u64,
}

/// A rate-limit service that records every request and always answers OK.
#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Vec<Charged>>>);

#[tonic::async_trait]
impl RateLimitService for Recorder {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let r = request.into_inner();
        let mut seen = self.0.lock().unwrap();
        for d in &r.descriptors {
            seen.push(Charged {
                domain: r.domain.clone(),
                tenant: d
                    .entries
                    .iter()
                    .find(|e| e.key == "tenant")
                    .map(|e| e.value.clone())
                    .unwrap_or_default(),
                hits: d
                    .hits_addend
                    .map(|h| h.value)
                    .unwrap_or(u64::from(r.hits_addend)),
            });
        }
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        }))
    }
}

impl Recorder {
    fn charges_of(&self, tenant: &str) -> Vec<Charged> {
        let seen = self.0.lock().unwrap();
        seen.iter()
            .filter(|c| c.tenant == tenant)
            .cloned()
            .collect()
    }
}

async fn start_rate_limit_service(recorder: Recorder) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind rls");
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(recorder))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (port, task)
}

type Body = Either<
    Full<Bytes>,
    StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>,
>;

/// Serves the fixture named by the request's `x-fixture` header with the status and content
/// type of `x-fixture-status` and `x-fixture-type`: SSE one event per chunk, an AWS event stream
/// one message per chunk (as Bedrock writes them; a cut last message as it is), anything else
/// whole with a content-length. With `x-fixture-encoding`, the stored bytes are sent as they are with
/// that `Content-Encoding`, an SSE body in three chunks cut anywhere.
async fn serve_fixture(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let name = header("x-fixture");
    let content_type = header("x-fixture-type");
    let status: u16 = header("x-fixture-status").parse().unwrap_or(200);
    let encoding = header("x-fixture-encoding");
    let bytes = std::fs::read(fixtures().join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let body = if !encoding.is_empty() && content_type == SSE {
        let third = bytes.len().div_ceil(3);
        let frames: Vec<_> = bytes
            .chunks(third)
            .map(|piece| Ok(Frame::data(Bytes::copy_from_slice(piece))))
            .collect();
        Either::Right(StreamBody::new(tokio_stream::iter(frames)))
    } else if content_type == EVENTSTREAM {
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = rest.get(..4).map_or(rest.len(), |l| {
                u32::from_be_bytes(l.try_into().unwrap()) as usize
            });
            let (message, after) = rest.split_at(len.min(rest.len()));
            frames.push(Ok(Frame::data(Bytes::copy_from_slice(message))));
            rest = after;
        }
        Either::Right(StreamBody::new(tokio_stream::iter(frames)))
    } else if content_type == SSE {
        let text = String::from_utf8(bytes).expect("utf-8 sse");
        let frames: Vec<_> = text
            .split_inclusive("\n\n")
            .map(|event| Ok(Frame::data(Bytes::from(event.to_owned()))))
            .collect();
        Either::Right(StreamBody::new(tokio_stream::iter(frames)))
    } else {
        Either::Left(Full::new(Bytes::from(bytes)))
    };
    let mut response = hyper::Response::builder()
        .status(status)
        .header("content-type", content_type);
    if !encoding.is_empty() {
        response = response.header("content-encoding", encoding);
    }
    Ok(response.body(body).expect("response"))
}

async fn start_upstream() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), hyper::service::service_fn(serve_fixture))
                    .await;
            });
        }
    });
    (port, task)
}

/// Sends one request for `case` through Envoy as tenant `rid`; returns status and body.
async fn fetch(port: u16, case: &Case, rid: &str) -> (u16, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to envoy");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::post(format!("{}?test-id={rid}", case.path))
        .header("host", "gateway")
        .header("x-request-id", rid)
        .header("x-tenant", rid)
        .header("x-fixture", case.fixture)
        .header("x-fixture-status", case.status.to_string())
        .header("x-fixture-type", case.content_type)
        .header("x-fixture-encoding", case.encoding.unwrap_or_default())
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("response within 10 s")
        .expect("response");
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body within 10 s")
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, body)
}

/// The golden file as `namespace → JSON object`, the shape Envoy's access log prints.
fn golden(name: &str) -> BTreeMap<String, Json> {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.golden"))).expect("golden");
    let mut out: BTreeMap<String, Json> = BTreeMap::new();
    for line in text.lines() {
        let (path, value) = line.split_once(" = ").expect("`path = value`");
        let ns = ["plugvisor.usage", "envoy.ratelimit", "envoy.lb"]
            .into_iter()
            .find(|ns| path.starts_with(&format!("{ns}.")))
            .unwrap_or_else(|| panic!("unknown namespace in `{line}`"));
        let key = &path[ns.len() + 1..];
        let value: Json = serde_json::from_str(value).unwrap_or_else(|e| panic!("{line}: {e}"));
        let map = out.entry(ns.to_owned()).or_insert_with(|| json!({}));
        match key.split_once('[') {
            Some((outer, inner)) => {
                map[outer][inner.trim_end_matches(']')] = value;
            }
            None => map[key] = value,
        }
    }
    out
}

/// Numbers compare by value (Envoy prints the metadata's doubles as it likes).
fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x.as_f64() == y.as_f64(),
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// The access-log field of each namespace (see [`add_rate_limiting`] and examples/envoy.yaml).
const FIELDS: [(&str, &str); 3] = [
    ("plugvisor.usage", "usage"),
    ("envoy.ratelimit", "costs"),
    ("envoy.lb", "lb"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_reaches_envoy_with_its_golden_tokens_costs_and_model() {
    tests::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = Recorder::default();
    let (rls_port, rls) = start_rate_limit_service(recorder.clone()).await;
    let (upstream_port, upstream) = start_upstream().await;
    let plugins = format!(
        "[plugins.usage]\n{}",
        doc_block("tests/tests/it/usage_envoy.rs")
    );
    let (front, envoy) = tokio::task::block_in_place(|| {
        let front = FrontProcess::start(dir.path(), &plugins, &["usage"]);
        let envoy = Envoy::start_edited(
            dir.path(),
            &EnvoyOptions {
                ext_proc: front.ext_proc.clone(),
                upstream_port,
                ..EnvoyOptions::default()
            },
            |yaml| add_native_usage(add_rate_limiting(yaml, rls_port)),
        );
        (front, envoy)
    });

    let mut failures = Vec::new();
    // Responses Envoy's own extraction reported usage for (the check is not vacuous).
    let mut compared = 0;
    for (i, case) in CASES.iter().enumerate() {
        let rid = format!("{i}-{}", case.golden);
        let (status, body) = fetch(envoy.port, case, &rid).await;
        assert_eq!(status, case.status, "{rid}");
        let sent = std::fs::read(fixtures().join(case.fixture)).unwrap();
        assert!(
            body == sent,
            "{rid}: the client must get the upstream's bytes untouched"
        );
        let line =
            tokio::task::block_in_place(|| envoy.access_log_for(&rid, Duration::from_secs(5)));
        let want = golden(case.golden);
        compared += usize::from(line["native_output_tokens"].is_string());
        if let Some(differs) = native_differs(case.golden, &line) {
            failures.push(format!("{rid}: {differs}"));
        }
        for (ns, field) in FIELDS {
            let got = &line[field];
            match want.get(ns) {
                Some(w) if same(w, got) => {}
                None if got.is_null() => {}
                w => failures.push(format!("{rid}: {ns}\n  want {w:?}\n  got  {got}")),
            }
        }
        // What hits_addend reads is what the cost says, or nothing.
        let tokens = want.get("envoy.ratelimit").map(|c| c["tokens"].clone());
        match &tokens {
            Some(t) => assert!(
                same(&line["hits"], t),
                "{rid}: hits {} vs {t}",
                line["hits"]
            ),
            None => assert!(line["hits"].is_null(), "{rid}: {line}"),
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nfront log:\n{}",
        failures.join("\n"),
        front.log()
    );
    assert!(
        compared >= 12,
        "Envoy reported usage for only {compared} responses"
    );

    // Every stream with a cost is charged it once, at stream end; the others are not charged.
    let deadline = Instant::now() + Duration::from_secs(5);
    for (i, case) in CASES.iter().enumerate() {
        let rid = format!("{i}-{}", case.golden);
        let want = golden(case.golden)
            .get("envoy.ratelimit")
            .and_then(|c| c["tokens"].as_u64());
        if let Some(tokens) = want {
            let left = deadline.saturating_duration_since(Instant::now());
            let what = format!("{rid} charged");
            let charges = tests::eventually_async(&what, left, async || {
                let c = recorder.charges_of(&rid);
                (!c.is_empty()).then_some(c)
            })
            .await;
            assert_eq!(charges.len(), 1, "{rid}: {charges:?}");
            assert_eq!(charges[0].hits, tokens, "{rid}");
            assert_eq!(charges[0].domain, "llm-tokens", "{rid}");
        }
    }
    // Streams without a cost must not be charged. Their charges would have been sent when they
    // ended; one more costed stream, sent after them all and charged, bounds that wait.
    let sentinel = &CASES[0];
    fetch(envoy.port, sentinel, "sentinel").await;
    tests::eventually_async(
        "the sentinel stream charged",
        Duration::from_secs(5),
        async || !recorder.charges_of("sentinel").is_empty(),
    )
    .await;
    for (i, case) in CASES.iter().enumerate() {
        let rid = format!("{i}-{}", case.golden);
        if !golden(case.golden).contains_key("envoy.ratelimit") {
            assert!(recorder.charges_of(&rid).is_empty(), "{rid} was charged");
        }
    }

    // The docs' example of what Envoy holds is this very run's OpenAI stream.
    let example: Json = serde_json::from_str(&doc_block("metadata-example")).expect("json");
    let line = tokio::task::block_in_place(|| {
        envoy.access_log_for("0-openai_chat_stream", Duration::from_secs(5))
    });
    assert!(
        same(&example["usage"], &line["usage"]),
        "{}\nvs {}",
        example["usage"],
        line["usage"]
    );
    assert!(
        same(&example["costs"], &line["costs"]),
        "{}\nvs {}",
        example["costs"],
        line["costs"]
    );
    let charged = &recorder.charges_of("0-openai_chat_stream")[0];
    let request = &example["rate_limit_request"];
    assert_eq!(request["domain"], charged.domain.as_str());
    assert_eq!(request["descriptors"][0]["hits_addend"], charged.hits);

    drop(envoy);
    drop(front);
    rls.abort();
    upstream.abort();
}
