//! A node link's handshake, pure: the accepting node sends a random challenge and the link
//! protocol version it speaks; the dialling node answers with its `Hello` (its identity,
//! version, the frame bounds it declares and a challenge of its own) and an HMAC-SHA256 of
//! all of it and the challenge under the cluster's secret; the accepting node answers a
//! verified hello of its own version with `Welcome`: the bounds it reads the link with
//! (`FrameLimits::reading`) and an HMAC of them, its name and the hello's, so the dialling
//! node knows it reached a node of the cluster, the one it dialled, now. The secret is
//! created in etcd by the first node (`/ringmq/<cluster>/secret`) and read by every other
//! one, so anyone who may join the cluster's etcd may link, and nobody else.
//!
//! Nodes of different versions do not link (each logs why): frames change between
//! versions, and a node reading another version's frames could take one for another.

use ring::hmac;

use super::frame::FrameLimits;

/// Bytes of a challenge.
pub const NONCE: usize = 16;

/// The link protocol this build speaks. Raised whenever a frame's meaning or layout
/// changes. 0: a build from before versions (its challenge and hello carry none).
pub const LINK_VERSION: u32 = 2;

/// Who a dialling node says it is: its cluster, name and incarnation, the link protocol
/// version it speaks, the frame bounds it declares, and its challenge to the accepting
/// node.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub incarnation: u64,
    pub limits: FrameLimits,
    pub version: u32,
    pub challenge: [u8; NONCE],
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
    m.extend_from_slice(&who.version.to_be_bytes());
    m.extend_from_slice(&who.challenge);
    m
}

/// What the accepting node `node` proves in its `Welcome`: that it knows the secret, and
/// answers this hello (`hello_mac`, which covers both challenges) with these bounds.
pub fn welcome_proof(secret: &[u8], hello_mac: &[u8; 32], node: &str, limits: FrameLimits) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, &welcome_message(hello_mac, node, limits));
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `mac` proves what [`welcome_proof`] computes (in constant time).
pub fn verify_welcome(
    secret: &[u8],
    hello_mac: &[u8; 32],
    node: &str,
    limits: FrameLimits,
    mac: &[u8; 32],
) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &welcome_message(hello_mac, node, limits), mac).is_ok()
}

fn welcome_message(hello_mac: &[u8; 32], node: &str, limits: FrameLimits) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + node.len() + 16);
    m.extend_from_slice(b"welcome");
    m.extend_from_slice(hello_mac);
    m.extend_from_slice(&(node.len() as u32).to_be_bytes());
    m.extend_from_slice(node.as_bytes());
    m.extend_from_slice(&(limits.frame as u64).to_be_bytes());
    m.extend_from_slice(&(limits.handover as u64).to_be_bytes());
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
        let who = |cluster, node, incarnation| Identity {
            cluster,
            node,
            incarnation,
            limits,
            version: LINK_VERSION,
            challenge: [5; NONCE],
        };
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
        let older = Identity { version: 0, ..who("c", "a", 1) };
        assert!(!verify(b"secret", &nonce, older, &mac), "another version");
        let challenged = Identity { challenge: [6; NONCE], ..who("c", "a", 1) };
        assert!(!verify(b"secret", &nonce, challenged, &mac), "another challenge of the dialling node");
        assert_ne!(random::<16>(), random::<16>());
    }

    #[test]
    fn a_welcome_proves_the_secret_the_node_the_bounds_and_the_hello_it_answers() {
        let limits = FrameLimits { frame: 1 << 20, handover: 96 << 20 };
        let mac = welcome_proof(b"secret", &[1; 32], "b", limits);
        assert!(verify_welcome(b"secret", &[1; 32], "b", limits, &mac));
        assert!(!verify_welcome(b"other", &[1; 32], "b", limits, &mac), "another secret");
        assert!(!verify_welcome(b"secret", &[2; 32], "b", limits, &mac), "another hello: a replayed welcome");
        assert!(!verify_welcome(b"secret", &[1; 32], "c", limits, &mac), "another node");
        let larger = FrameLimits { frame: 2 << 20, ..limits };
        assert!(!verify_welcome(b"secret", &[1; 32], "b", larger, &mac), "other bounds");
    }
}
