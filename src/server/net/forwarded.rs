//! Client addresses: trusted proxies, `X-Forwarded-For` and `Forwarded`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
pub(super) fn node_ip(entry: &str) -> Option<IpAddr> {
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
