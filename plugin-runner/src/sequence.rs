//! Sequence tracking per stream: from the sequence numbers the front puts on each event, decide
//! whether events are missing (a *gap*) and whether the host missed the stream's start (a
//! *partial* stream).
//!
//! As `docs/protocol.md` specifies, the front numbers the events it offers a plugin 0, 1, 2 … per
//! stream, counting only the kinds the plugin subscribed to, and a dropped event still uses up its
//! number. So on one socket every skipped number is a gap, and a stream first seen at a number
//! other than 0, or (with request starts subscribed) at another event than `RequestStart`, lost
//! its start. Pure functions, tested from a table.
//!
//! A replayed event (`ToPlugin::Replayed`, resent after a plugin restart) is judged exactly like
//! the live event it wraps: the front replays a stream from its first event with the numbers it
//! had, so a stream whose journal is whole is neither partial nor gapped.

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
            ToPlugin::Final(_) | ToPlugin::AbortedFinal(_) => Kind::Final,
            ToPlugin::Abort(_) => Kind::Abort,
            ToPlugin::Replayed(inner) if inner.is_live_event() => return Kind::of(inner),
            _ => return None,
        })
    }
}

/// What the host knows of one stream's sequence so far: the last number seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeqState {
    last: u32,
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
    seq != 0 || (subs.request_start && kind != Kind::RequestStart)
}

impl SeqState {
    /// The state after a stream's first event.
    pub(crate) fn first(seq: u32) -> SeqState {
        SeqState { last: seq }
    }

    /// The last number seen.
    pub(crate) fn last(&self) -> u32 {
        self.last
    }

    /// Judges the next event and, unless it is out of order, advances past it.
    pub(crate) fn next(&mut self, seq: u32) -> Verdict {
        if seq <= self.last {
            return Verdict {
                gap: 0,
                out_of_order: true,
            };
        }
        let gap = seq - self.last - 1;
        self.last = seq;
        Verdict {
            gap,
            out_of_order: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Kind::*;

    #[test]
    fn every_skipped_number_is_a_gap() {
        // (sequence numbers seen, expected gap before each one after the first)
        let table: &[(&[u32], &[u32])] = &[
            (&[0, 1, 2, 3], &[0, 0, 0]),
            (&[0, 1, 4, 5], &[0, 2, 0]),
            (&[0, 2], &[1]),
            (&[3, 4, 9], &[0, 4]),
        ];
        for (seqs, gaps) in table {
            let mut state = SeqState::first(seqs[0]);
            let got: Vec<u32> = seqs[1..].iter().map(|&seq| state.next(seq).gap).collect();
            assert_eq!(&got, gaps, "{seqs:?}");
        }
    }

    #[test]
    fn a_repeated_or_earlier_number_is_out_of_order_and_does_not_move_the_state() {
        let mut s = SeqState::first(0);
        assert!(!s.next(1).out_of_order);
        assert!(s.next(1).out_of_order);
        assert_eq!(s.next(2).gap, 0);
    }

    #[test]
    fn replayed_events_are_numbered_and_judged_like_live_ones() {
        use ipc_protocol::{Chunk, Ping, RequestStart};
        let start = ToPlugin::RequestStart(RequestStart {
            stream_id: 1,
            seq: 0,
            stamp_ns: 0,
            request_id: None,
            headers: vec![],
        });
        let chunk = |seq| {
            ToPlugin::Chunk(Chunk {
                stream_id: 1,
                seq,
                stamp_ns: 0,
                len: 0,
                bytes: Default::default(),
                end_of_stream: false,
                ack: false,
            })
        };
        let replayed = start.clone().replayed().unwrap();
        assert_eq!(Kind::of(&replayed), Some(RequestStart));
        assert_eq!(Kind::of(&chunk(1).replayed().unwrap()), Some(Chunk));
        assert_eq!(
            Kind::of(&ToPlugin::Replayed(Box::new(ToPlugin::Ping(Ping {
                nonce: 0
            })))),
            None
        );
        // A journal replayed from its start (0, 1, 2), then live events (3, 4): whole.
        let (_, seq) = replayed.stream_seq().unwrap();
        assert!(!starts_partial(
            &Subscriptions::ALL,
            seq,
            Kind::of(&replayed).unwrap()
        ));
        let mut state = SeqState::first(seq);
        for msg in [
            chunk(1).replayed().unwrap(),
            chunk(2).replayed().unwrap(),
            chunk(3),
            chunk(4),
        ] {
            let (_, seq) = msg.stream_seq().unwrap();
            assert_eq!(
                state.next(seq),
                Verdict {
                    gap: 0,
                    out_of_order: false
                }
            );
        }
        // A journal that lost its start is partial, like a live stream first seen mid-way.
        let late = chunk(5).replayed().unwrap();
        let (_, seq) = late.stream_seq().unwrap();
        assert!(starts_partial(
            &Subscriptions::ALL,
            seq,
            Kind::of(&late).unwrap()
        ));
    }

    #[test]
    fn a_stream_first_seen_past_its_start_is_partial() {
        assert!(!starts_partial(&Subscriptions::ALL, 0, RequestStart));
        assert!(starts_partial(&Subscriptions::ALL, 3, Chunk));
        assert!(starts_partial(&Subscriptions::ALL, 5, Final));
        assert!(starts_partial(&Subscriptions::ALL, 0, Chunk));
        let no_start = Subscriptions {
            request_start: false,
            ..Subscriptions::ALL
        };
        assert!(!starts_partial(&no_start, 0, ResponseHeaders));
        assert!(starts_partial(&no_start, 2, Chunk));
    }
}
