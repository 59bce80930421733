//! The service shell around the data path and the plugins: start-up in named phases and the
//! running front ([`front`]), the listeners it serves on ([`listeners`]), running under systemd
//! ([`service`], [`systemd`], [`crash_loop`]), the control socket behind `plugvisor status`
//! ([`control`]), applying a new configuration ([`reload`]), one front per runtime directory
//! ([`instance`]), and handing the listeners to a new binary ([`upgrade`]).

pub mod control;
pub mod crash_loop;
pub mod front;
pub mod instance;
pub mod listeners;
pub mod reload;
pub mod service;
// The crate's one `unsafe` outside process spawning: adopting the listening socket systemd passed
// (`adopt_listen_fd`) and the fds an old front passes in an upgrade (`adopt_received_fds`).
#[allow(unsafe_code)]
pub mod systemd;
pub mod upgrade;
