//! Handshake and version rules.
//!
//! The plugin speaks first: it connects and sends [`Hello`]. The front answers with
//! [`Welcome`] (carrying the plugin's config) or [`Refuse`] (with a reason) and, after a refusal,
//! closes the connection. Only after `Welcome` does the front send events.
//!
//! Versions: a front supports the range [`SUPPORTED_VERSIONS`]; a plugin announcing a version
//! outside it is refused with a reason that names both. Version 2 added flow control
//! (`Welcome.budget_bytes`, `FromPlugin::Credit`) and `Welcome.metadata_max_bytes`; a version 1
//! plugin would never send credit and would stall after its first window, so it is refused.
//!
//! Version 3 added capabilities: the `Hello` lists the optional parts of the protocol the plugin
//! understands, the `Welcome` the ones the front will use (see [`capability`]). A version 2
//! plugin is still welcomed, with none: the front then sends it nothing a capability would allow.

use std::ops::RangeInclusive;

use crate::message::{Hello, Refuse, RefuseCode, Welcome};
use crate::value::Value;
use crate::ProtocolError;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 3;

/// The protocol versions a front built from this crate accepts.
pub const SUPPORTED_VERSIONS: RangeInclusive<u32> = 2..=3;

/// The capabilities of protocol version 3: optional parts of the protocol that a plugin announces
/// in `Hello.capabilities` and the front confirms in `Welcome.capabilities`. A name the front does
/// not know is ignored (left out of the `Welcome`), so a plugin may announce capabilities of a
/// newer front.
pub mod capability {
    /// The plugin decodes `ToPlugin::Replayed` (index 9) and runs the wrapped event. Without it
    /// the front never replays to the plugin: after a crash the replacement sees the streams in
    /// flight as partial.
    pub const REPLAYED: &str = "replayed";

    /// The plugin answers `ToPlugin::AbortedFinal` (index 10) with a `FinalReply`, like a
    /// `Final`: a stream that ends without a response end (the client left, the upstream reset,
    /// the front stopped) still gets its final call, marked with the cause. Without it the plugin
    /// gets `Abort` (when subscribed) and the stream's record lists it as `not_asked`.
    pub const ABORTED_FINAL: &str = "aborted_final";

    /// The plugin follows `ToPlugin::Reconnect` (index 11): it opens a second connection to its
    /// socket and serves both until the front closes the old one. The front uses it to hand a
    /// plugin it does not start over to a new config (a reload) or to a new front (an upgrade)
    /// without a gap. Without it, a reload that changes the plugin's config closes its
    /// connection (the plugin's unit restarts it), and after an upgrade the plugin stays with
    /// the old front until that has drained.
    pub const RECONNECT: &str = "reconnect";

    /// The plugin reads the `traceparent` header the front adds to each `RequestStart` and may
    /// send `FromPlugin::Spans` (index 5) before a `FinalReply`: attributes for its final-call
    /// span and spans of its own in the request's trace. Without it, it gets the request's
    /// headers as they came and the front never reads a `Spans` from it.
    pub const TRACE: &str = "trace";

    /// The plugin may hold back `Credit` while less than a quarter of its window is unreported,
    /// even when it is idle; it reports everything it has consumed before it answers a `Ping`
    /// (`Credit`, then `Pong`) and again at its first idle moment after a `Ping`. The front, in
    /// turn, pings whenever its writer starts waiting for room in the window, and whenever
    /// credit comes that still leaves no room. Without it the plugin reports all it has consumed
    /// whenever it goes idle, which costs a `Credit` frame (and a wake-up on each side) for
    /// every event of a slow stream.
    pub const CREDIT_ON_PING: &str = "credit_on_ping";

    /// Every capability this front knows, in the order a `Welcome` lists them.
    pub const KNOWN: &[&str] = &[REPLAYED, ABORTED_FINAL, RECONNECT, TRACE, CREDIT_ON_PING];
}

/// Checks the version a plugin announced.
pub fn check_version(plugin_version: u32) -> Result<u32, ProtocolError> {
    if SUPPORTED_VERSIONS.contains(&plugin_version) {
        Ok(plugin_version)
    } else {
        Err(ProtocolError::UnsupportedVersion {
            plugin: plugin_version,
            min: *SUPPORTED_VERSIONS.start(),
            max: *SUPPORTED_VERSIONS.end(),
        })
    }
}

/// The per-plugin limits a `Welcome` carries besides the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The flow-control window ([`Welcome::budget_bytes`]).
    pub budget_bytes: u64,
    /// The cap on one final reply's metadata ([`Welcome::metadata_max_bytes`]).
    pub metadata_max_bytes: u64,
}

/// The front's answer to a `Hello` as far as the protocol decides it: a `Welcome` with `config`,
/// `limits` and the capabilities both sides know if the version is supported, otherwise a `Refuse`
/// that names both versions. The `Welcome` speaks the plugin's version.
/// Checks that need the front's state (plugin known, not already connected, peer credentials)
/// come first, in the front.
pub fn answer_hello(hello: &Hello, config: Value, limits: Limits) -> Result<Welcome, Refuse> {
    match check_version(hello.protocol_version) {
        Ok(version) => Ok(Welcome {
            protocol_version: version,
            config,
            budget_bytes: limits.budget_bytes,
            metadata_max_bytes: limits.metadata_max_bytes,
            capabilities: capability::KNOWN
                .iter()
                .filter(|known| hello.capabilities.iter().any(|c| c == *known))
                .map(|c| (*c).to_owned())
                .collect(),
        }),
        Err(e) => Err(Refuse {
            code: RefuseCode::UnsupportedVersion,
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Subscriptions;

    fn hello(version: u32) -> Hello {
        Hello {
            protocol_version: version,
            plugin: "usage".into(),
            pid: 42,
            subscriptions: Subscriptions::ALL,
            capabilities: vec!["replayed".into(), "from-the-future".into()],
        }
    }

    const LIMITS: Limits = Limits {
        budget_bytes: 1 << 23,
        metadata_max_bytes: 1 << 14,
    };

    #[test]
    fn supported_version_is_welcomed_with_config_and_limits() {
        let config = Value::map([("k", Value::Int(1))]);
        let welcome = answer_hello(&hello(PROTOCOL_VERSION), config.clone(), LIMITS).unwrap();
        assert_eq!(welcome.protocol_version, PROTOCOL_VERSION);
        assert_eq!(welcome.config, config);
        assert_eq!(welcome.budget_bytes, 1 << 23);
        assert_eq!(welcome.metadata_max_bytes, 1 << 14);
        assert_eq!(
            welcome.capabilities,
            ["replayed"],
            "unknown names are left out"
        );
    }

    #[test]
    fn a_version_2_plugin_is_welcomed_at_version_2_without_capabilities() {
        let mut old = hello(2);
        old.capabilities.clear();
        let welcome = answer_hello(&old, Value::Null, LIMITS).unwrap();
        assert_eq!(welcome.protocol_version, 2);
        assert!(welcome.capabilities.is_empty());
    }

    #[test]
    fn unsupported_version_is_refused_naming_both_versions() {
        let refuse = answer_hello(&hello(7), Value::Null, LIMITS).unwrap_err();
        assert_eq!(refuse.code, RefuseCode::UnsupportedVersion);
        assert!(refuse.reason.contains("version 7"), "{}", refuse.reason);
        assert!(refuse.reason.contains("2..=3"), "{}", refuse.reason);
    }

    #[test]
    fn a_version_1_plugin_without_flow_control_is_refused() {
        let refuse = answer_hello(&hello(1), Value::Null, LIMITS).unwrap_err();
        assert_eq!(refuse.code, RefuseCode::UnsupportedVersion);
        assert!(refuse.reason.contains("version 1"), "{}", refuse.reason);
        assert!(refuse.reason.contains("upgrade"), "{}", refuse.reason);
    }
}
