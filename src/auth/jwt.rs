//! JWT authentication: a token in the CONNECT password field, verified with one
//! configured key. Pure: the token, the CONNECT user name and the time come in as
//! arguments; only [`JwtVerifier::load`] touches the file system.
//!
//! One key, one algorithm: a secret accepts HS256 only; an RSA public key RS256 only; an
//! EC P-256 public key ES256 only. The token's `alg` header must name exactly that, so
//! `none` and algorithm confusion (an HS256 token keyed with the public key's PEM text)
//! are refused before any signature is checked.
//!
//! Claims, read only after the signature holds:
//! - `exp`, `nbf` (NumericDate, seconds): each optional, enforced when present with no
//!   leeway: valid while `nbf <= now < exp`. A fraction rounds up (integer `now` then
//!   compares the same as with the exact value). A present claim that is not a number is
//!   refused, never ignored.
//! - the user name: the configured claim (default `sub`), a non-empty string. When the
//!   CONNECT carries a non-empty user name it must be equal; an empty one counts as none
//!   (MQTT 3.1.1 requires a user name whenever a password is sent).
//! - `acl` (optional), EMQX's formats, see [`JwtClaims`].
//!
//! `aud`, `iss` and `iat` are not checked. A token whose `sub` is a list or an object
//! (RFC 7519 makes it a string) is unreadable to jsonwebtoken and refused as malformed,
//! whatever the user name claim.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls::pki_types::pem::{PemObject, SectionKind};
use serde_json::{Map, Value};

use crate::topic::TopicFilter;

#[cfg(test)]
mod tests;

/// The longest token accepted, checked before any parsing: a token is a few hundred bytes,
/// so anything near this is an attack or a mistake.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The largest key file read. A public key or certificate PEM is a few KiB.
const MAX_KEY_FILE_LEN: u64 = 1024 * 1024;

/// The claim holding the access lists, as EMQX names it.
const ACL_CLAIM: &str = "acl";

/// Why a token (or the key to check it) was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {found:?} refused: the configured key accepts {expected} only")]
    Algorithm { expected: &'static str, found: String },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("token not valid yet (nbf in the future)")]
    NotYetValid,
    #[error("token has no user name claim (a non-empty string)")]
    MissingUsername,
    #[error("CONNECT user name differs from the token's")]
    UsernameMismatch,
    #[error("JWT key {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
}

/// What a verified token grants.
///
/// The access lists come from the `acl` claim in either EMQX format:
/// - EMQX 4 (and 5's map form): `{"pub": [filters], "sub": [filters], "all": [filters]}`;
///   `all` grants both. Other keys are ignored.
/// - EMQX 5's rule list: `[{"permission": "allow"|"deny", "action":
///   "publish"|"subscribe"|"all", "topic": filter}]`. Allow entries are grants; deny
///   entries grant nothing. EMQX takes the first rule that matches, so a deny can shadow
///   part of a later allow: an allow after a deny for the same action is dropped. Allow
///   entries conditioned on `qos` or `retain`, and `eq ` (exact-match) topics, are
///   dropped too. The grants are thus never more than EMQX would give.
///
/// Any other shape (`"acl": null` included), or a filter that is not a valid MQTT topic
/// filter, refuses the token as malformed. Filters are returned verbatim: EMQX
/// placeholders such as `${clientid}` are not expanded here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtClaims {
    pub username: String,
    /// `exp` in unix seconds (rounded up): the token is expired from this second on.
    pub expires_at: Option<u64>,
    /// Whether the token had an `acl` claim at all: empty lists then mean "nothing is
    /// allowed", not "no restriction".
    pub acl_present: bool,
    pub acl_publish: Vec<String>,
    pub acl_subscribe: Vec<String>,
}

/// Checks tokens against one key. Built once per (re)load and shared by all shards.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
    username_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    // The key (an HMAC secret) stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithm", &self.algorithm)
            .field("username_claim", &self.username_claim)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// An HS256 verifier. An empty or short secret is the caller's to refuse.
    pub fn from_secret(secret: &[u8], username_claim: &str) -> JwtVerifier {
        JwtVerifier::new(DecodingKey::from_secret(secret), Algorithm::HS256, username_claim)
    }

    /// A verifier for the first `PUBLIC KEY` or `CERTIFICATE` in `pem`: RSA (RS256, 2048
    /// to 8192 bits) or EC P-256 (ES256). `path` only names the file in errors.
    pub fn from_pem(pem: &[u8], path: &Path, username_claim: &str) -> Result<JwtVerifier, JwtError> {
        let key_error = |reason: String| JwtError::KeyFile { path: path.to_path_buf(), reason };
        let (algorithm, key) = public_key(pem).map_err(key_error)?;
        Ok(JwtVerifier::new(key, algorithm, username_claim))
    }

    /// Reads the PEM file at `path`, then [`JwtVerifier::from_pem`].
    pub fn load(path: &Path, username_claim: &str) -> Result<JwtVerifier, JwtError> {
        let key_error = |reason: String| JwtError::KeyFile { path: path.to_path_buf(), reason };
        let file = std::fs::File::open(path).map_err(|e| key_error(e.to_string()))?;
        let mut pem = Vec::new();
        file.take(MAX_KEY_FILE_LEN + 1).read_to_end(&mut pem).map_err(|e| key_error(e.to_string()))?;
        if pem.len() as u64 > MAX_KEY_FILE_LEN {
            return Err(key_error(format!("larger than {MAX_KEY_FILE_LEN} bytes")));
        }
        JwtVerifier::from_pem(&pem, path, username_claim)
    }

    fn new(key: DecodingKey, algorithm: Algorithm, username_claim: &str) -> JwtVerifier {
        let mut validation = Validation::new(algorithm);
        // jsonwebtoken reads the system clock for exp/nbf: time is checked in `verify`
        // against its argument instead. No audience is configured, so none is checked.
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        JwtVerifier { key, algorithm, validation, username_claim: username_claim.to_owned() }
    }

    /// The algorithm this verifier accepts (its key's).
    pub fn algorithm(&self) -> &'static str {
        algorithm_name(self.algorithm)
    }

    /// Verifies `token` (the CONNECT password). `username`: the CONNECT's user name field,
    /// if any. `now`: unix seconds.
    pub fn verify(&self, token: &[u8], username: Option<&str>, now: u64) -> Result<JwtClaims, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed(format!("longer than {MAX_TOKEN_LEN} bytes")));
        }
        let token = std::str::from_utf8(token).map_err(|_| malformed("not UTF-8"))?;
        self.check_header(token)?;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| self.decode_error(e))?
            .claims;

        let expires_at = numeric_date(&claims, "exp")?;
        if let Some(exp) = expires_at {
            if now >= exp {
                return Err(JwtError::Expired { exp, now });
            }
        }
        if numeric_date(&claims, "nbf")?.is_some_and(|nbf| now < nbf) {
            return Err(JwtError::NotYetValid);
        }

        let token_username = match claims.get(&self.username_claim) {
            Some(Value::String(name)) if !name.is_empty() => name,
            _ => return Err(JwtError::MissingUsername),
        };
        if token_username.contains('\0') {
            return Err(malformed("user name contains U+0000 [MQTT-1.5.4-2]"));
        }
        if username.is_some_and(|given| !given.is_empty() && given != token_username) {
            return Err(JwtError::UsernameMismatch);
        }

        let acl = match claims.get(ACL_CLAIM) {
            None => Acl::default(),
            Some(value) => Acl::parse(value)?,
        };
        Ok(JwtClaims {
            username: token_username.clone(),
            expires_at,
            acl_present: claims.contains_key(ACL_CLAIM),
            acl_publish: acl.publish,
            acl_subscribe: acl.subscribe,
        })
    }

    /// Refuses a token whose `alg` is not this key's (`none`, algorithm confusion) or
    /// that names critical extensions, before its signature is looked at.
    fn check_header(&self, token: &str) -> Result<(), JwtError> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three dot-separated parts"));
        };
        let header = URL_SAFE_NO_PAD.decode(header).map_err(|e| malformed(format!("header: {e}")))?;
        let header: Map<String, Value> =
            serde_json::from_slice(&header).map_err(|e| malformed(format!("header: {e}")))?;
        let expected = self.algorithm();
        match header.get("alg") {
            Some(Value::String(alg)) if alg == expected => {}
            Some(Value::String(alg)) => {
                // The header is the sender's text: keep only a short prefix of it in errors.
                let found = alg.chars().take(16).collect();
                return Err(JwtError::Algorithm { expected, found });
            }
            _ => return Err(malformed("header has no alg string")),
        }
        // RFC 7515 §4.1.11: extensions listed in crit must be understood; none are here.
        if header.contains_key("crit") {
            return Err(malformed("header lists critical extensions (crit)"));
        }
        Ok(())
    }

    fn decode_error(&self, error: jsonwebtoken::errors::Error) -> JwtError {
        match error.kind() {
            ErrorKind::InvalidSignature => JwtError::BadSignature,
            // `check_header` refused these already; kept so a library change fails closed.
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                JwtError::Algorithm { expected: self.algorithm(), found: String::new() }
            }
            _ => JwtError::Malformed(error.to_string()),
        }
    }
}

fn malformed(reason: impl Into<String>) -> JwtError {
    JwtError::Malformed(reason.into())
}

fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        // Only the three above are ever configured.
        _ => "unsupported",
    }
}

/// A NumericDate claim in whole seconds, rounded up; negative dates are 0.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, JwtError> {
    let number = match claims.get(name) {
        None => return Ok(None),
        Some(Value::Number(number)) => number,
        Some(_) => return Err(malformed(format!("{name} is not a number"))),
    };
    let seconds = match (number.as_u64(), number.as_i64(), number.as_f64()) {
        (Some(seconds), _, _) => seconds,
        (None, Some(_negative), _) => 0,
        // `as` saturates: a date past u64::MAX seconds never comes.
        (None, None, Some(float)) if float > 0.0 => float.ceil() as u64,
        (None, None, _) => 0,
    };
    Ok(Some(seconds))
}

/// The grants of an `acl` claim (see [`JwtClaims`]).
#[derive(Debug, Default)]
struct Acl {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl Acl {
    fn parse(value: &Value) -> Result<Acl, JwtError> {
        let mut acl = Acl::default();
        match value {
            Value::Object(map) => {
                for (key, publish, subscribe) in
                    [("pub", true, false), ("sub", false, true), ("all", true, true)]
                {
                    let Some(list) = map.get(key) else { continue };
                    let Value::Array(filters) = list else {
                        return Err(malformed(format!("acl.{key} is not a list")));
                    };
                    for filter in filters {
                        let Value::String(filter) = filter else {
                            return Err(malformed(format!("acl.{key} holds a non-string")));
                        };
                        acl.grant(filter, publish, subscribe)?;
                    }
                }
            }
            Value::Array(rules) => {
                // Once a deny for an action is seen, later allows for it may be shadowed.
                let (mut publish_denied, mut subscribe_denied) = (false, false);
                for rule in rules {
                    let rule = Rule::parse(rule)?;
                    if !rule.allow {
                        publish_denied |= rule.publish;
                        subscribe_denied |= rule.subscribe;
                        continue;
                    }
                    if rule.conditional || rule.topic.starts_with("eq ") {
                        continue;
                    }
                    acl.grant(
                        rule.topic,
                        rule.publish && !publish_denied,
                        rule.subscribe && !subscribe_denied,
                    )?;
                }
            }
            _ => return Err(malformed("acl is neither an object nor a list")),
        }
        Ok(acl)
    }

    fn grant(&mut self, filter: &str, publish: bool, subscribe: bool) -> Result<(), JwtError> {
        if let Err(e) = TopicFilter::new(filter.as_bytes().to_vec()) {
            return Err(malformed(format!("acl topic filter {filter:?}: {e}")));
        }
        if publish {
            self.publish.push(filter.to_owned());
        }
        if subscribe {
            self.subscribe.push(filter.to_owned());
        }
        Ok(())
    }
}

/// One entry of EMQX 5's rule list.
struct Rule<'a> {
    allow: bool,
    publish: bool,
    subscribe: bool,
    /// Limited to some QoS or retain flag: a condition not carried into the grants.
    conditional: bool,
    topic: &'a str,
}

impl<'a> Rule<'a> {
    fn parse(rule: &'a Value) -> Result<Rule<'a>, JwtError> {
        let Value::Object(rule) = rule else {
            return Err(malformed("acl rule is not an object"));
        };
        let text = |key: &str| match rule.get(key) {
            Some(Value::String(text)) => Ok(text.as_str()),
            _ => Err(malformed(format!("acl rule has no {key} string"))),
        };
        let allow = match text("permission")? {
            "allow" => true,
            "deny" => false,
            other => return Err(malformed(format!("acl rule permission {other:?}"))),
        };
        let (publish, subscribe) = match text("action")? {
            "publish" => (true, false),
            "subscribe" => (false, true),
            "all" => (true, true),
            other => return Err(malformed(format!("acl rule action {other:?}"))),
        };
        let conditional = rule.contains_key("qos") || rule.contains_key("retain");
        Ok(Rule { allow, publish, subscribe, conditional, topic: text("topic")? })
    }
}

const PKCS1_LABEL: &[u8] = b"BEGIN RSA PUBLIC KEY";

/// The algorithm and key of the first public key or certificate in `pem`.
fn public_key(pem: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let mut private = false;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
        let (kind, der) = section.map_err(|e| format!("not PEM: {e}"))?;
        match kind {
            SectionKind::PublicKey => {
                let (spki, _) = der_element(&der, 0x30).ok_or("PUBLIC KEY is not DER")?;
                return key_from_spki(spki);
            }
            SectionKind::Certificate => {
                return key_from_spki(certificate_spki(&der).ok_or("bad CERTIFICATE")?)
            }
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                private = true
            }
            _ => {}
        }
    }
    Err(if private {
        "holds a private key: give the public key (openssl pkey -pubout) or a certificate".into()
    } else if pem.windows(PKCS1_LABEL.len()).any(|w| w == PKCS1_LABEL) {
        "PKCS#1 RSA PUBLIC KEY: convert it (openssl rsa -RSAPublicKey_in -pubout)".into()
    } else {
        "no PUBLIC KEY or CERTIFICATE section".into()
    })
}

// DER encodings of the object identifiers that name the supported keys.
const OID_RSA_ENCRYPTION: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// A SubjectPublicKeyInfo's contents (RFC 5280 §4.1.2.7) to a key, checked now so a bad
/// key fails at start-up rather than on every CONNECT.
fn key_from_spki(spki: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let (algorithm, rest) = der_element(spki, 0x30).ok_or("bad key algorithm")?;
    let (bits, _) = der_element(rest, 0x03).ok_or("bad key bit string")?;
    let Some((0, key)) = bits.split_first() else {
        return Err("bad key bit string".into());
    };
    let (oid, parameters) = der_element(algorithm, 0x06).ok_or("bad key algorithm")?;
    if oid == OID_RSA_ENCRYPTION {
        let bits = rsa_modulus_bits(key).ok_or("bad RSA key")?;
        // ring verifies RS256 with 2048- to 8192-bit moduli only.
        if !(2048..=8192).contains(&bits) {
            return Err(format!("RSA key of {bits} bits: 2048 to 8192 accepted"));
        }
        Ok((Algorithm::RS256, DecodingKey::from_rsa_der(key)))
    } else if oid == OID_EC_PUBLIC_KEY {
        let (curve, _) = der_element(parameters, 0x06).ok_or("EC key without a named curve")?;
        if curve != OID_P256 {
            return Err("EC key not on P-256 (only ES256 is accepted)".into());
        }
        // ring takes the uncompressed point: 0x04, then X and Y of 32 bytes each.
        if key.len() != 65 || key[0] != 0x04 {
            return Err("EC key is not an uncompressed P-256 point".into());
        }
        Ok((Algorithm::ES256, DecodingKey::from_ec_der(key)))
    } else {
        Err("unsupported key type: RSA or EC P-256 expected".into())
    }
}

/// The modulus size of a PKCS#1 RSAPublicKey (RFC 8017 §A.1.1).
fn rsa_modulus_bits(key: &[u8]) -> Option<usize> {
    let (fields, _) = der_element(key, 0x30)?;
    let (modulus, rest) = der_element(fields, 0x02)?;
    der_element(rest, 0x02)?;
    let modulus = &modulus[modulus.iter().position(|&b| b != 0)?..];
    Some(modulus.len() * 8 - modulus[0].leading_zeros() as usize)
}

/// The SubjectPublicKeyInfo contents of a DER certificate (RFC 5280 §4.1). The
/// certificate itself is not verified: it only carries the key.
fn certificate_spki(der: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (mut tbs, _) = der_element(certificate, 0x30)?;
    // [0] version (optional), serial number, signature, issuer, validity, subject.
    if tbs.first() == Some(&0xA0) {
        tbs = der_element(tbs, 0xA0)?.1;
    }
    for tag in [0x02, 0x30, 0x30, 0x30, 0x30] {
        tbs = der_element(tbs, tag)?.1;
    }
    Some(der_element(tbs, 0x30)?.0)
}

/// The DER element at the front of `input`, if its tag is `tag`: (contents, what follows).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, contents, rest) = crate::tls::tlv(input)?;
    (found == tag).then_some((contents, rest))
}
