//! Keeping secrets out of what people see: URLs lose their credentials and
//! query strings (where API keys travel) before they reach a client, a log
//! line or `sonora config show`.

/// Schemes whose URLs are redacted when they appear in free text.
const SCHEMES: [&str; 4] = ["https://", "http://", "wss://", "ws://"];

/// A URL without its user information and query string:
/// `https://user:key@host/path?token=x#frag` → `https://***@host/path?***`.
/// Text that is not a URL comes back unchanged.
pub fn url(text: &str) -> String {
    let Some(scheme_end) = text.find("://").map(|i| i + 3) else {
        return text.to_owned();
    };
    let (scheme, rest) = text.split_at(scheme_end);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path_and_more) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let path_end = path_and_more
        .find(['?', '#'])
        .unwrap_or(path_and_more.len());
    let (path, tail) = path_and_more.split_at(path_end);
    let tail = if tail.is_empty() { "" } else { "?***" };
    format!("{scheme}{host}{path}{tail}")
}

/// `text` with every URL in it redacted as [`url`] does.
pub fn urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        let next = SCHEMES.iter().filter_map(|scheme| lower.find(scheme)).min();
        let Some(start) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        let end = candidate
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .unwrap_or(candidate.len());
        // Trailing punctuation of a sentence is not part of the URL.
        let trimmed = candidate[..end].trim_end_matches(['.', ',', ';', ')', ']']);
        out.push_str(&url(trimmed));
        rest = &candidate[trimmed.len()..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_queries_go() {
        assert_eq!(
            url("https://user:secret@api.example.edu:8443/v1/x?key=abc#f"),
            "https://***@api.example.edu:8443/v1/x?***"
        );
        assert_eq!(url("http://127.0.0.1:9/chat"), "http://127.0.0.1:9/chat");
        assert_eq!(url("https://h.example?key=1"), "https://h.example?***");
        assert_eq!(url("not a url"), "not a url");
        assert_eq!(url(""), "");
    }

    #[test]
    fn urls_in_text_are_found() {
        let text = "POST https://a.example/x?key=k failed (see http://u:p@b.example/y). Retry";
        assert_eq!(
            urls_in(text),
            "POST https://a.example/x?*** failed (see http://***@b.example/y). Retry"
        );
        assert_eq!(urls_in("no links here"), "no links here");
        assert_eq!(urls_in("HTTPS://X.example/?q=1"), "HTTPS://X.example/?***");
        // Multibyte text around a URL survives.
        assert_eq!(
            urls_in("¿falló wss://h.example/s?t=1 ñ?"),
            "¿falló wss://h.example/s?*** ñ?"
        );
    }
}
