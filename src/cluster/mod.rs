//! The cluster's control plane (issue 16, in progress): what several ringmq nodes agree on
//! through etcd — node membership under leases, routes, client ownership fenced by
//! revisions.
//!
//! - [`store`]: the [`store::ClusterStore`] contract (etcd's data model: revisions, leases,
//!   compare-and-swap transactions, watches from a revision) and [`store::MemoryStore`], an
//!   in-memory implementation with the same semantics, for unit tests of what is built on it.
//! - [`routes`]: the `routes/<filter>/<node>` keys a node writes on 0→1 and deletes on 1→0,
//!   and the node-level interest tree built from the other nodes' keys.
//! - [`ownership`]: `sessions/<client id>` → owner node and epoch, claimed by a transaction
//!   fenced on the record's revision.

pub mod etcd;
pub mod ownership;
pub mod routes;
pub mod store;
