use super::*;
use crate::config::Config;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn config(extra: &str) -> TracesConfig {
    // A port nobody serves: nothing in these tests is sent.
    Config::parse(
        &format!("[traces]\nendpoint = \"http://127.0.0.1:9\"\n{extra}"),
        "t",
    )
    .unwrap()
    .traces
    .unwrap()
}

fn headers(traceparent: Option<&'static str>) -> Vec<(&'static str, &'static str)> {
    let mut h = vec![(":method", "POST"), (":path", "/v1/chat/completions")];
    if let Some(tp) = traceparent {
        h.push(("traceparent", tp));
        h.push(("tracestate", "congo=t61rcWkgMzE"));
    }
    h
}

#[tokio::test]
async fn off_traces_nothing_and_on_follows_the_parent_or_starts_a_trace() {
    let off = Traces::off();
    assert!(!off.is_on());
    assert!(off
        .begin(
            headers(Some(PARENT)).into_iter(),
            Instant::now(),
            &Sampler::DEFAULT
        )
        .is_none());

    let on = Traces::start(Some(&config("")), Arc::new(Metrics::new())).unwrap();
    let child = on
        .begin(
            headers(Some(PARENT)).into_iter(),
            Instant::now(),
            &Sampler::DEFAULT,
        )
        .unwrap();
    let spans = child.into_spans(Instant::now());
    assert_eq!(
        spans[0].trace_id,
        context::traceparent_fields(PARENT).unwrap().0.to_vec()
    );
    assert_eq!(
        spans[0].parent_span_id,
        context::traceparent_fields(PARENT).unwrap().1.to_vec()
    );
    assert_eq!(spans[0].trace_state, "congo=t61rcWkgMzE");
    // The parent said not sampled: the default parent-based sampler follows it.
    let unsampled = PARENT.replace("-01", "-00");
    let h = vec![("traceparent", unsampled.as_str())];
    assert!(on
        .begin(h.into_iter(), Instant::now(), &Sampler::DEFAULT)
        .is_none());
    // No parent, or an invalid one: a new trace.
    for h in [headers(None), vec![("traceparent", "00-xyz")]] {
        let root = on
            .begin(h.into_iter(), Instant::now(), &Sampler::DEFAULT)
            .unwrap();
        let spans = root.into_spans(Instant::now());
        assert!(spans[0].parent_span_id.is_empty());
        assert_ne!(
            spans[0].trace_id,
            context::traceparent_fields(PARENT).unwrap().0.to_vec()
        );
    }
    on.stop(Duration::from_millis(10)).await;

    let off = config("sampler = \"always_off\"");
    let never = Traces::start(Some(&off), Arc::new(Metrics::new())).unwrap();
    assert!(never
        .begin(
            headers(Some(PARENT)).into_iter(),
            Instant::now(),
            &off.sampler
        )
        .is_none());
    never.stop(Duration::from_millis(10)).await;
}

/// The queue holds `QUEUE_REQUESTS` requests' spans; the next request's are dropped and counted,
/// and `finish` never waits. (A current-thread runtime: the exporter cannot take any while the
/// test fills the queue.)
#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_drops_the_next_requests_spans_and_counts_them() {
    let metrics = Arc::new(Metrics::new());
    let traces = Traces::start(Some(&config("")), metrics.clone()).unwrap();
    for _ in 0..QUEUE_REQUESTS {
        let t = traces
            .begin(headers(None).into_iter(), Instant::now(), &Sampler::DEFAULT)
            .unwrap();
        traces.finish(t);
    }
    assert_eq!(traces.describe().dropped, 0);
    let t = traces
        .begin(headers(None).into_iter(), Instant::now(), &Sampler::DEFAULT)
        .unwrap();
    traces.finish(t);
    assert_eq!(traces.describe().dropped, 1);
    assert!(
        metrics
            .encode()
            .contains("plugvisor_spans_dropped_total{reason=\"queue_full\"} 1"),
        "{}",
        metrics.encode()
    );
    // Nobody listens: what was queued is not taken either, and is counted at the stop.
    traces.stop(Duration::from_millis(300)).await;
    assert_eq!(traces.describe().exported, 0);
    assert_eq!(traces.describe().dropped, QUEUE_REQUESTS as u64 + 1);
}

#[test]
fn the_status_line_says_whether_spans_go_out_and_where() {
    let off = Traces::off().describe();
    assert_eq!(off, TracesStatus::default());
    assert!(off.line().starts_with("traces: off"), "{}", off.line());
    let on = TracesStatus {
        endpoint: Some("http://127.0.0.1:4318/v1/traces".into()),
        protocol: Some("http/protobuf".into()),
        sampler: Some("parentbased_always_on".into()),
        exported: 12,
        dropped: 1,
        off_by: None,
    };
    assert_eq!(
        on.line(),
        "traces: OTLP http/protobuf http://127.0.0.1:4318/v1/traces, sampler \
         parentbased_always_on; 12 spans exported, 1 dropped"
    );
}

#[tokio::test]
async fn configured_traces_turned_off_by_the_environment_trace_nothing_and_say_why() {
    let mut t = config("");
    t.off = Some("OTEL_SDK_DISABLED=true");
    let traces = Traces::start(Some(&t), Arc::new(Metrics::new())).unwrap();
    assert!(!traces.is_on());
    assert!(traces
        .begin(headers(None).into_iter(), Instant::now(), &Sampler::DEFAULT)
        .is_none());
    let status = traces.describe();
    assert_eq!(status.off_by.as_deref(), Some("OTEL_SDK_DISABLED=true"));
    assert_eq!(
        status.line(),
        "traces: off (OTEL_SDK_DISABLED=true in the environment; [traces] ignored)"
    );
}

/// The status names the running configuration's sampler once the data path follows it: a
/// reload that changes `sampler` shows there, and in what new streams use.
#[tokio::test]
async fn the_status_names_the_sampler_of_the_running_configuration() {
    let text = |sampler: &str| {
        format!("[traces]\nendpoint = \"http://127.0.0.1:9\"\nsampler = \"{sampler}\"\n")
    };
    let first = Config::parse(&text("always_on"), "t").unwrap();
    let traces = Traces::start(first.traces.as_ref(), Arc::new(Metrics::new())).unwrap();
    let published = crate::config::Published::new(first);
    traces.follow(published.clone());
    assert_eq!(traces.describe().sampler.as_deref(), Some("always_on"));
    published.replace(Config::parse(&text("always_off"), "t").unwrap());
    assert_eq!(traces.describe().sampler.as_deref(), Some("always_off"));
    traces.stop(Duration::from_millis(10)).await;
}
