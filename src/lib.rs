//! ringmq: a thread-per-core MQTT 3.1.1/5.0 broker on io_uring.
//!
//! - [`codec`]: the MQTT wire format, pure (bytes in, typed packets out).
//! - [`topic`]: topic names, filters and the subscription tree, pure.
//! - [`auth`]: password files, tokens and ACLs: who a client is and what it may do.
//! - [`config`]: the broker's settings and command-line flags.
//! - [`broker`]: shards, connections and the mesh of channels between cores.
//! - [`storage`]: per-shard memory-mapped logs of retained messages and sessions.
//! - [`server`]: start-up and shutdown of the shards; [`start`] and [`run`].
//! - [`http`]: the operator's endpoint: metrics, admin API, dashboard.
//! - [`cluster`]: the control plane's store contract (etcd's model), for the cluster.

pub mod auth;
pub mod broker;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod http;
pub mod listener;
pub mod node;
pub mod server;
pub mod storage;
pub mod tls;
pub mod topic;

pub use config::Config;
pub use server::{run, start, Broker, Shutdown, StartError};

#[cfg(test)]
mod layering;
