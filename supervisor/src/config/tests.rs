use super::*;

#[test]
fn embedded_default_serves_usage_and_latency_on_loopback() {
    let c = Config::default_config().unwrap();
    assert_eq!(c.listen, Listen::Tcp("127.0.0.1:9002".parse().unwrap()));
    let names: Vec<_> = c.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["usage", "latency"]);
    assert!(c
        .plugins
        .iter()
        .all(|p| p.process.spawn && p.process.command.is_none()));
}

#[test]
fn plugins_keep_file_order_and_their_config_table() {
    let c = Config::parse(
        r#"
listen = "unix:/tmp/x.sock"
[plugins.zeta]
dispatch = "inline"
[plugins.alpha]
final_timeout_ms = 50
[plugins.alpha.config]
spin_us = 5
attributes = [{ namespace = "envoy.lb", name = "cost", expression = "1" }]
"#,
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.listen, Listen::Unix("/tmp/x.sock".into()));
    assert_eq!(c.plugins[0].name, "zeta");
    assert_eq!(c.plugins[0].dispatch, Dispatch::Inline);
    assert_eq!(c.plugins[1].name, "alpha");
    assert_eq!(c.plugins[1].final_timeout, Duration::from_millis(50));
    assert_eq!(
        c.plugins[1].process.config.get("spin_us"),
        Some(&Value::Int(5))
    );
    assert!(
        matches!(c.plugins[1].process.config.get("attributes"), Some(Value::List(l)) if l.len() == 1)
    );
}

#[test]
fn errors_name_the_key_and_line() {
    let cases = [
        ("listen = \"nowhere\"\n", "line 1", "listen"),
        ("\n\nadmin_listen = \"0.0.0.0:9\"\n", "line 3", "loopback"),
        ("bogus = 1\n", "line 1", "bogus"),
        (
            "[plugins.a]\ndispatch = \"sometimes\"\n",
            "line 2",
            "dispatch",
        ),
        (
            "[plugins.a]\nfinal_timeout_ms = \"x\"\n",
            "line 2",
            "final_timeout_ms",
        ),
        (
            "[plugins.a]\nfinal_timout_ms = 5\n",
            "line 2",
            "final_timout_ms",
        ),
        ("\n\n[plugins.\"a b\"]\n", "line 3", "plugins.a b"),
        (
            "max_streams = 1\n[plugins.\"a/b\"]\n",
            "line 2",
            "plugins.a/b",
        ),
        (
            "[plugins.a]\nspawn = false\ncommand = \"/bin/x\"\n",
            "line 1",
            "spawn = false",
        ),
    ];
    for (text, line, word) in cases {
        let err = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(err.starts_with("t.toml: "), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains(word), "{text:?} -> {err}");
        if line != "line 0" {
            assert!(err.contains(line), "{text:?} -> {err}");
        }
    }
}

#[test]
fn required_plugins_and_the_readiness_wait() {
    let c = Config::parse(
        "ready_timeout_ms = 2500\n[plugins.a]\nrequired = true\n[plugins.b]\n",
        "t",
    )
    .unwrap();
    assert_eq!(c.ready_timeout, Duration::from_millis(2500));
    assert!(c.plugins[0].required);
    assert!(!c.plugins[1].required);
    let default = Config::default_config().unwrap();
    assert_eq!(default.ready_timeout, Duration::from_secs(10));
    assert!(default.plugins.iter().all(|p| !p.required));
}

#[test]
fn restart_policy_keys_and_their_defaults() {
    use crate::plugin::restart::{Policy, RestartType};
    let c = Config::parse(
        "ping_interval_ms = 100\n[plugins.a]\nrestart = \"transient\"\nbackoff_min_ms = 10\nbackoff_max_ms = 500\n\
         max_restarts = 2\nrestart_period_ms = 1000\nstart_timeout_ms = 300\nhang_timeout_ms = 700\n\
         [plugins.b]\n",
        "t",
    )
    .unwrap();
    let a = &c.plugins[0];
    assert_eq!(
        a.restart,
        Policy {
            restart: RestartType::Transient,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            max_restarts: 2,
            period: Duration::from_millis(1000),
        }
    );
    assert_eq!(a.start_timeout, Duration::from_millis(300));
    assert_eq!(a.hang_timeout, Duration::from_millis(700));
    let b = &c.plugins[1];
    assert_eq!(b.restart, Policy::default());
    assert_eq!(b.hang_timeout, Duration::from_secs(5));

    for (text, word) in [
        ("[plugins.a]\nrestart = \"sometimes\"\n", "restart"),
        (
            "[plugins.a]\nbackoff_min_ms = 900\nbackoff_max_ms = 100\n",
            "backoff_min_ms (900) is larger than backoff_max_ms (100)",
        ),
        ("[plugins.a]\nhang_timeout_ms = 0\n", "hang_timeout_ms"),
    ] {
        let err = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(err.contains(word), "{text:?} -> {err}");
    }
}

#[test]
fn cpu_scheduling_defaults_to_normal_and_names_its_choices() {
    use crate::config::CpuScheduling;
    let c = Config::parse(
        "[plugins.a]\ncpu_scheduling = \"idle\"\n[plugins.b]\ncpu_scheduling = \"batch\"\n[plugins.c]\n",
        "t",
    )
    .unwrap();
    let got: Vec<_> = c.plugins.iter().map(|p| p.process.cpu_scheduling).collect();
    assert_eq!(
        got,
        [
            CpuScheduling::Idle,
            CpuScheduling::Batch,
            CpuScheduling::Normal
        ]
    );
    let err = Config::parse("[plugins.a]\ncpu_scheduling = \"realtime\"\n", "t.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cpu_scheduling") || err.contains("realtime"),
        "{err}"
    );
    assert!(err.contains("idle"), "the error lists the choices: {err}");
}

#[test]
fn data_path_limits_are_checked_at_and_past_their_bounds() {
    let parse = |text: &str| Config::parse(text, "t.toml");
    let c = parse("").unwrap();
    assert_eq!(c.max_streams, DEFAULT_MAX_STREAMS);
    assert_eq!(c.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    assert_eq!(c.stream_metadata_max_bytes, DEFAULT_STREAM_METADATA_BYTES);
    assert_eq!(c.idle_stream_timeout, None);
    assert_eq!(
        parse("idle_stream_timeout_ms = 0")
            .unwrap()
            .idle_stream_timeout,
        None
    );
    assert_eq!(
        parse("idle_stream_timeout_ms = 250")
            .unwrap()
            .idle_stream_timeout,
        Some(Duration::from_millis(250))
    );
    assert_eq!(parse("max_streams = 1").unwrap().max_streams, 1);
    let bound = |key: &str, ok: usize, bad: usize| {
        let line = format!("\n{key} = {ok}\n");
        assert!(parse(&line).is_ok(), "{key} = {ok}");
        let line = format!("\n{key} = {bad}\n");
        let err = parse(&line).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains(key), "{err}");
    };
    bound("max_streams", 1, 0);
    bound(
        "max_message_bytes",
        MIN_MESSAGE_BYTES,
        MIN_MESSAGE_BYTES - 1,
    );
    bound(
        "stream_metadata_max_bytes",
        MIN_METADATA_BYTES,
        MIN_METADATA_BYTES - 1,
    );
    bound(
        "stream_metadata_max_bytes",
        MAX_METADATA_BYTES,
        MAX_METADATA_BYTES + 1,
    );

    let plugin = |key: &str, v: usize| parse(&format!("[plugins.p]\n{key} = {v}\n"));
    for (key, ok, bad) in [
        (
            "metadata_max_bytes",
            MIN_METADATA_BYTES,
            MIN_METADATA_BYTES - 1,
        ),
        (
            "metadata_max_bytes",
            MAX_METADATA_BYTES,
            MAX_METADATA_BYTES + 1,
        ),
        ("budget_bytes", MIN_BUDGET_BYTES, MIN_BUDGET_BYTES - 1),
    ] {
        assert!(plugin(key, ok).is_ok(), "{key} = {ok}");
        let err = plugin(key, bad).unwrap_err().to_string();
        assert!(err.contains("plugins.p") && err.contains(key), "{err}");
    }
    let p = &parse("[plugins.p]\n").unwrap().plugins[0];
    assert_eq!(p.process.metadata_max_bytes, DEFAULT_PLUGIN_METADATA_BYTES);
    assert_eq!(p.process.budget_bytes, DEFAULT_BUDGET_BYTES);
}

#[test]
fn ping_and_inline_timeouts_are_checked_at_and_past_their_bounds() {
    let parse = |text: &str| Config::parse(text, "t.toml");
    let refused = |text: &str, line: &str, key: &str| {
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains(line) && err.contains(&format!("key `{key}`")),
            "{text:?} -> {err}"
        );
    };
    assert_eq!(
        parse("ping_interval_ms = 1\n").unwrap().ping_interval,
        Duration::from_millis(10)
    );
    refused("\nping_interval_ms = 0\n", "line 2", "ping_interval_ms");
    // Against the default hang_timeout_ms (5000).
    assert!(parse("ping_interval_ms = 4999\n[plugins.a]\n").is_ok());
    refused(
        "ping_interval_ms = 5000\n[plugins.a]\n",
        "line 1",
        "ping_interval_ms",
    );
    // Against a plugin's own hang_timeout_ms, reported at that key.
    assert!(parse("ping_interval_ms = 100\n[plugins.a]\nhang_timeout_ms = 101\n").is_ok());
    refused(
        "ping_interval_ms = 100\n[plugins.a]\nhang_timeout_ms = 100\n",
        "line 3",
        "plugins.a.hang_timeout_ms",
    );
    // The front pings no faster than every 10 ms.
    refused(
        "ping_interval_ms = 1\n[plugins.a]\nhang_timeout_ms = 10\n",
        "line 3",
        "plugins.a.hang_timeout_ms",
    );
    assert!(parse("[plugins.a]\ninline_timeout_ms = 1\n").is_ok());
    refused(
        "[plugins.a]\ninline_timeout_ms = 0\n",
        "line 2",
        "plugins.a.inline_timeout_ms",
    );
}

/// What `load` (start, reload, `check-config`) checks beyond the text.
fn load(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with(text, "t.toml", Checks::All)
}

#[test]
fn builtin_plugins_and_their_config_are_checked_by_the_plugins_own_code() {
    let ok = [
        "[plugins.usage]\n[plugins.latency]\n[plugins.metrics.config]\nlisten = \"127.0.0.1:1\"\n",
        "[plugins.usage.config]\nattributes = [{ namespace = \"envoy.lb\", name = \"cost\", expression = \"usage.prompt_tokens + 1\" }]\n",
        // Not the default host: nothing to know about the plugin.
        "[plugins.mine]\nspawn = false\n[plugins.mine.config]\nanything = 1\n",
        "[plugins.mine]\ncommand = \"/bin/sh\"\n[plugins.mine.config]\nanything = 1\n",
        // The default host runs the plugin its first argument names.
        "[plugins.spin1]\nargs = [\"test-spin\", \"--as\", \"spin1\"]\n",
    ];
    for text in ok {
        assert!(load(text).is_ok(), "{text:?} -> {:?}", load(text).err());
        // The text-only parse accepts them too.
        assert!(Config::parse(text, "t").is_ok());
    }
    let refused = [
        (
            "[plugins.usage]\n\n[plugins.usgae]\n",
            "line 3",
            "plugins.usgae",
            "no built-in plugin is named `usgae`",
        ),
        (
            "[plugins.spin1]\nargs = [\"test-spinn\"]\n",
            "line 1",
            "plugins.spin1",
            "`test-spinn`",
        ),
        (
            "[plugins.latency]\n[plugins.latency.config]\nx = 1\n",
            "line 2",
            "plugins.latency.config",
            "unknown key `x`",
        ),
        (
            "[plugins.usage.config]\natributes = []\n",
            "line 1",
            "plugins.usage.config",
            "unknown key `atributes`",
        ),
        (
            "[plugins.usage]\n[[plugins.usage.config.attributes]]\nnamespace = \"envoy.lb\"\nname = \"cost\"\nexpression = \"usage.prompt_tokens +* 2\"\n",
            "line 2",
            "plugins.usage.config",
            "attributes[0].expression: invalid CEL expression",
        ),
        (
            "[plugins.metrics.config]\nlisten = \"localhost\"\n",
            "line 1",
            "plugins.metrics.config",
            "config.listen",
        ),
    ];
    for (text, line, key, word) in refused {
        let err = load(text).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("t.toml: {line}: key `{key}`: ")) && err.contains(word),
            "{text:?} -> {err}"
        );
    }
}

#[test]
fn a_unit_run_plugin_named_after_a_built_in_is_warned_about_a_config_the_built_in_refuses() {
    // plugvisor-plugin@usage runs the built-in `usage`, which would refuse this at its handshake;
    // plugvisor cannot see the unit's program, so it warns and goes on.
    let text = "[plugins.usage]\nspawn = false\n\n[plugins.usage.config]\natributes = []\n";
    let config = load(text).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    let warning = &config.warnings[0];
    assert!(
        warning.starts_with("t.toml: line 4: key `plugins.usage.config`: if this plugin's unit runs the built-in `usage` (as plugvisor-plugin@usage does), the plugin refuses this config and exits 78: ")
            && warning.contains("unknown key `atributes`"),
        "{warning}"
    );
    // A config the built-in takes, a name no built-in has, and the text-only parse: no warning.
    for quiet in [
        "[plugins.usage]\nspawn = false\n[plugins.usage.config]\nattributes = []\n",
        "[plugins.mine]\nspawn = false\n[plugins.mine.config]\nanything = 1\n",
    ] {
        assert_eq!(
            load(quiet).unwrap().warnings,
            Vec::<String>::new(),
            "{quiet}"
        );
    }
    assert!(Config::parse(text, "t").unwrap().warnings.is_empty());
    // Spawned, the same config is the built-in's for sure: refused, not warned about.
    assert!(load("[plugins.usage.config]\natributes = []\n").is_err());
}

#[test]
fn commands_users_and_groups_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let ok = [
        "[plugins.p]\ncommand = \"/bin/sh\"\n".to_owned(),
        "[plugins.p]\ncommand = \"sh\"\n".to_owned(),
        "[plugins.p]\ncommand = \"sh\"\nenv = { PATH = \"/bin\" }\n".to_owned(),
        "[plugins.usage]\ngroup = \"root\"\nuid = 0\n".to_owned(),
    ];
    for text in &ok {
        assert!(load(text).is_ok(), "{text:?} -> {:?}", load(text).err());
    }
    let refused = [
        (
            "[plugins.p]\n\ncommand = \"/nonexistent/plugin\"\n".to_owned(),
            "line 3",
            "plugins.p.command",
            "does not exist",
        ),
        (
            "[plugins.p]\ncommand = \"no-such-command-xyz\"\n".to_owned(),
            "line 2",
            "plugins.p.command",
            "not found in PATH",
        ),
        (
            "[plugins.p]\ncommand = \"sh\"\nenv = { PATH = \"/nonexistent\" }\n".to_owned(),
            "line 2",
            "plugins.p.command",
            "not found in PATH; PATH is /nonexistent",
        ),
        (
            format!("[plugins.p]\ncommand = \"{}\"\n", plain.display()),
            "line 2",
            "plugins.p.command",
            "is not executable",
        ),
        (
            format!("[plugins.p]\ncommand = \"{}\"\n", dir.path().display()),
            "line 2",
            "plugins.p.command",
            "is not a file",
        ),
        (
            "[plugins.usage]\ngroup = \"no-such-group-xyz\"\n".to_owned(),
            "line 2",
            "plugins.usage.group",
            "group `no-such-group-xyz` does not exist",
        ),
        (
            "[plugins.usage]\nuid = 3999999\n".to_owned(),
            "line 2",
            "plugins.usage.uid",
            "uid 3999999 is no user",
        ),
    ];
    for (text, line, key, word) in &refused {
        let err = load(text).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("t.toml: {line}: key `{key}`: ")) && err.contains(word),
            "{text:?} -> {err}"
        );
        assert!(Config::parse(text, "t").is_ok(), "the text alone is fine");
    }
}

#[test]
fn upgrade_drain_is_long_by_default_and_checked_at_its_bounds() {
    let parse = |text: &str| Config::parse(text, "t.toml");
    assert_eq!(
        parse("").unwrap().upgrade_drain,
        Duration::from_millis(DEFAULT_UPGRADE_DRAIN_MS)
    );
    assert!(
        parse("").unwrap().upgrade_drain > parse("").unwrap().shutdown_grace,
        "an upgrade drains longer than a stop"
    );
    assert_eq!(
        parse("upgrade_drain_ms = 1").unwrap().upgrade_drain,
        Duration::from_millis(1)
    );
    assert_eq!(
        parse(&format!("upgrade_drain_ms = {MAX_UPGRADE_DRAIN_MS}"))
            .unwrap()
            .upgrade_drain,
        Duration::from_millis(MAX_UPGRADE_DRAIN_MS)
    );
    for bad in [0, MAX_UPGRADE_DRAIN_MS + 1] {
        let err = parse(&format!("\nupgrade_drain_ms = {bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("upgrade_drain_ms"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }
}

/// Every integer key of the schema has a range (a key added later without one fails here), and
/// each range holds at and past both ends: the end passes, one past it is refused with one line
/// naming the key.
#[test]
fn every_integer_key_is_checked_at_and_past_its_range() {
    use crate::config::keys::{self, RANGES};
    // The integer keys: those whose documented default in the schema tables is a number.
    let integer_keys: Vec<&str> = keys::TOP_LEVEL
        .iter()
        .chain(keys::PLUGIN)
        .map(|(k, _)| *k)
        .filter(|k| {
            k.ends_with("_ms")
                || k.ends_with("_bytes")
                || [
                    "max_streams",
                    "queue_events",
                    "max_restarts",
                    "uid",
                    "workers",
                ]
                .contains(k)
        })
        .collect();
    for key in &integer_keys {
        assert!(keys::range(key).is_some(), "no range for `{key}`");
    }
    assert_eq!(
        integer_keys.len(),
        RANGES.len(),
        "a range for a key not in the schema"
    );
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/configuration.md"
    ))
    .unwrap();
    let top_level = |key: &str| keys::top_level(key).is_some();
    for (key, lo, hi) in RANGES {
        assert!(
            docs.contains(&format!("| `{key}` | {lo} | {hi} |")),
            "docs/configuration.md's ranges do not say `{key}`: {lo} to {hi}"
        );
        // Keys whose values other keys are checked against get partners that keep them valid.
        let text = |v: i128| {
            let line = format!("{key} = {v}");
            if top_level(key) {
                let ping = if *key == "ping_interval_ms" {
                    ""
                } else {
                    "ping_interval_ms = 1\n"
                };
                format!(
                    "{ping}{line}\n[plugins.p]\nhang_timeout_ms = {}\n",
                    keys::DAY_MS
                )
            } else {
                let partners = match *key {
                    "hang_timeout_ms" => String::new(),
                    "backoff_min_ms" => format!("backoff_max_ms = {}\n", keys::DAY_MS),
                    "backoff_max_ms" => "backoff_min_ms = 0\n".to_owned(),
                    _ => String::new(),
                };
                let ping = if *key == "hang_timeout_ms" {
                    "ping_interval_ms = 1\n"
                } else {
                    ""
                };
                format!("{ping}[plugins.p]\n{partners}{line}\n")
            }
        };
        let name = if top_level(key) {
            key.to_string()
        } else {
            format!("plugins.p.{key}")
        };
        for ok in [*lo as i128, *hi as i128] {
            if *key == "ping_interval_ms" && ok == *hi as i128 {
                continue; // must stay under every plugin's hang_timeout_ms (checked apart)
            }
            Config::parse(&text(ok), "t").unwrap_or_else(|e| panic!("{key} = {ok}: {e}"));
        }
        let mut refused = vec![*hi as i128 + 1, i64::MAX as i128];
        if *lo > 0 {
            refused.push(*lo as i128 - 1);
        }
        for bad in refused {
            let err = Config::parse(&text(bad), "t")
                .err()
                .unwrap_or_else(|| panic!("{key} = {bad} accepted"))
                .to_string();
            assert!(
                err.contains(&format!("key `{name}`")),
                "{key} = {bad}: {err}"
            );
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}

#[test]
fn socket_paths_runtime_dir_and_address_clashes_are_refused() {
    let long = "p".repeat(100);
    let cases = [
        (
            format!("runtime_dir = \"/run/x\"\n[plugins.{long}]\n"),
            format!("plugins.{long}"),
            "at most 107",
        ),
        (
            format!("listen = \"unix:/tmp/{long}.sock\"\n"),
            "listen".to_owned(),
            "at most 107",
        ),
        (
            "runtime_dir = \"\"\n".to_owned(),
            "runtime_dir".to_owned(),
            "absolute",
        ),
        (
            "runtime_dir = \"run\"\n".to_owned(),
            "runtime_dir".to_owned(),
            "absolute",
        ),
        (
            "listen = \"127.0.0.1:9100\"\nadmin_listen = \"127.0.0.1:9100\"\n".to_owned(),
            "admin_listen".to_owned(),
            "also `listen`",
        ),
    ];
    for (text, key, word) in cases {
        let err = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(
            err.contains(&format!("key `{key}`")) && err.contains(word),
            "{text:?} -> {err}"
        );
    }
    // At the limit: a plugin socket of exactly 107 bytes is fine.
    let dir = "/run/x";
    let name = "n".repeat(107 - "/run/x/plugins/.sock".len());
    Config::parse(&format!("runtime_dir = \"{dir}\"\n[plugins.{name}]\n"), "t").unwrap();
    let name = format!("{name}n");
    assert!(Config::parse(&format!("runtime_dir = \"{dir}\"\n[plugins.{name}]\n"), "t").is_err());
}

#[test]
fn a_plugin_is_granted_its_own_namespace_its_namespaces_key_and_its_built_in_s_outputs() {
    let config = load(
        "[plugins.usage.config]\n\
         attributes = [{ namespace = \"envoy.lb\", name = \"n\", expression = \"1\" }]\n\
         costs = [{ namespace = \"envoy.ratelimit\", key = \"hits\", type = \"total_tokens\" }]\n\
         [plugins.mine]\nspawn = false\nnamespaces = [\"acme.billing\", \"acme.billing\"]\n\
         [plugins.spin1]\nargs = [\"test-spin\", \"--as\", \"spin1\"]\n",
    )
    .unwrap();
    let granted = |name: &str| {
        let plugin = config.plugins.iter().find(|p| p.name == name).unwrap();
        plugin.granted.clone()
    };
    assert_eq!(
        granted("usage"),
        ["envoy.lb", "envoy.ratelimit", "plugvisor.usage"]
    );
    assert_eq!(granted("mine"), ["acme.billing", "plugvisor.mine"]);
    assert_eq!(granted("spin1"), ["plugvisor.spin1"]);
    // The built-in run as its own unit (`plugvisor-plugin@usage`) writes the same namespaces.
    let unit = load(
        "[plugins.usage]
spawn = false
[plugins.usage.config]
         costs = [{ namespace = \"envoy.ratelimit\", key = \"hits\", type = \"total_tokens\" }]
",
    )
    .unwrap();
    assert_eq!(
        unit.plugins[0].granted,
        ["envoy.ratelimit", "plugvisor.usage"]
    );
    for (text, why) in [
        ("namespaces = [\"plugvisor\"]", "the front's own namespace"),
        ("namespaces = [\"\"]", "a namespace has a name"),
    ] {
        let err = load(&format!("[plugins.mine]\nspawn = false\n{text}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespaces") && err.contains(why), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }
}
