//! The MQTT wire codec: bytes in, typed packets out, no I/O and nothing of the runtime.
//!
//! One type per control packet, one [`Properties`] table for every MQTT 5 property,
//! and two entry points: [`decode`] reads one packet from the front of a buffer
//! (an incomplete packet is `Ok(None)`), [`encode`] appends one packet after
//! computing its size ([`encoded_size`]). MQTT 3.1 (`MQIsdp`, level 3), 3.1.1
//! (level 4) and 5.0 (level 5) are supported; the version decides whether
//! properties and reason codes are on the wire.

mod error;
mod packet;
mod primitives;
mod properties;
mod reason;

pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use properties::{Properties, Property, PropertyId};
pub use reason::ReasonCode;
