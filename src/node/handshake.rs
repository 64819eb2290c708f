//! A node link's handshake, pure: the accepting node sends a random challenge, the dialling
//! node answers with its `Hello` and an HMAC-SHA256 of the challenge, its identity and the
//! frame bounds it declares under the cluster's secret; the accepting node answers a
//! verified hello with `Welcome` and the bounds it reads the link with
//! (`FrameLimits::reading`). The secret is created in etcd by the first node
//! (`/ringmq/<cluster>/secret`) and read by every other one, so anyone who may join the
//! cluster's etcd may link, and nobody else.

use ring::hmac;

use super::frame::FrameLimits;

/// Bytes of a challenge.
pub const NONCE: usize = 16;

/// Who a dialling node says it is: its cluster, name and incarnation, and the frame bounds
/// it declares.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub incarnation: u64,
    pub limits: FrameLimits,
}

/// What the dialling node proves: that it knows the secret, for this challenge, as this
/// node and incarnation of this cluster, declaring these bounds.
pub fn proof(secret: &[u8], nonce: &[u8; NONCE], who: Identity) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, &message(nonce, who));
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `mac` proves what [`proof`] computes (compared in constant time).
pub fn verify(secret: &[u8], nonce: &[u8; NONCE], who: Identity, mac: &[u8; 32]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &message(nonce, who), mac).is_ok()
}

fn message(nonce: &[u8; NONCE], who: Identity) -> Vec<u8> {
    let mut m = Vec::with_capacity(NONCE + who.cluster.len() + who.node.len() + 40);
    m.extend_from_slice(nonce);
    for part in [who.cluster.as_bytes(), who.node.as_bytes()] {
        m.extend_from_slice(&(part.len() as u32).to_be_bytes());
        m.extend_from_slice(part);
    }
    m.extend_from_slice(&who.incarnation.to_be_bytes());
    m.extend_from_slice(&(who.limits.frame as u64).to_be_bytes());
    m.extend_from_slice(&(who.limits.handover as u64).to_be_bytes());
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
        let limits = FrameLimits { frame: 1 << 20, handover: 96 << 20 };
        let who = |cluster, node, incarnation| Identity { cluster, node, incarnation, limits };
        let mac = proof(b"secret", &nonce, who("c", "a", 1));
        assert!(verify(b"secret", &nonce, who("c", "a", 1), &mac));
        assert!(!verify(b"other", &nonce, who("c", "a", 1), &mac), "another secret");
        assert!(!verify(b"secret", &[8u8; NONCE], who("c", "a", 1), &mac), "a replayed answer");
        assert!(!verify(b"secret", &nonce, who("c", "b", 1), &mac), "another node");
        assert!(!verify(b"secret", &nonce, who("c", "a", 2), &mac), "another incarnation");
        let larger = FrameLimits { frame: 2 << 20, ..limits };
        assert!(
            !verify(b"secret", &nonce, Identity { limits: larger, ..who("c", "a", 1) }, &mac),
            "other bounds"
        );
        assert!(
            !verify(b"secret", &nonce, who("ca", "", 1), &proof(b"secret", &nonce, who("c", "a", 1))),
            "fields are delimited"
        );
        assert_ne!(random::<16>(), random::<16>());
    }
}
