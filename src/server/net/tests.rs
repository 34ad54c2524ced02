use std::net::IpAddr;

use axum::http::HeaderMap;

use super::forwarded::{forwarded_chain, node_ip};
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
