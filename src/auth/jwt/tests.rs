use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

// Test-only keys, made with openssl (rcgen on ring cannot generate RSA keys).
const RSA_PRIVATE: &str = include_str!("testdata/rsa.key");
const RSA_PUBLIC: &str = include_str!("testdata/rsa.pub");
const RSA_CERT: &str = include_str!("testdata/rsa.crt");
const RSA_1024_PUBLIC: &str = include_str!("testdata/rsa1024.pub");
const RSA_PKCS1_PUBLIC: &str = include_str!("testdata/rsa_pkcs1.pub");
const P384_PUBLIC: &str = include_str!("testdata/p384.pub");

const SECRET: &[u8] = b"a secret of at least thirty-two bytes";
const NOW: u64 = 1_700_000_000;

fn path() -> &'static Path {
    Path::new("jwt.pem")
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/auth/jwt/testdata").join(name)
}

fn hs256(claims: &Value) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

fn secret_verifier() -> JwtVerifier {
    JwtVerifier::from_secret(SECRET, "sub")
}

fn rsa_verifier() -> JwtVerifier {
    JwtVerifier::from_pem(RSA_PUBLIC.as_bytes(), path(), "sub").unwrap()
}

fn rs256(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
}

/// A P-256 key pair: (private PKCS#8 PEM, public SPKI PEM, self-signed certificate PEM).
fn p256() -> (String, String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["jwt".into()]).unwrap().self_signed(&key).unwrap();
    (key.serialize_pem(), key.public_key_pem(), cert.pem())
}

fn es256(private_pem: &str, claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::ES256), claims, &key).unwrap()
}

/// A token with the given header and claims and a junk signature.
fn unsigned(header: &Value, claims: &Value, signature: &str) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!("{}.{}.{signature}", part(header), part(claims))
}

fn key_error(pem: &str) -> String {
    match JwtVerifier::from_pem(pem.as_bytes(), path(), "sub") {
        Err(JwtError::KeyFile { path: p, reason }) => {
            assert_eq!(p, path());
            reason
        }
        other => panic!("expected a key error, got {other:?}"),
    }
}

#[test]
fn verifier_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<JwtVerifier>();
}

#[test]
fn debug_hides_the_secret() {
    let shown = format!("{:?}", secret_verifier());
    assert!(shown.contains("HS256"), "{shown}");
    assert!(!shown.contains("thirty-two"), "{shown}");
}

#[test]
fn hs256_good_token() {
    let token = hs256(&json!({"sub": "alice", "exp": NOW + 60}));
    let claims = secret_verifier().verify(token.as_bytes(), None, NOW).unwrap();
    assert_eq!(
        claims,
        JwtClaims {
            username: "alice".into(),
            expires_at: Some(NOW + 60),
            acl_present: false,
            acl_publish: vec![],
            acl_subscribe: vec![],
        }
    );
}

#[test]
fn hs256_bad_signature() {
    let token = hs256(&json!({"sub": "alice"}));
    let other = JwtVerifier::from_secret(b"another secret", "sub");
    assert!(matches!(other.verify(token.as_bytes(), None, NOW), Err(JwtError::BadSignature)));
}

#[test]
fn hs256_tampered_claims_refused() {
    let token = hs256(&json!({"sub": "alice"}));
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(br#"{"sub":"admin"}"#);
    parts[1] = &forged;
    let result = secret_verifier().verify(parts.join(".").as_bytes(), None, NOW);
    assert!(matches!(result, Err(JwtError::BadSignature)), "{result:?}");
}

#[test]
fn rs256_with_public_key() {
    let token = rs256(&json!({"sub": "bob"}));
    let verifier = rsa_verifier();
    assert_eq!(verifier.algorithm(), "RS256");
    assert_eq!(verifier.verify(token.as_bytes(), None, NOW).unwrap().username, "bob");
}

#[test]
fn rs256_with_certificate() {
    let verifier = JwtVerifier::from_pem(RSA_CERT.as_bytes(), path(), "sub").unwrap();
    let token = rs256(&json!({"sub": "bob"}));
    assert_eq!(verifier.verify(token.as_bytes(), None, NOW).unwrap().username, "bob");
}

#[test]
fn es256_with_public_key_and_certificate() {
    let (private, public, cert) = p256();
    let token = es256(&private, &json!({"sub": "carol"}));
    for pem in [public, cert] {
        let verifier = JwtVerifier::from_pem(pem.as_bytes(), path(), "sub").unwrap();
        assert_eq!(verifier.algorithm(), "ES256");
        assert_eq!(verifier.verify(token.as_bytes(), None, NOW).unwrap().username, "carol");
    }
}

#[test]
fn es256_other_key_bad_signature() {
    let (private, _, _) = p256();
    let (_, other_public, _) = p256();
    let token = es256(&private, &json!({"sub": "carol"}));
    let verifier = JwtVerifier::from_pem(other_public.as_bytes(), path(), "sub").unwrap();
    assert!(matches!(verifier.verify(token.as_bytes(), None, NOW), Err(JwtError::BadSignature)));
}

#[test]
fn es256_token_refused_by_rsa_key() {
    let (private, _, _) = p256();
    let token = es256(&private, &json!({"sub": "carol"}));
    let result = rsa_verifier().verify(token.as_bytes(), None, NOW);
    assert!(
        matches!(&result, Err(JwtError::Algorithm { expected: "RS256", found }) if found == "ES256"),
        "{result:?}"
    );
}

#[test]
fn load_reads_the_file() {
    let verifier = JwtVerifier::load(&testdata("rsa.pub"), "sub").unwrap();
    let token = rs256(&json!({"sub": "bob"}));
    assert_eq!(verifier.verify(token.as_bytes(), None, NOW).unwrap().username, "bob");

    let missing = testdata("missing.pem");
    let result = JwtVerifier::load(&missing, "sub");
    assert!(matches!(&result, Err(JwtError::KeyFile { path, .. }) if *path == missing), "{result:?}");
}

#[test]
fn unusable_keys_are_refused_at_load() {
    assert!(key_error(RSA_PRIVATE).contains("private key"));
    assert!(key_error(&p256().0).contains("private key"));
    assert!(key_error(RSA_1024_PUBLIC).contains("1024 bits"));
    assert!(key_error(P384_PUBLIC).contains("P-256"));
    assert!(key_error(RSA_PKCS1_PUBLIC).contains("PKCS#1"));
    assert!(key_error("hello").contains("no PUBLIC KEY"));
    assert!(key_error("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").contains("DER"));
    assert!(
        key_error("-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n").contains("CERTIFICATE")
    );
    assert!(key_error("-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----\n").contains("not PEM"));
}

#[test]
fn expiry_is_exclusive_with_no_leeway() {
    let token = hs256(&json!({"sub": "alice", "exp": NOW}));
    let verifier = secret_verifier();
    assert!(verifier.verify(token.as_bytes(), None, NOW - 1).is_ok());
    let result = verifier.verify(token.as_bytes(), None, NOW);
    assert!(matches!(result, Err(JwtError::Expired { exp: NOW, now: NOW })), "{result:?}");
    assert!(matches!(verifier.verify(token.as_bytes(), None, NOW + 1000), Err(JwtError::Expired { .. })));
}

#[test]
fn fractional_and_negative_dates() {
    let verifier = secret_verifier();
    let token = hs256(&json!({"sub": "alice", "exp": NOW as f64 + 0.5}));
    let claims = verifier.verify(token.as_bytes(), None, NOW).unwrap();
    assert_eq!(claims.expires_at, Some(NOW + 1));
    assert!(matches!(verifier.verify(token.as_bytes(), None, NOW + 1), Err(JwtError::Expired { .. })));

    let token = hs256(&json!({"sub": "alice", "exp": -5}));
    assert!(matches!(verifier.verify(token.as_bytes(), None, 0), Err(JwtError::Expired { exp: 0, .. })));
    let token = hs256(&json!({"sub": "alice", "nbf": -5}));
    assert!(verifier.verify(token.as_bytes(), None, 0).is_ok());
}

#[test]
fn not_before_is_enforced() {
    let token = hs256(&json!({"sub": "alice", "nbf": NOW}));
    let verifier = secret_verifier();
    assert!(matches!(verifier.verify(token.as_bytes(), None, NOW - 1), Err(JwtError::NotYetValid)));
    assert!(verifier.verify(token.as_bytes(), None, NOW).is_ok());
}

#[test]
fn unreadable_dates_are_refused() {
    for claims in [json!({"sub": "a", "exp": "tomorrow"}), json!({"sub": "a", "nbf": null})] {
        let result = secret_verifier().verify(hs256(&claims).as_bytes(), None, NOW);
        assert!(matches!(result, Err(JwtError::Malformed(_))), "{claims}: {result:?}");
    }
}

#[test]
fn algorithm_confusion_is_refused() {
    // The classic attack: HMAC keyed with the public key's text, which the attacker knows.
    let key = EncodingKey::from_secret(RSA_PUBLIC.as_bytes());
    let token = encode(&Header::new(Algorithm::HS256), &json!({"sub": "mallory"}), &key).unwrap();
    let result = rsa_verifier().verify(token.as_bytes(), None, NOW);
    assert!(
        matches!(&result, Err(JwtError::Algorithm { expected: "RS256", found }) if found == "HS256"),
        "{result:?}"
    );
    // And the other way: an RS256 token never passes a secret verifier.
    let token = rs256(&json!({"sub": "bob"}));
    let result = secret_verifier().verify(token.as_bytes(), None, NOW);
    assert!(matches!(result, Err(JwtError::Algorithm { expected: "HS256", .. })), "{result:?}");
}

#[test]
fn alg_none_is_refused() {
    let header = json!({"alg": "none", "typ": "JWT"});
    for verifier in [secret_verifier(), rsa_verifier()] {
        for signature in ["", "AAAA"] {
            let token = unsigned(&header, &json!({"sub": "mallory"}), signature);
            let result = verifier.verify(token.as_bytes(), None, NOW);
            assert!(
                matches!(&result, Err(JwtError::Algorithm { found, .. }) if found == "none"),
                "{result:?}"
            );
        }
    }
}

#[test]
fn bad_headers_are_malformed() {
    for header in [json!({"typ": "JWT"}), json!({"alg": 5}), json!({"alg": "HS256", "crit": ["exp"]})] {
        let token = unsigned(&header, &json!({"sub": "a"}), "AAAA");
        let result = secret_verifier().verify(token.as_bytes(), None, NOW);
        assert!(matches!(result, Err(JwtError::Malformed(_))), "{header}: {result:?}");
    }
}

#[test]
fn token_shape_is_checked_first() {
    let verifier = secret_verifier();
    let good = hs256(&json!({"sub": "alice"}));
    let too_long = format!("{good}{}", "A".repeat(MAX_TOKEN_LEN));
    let two_parts = good.rsplit_once('.').unwrap().0.to_owned();
    let four_parts = format!("{good}.AAAA");
    let non_utf8 = [good.as_bytes(), &[0xFF]].concat();
    for token in [too_long.as_bytes(), two_parts.as_bytes(), four_parts.as_bytes(), &non_utf8, b""] {
        let result = verifier.verify(token, None, NOW);
        assert!(matches!(result, Err(JwtError::Malformed(_))), "{result:?}");
    }
}

#[test]
fn username_from_sub_or_custom_claim() {
    let token = hs256(&json!({"sub": "alice", "client": "dev-7", "iss": {"x": 1}, "aud": [2]}));
    assert_eq!(secret_verifier().verify(token.as_bytes(), None, NOW).unwrap().username, "alice");
    let custom = JwtVerifier::from_secret(SECRET, "client");
    assert_eq!(custom.verify(token.as_bytes(), None, NOW).unwrap().username, "dev-7");
}

#[test]
fn username_claim_must_be_a_non_empty_string() {
    for claims in
        [json!({}), json!({"sub": 42}), json!({"sub": ""}), json!({"sub": null}), json!({"sub": true})]
    {
        let result = secret_verifier().verify(hs256(&claims).as_bytes(), None, NOW);
        assert!(matches!(result, Err(JwtError::MissingUsername)), "{claims}: {result:?}");
    }
    // jsonwebtoken cannot read a token whose `sub` is a list or an object (RFC 7519: a string).
    for sub in [json!(["alice"]), json!({"name": "alice"})] {
        let result = secret_verifier().verify(hs256(&json!({"sub": sub})).as_bytes(), None, NOW);
        assert!(matches!(result, Err(JwtError::Malformed(_))), "{result:?}");
    }
    let result = secret_verifier().verify(hs256(&json!({"sub": "a\u{0}b"})).as_bytes(), None, NOW);
    assert!(matches!(result, Err(JwtError::Malformed(_))), "{result:?}");
}

#[test]
fn connect_username_must_match() {
    let token = hs256(&json!({"sub": "alice"}));
    let verifier = secret_verifier();
    assert!(verifier.verify(token.as_bytes(), Some("alice"), NOW).is_ok());
    assert!(verifier.verify(token.as_bytes(), Some(""), NOW).is_ok());
    for other in ["bob", "Alice", "alice "] {
        let result = verifier.verify(token.as_bytes(), Some(other), NOW);
        assert!(matches!(result, Err(JwtError::UsernameMismatch)), "{other}: {result:?}");
    }
}

fn acl_of(acl: Value) -> Result<JwtClaims, JwtError> {
    secret_verifier().verify(hs256(&json!({"sub": "alice", "acl": acl})).as_bytes(), None, NOW)
}

#[test]
fn acl_map_form() {
    let claims = acl_of(json!({"pub": ["a/#"], "sub": ["b/+", "c"], "all": ["d/${clientid}"]})).unwrap();
    assert!(claims.acl_present);
    assert_eq!(claims.acl_publish, ["a/#", "d/${clientid}"]);
    assert_eq!(claims.acl_subscribe, ["b/+", "c", "d/${clientid}"]);

    let empty = acl_of(json!({})).unwrap();
    assert!(empty.acl_present && empty.acl_publish.is_empty() && empty.acl_subscribe.is_empty());
}

#[test]
fn acl_list_form() {
    let claims = acl_of(json!([
        {"permission": "allow", "action": "publish", "topic": "p/#"},
        {"permission": "allow", "action": "subscribe", "topic": "s/+"},
        {"permission": "allow", "action": "all", "topic": "both"},
        {"permission": "allow", "action": "publish", "topic": "q", "qos": [0, 1]},
        {"permission": "allow", "action": "subscribe", "topic": "eq x/#"},
        {"permission": "deny", "action": "publish", "topic": "p/secret"},
        {"permission": "allow", "action": "all", "topic": "after/deny"},
    ]))
    .unwrap();
    assert!(claims.acl_present);
    // The last allow comes after a publish deny: it keeps only its subscribe half.
    assert_eq!(claims.acl_publish, ["p/#", "both"]);
    assert_eq!(claims.acl_subscribe, ["s/+", "both", "after/deny"]);
}

#[test]
fn acl_deny_all_shadows_every_later_allow() {
    let claims = acl_of(json!([
        {"permission": "deny", "action": "all", "topic": "#"},
        {"permission": "allow", "action": "all", "topic": "x"},
    ]))
    .unwrap();
    assert!(claims.acl_present && claims.acl_publish.is_empty() && claims.acl_subscribe.is_empty());
}

#[test]
fn malformed_acl_is_refused() {
    for acl in [
        json!("a/#"),
        json!({"pub": "a/#"}),
        json!({"sub": [1]}),
        json!({"pub": ["a/#/b"]}),
        json!({"sub": ["a+"]}),
        json!([{"permission": "allow", "action": "publish"}]),
        json!([{"permission": "maybe", "action": "publish", "topic": "t"}]),
        json!([{"permission": "allow", "action": "read", "topic": "t"}]),
        json!([{"permission": "allow", "action": "all", "topic": ""}]),
        json!(["t"]),
    ] {
        let result = acl_of(acl.clone());
        assert!(matches!(result, Err(JwtError::Malformed(_))), "{acl}: {result:?}");
    }
}

/// One verifier of each kind, made once: proptest runs each case many times.
fn verifiers() -> &'static [JwtVerifier] {
    static VERIFIERS: std::sync::OnceLock<Vec<JwtVerifier>> = std::sync::OnceLock::new();
    VERIFIERS.get_or_init(|| vec![secret_verifier(), rsa_verifier()])
}

proptest! {
    #[test]
    fn garbage_never_panics_nor_passes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        for verifier in verifiers() {
            prop_assert!(verifier.verify(&bytes, Some("alice"), NOW).is_err());
        }
    }

    #[test]
    fn garbage_parts_never_pass(
        header in "[A-Za-z0-9_-]{0,40}",
        payload in "[A-Za-z0-9_-]{0,80}",
        signature in "[A-Za-z0-9_-]{0,80}",
    ) {
        let token = format!("{header}.{payload}.{signature}");
        for verifier in verifiers() {
            prop_assert!(verifier.verify(token.as_bytes(), None, NOW).is_err());
        }
    }

    #[test]
    fn any_changed_byte_is_refused(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let token = hs256(&json!({"sub": "alice", "acl": {"pub": ["a/#"]}}));
        let mut bytes = token.into_bytes();
        let at = at.index(bytes.len());
        prop_assume!(bytes[at] != byte);
        bytes[at] = byte;
        prop_assert!(secret_verifier().verify(&bytes, None, NOW).is_err());
    }

    #[test]
    fn random_claims_never_panic(
        sub in prop_oneof![Just(json!(null)), any::<i64>().prop_map(|n| json!(n)), ".{0,8}".prop_map(|s| json!(s))],
        exp in prop_oneof![Just(json!(null)), any::<i64>().prop_map(|n| json!(n)), any::<f64>().prop_map(|f| json!(f))],
        acl in prop_oneof![Just(json!(null)), ".{0,8}".prop_map(|s| json!({"pub": [s]})), ".{0,8}".prop_map(|s| json!([{"permission": "allow", "action": "all", "topic": s}]))],
    ) {
        let token = hs256(&json!({"sub": sub, "exp": exp, "acl": acl}));
        if let Ok(claims) = secret_verifier().verify(token.as_bytes(), None, NOW) {
            prop_assert_eq!(json!(claims.username), sub);
            prop_assert!(claims.expires_at.is_some_and(|at| at > NOW));
        }
    }
}
