//! Who a client is and what it may do.
//!
//! - [`passwd`]: password files as `mosquitto_passwd` writes them (and `ringmq passwd`).
//! - [`jwt`]: JSON Web Tokens in the password field.
//! - [`acl`]: Mosquitto's `acl_file` rules, compiled per client.
//! - [`ListenerAuth`]: one listener's sources, loaded together and replaced whole on
//!   SIGHUP through its [`AuthSlot`]; [`authenticate`] answers a CONNECT with them.
//! - [`SessionAuth`]: what a session's operations are checked against, rebuilt when the
//!   rules are reloaded.
//!
//! Who waits, who pays: a hash is verified on the shard's blocking-thread pool, so a slow
//! argon2id never holds the core; a failed attempt is answered after [`FAILURE_DELAY`]
//! (the client waits, holding only its own connection slot); an address past
//! [`failures::MAX_FAILURES`] failures in a window is refused without a check.

pub mod acl;
mod failures;
pub mod jwt;
pub mod passwd;
pub mod passwd_cli;
mod session;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use failures::FailureLimiter;
pub use session::{AclMark, SessionAuth};

use crate::codec::Connect;
use crate::config::{AuthSettings, CertIdentityKind, JwtKeySource};
use crate::tls::CertIdentity;
use acl::{Acl, AclError};
use jwt::{JwtError, JwtVerifier};
use passwd::{PasswordFile, PasswordFileError};

/// How long a refused CONNECT waits for its CONNACK: guessing passwords costs a second
/// each, on the guesser's connection only.
pub const FAILURE_DELAY: Duration = Duration::from_secs(1);

/// A listener's authentication sources that did not load.
#[derive(Debug, thiserror::Error)]
pub enum AuthLoadError {
    #[error("password file {0}")]
    Passwords(#[from] PasswordFileError),
    #[error("ACL file {0}")]
    Acl(#[from] AclError),
    #[error("JWT key: {0}")]
    Jwt(#[from] JwtError),
    #[error("the JWT secret is empty")]
    EmptySecret,
}

/// One listener's loaded authentication sources. Immutable: a reload builds a new one.
pub struct ListenerAuth {
    pub passwords: Option<Arc<PasswordFile>>,
    pub acl: Option<Arc<Acl>>,
    pub jwt: Option<JwtVerifier>,
    pub allow_anonymous: bool,
    pub identity: CertIdentityKind,
}

impl ListenerAuth {
    /// Whether anything here can prove who a client is.
    pub fn authenticates(&self) -> bool {
        self.passwords.is_some() || self.jwt.is_some() || self.identity != CertIdentityKind::None
    }

    /// Reads every file `settings` names.
    pub fn load(settings: &AuthSettings) -> Result<ListenerAuth, AuthLoadError> {
        let passwords = match &settings.password_file {
            Some(path) => Some(Arc::new(PasswordFile::load(path)?)),
            None => None,
        };
        let acl = match &settings.acl_file {
            Some(path) => Some(Arc::new(Acl::load(path)?)),
            None => None,
        };
        let claim = settings.jwt_username_claim.as_deref().unwrap_or("sub");
        let jwt = match &settings.jwt {
            Some(JwtKeySource::Secret(secret)) if secret.is_empty() => {
                return Err(AuthLoadError::EmptySecret)
            }
            Some(JwtKeySource::Secret(secret)) => Some(JwtVerifier::from_secret(secret.as_bytes(), claim)),
            Some(JwtKeySource::KeyFile(path)) => Some(JwtVerifier::load(path, claim)?),
            None => None,
        };
        Ok(ListenerAuth {
            passwords,
            acl,
            jwt,
            // Mosquitto 2's rule: anonymous only while nothing authenticates anyone.
            allow_anonymous: settings.allow_anonymous.unwrap_or(!settings.authenticates()),
            identity: settings.identity.unwrap_or(CertIdentityKind::None),
        })
    }
}

/// Changes with every successful reload of any listener's sources (process-wide): one
/// atomic load tells a delivery whether the marks its subscriptions carry still hold.
static GENERATION: AtomicU32 = AtomicU32::new(1);

/// The generation of the rules in force, in 1..2^31.
pub fn generation() -> u32 {
    GENERATION.load(Ordering::Acquire)
}

/// A listener's authentication, replaced whole on reload. Read once per CONNECT (off the
/// publish path); sessions notice a reload through [`generation`], one atomic load, and
/// rebuild their rules from [`AuthSlot::current`].
pub struct AuthSlot {
    pub settings: AuthSettings,
    current: RwLock<Arc<ListenerAuth>>,
}

impl std::fmt::Debug for AuthSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSlot").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl AuthSlot {
    pub fn new(settings: AuthSettings, loaded: ListenerAuth) -> AuthSlot {
        AuthSlot { settings, current: RwLock::new(Arc::new(loaded)) }
    }

    /// The sources new operations use.
    pub fn current(&self) -> Arc<ListenerAuth> {
        // A poisoned lock still holds a whole value (it is replaced, not edited).
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the files again; on failure the old sources stay.
    pub fn reload(&self) -> Result<(), AuthLoadError> {
        let fresh = ListenerAuth::load(&self.settings)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        // In 1..2^31: 0 marks subscriptions that are never checked, and the top bit is
        // AclMark's "checked per message".
        let _ = GENERATION.fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
            Some((g.wrapping_add(1) & 0x7FFF_FFFF).max(1))
        });
        Ok(())
    }
}

/// What a CONNECT proved about its client.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The authenticated username, the certificate's name, or the unverified one an
    /// anonymous client sent (Mosquitto uses it for the ACL too).
    pub username: Option<Box<str>>,
    /// When the client's token expires (unix seconds).
    pub expires_at: Option<u64>,
    /// Filters a token's `acl` claim grants for publish and for subscribe.
    pub grants: Option<Box<(Vec<String>, Vec<String>)>>,
    /// A password, token or certificate proved the username.
    pub verified: bool,
    /// A password did: removing the user from the file revokes it.
    pub by_password: bool,
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong password, unknown user, or a token that did not verify.
    BadCredentials,
    /// No credentials where they are required.
    NotAuthorized,
    /// Too many failures from this address lately.
    RateLimited,
    /// Too many password checks at once, or one that took longer than `--connect-timeout`.
    Busy,
}

impl Refusal {
    pub fn reason_code(self) -> crate::codec::ReasonCode {
        use crate::codec::ReasonCode;
        match self {
            Refusal::BadCredentials => ReasonCode::BadUserNameOrPassword,
            Refusal::NotAuthorized => ReasonCode::NotAuthorized,
            Refusal::RateLimited => ReasonCode::ConnectionRateExceeded,
            Refusal::Busy => ReasonCode::ServerBusy,
        }
    }
}

/// Whether `topic` is the broker's own (`$SYS` or below): no client writes there.
pub fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// Whether a password field holds a JSON Web Token rather than a password: three
/// base64url parts, the first a JSON object (`eyJ` is `{"`).
fn looks_like_jwt(password: &[u8]) -> bool {
    password.starts_with(b"eyJ") && password.iter().filter(|b| **b == b'.').count() == 2
}

/// Checks a CONNECT's credentials against `auth`: a verified certificate's name (with
/// `identity`), a token (with a JWT key), a password (with a password file), or none
/// (anonymous, if allowed). `now`: unix seconds.
pub async fn authenticate(
    auth: &Arc<ListenerAuth>,
    connect: &Connect,
    certificate: Option<CertIdentity>,
    now: u64,
) -> Result<Identity, Refusal> {
    let sent_username = connect.username.as_deref().map(Box::<str>::from);
    if let Some(name) = certificate.and_then(|c| match auth.identity {
        CertIdentityKind::Cn => c.common_name,
        CertIdentityKind::San => c.alt_names.into_iter().next(),
        CertIdentityKind::None => None,
    }) {
        // The certificate names the user (Mosquitto's use_identity_as_username): what the
        // CONNECT says about itself is not asked.
        return Ok(Identity { username: Some(name.into()), verified: true, ..Identity::default() });
    }
    let password = connect.password.as_deref();
    if let (Some(verifier), Some(token)) = (&auth.jwt, password.filter(|p| looks_like_jwt(p))) {
        match verifier.verify(token, connect.username.as_deref(), now) {
            Ok(claims) => {
                // A token with an `acl` claim is held to it (on top of the ACL file, if
                // any), even when it grants nothing.
                let grants = claims.acl_present.then(|| Box::new((claims.acl_publish, claims.acl_subscribe)));
                return Ok(Identity {
                    username: Some(claims.username.into()),
                    verified: true,
                    expires_at: claims.expires_at,
                    grants,
                    by_password: false,
                });
            }
            // A password that merely looks like a token is still a password.
            Err(err) if auth.passwords.is_none() || sent_username.is_none() => {
                tracing::debug!(client_id = %connect.client_id, %err, "token refused");
                return Err(Refusal::BadCredentials);
            }
            Err(_) => {}
        }
    }
    if let Some(passwords) = &auth.passwords {
        match (sent_username, password) {
            (Some(user), Some(password)) => {
                // On the shard's blocking pool: an argon2id hash takes milliseconds.
                let (file, name, secret) = (passwords.clone(), user.to_string(), password.to_vec());
                let ok = glommio::executor().spawn_blocking(move || file.check(&name, &secret)).await;
                return if ok {
                    Ok(Identity {
                        username: Some(user),
                        verified: true,
                        by_password: true,
                        ..Identity::default()
                    })
                } else {
                    Err(Refusal::BadCredentials)
                };
            }
            (Some(_), None) => return Err(Refusal::BadCredentials),
            (None, _) => {}
        }
    } else if auth.jwt.is_some() && password.is_some() {
        // Only tokens can be checked here, and this was none.
        return Err(Refusal::BadCredentials);
    }
    if !auth.allow_anonymous {
        return Err(Refusal::NotAuthorized);
    }
    // Anonymous: nothing proved. Where nothing could check a username, the one sent is kept
    // for the ACL's `user` rules, as Mosquitto does; where something could, an unchecked
    // one is dropped, so it never borrows a real user's rules.
    let username = connect.username.as_deref().filter(|_| !auth.authenticates()).map(Box::<str>::from);
    Ok(Identity { username, ..Identity::default() })
}

/// Loads a listener's settings once at start-up (errors name the file and line).
pub fn load_slot(settings: &AuthSettings) -> Result<Option<AuthSlot>, AuthLoadError> {
    if settings.is_empty() {
        return Ok(None);
    }
    Ok(Some(AuthSlot::new(settings.clone(), ListenerAuth::load(settings)?)))
}

/// Whether `path` names a file a reload would read (for log lines).
pub fn describe(settings: &AuthSettings) -> Vec<&Path> {
    let mut files: Vec<&Path> = Vec::new();
    files.extend(settings.password_file.as_deref());
    files.extend(settings.acl_file.as_deref());
    if let Some(JwtKeySource::KeyFile(path)) = &settings.jwt {
        files.push(path);
    }
    files
}
