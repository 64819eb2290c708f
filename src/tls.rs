//! TLS listeners' configuration: certificates and keys from PEM files into rustls'
//! `ServerConfig` (the `ring` provider; TLS 1.2 and 1.3), with client certificates
//! verified against a CA where one is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsFiles;

/// Why a TLS listener cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), reason: reason.to_string() }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The rustls server configuration of a TLS listener.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier =
                if files.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            builder
                .with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Verifier(e.to_string()))?)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    // MQTT over TLS has no ALPN of its own to require; clients that offer "mqtt" get it.
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    Ok(Arc::new(config))
}

/// Who a verified client certificate names: its subject's Common Name and its Subject
/// Alternative Names (DNS, e-mail, URI). What `identity = "cn" | "san"` uses as a username.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertIdentity {
    pub common_name: Option<String>,
    pub alt_names: Vec<String>,
}

/// Reads the subject CN and the SAN entries of a DER certificate (a minimal DER walk: the
/// certificate was verified by rustls already, so only structure is read here). `None`
/// when the bytes are not a certificate.
pub fn cert_identity(der: &[u8]) -> Option<CertIdentity> {
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    let mut next = || -> Option<(u8, &[u8])> {
        let (tag, value, rest) = tlv(tbs)?;
        tbs = rest;
        Some((tag, value))
    };
    if next()?.0 == 0xA0 {
        next()?; // the version was explicit: the serial number follows it
    }
    next()?; // signature algorithm
    next()?; // issuer
    next()?; // validity
    let (_, subject) = next()?;
    next()?; // subject public key
    let mut identity = CertIdentity { common_name: common_name(subject), alt_names: Vec::new() };
    while let Some((tag, value)) = next() {
        if tag == 0xA3 {
            identity.alt_names = alt_names(value).unwrap_or_default();
        }
    }
    Some(identity)
}

/// One DER element at the front of `input`: (tag, contents, what follows).
pub(crate) fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_SAN: &[u8] = &[0x55, 0x1D, 0x11];

/// The first CN of a Name (SEQUENCE OF SET OF SEQUENCE { OID, value }).
fn common_name(mut name: &[u8]) -> Option<String> {
    while let Some((_, set, rest)) = tlv(name) {
        name = rest;
        let (_, pair, _) = tlv(set)?;
        let (_, oid, after) = tlv(pair)?;
        if oid == OID_CN {
            let (_, value, _) = tlv(after)?;
            return std::str::from_utf8(value).ok().map(str::to_string);
        }
    }
    None
}

/// DNS names, e-mail addresses and URIs of the SAN extension inside `[3] Extensions`.
fn alt_names(extensions: &[u8]) -> Option<Vec<String>> {
    let (_, mut list, _) = tlv(extensions)?;
    while let Some((_, ext, rest)) = tlv(list) {
        list = rest;
        let (_, oid, mut after) = tlv(ext)?;
        if oid != OID_SAN {
            continue;
        }
        let (mut tag, mut value, rest) = tlv(after)?;
        if tag == 0x01 {
            after = rest; // the critical flag
            (tag, value, _) = tlv(after)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (_, mut names, _) = tlv(value)?;
        let mut out = Vec::new();
        while let Some((tag, name, rest)) = tlv(names) {
            names = rest;
            // [1] rfc822Name, [2] dNSName, [6] URI: IA5 strings.
            if matches!(tag, 0x81 | 0x82 | 0x86) {
                if let Ok(text) = std::str::from_utf8(name) {
                    out.push(text.to_string());
                }
            }
        }
        return Some(out);
    }
    Some(Vec::new())
}
