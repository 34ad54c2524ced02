#![allow(clippy::unwrap_used)]

//! The configuration as the command line loads it: the generic rules and
//! every owner's check of its own section, each rejected value named with
//! where it came from.

use sonora::cli::SETTING_CHECKS;
use sonora::config::{ConfigError, LoadOptions, load};

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|&(k, v)| (k.into(), v.into())).collect()
}

fn opts(env: &[(&str, &str)], flags: &[(&str, &str)]) -> LoadOptions {
    LoadOptions {
        file: None,
        default_file: std::env::temp_dir().join("sonora-no-such-config.toml"),
        env: pairs(env),
        overrides: pairs(flags),
    }
}

/// A flag that must be refused, with a one-line message naming the flag.
fn flag_fail(key: &str, value: &str) -> (ConfigError, String) {
    let err = load(&opts(&[], &[(key, value)]), &SETTING_CHECKS).unwrap_err();
    let text = err.to_string();
    assert!(!text.contains('\n') && !text.contains('{'), "{text}");
    assert!(text.contains(&format!("(from --{key})")), "{text}");
    (err, text)
}

#[test]
fn tool_settings_are_checked_by_the_tools() {
    let (err, text) = flag_fail("tools.time_zone", "America/Atlantis");
    assert!(matches!(err, ConfigError::Invalid { .. }), "{text}");
    assert_eq!(err.key(), Some("tools.time_zone"), "{text}");
    assert!(text.contains("IANA time zone"), "{text}");
    let (err, text) = flag_fail("tools.timeout_ms", "5");
    assert_eq!(err.key(), Some("tools.timeout_ms"), "{text}");
    // Without the owners' checks the generic rules accept both.
    let plain = opts(&[], &[("tools.time_zone", "America/Atlantis")]);
    assert!(load(&plain, &[]).is_ok());
}

#[test]
fn an_http_tool_is_named_by_its_index() {
    let file = std::env::temp_dir().join(format!("sonora-config-it-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "[[tools.http]]\nname = \"ok\"\ndescription = \"x\"\nschema = '{}'\nurl = \"https://a.example\"\n\
         [[tools.http]]\nname = \"bad\"\ndescription = \"x\"\nschema = '{}'\nurl = \"ftp://b.example\"\n",
    )
    .unwrap();
    let options = LoadOptions {
        file: Some(file.clone()),
        ..opts(&[], &[])
    };
    let result = load(&options, &SETTING_CHECKS);
    let _ = std::fs::remove_file(&file);
    let err = result.unwrap_err();
    assert_eq!(err.key(), Some("tools.http[1].url"), "{err}");
    assert!(err.to_string().contains("not an http(s) URL"), "{err}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn network_settings_are_checked() {
    let bad = [
        ("server.trusted_proxies", "10.0.0.0/33"),
        ("server.trusted_proxies", "proxy.example"),
        ("server.allowed_hosts", "::1"),
        ("server.allowed_hosts", "evil example"),
        ("server.allowed_hosts", "voz.example:0"),
        ("server.allowed_origins", "https://ayuda.example.edu/path"),
        ("server.allowed_origins", "ayuda.example.edu"),
        ("server.metrics_listen", "localhost"),
        ("server.header_read_timeout_ms", "10"),
        ("server.keepalive_timeout_ms", "0"),
        ("server.max_sessions_per_client", "0"),
        ("server.connections_per_minute_per_client", "0"),
        // Below server.max_sessions (200): conversations could not all connect.
        ("server.max_connections", "100"),
    ];
    for (key, value) in bad {
        let (err, text) = flag_fail(key, value);
        assert_eq!(err.key(), Some(key), "{value}: {text}");
    }
    let (_, text) = flag_fail("server.trusted_proxies", "10.0.0.0/33");
    assert!(text.contains("IPs or CIDRs"), "{text}");
    let env = [(
        "SONORA_SERVER_TRUSTED_PROXIES",
        "127.0.0.1, 10.0.0.0/8, ::1, fd00::/8",
    )];
    let flags = [
        (
            "server.allowed_hosts",
            "voz.example.edu, voz.example.edu:8443, [::1]:8080, 192.0.2.7",
        ),
        ("server.metrics_listen", "127.0.0.1:9100"),
        ("server.max_sessions", "5000"),
        ("server.max_connections", "5000"),
    ];
    let server = load(&opts(&env, &flags), &SETTING_CHECKS).unwrap().server;
    assert_eq!(server.trusted_proxies.len(), 4);
    assert_eq!(server.allowed_hosts.len(), 4);
    assert_eq!(server.metrics_listen, "127.0.0.1:9100");
    let defaults = sonora::config::Config::default().server;
    assert_eq!(
        (
            defaults.max_sessions_per_client,
            defaults.connections_per_minute_per_client,
            defaults.header_read_timeout_ms,
            defaults.keepalive_timeout_ms,
            defaults.max_connections
        ),
        (4, 120, 10_000, 30_000, 2_000)
    );
}
