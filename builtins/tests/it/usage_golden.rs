//! Golden tests of the `usage` plugin: each recorded body under `tests/fixtures/usage/` (written
//! from the providers' published wire formats) is played through the plugin's hooks, whole and
//! split at every byte into two chunks, and the metadata must match `<case>.golden` exactly.
//!
//! After a deliberate change,
//! `UPDATE_GOLDEN=1 cargo test -p plugvisor-builtins --test it usage_golden::` rewrites the golden
//! files; review their diff like code.

use crate::usage_play;

use std::path::PathBuf;

use plugin_runner::testing::Player;
use plugin_runner::{Metadata, Plugin, Value};
use plugvisor_builtins::usage::UsagePlugin;

/// One recorded response and how it is served.
struct Case {
    name: &'static str,
    fixture: &'static str,
    status: u16,
    content_type: &'static str,
    content_encoding: Option<&'static str>,
    /// The plugin's `format` config; `None` leaves it out (auto).
    format: Option<&'static str>,
    /// The plugin's `estimate_output_tokens`.
    estimate: bool,
    /// The request's `:path` (Bedrock names the model there); `None` sends none.
    path: Option<&'static str>,
}

const SSE: &str = "text/event-stream";
const JSON: &str = "application/json";
const EVENTSTREAM: &str = "application/vnd.amazon.eventstream";

const CONVERSE_CLAUDE: &str =
    "/model/us.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse-stream";
const INVOKE_CLAUDE: &str =
    "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke-with-response-stream";
const INVOKE_LLAMA: &str = "/model/meta.llama3-8b-instruct-v1%3A0/invoke-with-response-stream";
const CONVERSE_MISTRAL: &str = "/model/mistral.mistral-large-2407-v1%3A0/converse-stream";

/// A Bedrock event stream, requested at `path`.
const fn bedrock(name: &'static str, fixture: &'static str, path: &'static str) -> Case {
    Case {
        path: Some(path),
        ..case(name, fixture, EVENTSTREAM)
    }
}

const fn case(name: &'static str, fixture: &'static str, content_type: &'static str) -> Case {
    Case {
        name,
        fixture,
        status: 200,
        content_type,
        content_encoding: None,
        format: None,
        estimate: false,
        path: None,
    }
}

const CASES: &[Case] = &[
    case("openai_chat_stream", "openai_chat_stream.sse", SSE),
    case("openai_chat_json", "openai_chat.json", JSON),
    case("openai_completions_json", "openai_completions.json", JSON),
    case(
        "vllm_completions_stream",
        "vllm_completions_stream.sse",
        SSE,
    ),
    case("sglang_chat_json", "sglang_chat.json", JSON),
    case(
        "openai_chat_stream_no_usage",
        "openai_chat_stream_no_usage.sse",
        SSE,
    ),
    case(
        "openai_chat_stream_truncated",
        "openai_chat_stream_truncated.sse",
        SSE,
    ),
    Case {
        status: 429,
        ..case("openai_error_json", "openai_error.json", JSON)
    },
    Case {
        content_encoding: Some("gzip"),
        ..case("openai_chat_json_gzip", "openai_chat.json.gz", JSON)
    },
    case(
        "openai_responses_stream",
        "openai_responses_stream.sse",
        SSE,
    ),
    case("openai_responses_json", "openai_responses.json", JSON),
    case("anthropic_stream", "anthropic_stream.sse", SSE),
    case("anthropic_json", "anthropic.json", JSON),
    case("anthropic_error_stream", "anthropic_error_stream.sse", SSE),
    Case {
        format: Some("anthropic"),
        ..case("anthropic_stream_forced", "anthropic_stream.sse", SSE)
    },
    Case {
        format: Some("anthropic"),
        ..case(
            "openai_chat_stream_forced_anthropic",
            "openai_chat_stream.sse",
            SSE,
        )
    },
    case("gemini_stream", "gemini_stream.sse", SSE),
    case("gemini_json", "gemini.json", JSON),
    case("gemini_stream_array_json", "gemini_stream_array.json", JSON),
    case(
        "gemini_stream_truncated",
        "gemini_stream_truncated.sse",
        SSE,
    ),
    Case {
        status: 400,
        ..case("gemini_error_json", "gemini_error.json", JSON)
    },
    case(
        "vllm_chat_reasoning_stream",
        "vllm_chat_reasoning_stream.sse",
        SSE,
    ),
    case(
        "sglang_chat_reasoning_stream",
        "sglang_chat_reasoning_stream.sse",
        SSE,
    ),
    case("vllm_error_stream", "vllm_error_stream.sse", SSE),
    Case {
        estimate: true,
        ..case("vllm_error_stream_estimate", "vllm_error_stream.sse", SSE)
    },
    Case {
        status: 503,
        estimate: true,
        ..case("proxy_503", "proxy_503.txt", "text/plain")
    },
    Case {
        status: 404,
        ..case("vllm_404_json", "vllm_404.json", JSON)
    },
    // Without usage, with and without the estimate.
    case(
        "vllm_chat_reasoning_stream_no_usage",
        "vllm_chat_reasoning_stream_no_usage.sse",
        SSE,
    ),
    Case {
        estimate: true,
        ..case(
            "vllm_chat_reasoning_stream_no_usage_estimated",
            "vllm_chat_reasoning_stream_no_usage.sse",
            SSE,
        )
    },
    Case {
        estimate: true,
        ..case(
            "openai_chat_stream_no_usage_estimated",
            "openai_chat_stream_no_usage.sse",
            SSE,
        )
    },
    Case {
        estimate: true,
        ..case(
            "gemini_stream_truncated_estimated",
            "gemini_stream_truncated.sse",
            SSE,
        )
    },
    Case {
        estimate: true,
        ..case(
            "anthropic_stream_estimate_unused",
            "anthropic_stream.sse",
            SSE,
        )
    },
    // Amazon Bedrock: ConverseStream and InvokeModelWithResponseStream (Claude, Llama), an
    // exception mid-stream, a stream cut inside a message and one whose usage a bad CRC guards.
    bedrock(
        "bedrock_converse_stream",
        "bedrock_converse_stream.eventstream",
        CONVERSE_CLAUDE,
    ),
    bedrock(
        "bedrock_invoke_claude_stream",
        "bedrock_invoke_claude_stream.eventstream",
        INVOKE_CLAUDE,
    ),
    bedrock(
        "bedrock_invoke_llama_stream",
        "bedrock_invoke_llama_stream.eventstream",
        INVOKE_LLAMA,
    ),
    bedrock(
        "bedrock_converse_exception",
        "bedrock_converse_exception.eventstream",
        CONVERSE_MISTRAL,
    ),
    Case {
        estimate: true,
        ..bedrock(
            "bedrock_converse_exception_estimate",
            "bedrock_converse_exception.eventstream",
            CONVERSE_MISTRAL,
        )
    },
    bedrock(
        "bedrock_converse_stream_truncated",
        "bedrock_converse_stream_truncated.eventstream",
        CONVERSE_CLAUDE,
    ),
    Case {
        estimate: true,
        ..bedrock(
            "bedrock_converse_stream_truncated_estimated",
            "bedrock_converse_stream_truncated.eventstream",
            CONVERSE_CLAUDE,
        )
    },
    bedrock(
        "bedrock_converse_stream_bad_crc",
        "bedrock_converse_stream_bad_crc.eventstream",
        CONVERSE_CLAUDE,
    ),
    Case {
        estimate: true,
        ..bedrock(
            "bedrock_converse_stream_bad_crc_estimated",
            "bedrock_converse_stream_bad_crc.eventstream",
            CONVERSE_CLAUDE,
        )
    },
    // No content type and no path: the NUL byte of the prelude says event stream, Claude's own
    // `message.model` names the model.
    case(
        "bedrock_invoke_claude_stream_sniffed",
        "bedrock_invoke_claude_stream.eventstream",
        "application/octet-stream",
    ),
    Case {
        format: Some("bedrock"),
        ..bedrock(
            "bedrock_converse_stream_forced",
            "bedrock_converse_stream.eventstream",
            CONVERSE_CLAUDE,
        )
    },
    Case {
        format: Some("anthropic"),
        ..bedrock(
            "bedrock_invoke_claude_stream_forced_anthropic",
            "bedrock_invoke_claude_stream.eventstream",
            INVOKE_CLAUDE,
        )
    },
    Case {
        format: Some("bedrock"),
        ..case(
            "anthropic_stream_forced_bedrock",
            "anthropic_stream.sse",
            SSE,
        )
    },
];

fn dir() -> PathBuf {
    usage_play::fixtures().join("usage")
}

/// The plugin as configured for `case`, with the sample config's CEL cost attribute and two
/// costs (a token type and a CEL expression), so every golden file also pins the OpenAI-style
/// CEL variables, the token types and the cost errors for its format.
fn plugin(case: &Case) -> Player<UsagePlugin> {
    let cost = |key: &str, kind: &str| {
        Value::map([
            ("namespace", Value::from("envoy.ratelimit")),
            ("key", Value::from(key)),
            ("type", Value::from(kind)),
        ])
    };
    let mut config = vec![
        (
            "costs",
            Value::List(vec![
                cost("tokens", "total"),
                cost(
                    "weighted",
                    "input_tokens - cached_input_tokens + 4 * output_tokens + reasoning_tokens",
                ),
            ]),
        ),
        ("estimate_output_tokens", Value::Bool(case.estimate)),
        ("attributes", usage_play::cost_attributes()),
    ];
    if let Some(format) = case.format {
        config.push(("format", Value::from(format)));
    }
    let mut p = UsagePlugin::default();
    p.configure(&Value::map(config)).expect("valid config");
    Player::new(p)
}

/// Plays `case`'s response (see [`usage_play::play`]).
fn play(p: &Player<UsagePlugin>, case: &Case, chunks: &[&[u8]]) -> Metadata {
    usage_play::play_request(
        p,
        case.path,
        case.status,
        case.content_type,
        case.content_encoding,
        chunks,
    )
}

/// One `namespace.key = value` line per entry, in key order; a map value (`cost_errors`) gives
/// one `namespace.key[inner] = value` line per inner entry.
fn render(meta: &Metadata) -> String {
    let mut out = String::new();
    for (ns, v) in meta {
        match v {
            Value::Map(m) => {
                for (k, v) in m {
                    match v {
                        Value::Map(inner) => {
                            for (ik, iv) in inner {
                                out.push_str(&format!("{ns}.{k}[{ik}] = {}\n", scalar(iv)));
                            }
                        }
                        v => out.push_str(&format!("{ns}.{k} = {}\n", scalar(v))),
                    }
                }
            }
            other => out.push_str(&format!("{ns} = {}\n", scalar(other))),
        }
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

#[test]
fn every_recorded_body_gives_its_golden_metadata() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in CASES {
        let body = std::fs::read(dir().join(case.fixture)).expect("fixture");
        let got = render(&play(&plugin(case), case, &[&body]));
        let golden = dir().join(format!("{}.golden", case.name));
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if got != want {
            failures.push(format!("--- {}\nwant:\n{want}got:\n{got}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_split_anywhere_gives_the_same_metadata_as_the_whole_body() {
    for case in CASES {
        let p = plugin(case);
        let body = std::fs::read(dir().join(case.fixture)).expect("fixture");
        let whole = play(&p, case, &[&body]);
        for at in 1..body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(
                play(&p, case, &[a, b]),
                whole,
                "{} split at {at}",
                case.name
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(play(&p, case, &bytes), whole, "{} byte by byte", case.name);
    }
}
