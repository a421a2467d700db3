//! Who the client is: the TCP peer, or behind trusted proxies the address they say
//! sent the request (`X-Forwarded-For`), recorded in the request log as `client_ip`.
//!
//! `[server].trusted_proxies` lists CIDRs or single addresses (IPv4 and IPv6). Empty
//! (the default): the TCP peer is the client and `X-Forwarded-For` is ignored, so a
//! client cannot claim another address. When the peer is trusted, `X-Forwarded-For`
//! is read from the right (each proxy appends the address it saw) and the first
//! address that is not a trusted proxy is the client; if every address is trusted,
//! the leftmost one is.
//!
//! # Example
//! ```
//! use std::net::IpAddr;
//! use switchboard::client_ip::TrustedProxies;
//!
//! let proxies = TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
//! let xff = http::HeaderValue::from_static("203.0.113.9, 198.51.100.2, 10.1.2.3");
//! let peer: IpAddr = "10.0.0.1".parse().unwrap();
//! // 10.1.2.3 is a proxy of ours; 198.51.100.2 is not: it is the client.
//! assert_eq!(proxies.client(peer, [&xff]), "198.51.100.2".parse::<IpAddr>().unwrap());
//! // From an untrusted peer the header is ignored.
//! let outsider: IpAddr = "192.0.2.7".parse().unwrap();
//! assert_eq!(proxies.client(outsider, [&xff]), outsider);
//! assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).unwrap_err().contains("10.0.0.0/33"));
//! ```

use std::net::IpAddr;

use ipnet::IpNet;

/// The client's address of a request, as a request extension (set by the server
/// for each request it accepts; absent when a service is called directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The proxies whose `X-Forwarded-For` is believed (`[server].trusted_proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses CIDRs (`10.0.0.0/8`, `fd00::/8`) and single addresses (`127.0.0.1`,
    /// `::1`); `Err` names the entry that is neither and how to write it.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.trim();
                e.parse::<IpNet>()
                    .map(|n| n.trunc())
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!(
                            "`{e}` is not an IP address or CIDR: write e.g. \"10.0.0.0/8\", \"127.0.0.1\" or \"fd00::/8\""
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    /// Whether no proxy is trusted (the TCP peer is always the client).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is a trusted proxy (an IPv4-mapped IPv6 peer counts as IPv4).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client of a request from `peer` with these `X-Forwarded-For` values (in
    /// the order they came; see the [module docs](self)).
    pub fn client<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl IntoIterator<Item = &'a http::HeaderValue, IntoIter: DoubleEndedIterator>,
    ) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for value in forwarded_for.into_iter().rev() {
            let Ok(text) = value.to_str() else {
                return client;
            };
            for hop in text.rsplit(',') {
                // Unparseable (e.g. "unknown" or garbage): stop at the last good one.
                let Some(ip) = parse_hop(hop.trim()) else {
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return ip;
                }
            }
        }
        client
    }

    /// [`client`](Self::client) of a request: its `X-Forwarded-For` headers are read
    /// only when some proxy is trusted.
    pub fn client_of(&self, peer: IpAddr, headers: &http::HeaderMap) -> ClientIp {
        if self.is_empty() {
            return ClientIp(peer.to_canonical());
        }
        ClientIp(self.client(peer, headers.get_all("x-forwarded-for").iter()))
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5678`,
/// `[::1]:443`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn xff(values: &[&'static str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_the_header() {
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_of(ip("192.0.2.1"), &xff(&["203.0.113.5"])),
            ClientIp(ip("192.0.2.1"))
        );
    }

    #[test]
    fn from_a_trusted_peer_the_nearest_untrusted_hop_is_the_client() {
        let p = proxies(&["10.0.0.0/8", "127.0.0.1", "fd00::/8"]);
        let peer = ip("127.0.0.1");
        // Spoofed left part ignored: the first untrusted hop from the right wins.
        let h = xff(&["1.1.1.1, 203.0.113.5", "10.9.9.9"]);
        assert_eq!(p.client_of(peer, &h), ClientIp(ip("203.0.113.5")));
        // IPv6, with ports, and an IPv4-mapped peer.
        let h = xff(&["[2001:db8::7]:443, fd00::1"]);
        assert_eq!(
            p.client_of(ip("::ffff:10.0.0.1"), &h),
            ClientIp(ip("2001:db8::7"))
        );
        let h = xff(&["198.51.100.4:5555"]);
        assert_eq!(p.client_of(peer, &h), ClientIp(ip("198.51.100.4")));
        // Every hop trusted: the leftmost.
        let h = xff(&["10.0.0.2, 10.0.0.3"]);
        assert_eq!(p.client_of(peer, &h), ClientIp(ip("10.0.0.2")));
        // No header: the peer. Garbage: the last good address before it.
        assert_eq!(p.client_of(peer, &xff(&[])), ClientIp(peer));
        let h = xff(&["203.0.113.1, unknown, 10.0.0.5"]);
        assert_eq!(p.client_of(peer, &h), ClientIp(ip("10.0.0.5")));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["10.0.0.0/33", "localhost", "1.2.3", ""] {
            let e = TrustedProxies::parse(&[bad.to_string()]).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
        assert!(proxies(&["10.1.2.3/8"]).trusts(ip("10.200.0.1")));
    }
}
