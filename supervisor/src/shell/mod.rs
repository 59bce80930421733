//! The service shell around the data path and the plugins: running under systemd
//! ([`service`], [`systemd`], [`crash_loop`]), the control socket behind `plugvisor status` ([`control`]),
//! applying a new configuration ([`reload`]), Prometheus and the admin server ([`metrics`]), the
//! log ([`logging`], [`journal`]), and one front per runtime directory ([`instance`]).

pub mod control;
pub mod crash_loop;
pub mod instance;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod service;
// The crate's one `unsafe` outside process spawning: adopting the listening socket systemd passed
// (`adopt_listen_fd`).
#[allow(unsafe_code)]
pub mod systemd;
