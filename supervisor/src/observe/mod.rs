//! What the front tells the world about itself, used by every other part and using none of them:
//! [`metrics`] (the Prometheus registry and the admin server with `/metrics` and `/healthz`),
//! [`logging`] (the log, its rate-limited warnings, one-line error chains), [`journal`]
//! (journald's native protocol for plugin lines) and [`probe`] (liveness probes the systemd
//! watchdog asks).

pub mod journal;
pub mod logging;
pub mod metrics;
pub mod probe;
