use super::*;

#[test]
fn embedded_default_serves_usage_and_latency_on_loopback() {
    let c = Config::default_config().unwrap();
    assert_eq!(c.listen, Listen::Tcp("127.0.0.1:9002".parse().unwrap()));
    let names: Vec<_> = c.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["usage", "latency"]);
    assert!(c.plugins.iter().all(|p| p.spawn && p.command.is_none()));
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
    assert_eq!(c.plugins[1].config.get("spin_us"), Some(&Value::Int(5)));
    assert!(matches!(c.plugins[1].config.get("attributes"), Some(Value::List(l)) if l.len() == 1));
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
        ("[plugins.\"a b\"]\n", "line 0", "plugins.a b"),
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
    use crate::restart::{Policy, RestartType};
    let c = Config::parse(
        "[plugins.a]\nrestart = \"transient\"\nbackoff_min_ms = 10\nbackoff_max_ms = 500\n\
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
    let got: Vec<_> = c.plugins.iter().map(|p| p.cpu_scheduling).collect();
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
    assert_eq!(p.metadata_max_bytes, DEFAULT_PLUGIN_METADATA_BYTES);
    assert_eq!(p.budget_bytes, DEFAULT_BUDGET_BYTES);
}
