//! A client's arrival and departure as the operator sees them: the log lines (`info`,
//! unless `--log-connections false`) and the shard's counters behind `/metrics`.

use crate::broker::conn_handle::{CloseCause, ConnHandle};
use crate::broker::shard::ShardRef;
use crate::codec::ReasonCode;

/// A CONNECT was accepted: its CONNACK is queued and the connection attached.
pub(super) fn connected(shard: &ShardRef, conn: &ConnHandle, session_present: bool, cert_cn: Option<&str>) {
    let log = {
        let mut s = shard.borrow_mut();
        s.stats.connects += 1;
        s.config.log_connections
    };
    if log {
        let details = Details { session_present: Some(session_present), cert_cn, reason: None };
        line(conn, "connected", details);
    }
}

/// The connection ended, for `cause`.
pub(super) fn disconnected(shard: &ShardRef, conn: &ConnHandle, cause: CloseCause) {
    let log = {
        let mut s = shard.borrow_mut();
        s.stats.count_disconnect(cause);
        s.config.log_connections
    };
    if log {
        line(conn, "disconnected", Details { reason: Some(cause.label()), ..Details::default() });
    }
}

/// What one event's line adds (a field left `None` is left out).
#[derive(Default)]
struct Details<'a> {
    session_present: Option<bool>,
    cert_cn: Option<&'a str>,
    reason: Option<&'a str>,
}

/// One connection log line: who, from where, on which listener, in which protocol.
fn line(conn: &ConnHandle, event: &str, details: Details<'_>) {
    let meta = &conn.meta;
    tracing::info!(
        client_id = %conn.client_id,
        peer = %meta.peer,
        listener = %meta.listener.as_ref().map_or("-", |l| &*l.name),
        protocol = conn.version.name(),
        username = meta.username.as_deref(),
        keep_alive = meta.keep_alive,
        session_present = details.session_present,
        cert_cn = details.cert_cn,
        reason = details.reason,
        "{event}"
    );
}

/// A CONNECT was refused with `reason` (its CONNACK says so).
pub(super) fn refused(shard: &ShardRef, reason: ReasonCode) {
    shard.borrow_mut().stats.count_refused(reason);
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
