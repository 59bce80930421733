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

use std::ops::RangeInclusive;

use crate::message::{Hello, Refuse, RefuseCode, Welcome};
use crate::value::Value;
use crate::ProtocolError;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 2;

/// The protocol versions a front built from this crate accepts.
pub const SUPPORTED_VERSIONS: RangeInclusive<u32> = 2..=2;

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

/// The front's answer to a `Hello` as far as the protocol decides it: a `Welcome` with `config`
/// and `limits` if the version is supported, otherwise a `Refuse` that names both versions.
/// Checks that need the front's state (plugin known, not already connected, peer credentials)
/// come first, in the front.
pub fn answer_hello(hello: &Hello, config: Value, limits: Limits) -> Result<Welcome, Refuse> {
    match check_version(hello.protocol_version) {
        Ok(version) => Ok(Welcome {
            protocol_version: version,
            config,
            budget_bytes: limits.budget_bytes,
            metadata_max_bytes: limits.metadata_max_bytes,
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
    }

    #[test]
    fn unsupported_version_is_refused_naming_both_versions() {
        let refuse = answer_hello(&hello(7), Value::Null, LIMITS).unwrap_err();
        assert_eq!(refuse.code, RefuseCode::UnsupportedVersion);
        assert!(refuse.reason.contains("version 7"), "{}", refuse.reason);
        assert!(refuse.reason.contains("2..=2"), "{}", refuse.reason);
    }

    #[test]
    fn a_version_1_plugin_without_flow_control_is_refused() {
        let refuse = answer_hello(&hello(1), Value::Null, LIMITS).unwrap_err();
        assert_eq!(refuse.code, RefuseCode::UnsupportedVersion);
        assert!(refuse.reason.contains("version 1"), "{}", refuse.reason);
        assert!(refuse.reason.contains("upgrade"), "{}", refuse.reason);
    }
}
