//! Sequence tracking per stream: from the sequence numbers the front puts on each event, decide
//! whether events are missing (a *gap*) and whether the host missed the stream's start (a
//! *partial* stream).
//!
//! The front numbers every event of a stream 0, 1, 2 … in arrival order. A plugin that does not
//! subscribe to some event kinds legitimately never sees their numbers, so a skip that an
//! unsubscribed kind explains is not a gap: with all kinds subscribed every skip is a gap; without
//! chunks, any skip before the final is explained (the chunk count is unknown). Pure functions,
//! tested from a table.

use ipc_protocol::{Subscriptions, ToPlugin};

/// The kind of a per-stream event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    RequestStart,
    ResponseHeaders,
    Chunk,
    Final,
    Abort,
}

impl Kind {
    pub(crate) fn of(msg: &ToPlugin) -> Option<Kind> {
        Some(match msg {
            ToPlugin::RequestStart(_) => Kind::RequestStart,
            ToPlugin::ResponseHeaders(_) => Kind::ResponseHeaders,
            ToPlugin::Chunk(_) => Kind::Chunk,
            ToPlugin::Final(_) => Kind::Final,
            ToPlugin::Abort(_) => Kind::Abort,
            _ => return None,
        })
    }
}

/// What the host knows of one stream's sequence so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeqState {
    last: u32,
    last_kind: Kind,
}

/// The verdict on one arriving event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Events missing right before this one.
    pub gap: u32,
    /// The event's number is not after the last one seen (never expected on one socket).
    pub out_of_order: bool,
}

/// Whether a stream whose first event seen is (`seq`, `kind`) is missing its start.
pub(crate) fn starts_partial(subs: &Subscriptions, seq: u32, kind: Kind) -> bool {
    if subs.request_start {
        return seq != 0;
    }
    // Without request starts, the front may have numbered the start (seq 0) or not.
    match kind {
        Kind::RequestStart => seq != 0,
        Kind::ResponseHeaders => seq > 1,
        // Headers always come before body and final: subscribed but never seen means missed.
        Kind::Chunk | Kind::Final => subs.response_headers || (subs.chunks && seq > 2),
        Kind::Abort => subs.response_headers && seq > 1,
    }
}

impl SeqState {
    /// The state after a stream's first event.
    pub(crate) fn first(seq: u32, kind: Kind) -> SeqState {
        SeqState {
            last: seq,
            last_kind: kind,
        }
    }

    /// Judges the next event and, unless it is out of order, advances past it.
    pub(crate) fn next(&mut self, subs: &Subscriptions, seq: u32, kind: Kind) -> Verdict {
        if seq <= self.last {
            return Verdict {
                gap: 0,
                out_of_order: true,
            };
        }
        let skipped = seq - self.last - 1;
        let explained = if skipped == 0 {
            0
        } else if !subs.chunks && matches!(kind, Kind::Chunk | Kind::Final | Kind::Abort) {
            skipped
        } else if !subs.response_headers && self.last_kind == Kind::RequestStart {
            1
        } else {
            0
        };
        self.last = seq;
        self.last_kind = kind;
        Verdict {
            gap: skipped.saturating_sub(explained),
            out_of_order: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Kind::*;

    const NO_HEADERS: Subscriptions = Subscriptions {
        request_start: true,
        response_headers: false,
        chunks: true,
        body_bytes: true,
        abort: true,
    };
    const ONLY_FINAL: Subscriptions = Subscriptions {
        request_start: true,
        response_headers: false,
        chunks: false,
        body_bytes: false,
        abort: false,
    };

    #[test]
    fn gaps_are_counted_only_where_subscriptions_cannot_explain_the_skip() {
        // (subscriptions, events as (seq, kind), expected gaps per event after the first)
        type Case<'a> = (Subscriptions, &'a [(u32, Kind)], &'a [u32]);
        let table: &[Case] = &[
            (
                Subscriptions::ALL,
                &[
                    (0, RequestStart),
                    (1, ResponseHeaders),
                    (2, Chunk),
                    (3, Final),
                ],
                &[0, 0, 0],
            ),
            (
                Subscriptions::ALL,
                &[
                    (0, RequestStart),
                    (1, ResponseHeaders),
                    (4, Chunk),
                    (5, Final),
                ],
                &[0, 2, 0],
            ),
            (Subscriptions::ALL, &[(0, RequestStart), (2, Chunk)], &[1]),
            (
                NO_HEADERS,
                &[(0, RequestStart), (2, Chunk), (3, Chunk), (4, Final)],
                &[0, 0, 0],
            ),
            (NO_HEADERS, &[(0, RequestStart), (3, Chunk)], &[1]),
            (ONLY_FINAL, &[(0, RequestStart), (9, Final)], &[0]),
        ];
        for (subs, events, gaps) in table {
            let mut state = SeqState::first(events[0].0, events[0].1);
            let got: Vec<u32> = events[1..]
                .iter()
                .map(|&(seq, kind)| state.next(subs, seq, kind).gap)
                .collect();
            assert_eq!(&got, gaps, "{subs:?} {events:?}");
        }
    }

    #[test]
    fn a_repeated_or_earlier_number_is_out_of_order_and_does_not_move_the_state() {
        let mut s = SeqState::first(0, RequestStart);
        assert!(!s.next(&Subscriptions::ALL, 1, Chunk).out_of_order);
        assert!(s.next(&Subscriptions::ALL, 1, Chunk).out_of_order);
        assert_eq!(s.next(&Subscriptions::ALL, 2, Chunk).gap, 0);
    }

    #[test]
    fn a_stream_first_seen_past_its_start_is_partial() {
        assert!(!starts_partial(&Subscriptions::ALL, 0, RequestStart));
        assert!(starts_partial(&Subscriptions::ALL, 3, Chunk));
        assert!(starts_partial(&Subscriptions::ALL, 5, Final));
        let no_start = Subscriptions {
            request_start: false,
            ..Subscriptions::ALL
        };
        assert!(!starts_partial(&no_start, 1, ResponseHeaders));
        assert!(starts_partial(&no_start, 2, Chunk));
    }
}
