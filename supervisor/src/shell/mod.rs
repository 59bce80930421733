//! The service shell around the data path and the plugins: running under systemd
//! ([`service`], [`systemd`], [`crash_loop`]), the control socket behind `plugvisor status` ([`control`]),
//! applying a new configuration ([`reload`]), Prometheus and the admin server ([`metrics`]), the
//! log ([`logging`], [`journal`]), one front per runtime directory ([`instance`]), and handing
//! the listeners to a new binary ([`upgrade`]).

pub mod control;
pub mod crash_loop;
pub mod instance;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod service;
// The crate's one `unsafe` outside process spawning: adopting the listening socket systemd passed
// (`adopt_listen_fd`) and the fds an old front passes in an upgrade (`adopt_received_fds`).
#[allow(unsafe_code)]
pub mod systemd;
pub mod upgrade;
