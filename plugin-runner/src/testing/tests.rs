use super::*;
use crate::plugin::EventCtx;

/// Records every hook: (hook, seq, gap, partial, replayed, body bytes seen).
#[derive(Default)]
struct Recorder {
    subs: Option<Subscriptions>,
}

type Seen = Vec<(&'static str, u32, u32, bool, bool, usize)>;

fn seen(
    hook: &'static str,
    ctx: &EventCtx,
    bytes: usize,
) -> (&'static str, u32, u32, bool, bool, usize) {
    (
        hook,
        ctx.seq,
        ctx.gap,
        ctx.partial,
        ctx.is_replayed(),
        bytes,
    )
}

impl Plugin for Recorder {
    type Stream = Seen;
    fn name(&self) -> &str {
        "rec"
    }
    fn subscriptions(&self) -> Subscriptions {
        self.subs.unwrap_or(Subscriptions::ALL)
    }
    fn on_request_start(&self, s: &mut Seen, ctx: &EventCtx, _: &RequestStart) {
        s.push(seen("start", ctx, 0));
    }
    fn on_response_headers(&self, s: &mut Seen, ctx: &EventCtx, _: &ResponseHeaders) {
        s.push(seen("headers", ctx, 0));
    }
    fn on_chunk(&self, s: &mut Seen, ctx: &EventCtx, c: &Chunk) {
        assert_ne!(&c.bytes[..], b"panic", "asked to panic");
        s.push(seen("chunk", ctx, c.bytes.len()));
    }
    fn on_final(&self, s: &mut Seen, ctx: &EventCtx, f: &Final) -> Metadata {
        s.push(seen("final", ctx, f.bytes.len()));
        let list = s
            .iter()
            .map(|(hook, seq, gap, partial, replayed, bytes)| {
                Value::from(format!(
                    "{hook} {seq} gap={gap} partial={partial} replayed={replayed} bytes={bytes}"
                ))
            })
            .collect();
        Metadata::from([(
            "plugvisor.rec".to_owned(),
            Value::map([("seen", Value::List(list))]),
        )])
    }
}

fn lines(played: &Played) -> Vec<String> {
    match played.own().get("seen") {
        Some(Value::List(l)) => l.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
        other => panic!("{other:?}"),
    }
}

fn sse_stream(id: StreamId) -> Stream {
    Stream::new(id)
        .request(&[("x-request-id", "r")])
        .response(200, &[])
        .body("data: 1\n\ndata: 22\n\n", Split::SseEvents)
        .final_(b"end")
}

#[test]
fn a_whole_stream_runs_every_hook_in_order_with_nothing_added() {
    let player = Player::new(Recorder::default());
    let played = player.play(&sse_stream(1));
    assert_eq!(
        lines(&played),
        [
            "start 0 gap=0 partial=false replayed=false bytes=0",
            "headers 1 gap=0 partial=false replayed=false bytes=0",
            "chunk 2 gap=0 partial=false replayed=false bytes=9",
            "chunk 3 gap=0 partial=false replayed=false bytes=10",
            "final 4 gap=0 partial=false replayed=false bytes=3",
        ]
    );
    assert_eq!(played.own().get("gaps"), None);
    assert_eq!(played.own().get("partial"), None);
}

#[test]
fn dropped_events_are_gaps_on_the_next_event_and_in_the_metadata() {
    let player = Player::new(Recorder::default());
    let played = player.play(&sse_stream(1).drop_seqs([1, 3]));
    assert_eq!(
        lines(&played),
        [
            "start 0 gap=0 partial=false replayed=false bytes=0",
            "chunk 2 gap=1 partial=false replayed=false bytes=9",
            "final 4 gap=1 partial=false replayed=false bytes=3",
        ]
    );
    assert_eq!(played.own().get("gaps"), Some(&Value::Int(2)));
}

#[test]
fn a_lost_start_makes_the_stream_partial() {
    let player = Player::new(Recorder::default());
    let played = player.play(&sse_stream(1).lose_start(2));
    assert_eq!(
        lines(&played),
        [
            "chunk 2 gap=0 partial=true replayed=false bytes=9",
            "chunk 3 gap=0 partial=true replayed=false bytes=10",
            "final 4 gap=0 partial=true replayed=false bytes=3",
        ]
    );
    assert_eq!(played.own().get("partial"), Some(&Value::Bool(true)));
    assert_eq!(played.own().get("gaps"), None);
}

#[test]
fn replayed_events_are_marked_only_while_their_hooks_run() {
    let player = Player::new(Recorder::default());
    let played = player.play(&sse_stream(1).replayed(3));
    let replayed: Vec<bool> = lines(&played)
        .iter()
        .map(|l| l.contains("replayed=true"))
        .collect();
    assert_eq!(replayed, [true, true, true, false, false]);
    assert_eq!(played.own().get("partial"), None);
}

#[test]
fn events_are_numbered_over_the_subscribed_kinds_and_bytes_follow_body_bytes() {
    let subs = Subscriptions {
        response_headers: false,
        body_bytes: false,
        ..Subscriptions::ALL
    };
    let player = Player::new(Recorder { subs: Some(subs) });
    assert_eq!(
        lines(&player.play(&sse_stream(1))),
        [
            "start 0 gap=0 partial=false replayed=false bytes=0",
            "chunk 1 gap=0 partial=false replayed=false bytes=0",
            "chunk 2 gap=0 partial=false replayed=false bytes=0",
            "final 3 gap=0 partial=false replayed=false bytes=0",
        ]
    );
    let messages = sse_stream(1).messages(&subs);
    let ToPlugin::Chunk(c) = &messages[1] else {
        panic!("{messages:?}")
    };
    assert_eq!((c.len, c.bytes.len()), (9, 0));
}

#[test]
fn a_panicking_hook_fails_its_stream_alone_and_the_player_goes_on() {
    let player = Player::new(Recorder::default());
    let doomed = Stream::new(1).request(&[]).chunk("panic").final_(b"");
    let played = player.play(&doomed);
    let err = played.error().expect("an error reply");
    assert!(
        err.contains("asked to panic") && err.contains("on_chunk"),
        "{err}"
    );
    assert_eq!(lines(&player.play(&sse_stream(2))).len(), 5);
}

#[test]
fn an_aborted_stream_has_no_final_reply_and_drops_its_state() {
    let player = Player::new(Recorder::default());
    let played = player.play(
        &Stream::new(1)
            .request(&[])
            .abort(AbortCause::ClientDisconnect),
    );
    assert_eq!(played.outcome(), None);
    assert_eq!(player.lanes.active_streams(), 0);
    // Not subscribed to aborts: nothing is sent, and the idle state is evicted.
    let subs = Subscriptions {
        abort: false,
        ..Subscriptions::ALL
    };
    let player = Player::new(Recorder { subs: Some(subs) });
    let played = player.play(&Stream::new(1).request(&[]).abort(AbortCause::Timeout));
    assert_eq!(played.outcome(), None);
    assert_eq!(player.lanes.active_streams(), 0);
}

#[test]
fn stamps_start_at_start_ns_and_follow_the_step_unless_set() {
    let stream = Stream::new(3)
        .request(&[])
        .at(50)
        .step(10)
        .chunks(["a", "b"])
        .final_(b"");
    let stamps: Vec<u64> = stream
        .messages(&Subscriptions::ALL)
        .iter()
        .map(|m| match m {
            ToPlugin::RequestStart(e) => e.stamp_ns,
            ToPlugin::Chunk(e) => e.stamp_ns,
            ToPlugin::Final(e) => e.stamp_ns,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(stamps, [START_NS, 50, 60, 70]);
}

#[test]
fn splits_cover_the_body_exactly() {
    let body = b"data: a\r\n\r\n: c\n\ndata: b\n\ntail";
    for split in [
        Split::Whole,
        Split::Every(1),
        Split::Every(7),
        Split::At(vec![0, 5, 5, body.len()]),
        Split::SseEvents,
    ] {
        assert_eq!(split.apply(body).concat(), body, "{split:?}");
    }
    assert_eq!(Split::SseEvents.apply(body).len(), 4);
    assert!(Split::Every(3).apply(b"").is_empty());
    assert_eq!(Split::Whole.apply(b""), [b""]);
}

#[test]
#[should_panic(expected = "never drops a final")]
fn dropping_a_final_is_refused() {
    sse_stream(1).drop_seqs([4]).messages(&Subscriptions::ALL);
}

#[test]
#[should_panic(expected = "no event can follow")]
fn nothing_follows_the_end() {
    let _ = Stream::new(1).final_(b"").chunk("late");
}
