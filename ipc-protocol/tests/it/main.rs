//! The wire protocol from the outside, linked into one test binary (`it`): framing over real
//! byte streams, round-trip properties, and the byte layout docs/protocol.md quotes. `support`
//! holds the sample messages. Run one module with `cargo test -p ipc-protocol --test it frames::`.

mod support;

mod frames;
mod roundtrip_prop;
mod wire_layout;
