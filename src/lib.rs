//! ringmq: a thread-per-core MQTT 3.1.1/5.0 broker on io_uring.
//!
//! - [`codec`]: the MQTT wire format, pure (bytes in, typed packets out).
//! - [`topic`]: topic names, filters and the subscription tree, pure.

pub mod codec;
pub mod topic;
