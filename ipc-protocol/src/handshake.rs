//! Handshake and version rules.
//!
//! The plugin speaks first: it connects and sends [`Hello`]. The front answers with
//! [`Welcome`] (carrying the plugin's config) or [`Refuse`] (with a reason) and, after a refusal,
//! closes the connection. Only after `Welcome` does the front send events.
//!
//! Versions: a front supports the range [`SUPPORTED_VERSIONS`]; a plugin announcing a version
//! outside it is refused with a reason that names both.

use std::ops::RangeInclusive;

use crate::message::{Hello, Refuse, RefuseCode, Welcome};
use crate::value::Value;
use crate::ProtocolError;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The protocol versions a front built from this crate accepts.
pub const SUPPORTED_VERSIONS: RangeInclusive<u32> = 1..=1;

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

/// The front's answer to a `Hello` as far as the protocol decides it: a `Welcome` with `config`
/// if the version is supported, otherwise a `Refuse` that names both versions. Checks that need
/// the front's state (plugin known, not already connected, peer credentials) come first, in the
/// front.
pub fn answer_hello(hello: &Hello, config: Value) -> Result<Welcome, Refuse> {
    match check_version(hello.protocol_version) {
        Ok(version) => Ok(Welcome {
            protocol_version: version,
            config,
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

    #[test]
    fn supported_version_is_welcomed_with_config() {
        let config = Value::map([("k", Value::Int(1))]);
        let welcome = answer_hello(&hello(PROTOCOL_VERSION), config.clone()).unwrap();
        assert_eq!(welcome.protocol_version, PROTOCOL_VERSION);
        assert_eq!(welcome.config, config);
    }

    #[test]
    fn unsupported_version_is_refused_naming_both_versions() {
        let refuse = answer_hello(&hello(7), Value::Null).unwrap_err();
        assert_eq!(refuse.code, RefuseCode::UnsupportedVersion);
        assert!(refuse.reason.contains("version 7"), "{}", refuse.reason);
        assert!(refuse.reason.contains("1..=1"), "{}", refuse.reason);
    }
}
