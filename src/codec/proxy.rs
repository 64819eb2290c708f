//! The PROXY protocol header (HAProxy's, versions 1 and 2) a load balancer sends before
//! the client's bytes: where the connection really came from. Pure: bytes in, the source
//! address and the header's length out. A listener with `proxy_protocol = true` requires
//! one; anything else there is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The twelve bytes that open a version 2 header.
pub const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Longest version 1 line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// Longest version 2 address block accepted (addresses and TLVs); the format allows 64 KiB
/// but what load balancers send is far smaller, and the header is buffered before CONNECT.
pub const V2_MAX_BODY: usize = 2048;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client's address; `None` for a LOCAL (v2) or UNKNOWN (v1) header, a health
    /// check by the proxy itself: the socket's own address then stands.
    pub source: Option<SocketAddr>,
    /// Bytes the header took at the front of the buffer.
    pub len: usize,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header (first bytes are neither `PROXY ` nor the v2 signature)")]
    Missing,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
}

/// Reads a header from the front of `buf`: `Ok(None)` while more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    let v1 = b"PROXY ";
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() { Ok(None) } else { parse_v2(buf) };
    }
    let m = buf.len().min(v1.len());
    if buf[..m] == v1[..m] {
        return if m < v1.len() { Ok(None) } else { parse_v1(buf) };
    }
    Err(ProxyError::Missing)
}

/// How many more bytes to read before `parse` can say more about `buf`, never reading past
/// a header: the whole v2 header once its length is known, one byte at a time otherwise.
pub fn bytes_wanted(buf: &[u8]) -> usize {
    let n = buf.len().min(V2_SIGNATURE.len());
    if n > 0 && buf[..n] == V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return 16 - buf.len();
        }
        let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        return (16 + body).saturating_sub(buf.len()).max(1);
    }
    1
}

fn parse_v1(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    let Some(end) = buf.iter().take(V1_MAX).position(|b| *b == b'\n') else {
        return if buf.len() >= V1_MAX { Err(ProxyError::V1("no CRLF within 107 bytes")) } else { Ok(None) };
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").ok_or(ProxyError::V1("line not ended by CRLF"))?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1("not ASCII"))?;
    let mut words = line.split(' ');
    words.next(); // "PROXY"
    let source = match words.next() {
        Some("UNKNOWN") => None,
        Some(family @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(_dst), Some(sport), Some(_dport), None) =
                (words.next(), words.next(), words.next(), words.next(), words.next())
            else {
                return Err(ProxyError::V1("expected source, destination and two ports"));
            };
            let ip: IpAddr = src.parse().map_err(|_| ProxyError::V1("bad source address"))?;
            if (family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::V1("address does not match the family"));
            }
            let port: u16 = sport.parse().map_err(|_| ProxyError::V1("bad source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::V1("unknown protocol family")),
    };
    Ok(Some(ProxyHeader { source, len: end + 1 }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if body > V2_MAX_BODY {
        return Err(ProxyError::V2("address block longer than 2048 bytes"));
    }
    if buf.len() < 16 + body {
        return Ok(None);
    }
    let addr = &buf[16..16 + body];
    let len = 16 + body;
    let source = match ver_cmd & 0x0F {
        // LOCAL: the proxy's own connection (health check); addresses are ignored.
        0 => None,
        1 => match family {
            // TCP over IPv4 / IPv6 (and UDP, which cannot carry MQTT, is refused below).
            0x11 => {
                let a: [u8; 12] = addr
                    .get(..12)
                    .and_then(|a| a.try_into().ok())
                    .ok_or(ProxyError::V2("short IPv4 block"))?;
                let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
            }
            0x21 => {
                let a: [u8; 36] = addr
                    .get(..36)
                    .and_then(|a| a.try_into().ok())
                    .ok_or(ProxyError::V2("short IPv6 block"))?;
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&a[..16]);
                Some(SocketAddr::new(Ipv6Addr::from(ip).into(), u16::from_be_bytes([a[32], a[33]])))
            }
            // UNSPEC: unknown origin, the socket's address stands.
            0x00 => None,
            _ => return Err(ProxyError::V2("not TCP over IPv4 or IPv6")),
        },
        _ => return Err(ProxyError::V2("unknown command")),
    };
    Ok(Some(ProxyHeader { source, len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[0x20 | cmd, family]);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    #[test]
    fn a_v1_header_gives_the_clients_address_and_leaves_what_follows() {
        let mut buf = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1883\r\n".to_vec();
        buf.extend_from_slice(&[0x10, 0x0c]);
        let h = parse(&buf).unwrap().unwrap();
        assert_eq!(h.source, Some("192.0.2.7:56324".parse().unwrap()));
        assert_eq!(&buf[h.len..], &[0x10, 0x0c]);
        let h = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 1883\r\n").unwrap().unwrap();
        assert_eq!(h.source, Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().source, None);
        assert_eq!(parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").unwrap().unwrap().source, None);
    }

    #[test]
    fn a_v2_header_gives_the_clients_address_and_skips_tlvs() {
        let mut block = vec![203, 0, 113, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x07, 0x5b];
        block.extend_from_slice(&[0x04, 0x00, 0x02, 0xAB, 0xCD]); // a TLV (NOOP)
        let mut buf = v2(1, 0x11, &block);
        let header_len = buf.len();
        buf.push(0x10);
        let h = parse(&buf).unwrap().unwrap();
        assert_eq!(h.source, Some("203.0.113.9:8080".parse().unwrap()));
        assert_eq!(h.len, header_len);

        let mut block6 = vec![0u8; 36];
        block6[..16].copy_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        block6[32..34].copy_from_slice(&5555u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &block6)).unwrap().unwrap().source,
            Some("[2001:db8::5]:5555".parse().unwrap())
        );
        // LOCAL (a health check) and UNSPEC keep the socket's address.
        assert_eq!(parse(&v2(0, 0x11, &block)).unwrap().unwrap().source, None);
        assert_eq!(parse(&v2(1, 0x00, &[])).unwrap().unwrap().source, None);
    }

    #[test]
    fn a_header_split_anywhere_waits_for_the_rest() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1883\r\n".to_vec();
        let v2 = v2(1, 0x11, &[203, 0, 113, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x07, 0x5b]);
        for whole in [v1, v2] {
            for cut in 0..whole.len() {
                assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
            }
            assert!(parse(&whole).unwrap().is_some());
        }
    }

    #[test]
    fn bytes_wanted_never_reaches_past_the_header() {
        let mut v2 = v2(1, 0x11, &[203, 0, 113, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x07, 0x5b]);
        let total = v2.len();
        v2.extend_from_slice(&[0x16, 0x03, 0x01]); // a TLS ClientHello after it
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 1883\r\n\x16\x03".to_vec();
        for (bytes, header) in [(v2, total), (v1.clone(), v1.len() - 2)] {
            let mut have = 0;
            while parse(&bytes[..have]).unwrap().is_none() {
                have += bytes_wanted(&bytes[..have]);
                assert!(have <= header, "asked past the header: {have} > {header}");
            }
            assert_eq!(have, header);
        }
    }

    #[test]
    fn anything_else_is_refused_not_waited_for() {
        assert_eq!(parse(&[0x10, 0x0c, 0x00]), Err(ProxyError::Missing));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing));
        assert!(parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n").is_err());
        assert!(parse(b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 99999 1883\r\n").is_err());
        assert!(parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n").is_err());
        assert!(parse(b"PROXY SCTP a b 1 2\r\n").is_err());
        assert!(
            parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'x'].repeat(20)).is_err(),
            "no CRLF in 107 bytes"
        );
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert!(parse(&long).is_err(), "a 64 KiB block is refused before it is buffered");
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        assert!(parse(&bad_version).is_err());
        assert!(parse(&v2(1, 0x12, &[0; 12])).is_err(), "UDP");
        assert!(parse(&v2(1, 0x11, &[0; 4])).is_err(), "short block");
    }
}
