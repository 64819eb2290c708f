//! A node link's handshake, pure: the accepting node sends a random challenge, the dialling
//! node answers with its `Hello` and an HMAC-SHA256 of the challenge and its identity under
//! the cluster's secret. The secret is created in etcd by the first node
//! (`/ringmq/<cluster>/secret`) and read by every other one, so anyone who may join the
//! cluster's etcd may link, and nobody else.

use ring::hmac;

/// Bytes of a challenge.
pub const NONCE: usize = 16;

/// What the dialling node proves: that it knows the secret, for this challenge, as this
/// node and incarnation of this cluster.
pub fn proof(secret: &[u8], nonce: &[u8; NONCE], cluster: &str, node: &str, incarnation: u64) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, &message(nonce, cluster, node, incarnation));
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `mac` proves what [`proof`] computes (compared in constant time).
pub fn verify(
    secret: &[u8],
    nonce: &[u8; NONCE],
    cluster: &str,
    node: &str,
    incarnation: u64,
    mac: &[u8; 32],
) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &message(nonce, cluster, node, incarnation), mac).is_ok()
}

fn message(nonce: &[u8; NONCE], cluster: &str, node: &str, incarnation: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(NONCE + cluster.len() + node.len() + 18);
    m.extend_from_slice(nonce);
    for part in [cluster.as_bytes(), node.as_bytes()] {
        m.extend_from_slice(&(part.len() as u32).to_be_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&incarnation.to_be_bytes());
    m
}

/// A fresh challenge, or a new secret's bytes.
pub fn random<const N: usize>() -> Option<[u8; N]> {
    let mut out = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_for_its_secret_challenge_and_identity_only() {
        let nonce = [7u8; NONCE];
        let mac = proof(b"secret", &nonce, "c", "a", 1);
        assert!(verify(b"secret", &nonce, "c", "a", 1, &mac));
        assert!(!verify(b"other", &nonce, "c", "a", 1, &mac), "another secret");
        assert!(!verify(b"secret", &[8u8; NONCE], "c", "a", 1, &mac), "a replayed answer");
        assert!(!verify(b"secret", &nonce, "c", "b", 1, &mac), "another node");
        assert!(!verify(b"secret", &nonce, "c", "a", 2, &mac), "another incarnation");
        assert!(
            !verify(b"secret", &nonce, "ca", "", 1, &proof(b"secret", &nonce, "c", "a", 1)),
            "fields are delimited"
        );
        assert_ne!(random::<16>(), random::<16>());
    }
}
