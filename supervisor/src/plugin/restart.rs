//! Restart policy: the pure state machine that decides, for one plugin, whether and when its
//! process is started again.
//!
//! Events come in (the process was spawned, finished its handshake, exited, a timer fired, an
//! operator asked for something); actions come out (spawn, kill, retry after a delay, give up).
//! Nothing here spawns, signals or sleeps: the supervisor does that at the edges, which keeps the
//! policy testable from a table. Time and jitter are passed in for the same reason.
//!
//! The restart types are OTP's: `permanent` restarts after any exit, `transient` only after an
//! abnormal one, `temporary` never. Backoff grows exponentially from `backoff_min` to
//! `backoff_max`, with jitter spread between the minimum and the current step so that plugins
//! that failed together do not come back in lockstep. The intensity limit (`max_restarts` within
//! `period`) marks a plugin `failed`: it stays down, the others keep serving, and an operator's
//! `start`/`restart` brings it back with a fresh window.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// When a plugin is restarted after its process ends (OTP's restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RestartType {
    /// Always restarted.
    #[default]
    Permanent,
    /// Restarted only after an abnormal exit (non-zero status, a signal, a hang, a failed start).
    Transient,
    /// Never restarted.
    Temporary,
}

/// The restart parameters of one plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Which exits lead to a restart.
    pub restart: RestartType,
    /// Delay before the first restart after a failure; the floor of every delay.
    pub backoff_min: Duration,
    /// The cap of the exponential backoff.
    pub backoff_max: Duration,
    /// Restarts allowed within `period` before the plugin is marked failed.
    pub max_restarts: u32,
    /// The sliding window of the intensity limit; also how long a plugin must stay up for its
    /// backoff to start again from the minimum.
    pub period: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            restart: RestartType::Permanent,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(30),
            max_restarts: 10,
            period: Duration::from_secs(60),
        }
    }
}

/// How a plugin process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// It could not be spawned at all (missing binary, ...).
    SpawnFailed,
}

impl Exit {
    /// `EX_CONFIG` (sysexits): the plugin refused its configuration, or the front refused it.
    /// Starting it again with the same configuration gives the same answer.
    pub const CONFIG_REFUSED: Exit = Exit::Code(78);

    /// Status 0 is the only normal exit.
    pub fn is_normal(self) -> bool {
        self == Exit::Code(0)
    }
}

/// Where a plugin stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not running and not meant to (before the first start, after `stop`, or a temporary or
    /// transient plugin that ended normally).
    Stopped,
    /// A process was spawned and has not finished its handshake yet.
    Starting,
    /// The handshake completed; the plugin serves.
    Up,
    /// Waiting to be started again.
    Backoff {
        /// When the retry is due.
        until: Instant,
    },
    /// Past its intensity limit: stays down until an operator starts it.
    Failed,
}

impl State {
    /// The name `plugvisor status` shows.
    pub fn name(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Up => "up",
            State::Backoff { .. } => "backoff",
            State::Failed => "failed",
        }
    }
}

/// Something that happened to a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Start it (the supervisor starting up, or an operator's `start`/`restart`).
    Start,
    /// Its handshake completed.
    HandshakeDone,
    /// It did not finish its handshake within `start_timeout`.
    StartTimedOut,
    /// It missed its heartbeats for `hang_timeout`.
    Hung,
    /// Its process ended (reaped) or could not be spawned.
    Exited(Exit),
    /// The backoff delay is over.
    BackoffElapsed,
    /// Stop it and keep it stopped (operator's `stop`, config reload removing it, shutdown).
    Stop,
}

/// What the supervisor must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Spawn a new process (then report `HandshakeDone`, `StartTimedOut` or `Exited`).
    Spawn,
    /// SIGKILL the process group: it hung or never finished starting.
    Kill,
    /// Ask the process to stop (Shutdown, then SIGTERM and SIGKILL after the grace).
    Terminate,
    /// Let the running process finish its streams while a new one takes the new ones (a
    /// planned restart of a healthy plugin); it is reaped apart, and its exit is not a failure.
    Handover,
    /// Report `BackoffElapsed` after this delay.
    RetryAfter(Duration),
    /// The intensity limit was hit; the plugin is now `failed`.
    GaveUp {
        /// Restarts counted in the window.
        restarts: u32,
    },
    /// It exited [`Exit::CONFIG_REFUSED`]: the same configuration would be refused again, so it
    /// is `failed` at once, until a reload changes its table or an operator starts it.
    ConfigRefused,
}

/// The restart state machine of one plugin.
#[derive(Debug, Clone)]
pub struct Restarter {
    policy: Policy,
    state: State,
    /// Restarts (not first starts) within the last `period`, oldest first.
    window: VecDeque<Instant>,
    /// Failures since the plugin last stayed up for a whole `period`; drives the backoff step.
    consecutive_failures: u32,
    up_since: Option<Instant>,
    /// Why we killed the running process, so its signal exit is judged by that reason.
    killed_for_cause: bool,
    /// An operator's restart: spawn again as soon as the running process is gone.
    restart_on_exit: bool,
    restarts_total: u64,
}

impl Restarter {
    /// A stopped plugin with this policy.
    pub fn new(policy: Policy) -> Self {
        Restarter {
            policy,
            state: State::Stopped,
            window: VecDeque::new(),
            consecutive_failures: 0,
            up_since: None,
            killed_for_cause: false,
            restart_on_exit: false,
            restarts_total: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Restarts since the supervisor started (first starts and operator starts not counted).
    pub fn restarts_total(&self) -> u64 {
        self.restarts_total
    }

    /// Whether the running process's exit was asked for (a stop, or a restart that starts the
    /// next one once it is reaped): logged as such, not as a failure.
    pub fn exit_expected(&self) -> bool {
        self.state == State::Stopped || self.restart_on_exit
    }

    /// Since when the running process is up (its handshake completed).
    pub fn up_since(&self) -> Option<Instant> {
        self.up_since
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Takes a new policy (a reload) for what happens from now on.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Feeds one event; `jitter` is a uniform sample from `[0, 1)` that spreads backoff delays.
    pub fn handle(&mut self, event: Event, now: Instant, jitter: f64) -> Vec<Action> {
        match (self.state, event) {
            (State::Stopped | State::Failed | State::Backoff { .. }, Event::Start) => {
                // An operator's start is a fresh beginning: forget past failures.
                self.window.clear();
                self.consecutive_failures = 0;
                self.state = State::Starting;
                vec![Action::Spawn]
            }
            (State::Up, Event::Start) => {
                // `restart` of a healthy plugin: a new process takes new streams while this one
                // finishes its own. Planned, so not counted against the intensity limit.
                self.state = State::Starting;
                self.up_since = None;
                vec![Action::Handover, Action::Spawn]
            }
            (State::Starting, Event::Start) => {
                // Not serving yet, so it has no streams to finish and may not even read its
                // socket: kill it at once and start again once it is reaped (the owner never
                // waits out a grace for a connection that does not exist).
                self.restart_on_exit = true;
                vec![Action::Kill]
            }
            (State::Starting, Event::HandshakeDone) => {
                self.state = State::Up;
                self.up_since = Some(now);
                vec![]
            }
            (State::Starting, Event::StartTimedOut) | (State::Up, Event::Hung) => {
                self.killed_for_cause = true;
                vec![Action::Kill]
            }
            (State::Starting | State::Up, Event::Exited(exit)) => self.on_exit(exit, now, jitter),
            (State::Backoff { .. }, Event::BackoffElapsed) => {
                self.state = State::Starting;
                vec![Action::Spawn]
            }
            (State::Starting | State::Up, Event::Stop) => {
                self.restart_on_exit = false;
                self.state = State::Stopped;
                self.up_since = None;
                vec![Action::Terminate]
            }
            (State::Backoff { .. } | State::Failed, Event::Stop) => {
                self.state = State::Stopped;
                vec![]
            }
            // Late or duplicate events (a timer that fired after the process exited, an exit of
            // a process we were already stopping) change nothing.
            _ => vec![],
        }
    }

    fn on_exit(&mut self, exit: Exit, now: Instant, jitter: f64) -> Vec<Action> {
        let stayed_up_long = self
            .up_since
            .take()
            .is_some_and(|since| now.duration_since(since) >= self.policy.period);
        let for_cause = std::mem::take(&mut self.killed_for_cause);
        if std::mem::take(&mut self.restart_on_exit) {
            self.state = State::Starting;
            return vec![Action::Spawn];
        }
        if exit == Exit::CONFIG_REFUSED && !for_cause {
            self.state = State::Failed;
            return vec![Action::ConfigRefused];
        }
        let abnormal = for_cause || !exit.is_normal();
        let restart = match self.policy.restart {
            RestartType::Permanent => true,
            RestartType::Transient => abnormal,
            RestartType::Temporary => false,
        };
        if !restart {
            self.state = State::Stopped;
            return vec![];
        }
        if stayed_up_long {
            self.consecutive_failures = 0;
        }
        while self
            .window
            .front()
            .is_some_and(|&t| now.duration_since(t) > self.policy.period)
        {
            self.window.pop_front();
        }
        if self.window.len() as u32 >= self.policy.max_restarts {
            self.state = State::Failed;
            return vec![Action::GaveUp {
                restarts: self.window.len() as u32,
            }];
        }
        self.window.push_back(now);
        self.restarts_total += 1;
        self.consecutive_failures += 1;
        let delay = self.backoff(jitter);
        self.state = State::Backoff { until: now + delay };
        vec![Action::RetryAfter(delay)]
    }

    /// The delay before restart number `consecutive_failures` (1-based): the n-th step of the
    /// exponential series from `backoff_min`, capped, with the jitter spread between the
    /// minimum and that step. The first restart always waits exactly `backoff_min`.
    fn backoff(&self, jitter: f64) -> Duration {
        let min = self.policy.backoff_min;
        let max = self.policy.backoff_max.max(min);
        let exponent = self.consecutive_failures.saturating_sub(1).min(32);
        let step = min.saturating_mul(1u32 << exponent.min(31)).min(max);
        let spread = step.saturating_sub(min);
        min + spread.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(restart: RestartType) -> Policy {
        Policy {
            restart,
            backoff_min: 100 * MS,
            backoff_max: 1_000 * MS,
            max_restarts: 3,
            period: 10_000 * MS,
        }
    }

    /// Runs `(offset from t0, event, expected actions, expected state name)` rows in order, with
    /// the jitter at its top so that each delay is the full exponential step.
    fn run(policy: Policy, rows: &[(u64, Event, &[Action], &str)]) -> Restarter {
        let t0 = Instant::now();
        let mut r = Restarter::new(policy);
        for (i, (at_ms, event, actions, state)) in rows.iter().enumerate() {
            let got = r.handle(*event, t0 + Duration::from_millis(*at_ms), 1.0);
            assert_eq!(got, *actions, "row {i}: {event:?} actions");
            assert_eq!(r.state().name(), *state, "row {i}: {event:?} state");
        }
        r
    }

    use Action::*;
    use Event::*;

    #[test]
    fn permanent_plugin_restarts_after_any_exit_with_growing_backoff() {
        let r = run(
            policy(RestartType::Permanent),
            &[
                (0, Start, &[Spawn], "starting"),
                (10, HandshakeDone, &[], "up"),
                (
                    20,
                    Exited(Exit::Code(0)),
                    &[RetryAfter(100 * MS)],
                    "backoff",
                ),
                (120, BackoffElapsed, &[Spawn], "starting"),
                (
                    130,
                    Exited(Exit::Signal(9)),
                    &[RetryAfter(200 * MS)],
                    "backoff",
                ),
                (330, BackoffElapsed, &[Spawn], "starting"),
                (
                    340,
                    Exited(Exit::Code(1)),
                    &[RetryAfter(400 * MS)],
                    "backoff",
                ),
            ],
        );
        assert_eq!(r.restarts_total(), 3);
    }

    #[test]
    fn transient_plugin_restarts_only_after_abnormal_exit() {
        run(
            policy(RestartType::Transient),
            &[
                (0, Start, &[Spawn], "starting"),
                (10, HandshakeDone, &[], "up"),
                (
                    20,
                    Exited(Exit::Code(3)),
                    &[RetryAfter(100 * MS)],
                    "backoff",
                ),
                (120, BackoffElapsed, &[Spawn], "starting"),
                (130, HandshakeDone, &[], "up"),
                (140, Exited(Exit::Code(0)), &[], "stopped"),
            ],
        );
    }

    #[test]
    fn a_plugin_that_refuses_its_config_fails_at_once_and_starts_again_when_told() {
        for restart in [
            RestartType::Permanent,
            RestartType::Transient,
            RestartType::Temporary,
        ] {
            let r = run(
                policy(restart),
                &[
                    (0, Start, &[Spawn], "starting"),
                    (10, Exited(Exit::CONFIG_REFUSED), &[ConfigRefused], "failed"),
                    // A reload with a new table, or an operator, starts it again.
                    (20, Start, &[Spawn], "starting"),
                    (30, HandshakeDone, &[], "up"),
                    (40, Exited(Exit::CONFIG_REFUSED), &[ConfigRefused], "failed"),
                ],
            );
            assert_eq!(r.restarts_total(), 0, "{restart:?}");
        }
    }

    #[test]
    fn temporary_plugin_is_never_restarted() {
        run(
            policy(RestartType::Temporary),
            &[
                (0, Start, &[Spawn], "starting"),
                (10, Exited(Exit::Signal(11)), &[], "stopped"),
            ],
        );
    }

    #[test]
    fn intensity_limit_marks_failed_and_operator_start_revives() {
        run(
            policy(RestartType::Permanent),
            &[
                (0, Start, &[Spawn], "starting"),
                (1, Exited(Exit::Code(1)), &[RetryAfter(100 * MS)], "backoff"),
                (101, BackoffElapsed, &[Spawn], "starting"),
                (
                    102,
                    Exited(Exit::Code(1)),
                    &[RetryAfter(200 * MS)],
                    "backoff",
                ),
                (302, BackoffElapsed, &[Spawn], "starting"),
                (
                    303,
                    Exited(Exit::Code(1)),
                    &[RetryAfter(400 * MS)],
                    "backoff",
                ),
                (703, BackoffElapsed, &[Spawn], "starting"),
                (
                    704,
                    Exited(Exit::Code(1)),
                    &[GaveUp { restarts: 3 }],
                    "failed",
                ),
                (5_000, BackoffElapsed, &[], "failed"),
                (6_000, Start, &[Spawn], "starting"),
                (
                    6_001,
                    Exited(Exit::Code(1)),
                    &[RetryAfter(100 * MS)],
                    "backoff",
                ),
            ],
        );
    }

    #[test]
    fn restarts_older_than_the_period_leave_the_window() {
        run(
            policy(RestartType::Permanent),
            &[
                (0, Start, &[Spawn], "starting"),
                (1, Exited(Exit::Code(1)), &[RetryAfter(100 * MS)], "backoff"),
                (101, BackoffElapsed, &[Spawn], "starting"),
                (
                    102,
                    Exited(Exit::Code(1)),
                    &[RetryAfter(200 * MS)],
                    "backoff",
                ),
                (302, BackoffElapsed, &[Spawn], "starting"),
                (
                    303,
                    Exited(Exit::Code(1)),
                    &[RetryAfter(400 * MS)],
                    "backoff",
                ),
                (703, BackoffElapsed, &[Spawn], "starting"),
                // At 10.25 s the restarts at 1 ms and 102 ms have left the 10 s window.
                (
                    10_250,
                    Exited(Exit::Code(1)),
                    &[RetryAfter(800 * MS)],
                    "backoff",
                ),
            ],
        );
    }

    #[test]
    fn staying_up_a_whole_period_resets_the_backoff() {
        run(
            policy(RestartType::Permanent),
            &[
                (0, Start, &[Spawn], "starting"),
                (1, Exited(Exit::Code(1)), &[RetryAfter(100 * MS)], "backoff"),
                (101, BackoffElapsed, &[Spawn], "starting"),
                (
                    102,
                    Exited(Exit::Code(1)),
                    &[RetryAfter(200 * MS)],
                    "backoff",
                ),
                (302, BackoffElapsed, &[Spawn], "starting"),
                (303, HandshakeDone, &[], "up"),
                (
                    20_303,
                    Exited(Exit::Signal(9)),
                    &[RetryAfter(100 * MS)],
                    "backoff",
                ),
            ],
        );
    }

    #[test]
    fn hang_and_start_timeout_kill_and_count_as_abnormal() {
        run(
            policy(RestartType::Transient),
            &[
                (0, Start, &[Spawn], "starting"),
                (10, StartTimedOut, &[Kill], "starting"),
                // SIGKILL exit after our kill: abnormal even for a transient plugin.
                (
                    11,
                    Exited(Exit::Code(0)),
                    &[RetryAfter(100 * MS)],
                    "backoff",
                ),
                (111, BackoffElapsed, &[Spawn], "starting"),
                (112, HandshakeDone, &[], "up"),
                (500, Hung, &[Kill], "up"),
                (
                    501,
                    Exited(Exit::Signal(9)),
                    &[RetryAfter(200 * MS)],
                    "backoff",
                ),
            ],
        );
    }

    #[test]
    fn operator_stop_keeps_it_stopped_and_restart_hands_over_at_once() {
        let r = run(
            policy(RestartType::Permanent),
            &[
                (0, Start, &[Spawn], "starting"),
                (10, HandshakeDone, &[], "up"),
                // A healthy plugin's restart: the old process finishes its streams apart.
                (20, Start, &[Handover, Spawn], "starting"),
                (40, HandshakeDone, &[], "up"),
                (50, Stop, &[Terminate], "stopped"),
                (60, Exited(Exit::Code(0)), &[], "stopped"),
                (70, Start, &[Spawn], "starting"),
                // Restarting one that is not serving yet: kill it, start again once reaped.
                (80, Start, &[Kill], "starting"),
                (90, Exited(Exit::Signal(9)), &[Spawn], "starting"),
            ],
        );
        // Planned restarts are not failures.
        assert_eq!(r.restarts_total(), 0);
    }

    #[test]
    fn stop_during_backoff_cancels_the_retry() {
        run(
            policy(RestartType::Permanent),
            &[
                (0, Start, &[Spawn], "starting"),
                (1, Exited(Exit::Code(1)), &[RetryAfter(100 * MS)], "backoff"),
                (50, Stop, &[], "stopped"),
                (101, BackoffElapsed, &[], "stopped"),
            ],
        );
    }

    #[test]
    fn jitter_spreads_between_minimum_and_step_and_never_passes_the_cap() {
        let t0 = Instant::now();
        let mut r = Restarter::new(policy(RestartType::Permanent));
        r.handle(Start, t0, 0.0);
        // First restart: always the minimum, whatever the jitter.
        assert_eq!(
            r.handle(Exited(Exit::Code(1)), t0, 0.99),
            vec![RetryAfter(100 * MS)]
        );
        r.handle(BackoffElapsed, t0, 0.0);
        // Second: between 100 ms and 200 ms.
        assert_eq!(
            r.handle(Exited(Exit::Code(1)), t0, 0.5),
            vec![RetryAfter(150 * MS)]
        );
        let mut big = policy(RestartType::Permanent);
        big.max_restarts = 100;
        let mut r = Restarter::new(big);
        r.handle(Start, t0, 0.0);
        for _ in 0..40 {
            match r.handle(Exited(Exit::Code(1)), t0, 0.999)[..] {
                [RetryAfter(d)] => assert!(d <= 1_000 * MS, "{d:?}"),
                ref other => panic!("{other:?}"),
            }
            r.handle(BackoffElapsed, t0, 0.0);
        }
    }
}
