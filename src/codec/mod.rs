//! The MQTT wire codec: bytes in, typed packets out, no I/O and nothing of the runtime.
//!
//! One type per control packet, one [`Properties`] table for every MQTT 5 property,
//! and two entry points: [`decode`] reads one packet from the front of a buffer
//! (an incomplete packet is `Ok(None)`), [`encode`] appends one packet after
//! computing its size ([`encoded_size`]). MQTT 3.1 (`MQIsdp`, level 3), 3.1.1
//! (level 4) and 5.0 (level 5) are supported; the version decides whether
//! properties and reason codes are on the wire.
//!
//! Decoding never panics and names the rule each refusal enforces (see [`DecodeError`]).
//! Topic text that is not UTF-8 or holds U+0000 is `Malformed` like any string; valid
//! text that breaks topic rules is `TopicNameInvalid` / `TopicFilterInvalid`. Encoding
//! refuses ([`EncodeError::Invalid`]) what the peer's decoder would refuse, so every
//! encoded packet decodes to itself.

mod decode;
mod encode;
mod error;
mod outgoing;
mod packet;
mod primitives;
mod properties;
pub mod proxy;
mod reason;
mod reason_sets;
#[cfg(test)]
mod tests;
pub mod websocket;

pub use decode::{decode, packet_size};
pub use encode::{encode, encode_with_limit, encoded_size, MAX_ENCODED_SIZE};
pub use error::{DecodeError, EncodeError};
pub use outgoing::OutgoingPublish;
pub use packet::*;
pub use properties::{Properties, Property, PropertyContext, PropertyId};
pub use reason::ReasonCode;
