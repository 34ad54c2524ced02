//! Addresses, host names and origins: the parts of a request the gateway
//! judges before anything else (trusted proxies, `X-Forwarded-For` and
//! `Forwarded`, `Host`, `Origin`), parsed without trusting them.

mod forwarded;
mod host;

pub(crate) use forwarded::{IpNet, client_ip, client_key, forwarded_https};
pub(crate) use host::{HostPort, Hosts, Origin, origin_allowed};

use crate::config::{Config, SettingError, quoted};

/// The `[server]` section's addresses, host names and origins, checked when
/// the configuration is loaded.
pub fn check_settings(config: &Config) -> Result<(), SettingError> {
    let s = &config.server;
    if !matches!(s.auth.as_str(), "tokens" | "keys") {
        return Err(SettingError::new(
            "server.auth",
            quoted(&s.auth),
            "must be tokens or keys",
        ));
    }
    if s.auth == "keys" && !config.ledger.enabled() {
        return Err(SettingError::new(
            "server.auth",
            quoted(&s.auth),
            "keys live in the ledger: set ledger.url (it is off)",
        ));
    }
    if !(5..=3_600).contains(&s.client_token_ttl_s) {
        return Err(SettingError::new(
            "server.client_token_ttl_s",
            s.client_token_ttl_s.to_string(),
            "must be between 5 and 3600 s",
        ));
    }
    if let Some(origin) = s
        .allowed_origins
        .iter()
        .find(|o| o.as_str() != "*" && Origin::parse(o).is_none())
    {
        let reason = "origins are \"*\" or scheme://host[:port], e.g. https://ayuda.example.edu";
        return Err(SettingError::new(
            "server.allowed_origins",
            quoted(origin),
            reason,
        ));
    }
    for proxy in &s.trusted_proxies {
        if let Err(why) = IpNet::parse(proxy) {
            let reason = format!("{why}: entries are IPs or CIDRs, e.g. 10.0.0.0/8");
            return Err(SettingError::new(
                "server.trusted_proxies",
                quoted(proxy),
                reason,
            ));
        }
    }
    for host in &s.allowed_hosts {
        if let Err(why) = HostPort::parse(host) {
            let reason = format!("{why}: entries are host or host:port, e.g. voz.example.edu");
            return Err(SettingError::new(
                "server.allowed_hosts",
                quoted(host),
                reason,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
