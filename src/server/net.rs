//! Addresses, host names and origins: the parts of a request the gateway
//! judges before anything else (trusted proxies, `X-Forwarded-For` and
//! `Forwarded`, `Host`, `Origin`), parsed without trusting them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::http::HeaderMap;

/// An IP network such as `10.0.0.0/8` or `2001:db8::/32`; a bare address
/// is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// `ip` or `ip/prefix`. Host bits past the prefix are ignored.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("/{p} is not a prefix length from 0 to {bits}"))?,
        };
        // An IPv4-mapped network is the IPv4 network it maps.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        Ok(Self {
            addr: masked(addr, prefix),
            prefix,
        })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && masked(ip, self.prefix) == self.addr
    }
}

/// `ip` with every bit past `prefix` cleared.
fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// The address per-client limits count under: an IPv4 address alone, an
/// IPv6 address by its /64 network (what one host or one home is given).
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        v6 @ IpAddr::V6(_) => masked(v6, 64),
    }
}

/// The client a request comes from: the TCP peer, or, when the peer is a
/// trusted proxy, the right-most address in its forwarding chain that is not
/// itself a trusted proxy. An entry a proxy could not name (`unknown`, an
/// obfuscated name) stops the walk at the proxy that wrote it.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(client) {
        return client;
    }
    for entry in forwarded_chain(headers).into_iter().rev() {
        let Some(ip) = entry else {
            return client;
        };
        client = ip.to_canonical();
        if !is_trusted(client) {
            return client;
        }
    }
    client
}

/// The addresses proxies reported, from the original client (left) to the
/// nearest proxy's client (right): every `X-Forwarded-For` value, or, when
/// there is none, every `for=` of `Forwarded` (RFC 7239). `None` for an
/// entry that is not an address.
///
/// `X-Forwarded-For` comes first because it is what nearly every proxy
/// appends to; a proxy that writes only `Forwarded` must drop an
/// `X-Forwarded-For` sent by a client.
pub(crate) fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let xff: Vec<&str> = header_values(headers, "x-forwarded-for");
    if !xff.is_empty() {
        return xff
            .iter()
            .flat_map(|value| value.split(','))
            .map(node_ip)
            .collect();
    }
    header_values(headers, "forwarded")
        .iter()
        .flat_map(|value| split_unquoted(value, ','))
        .map(|element| forwarded_param(element, "for").and_then(|node| node_ip(&node)))
        .collect()
}

/// Whether a trusted proxy said the client spoke HTTPS to it: the last
/// `X-Forwarded-Proto` value, or else the `proto=` of the last `Forwarded`
/// element.
pub(crate) fn forwarded_https(headers: &HeaderMap) -> bool {
    let xfp = header_values(headers, "x-forwarded-proto");
    let proto = if xfp.is_empty() {
        header_values(headers, "forwarded")
            .iter()
            .flat_map(|value| split_unquoted(value, ','))
            .next_back()
            .and_then(|element| forwarded_param(element, "proto"))
    } else {
        xfp.iter()
            .flat_map(|value| value.split(','))
            .next_back()
            .map(|p| p.trim().to_owned())
    };
    proto.is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// Every value of a header that is text, in order.
fn header_values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

/// `text` split at `separator`s outside double quotes.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..at]);
                start = at + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The value of `name=` in one `Forwarded` element, unquoted.
fn forwarded_param(element: &str, name: &str) -> Option<String> {
    split_unquoted(element, ';').into_iter().find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case(name).then(|| {
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            unquoted.replace('\\', "")
        })
    })
}

/// The address of one forwarding entry: `192.0.2.7`, `192.0.2.7:4711`,
/// `2001:db8::7`, `[2001:db8::7]` or `[2001:db8::7]:4711`, maybe quoted.
fn node_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim().trim_matches('"');
    if let Some(rest) = entry.strip_prefix('[') {
        let (v6, port) = rest.split_once(']')?;
        if !(port.is_empty() || port.starts_with(':')) {
            return None;
        }
        return v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    let (v4, port) = entry.split_once(':')?;
    port.parse::<u16>().ok()?;
    v4.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A host name or address with an optional port, as in `Host` or in
/// `server.allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPort {
    /// Lower case, without a trailing dot; an IPv6 address in brackets.
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
}

impl HostPort {
    /// `name`, `name:port`, `192.0.2.7[:port]` or `[2001:db8::7][:port]`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (v6, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{text:?} opens a [ it does not close"))?;
            let v6: Ipv6Addr = v6
                .parse()
                .map_err(|_| format!("{v6:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| format!("{text:?}: only :port may follow the address"))?,
                ),
            };
            (format!("[{v6}]"), port)
        } else {
            let (name, port) = match text.split_once(':') {
                Some((_, rest)) if rest.contains(':') => {
                    return Err(format!("{text:?}: an IPv6 address goes in brackets, [::1]"));
                }
                Some((name, port)) => (name, Some(port)),
                None => (text, None),
            };
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                return Err(format!("{text:?} is not a host name"));
            }
            (name, port)
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("{p:?} is not a port"))?,
            ),
        };
        Ok(Self { host, port })
    }

    fn of_ip(ip: IpAddr, port: u16) -> Self {
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        Self {
            host,
            port: Some(port),
        }
    }
}

/// The `Host`s one listener answers for.
#[derive(Debug, Clone)]
pub(crate) struct Hosts {
    allowed: Vec<HostPort>,
}

impl Hosts {
    /// `server.allowed_hosts` (entries that do not parse are skipped: the
    /// configuration check refuses them), plus the listener's own address
    /// and the loopback names on its port.
    pub(crate) fn new(configured: &[String], local: SocketAddr) -> Self {
        let port = local.port();
        let mut allowed: Vec<HostPort> = configured
            .iter()
            .filter_map(|h| HostPort::parse(h).ok())
            .collect();
        let ip = local.ip().to_canonical();
        if !ip.is_unspecified() {
            allowed.push(HostPort::of_ip(ip, port));
        }
        for name in ["localhost", "127.0.0.1", "[::1]"] {
            allowed.push(HostPort {
                host: name.to_owned(),
                port: Some(port),
            });
        }
        Self { allowed }
    }

    /// Whether `host` on `port` is one of ours; an entry without a port
    /// allows every port.
    pub(crate) fn allows(&self, host: &str, port: u16) -> bool {
        self.allowed
            .iter()
            .any(|a| a.host == host && a.port.is_none_or(|p| p == port))
    }

    /// Whether a request's `Host` (or the authority of an absolute
    /// request target) is one of ours; a missing port means 80.
    pub(crate) fn allows_authority(&self, authority: &str) -> bool {
        HostPort::parse(authority).is_ok_and(|h| self.allows(&h.host, h.port.unwrap_or(80)))
    }
}

/// A browser `Origin`, `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) https: bool,
    pub(crate) host: String,
    /// The port, or the scheme's own (80, 443).
    pub(crate) port: u16,
}

impl Origin {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let lower = text
            .get(..8)
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let (https, rest) = if lower.starts_with("http://") {
            (false, &text[7..])
        } else if lower == "https://" {
            (true, &text[8..])
        } else {
            return None;
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let host = HostPort::parse(rest).ok()?;
        let port = host.port.unwrap_or(if https { 443 } else { 80 });
        Some(Self {
            https,
            host: host.host,
            port,
        })
    }
}

/// Whether a browser `Origin` may open `/ws`: no origin (not a browser);
/// one listed in `server.allowed_origins` (`*` allows any); or the same
/// origin: `http://` (`https://` when a trusted proxy says the client used
/// HTTPS) and a host this listener answers for.
pub(crate) fn origin_allowed(
    origin: Option<&str>,
    listed: &[String],
    hosts: &Hosts,
    https: bool,
) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if listed.iter().any(|l| l == "*") {
        return true;
    }
    let Some(origin) = Origin::parse(origin) else {
        return false;
    };
    if listed
        .iter()
        .any(|l| Origin::parse(l).is_some_and(|l| l == origin))
    {
        return true;
    }
    origin.https == https && hosts.allows(&origin.host, origin.port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn networks_parse_and_contain() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!net.contains(ip("2001:db8::1")));
        let one = IpNet::parse(" 192.0.2.7 ").unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let v6 = IpNet::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(IpNet::parse("::/0").unwrap().contains(ip("::1")));
        // Host bits are ignored; a mapped network is an IPv4 one.
        assert!(IpNet::parse("10.1.2.3/8").unwrap().contains(ip("10.9.9.9")));
        let mapped = IpNet::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.contains(ip("10.200.0.1")));
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/x",
            "example.com",
            "10.0.0.0/",
        ] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
    }

    #[test]
    fn forwarding_chains_parse() {
        let chain = forwarded_chain(&headers(&[
            ("x-forwarded-for", "203.0.113.9, 198.51.100.2:4711"),
            ("x-forwarded-for", "[2001:db8::7]:80 ,2001:db8::8, unknown"),
        ]));
        assert_eq!(
            chain,
            [
                Some(ip("203.0.113.9")),
                Some(ip("198.51.100.2")),
                Some(ip("2001:db8::7")),
                Some(ip("2001:db8::8")),
                None
            ]
        );
        // Forwarded only when there is no X-Forwarded-For.
        let forwarded = r#"for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711", for=unknown, proto=https, for="_hidden", for="198.51.100.3:80";host="a,b""#;
        let chain = forwarded_chain(&headers(&[("forwarded", forwarded)]));
        assert_eq!(
            chain,
            [
                Some(ip("192.0.2.60")),
                Some(ip("2001:db8:cafe::17")),
                None,
                None,
                None,
                Some(ip("198.51.100.3"))
            ]
        );
        let both = headers(&[
            ("forwarded", "for=192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2"),
        ]);
        assert_eq!(forwarded_chain(&both), [Some(ip("192.0.2.2"))]);
        assert!(forwarded_chain(&HeaderMap::new()).is_empty());
        for bad in ["", "1.2.3", "[::1", "[::1]x", "1.2.3.4:x", "host.example"] {
            assert_eq!(node_ip(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_address_behind_trusted_proxies() {
        let trusted = [
            IpNet::parse("10.0.0.0/8").unwrap(),
            IpNet::parse("127.0.0.1").unwrap(),
        ];
        let xff = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.5, 10.0.0.2")]);
        // A peer that is not trusted: its headers are ignored.
        assert_eq!(client_ip(ip("192.0.2.1"), &xff, &trusted), ip("192.0.2.1"));
        // Through two trusted proxies, the forged left part is skipped.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &xff, &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_ip(ip("::ffff:127.0.0.1"), &xff, &trusted),
            ip("203.0.113.5")
        );
        // No header: the proxy itself; every entry trusted: the left-most.
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        let proxies = headers(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &proxies, &trusted),
            ip("10.0.0.3")
        );
        // An entry a trusted proxy could not name stops at that proxy.
        let unknown = headers(&[("x-forwarded-for", "203.0.113.5, unknown, 10.0.0.2")]);
        assert_eq!(
            client_ip(ip("10.0.0.1"), &unknown, &trusted),
            ip("10.0.0.2")
        );
        let forwarded = headers(&[("forwarded", "for=203.0.113.8, for=\"[2001:db8::1]\"")]);
        assert_eq!(
            client_ip(ip("127.0.0.1"), &forwarded, &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(client_ip(ip("127.0.0.1"), &xff, &[]), ip("127.0.0.1"));
    }

    #[test]
    fn forwarded_proto_is_the_last_value() {
        assert!(forwarded_https(&headers(&[("x-forwarded-proto", "HTTPS")])));
        assert!(forwarded_https(&headers(&[(
            "x-forwarded-proto",
            "http, https"
        )])));
        assert!(!forwarded_https(&headers(&[(
            "x-forwarded-proto",
            "https, http"
        )])));
        assert!(forwarded_https(&headers(&[(
            "forwarded",
            "for=1.2.3.4;proto=http, for=10.0.0.1;proto=\"https\""
        )])));
        assert!(!forwarded_https(&HeaderMap::new()));
    }

    #[test]
    fn hosts_parse_and_match() {
        let parsed = |t: &str| HostPort::parse(t).unwrap();
        assert_eq!(
            parsed("Ayuda.Example.EDU."),
            HostPort {
                host: "ayuda.example.edu".into(),
                port: None
            }
        );
        assert_eq!(parsed("voz.example:8443").port, Some(8443));
        assert_eq!(parsed("[::1]:8080").host, "[::1]");
        assert_eq!(parsed("[0:0::1]").host, "[::1]");
        assert_eq!(parsed("192.0.2.7:80").host, "192.0.2.7");
        for bad in [
            "",
            "::1",
            "a b",
            "host:",
            "host:0",
            "host:99999",
            "[::1",
            "[::1]8080",
            "a..b",
            "x:1:2",
            "é.example",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad}");
        }
        let hosts = Hosts::new(
            &["ayuda.example.edu".into(), "voz.example:8443".into()],
            "127.0.0.1:8080".parse().unwrap(),
        );
        for good in [
            "ayuda.example.edu",
            "ayuda.example.edu:8080",
            "AYUDA.example.edu:443",
            "voz.example:8443",
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
        ] {
            assert!(hosts.allows_authority(good), "{good}");
        }
        for bad in [
            "evil.example:8080",
            "voz.example",
            "localhost",
            "localhost:9090",
            "127.0.0.1",
            "",
        ] {
            assert!(!hosts.allows_authority(bad), "{bad}");
        }
        // Listening everywhere: only the names given, and loopback.
        let anywhere = Hosts::new(&[], "0.0.0.0:80".parse().unwrap());
        assert!(anywhere.allows_authority("localhost"));
        assert!(!anywhere.allows_authority("0.0.0.0"));
        assert!(!anywhere.allows_authority("192.0.2.7"));
        let v6 = Hosts::new(&[], "[2001:db8::5]:8080".parse().unwrap());
        assert!(v6.allows_authority("[2001:db8::5]:8080"));
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert_eq!(
            Origin::parse("HTTPS://Ayuda.example.edu/"),
            Some(Origin {
                https: true,
                host: "ayuda.example.edu".into(),
                port: 443
            })
        );
        assert_eq!(
            Origin::parse("http://[::1]:8080").map(|o| o.port),
            Some(8080)
        );
        for bad in [
            "null",
            "",
            "ftp://x",
            "http://",
            "https://a/b",
            "http://a b",
        ] {
            assert_eq!(Origin::parse(bad), None, "{bad}");
        }
        let hosts = Hosts::new(
            &["ayuda.example.edu".into()],
            "127.0.0.1:8080".parse().unwrap(),
        );
        let allowed = |origin: &str, listed: &[&str], https: bool| {
            let listed: Vec<String> = listed.iter().map(|s| (*s).to_owned()).collect();
            origin_allowed(Some(origin), &listed, &hosts, https)
        };
        assert!(origin_allowed(None, &[], &hosts, false), "not a browser");
        assert!(allowed("http://127.0.0.1:8080", &[], false));
        assert!(allowed("http://localhost:8080", &[], false));
        assert!(allowed("http://ayuda.example.edu", &[], false));
        // DNS rebinding: a name that is not ours, on our port.
        assert!(!allowed("http://evil.example:8080", &[], false));
        // Another port on the loopback is another origin.
        assert!(!allowed("http://localhost:3000", &[], false));
        // HTTPS only through a trusted proxy that says so, or when listed.
        assert!(!allowed("https://127.0.0.1:8080", &[], false));
        assert!(!allowed("https://ayuda.example.edu", &[], false));
        assert!(allowed("https://ayuda.example.edu", &[], true));
        assert!(!allowed("http://ayuda.example.edu", &[], true));
        assert!(allowed(
            "https://ayuda.example.edu",
            &["https://ayuda.example.edu/"],
            false
        ));
        assert!(allowed(
            "https://otra.example.edu",
            &["HTTPS://OTRA.example.edu:443"],
            false
        ));
        assert!(!allowed(
            "https://otra.example.edu:8443",
            &["https://otra.example.edu"],
            false
        ));
        assert!(allowed("null", &["*"], false));
        assert!(!allowed("null", &[], false));
    }
}
