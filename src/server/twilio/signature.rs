//! `X-Twilio-Signature`: base64 of HMAC-SHA1, keyed with the account's Auth
//! Token, over the URL Twilio requested followed by every POST parameter's
//! name and value, sorted by name (then value). Twilio's own signing is not
//! consistent about default ports, so a URL is also tried with the port
//! added and taken away, as Twilio's libraries do.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The signature of `url` with `params` under `auth_token`.
pub(crate) fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    sorted.dedup();
    // HMAC takes keys of any length: this never fails, and an empty
    // signature never passes `valid`.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()) else {
        return String::new();
    };
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    crate::base64::encode(&mac.finalize().into_bytes())
}

/// Whether `signature` signs `url` (with or without its default port) and
/// `params`; compared in constant time.
pub(crate) fn valid(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    !signature.is_empty()
        && port_variants(url)
            .iter()
            .any(|url| same(&sign(auth_token, url, params), signature))
}

/// Equal strings, compared in constant time.
pub(super) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

/// `url` as given, with its scheme's default port, and without any port.
fn port_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    let Some((scheme, rest)) = url.split_once("://") else {
        return out;
    };
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    // `[v6]:port` or `host:port`.
    let host = match authority.find(']') {
        Some(end) if authority.starts_with('[') => &authority[..=end],
        _ => authority.split(':').next().unwrap_or(authority),
    };
    let default_port = match scheme {
        "https" | "wss" => "443",
        _ => "80",
    };
    for candidate in [
        format!("{scheme}://{host}{path}"),
        format!("{scheme}://{host}:{default_port}{path}"),
    ] {
        if !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The worked examples, checked against Twilio's own validator.
    #[test]
    fn twilios_worked_examples() {
        let call = params(&[
            ("To", "+15559870000"),
            ("CallSid", "CA0001"),
            ("From", "+15551230000"),
        ]);
        let url = "https://example.com/twiml?lang=es";
        assert_eq!(sign("12345", url, &call), "r5RXePVmGCNZYjcQwFU2XXy7e1k=");
        assert_eq!(
            sign("12345", "wss://example.com/media", &[]),
            "7PR3qMkpDyEJtMrVOY/LDyNq8J8="
        );
        assert!(valid("12345", url, &call, "r5RXePVmGCNZYjcQwFU2XXy7e1k="));
        // The same request signed with a port, or checked with one.
        assert!(valid(
            "12345",
            "https://example.com:443/twiml?lang=es",
            &call,
            "r5RXePVmGCNZYjcQwFU2XXy7e1k="
        ));
        let ported = sign("12345", "https://example.com:443/twiml?lang=es", &call);
        assert!(valid("12345", url, &call, &ported));
    }

    #[test]
    fn anything_changed_fails() {
        let call = params(&[("CallSid", "CA0001"), ("From", "+15551230000")]);
        let url = "https://example.com/twilio/voice";
        let good = sign("secret", url, &call);
        assert!(valid("secret", url, &call, &good));
        assert!(!valid("other", url, &call, &good));
        assert!(!valid(
            "secret",
            "https://example.com/twilio/voicE",
            &call,
            &good
        ));
        let tampered = params(&[("CallSid", "CA0002"), ("From", "+15551230000")]);
        assert!(!valid("secret", url, &tampered, &good));
        assert!(!valid("secret", url, &call, ""));
        assert!(!valid("secret", url, &call, &good[1..]));
        // Order of parameters in the body does not matter.
        let reordered = params(&[("From", "+15551230000"), ("CallSid", "CA0001")]);
        assert!(valid("secret", url, &reordered, &good));
    }
}
