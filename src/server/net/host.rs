//! Host names and origins: `Host` against `server.allowed_hosts`, and a
//! browser's `Origin` against `server.allowed_origins`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

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
