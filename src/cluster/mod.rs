//! The cluster's control plane (issue 16, in progress): what several ringmq nodes agree on
//! through etcd — node membership under leases, routes, client ownership fenced by
//! revisions.
//!
//! - [`store`]: the [`store::ClusterStore`] contract (etcd's data model: revisions, leases,
//!   compare-and-swap transactions, watches from a revision) and [`store::MemoryStore`], an
//!   in-memory implementation with the same semantics, for unit tests of what is built on it.

pub mod store;
