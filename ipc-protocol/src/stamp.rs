//! Arrival stamps: nanoseconds on `CLOCK_MONOTONIC`.
//!
//! The front stamps every event when it arrives from Envoy. All processes on a host share this
//! clock, so a plugin can subtract stamps taken by the front and get real intervals, no matter how
//! late it runs the event.

use nix::time::{clock_gettime, ClockId};

/// The current `CLOCK_MONOTONIC` time in nanoseconds.
pub fn monotonic_now_ns() -> u64 {
    // CLOCK_MONOTONIC is mandatory on Linux; clock_gettime can only fail for an invalid clock id.
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always available");
    (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_stamps_never_go_backwards() {
        let a = monotonic_now_ns();
        let b = monotonic_now_ns();
        assert!(b >= a);
        assert!(a > 0);
    }
}
