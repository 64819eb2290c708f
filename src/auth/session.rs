//! A session's view of its listener's rules: who its client is, and the ACL compiled for
//! it, rebuilt when the listener's sources are reloaded.

use std::cell::{Ref, RefCell};
use std::sync::Arc;

use super::acl::{ClientAcl, SubscribeVerdict};
use super::{AuthSlot, Identity};

/// What one session's operations are checked against. Owned by its shard (the session's
/// entry and its connection's reader share it); a reload is noticed by comparing the
/// slot's generation, one atomic load, so the publish path takes no lock.
pub struct SessionAuth {
    pub username: Option<Box<str>>,
    /// A password, token or certificate proved `username`.
    pub verified: bool,
    /// The listener whose rules these are (`tls:0.0.0.0:8883`), as the session log keeps it.
    pub listener: std::sync::Arc<str>,
    /// When the client's token expires (unix seconds): the connection is closed then.
    pub expires_at: Option<u64>,
    client_id: Box<str>,
    slot: Arc<AuthSlot>,
    by_password: bool,
    /// The generation its subscriptions' marks were last judged under.
    pub remarked: std::cell::Cell<u32>,
    grants: Option<Box<(Vec<String>, Vec<String>)>>,
    view: RefCell<View>,
}

struct View {
    generation: u32,
    /// No ACL file: everything but publishing to `$SYS` is allowed, and deliveries are
    /// never checked.
    open: bool,
    /// The password file it authenticated against no longer has its user: nothing is
    /// allowed any more.
    revoked: bool,
    acl: ClientAcl,
}

/// A subscription's standing with the ACL, kept beside it so a delivery checks nothing
/// when the subscription was allowed whole under the current rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AclMark(u32);

const FILTERED: u32 = 1 << 31;

impl AclMark {
    /// A subscription of a session without rules: never checked.
    pub const OPEN: AclMark = AclMark(0);

    /// Whether a delivery on this subscription needs no check under rules of `generation`.
    pub fn passes(self, generation: u32) -> bool {
        self.0 == 0 || self.0 == generation & !FILTERED
    }
}

impl SessionAuth {
    pub fn new(slot: Arc<AuthSlot>, listener: Arc<str>, identity: Identity, client_id: &str) -> SessionAuth {
        let auth = SessionAuth {
            username: identity.username,
            verified: identity.verified,
            remarked: std::cell::Cell::new(0),
            by_password: identity.by_password,
            listener,
            expires_at: identity.expires_at,
            client_id: client_id.into(),
            grants: identity.grants,
            view: RefCell::new(View {
                generation: 0,
                open: true,
                revoked: false,
                acl: ClientAcl::allow_all(),
            }),
            slot,
        };
        auth.refresh();
        auth
    }

    /// Rebuilds the compiled rules if the slot was reloaded since.
    fn refresh(&self) {
        let generation = super::generation();
        if self.view.borrow().generation == generation {
            return;
        }
        let current = self.slot.current();
        // A token's `acl` claim grants on top of the file; without a file, it is the rules.
        let open = current.acl.is_none() && self.grants.is_none();
        let mut acl = match &current.acl {
            Some(acl) => acl.for_client(&self.client_id, self.username.as_deref()),
            None if open => ClientAcl::allow_all(),
            None => ClientAcl::deny_all(),
        };
        if let Some(grants) = &self.grants {
            acl = acl.with_extra(&grants.0, &grants.1);
        }
        let revoked = self.by_password
            && self
                .username
                .as_deref()
                .is_none_or(|user| current.passwords.as_ref().is_none_or(|p| p.get(user).is_none()));
        let (open, acl) = if revoked { (false, ClientAcl::deny_all()) } else { (open, acl) };
        *self.view.borrow_mut() = View { generation, open, revoked, acl };
    }

    fn view(&self) -> Ref<'_, View> {
        self.refresh();
        self.view.borrow()
    }

    /// Whether its user was removed from the password file since it connected.
    pub fn revoked(&self) -> bool {
        self.view().revoked
    }

    /// The generation of the rules checks are made against now.
    pub fn generation(&self) -> u32 {
        self.view().generation
    }

    pub fn can_publish(&self, topic: &str) -> bool {
        self.view().acl.can_publish(topic)
    }

    pub fn can_read(&self, topic: &str) -> bool {
        let view = self.view();
        view.open || view.acl.can_read(topic)
    }

    /// The verdict on a SUBSCRIBE to `filter` (without `$share/{group}/`) and the mark the
    /// subscription keeps.
    pub fn subscribe(&self, filter: &str) -> (SubscribeVerdict, AclMark) {
        let view = self.view();
        if view.open {
            return (SubscribeVerdict::Allowed, AclMark::OPEN);
        }
        let verdict = view.acl.subscribe(filter);
        let mark = match verdict {
            SubscribeVerdict::Allowed => AclMark(view.generation & !FILTERED),
            SubscribeVerdict::Filtered | SubscribeVerdict::Denied => AclMark(view.generation | FILTERED),
        };
        (verdict, mark)
    }

    /// The listener's sources this session's client came through.
    pub fn slot(&self) -> &Arc<AuthSlot> {
        &self.slot
    }
}
