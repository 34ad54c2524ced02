use super::load::is_secret;
use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A config file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = temp_path(NEXT.fetch_add(1, Ordering::Relaxed));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A unique path per process and tag; `usize::MAX` is never written.
fn temp_path(tag: usize) -> PathBuf {
    let name = format!("sonora-config-test-{}-{tag}.toml", std::process::id());
    std::env::temp_dir().join(name)
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|&(k, v)| (k.into(), v.into())).collect()
}

fn opts(file: Option<&TempFile>, env: &[(&str, &str)], flags: &[(&str, &str)]) -> LoadOptions {
    let (file, default_file) = (file.map(|f| f.0.clone()), temp_path(usize::MAX));
    let (env, overrides) = (pairs(env), pairs(flags));
    LoadOptions {
        file,
        default_file,
        env,
        overrides,
    }
}

/// Loads expecting an error whose message is one line, with no Debug dump.
fn fail(options: &LoadOptions) -> (ConfigError, String) {
    let err = load(options, &[]).unwrap_err();
    let text = err.to_string();
    assert!(!text.contains('\n') && !text.contains('{'), "{text}");
    (err, text)
}

fn env_fail(name: &str, value: &str) -> (ConfigError, String) {
    fail(&opts(None, &[(name, value)], &[]))
}

fn flag_fail(key: &str, value: &str) -> (ConfigError, String) {
    fail(&opts(None, &[], &[(key, value)]))
}

fn file_fail(contents: &str) -> (ConfigError, String, String) {
    let file = TempFile::new(contents);
    let (err, text) = fail(&opts(Some(&file), &[], &[]));
    (err, text, file.0.display().to_string())
}

#[test]
fn defaults_validate_and_load_unchanged() {
    let config = Config::default();
    config.validate(&[]).unwrap();
    assert_eq!(config.listen_addr(), DEFAULT_LISTEN);
    assert_eq!(config.audio.decoder_input_cap_bytes, 512 * 1024);
    assert_eq!(load(&opts(None, &[], &[]), &[]).unwrap(), config);
    assert_eq!(keys().len(), 148, "every leaf appears once: {:?}", keys());
}

#[test]
fn precedence_is_file_then_env_then_flag() {
    let file = TempFile::new("[audio]\nuplink_queue_ms = 3000\n");
    let env = [("SONORA_AUDIO_UPLINK_QUEUE_MS", "4000")];
    let flag = [("audio.uplink_queue_ms", "6000")];
    let ms = |o: LoadOptions| load(&o, &[]).unwrap().audio.uplink_queue_ms;
    assert_eq!(ms(opts(Some(&file), &[], &[])), 3000);
    assert_eq!(ms(opts(Some(&file), &env, &[])), 4000);
    assert_eq!(ms(opts(Some(&file), &env, &flag)), 6000);
    assert_eq!(ms(opts(None, &[], &flag)), 6000);
}

#[test]
fn unknown_file_keys_name_the_full_dotted_key() {
    let (err, text, path) = file_fail("[audio]\nuplink_queu_ms = 3000\n");
    assert_eq!(err.key(), Some("audio.uplink_queu_ms"));
    assert_eq!(text, format!("{path}: unknown key audio.uplink_queu_ms"));
    assert_eq!(file_fail("[audoi]\nx = 1\n").0.key(), Some("audoi"));
}

#[test]
fn wrong_types_name_key_source_and_expected_type() {
    let (err, text, path) = file_fail("[server]\nmax_sessions = \"many\"\n");
    assert_eq!(err.key(), Some("server.max_sessions"));
    let want = "server.max_sessions = \"many\" (from PATH): expected a TOML integer";
    assert_eq!(text, want.replace("PATH", &path));
    let (_, text, _) = file_fail("audio = 5\n");
    assert!(text.ends_with("expected a TOML table"), "{text}");
    let (err, text) = env_fail("SONORA_SERVER_MAX_SESSIONS", "lots");
    assert!(matches!(err, ConfigError::WrongType { .. }));
    let want = "server.max_sessions = \"lots\" (from SONORA_SERVER_MAX_SESSIONS): expected";
    assert!(text.starts_with(want), "{text}");
}

#[test]
fn unknown_settings_fail_but_config_log_and_other_variables_do_not() {
    let (err, text) = env_fail("SONORA_AUDIO_UPLNK_QUEUE_MS", "1");
    assert_eq!(err.key(), Some("SONORA_AUDIO_UPLNK_QUEUE_MS"));
    let want = "unknown setting SONORA_AUDIO_UPLNK_QUEUE_MS (from env)";
    assert_eq!(text, want);
    let env = [("SONORA_LOG", "debug"), ("HOME", "/"), ("sonora_x", "1")];
    assert_eq!(
        load(&opts(None, &env, &[]), &[]).unwrap(),
        Config::default()
    );
    let (err, text) = flag_fail("audio.nope", "1");
    assert_eq!(err.key(), Some("audio.nope"));
    assert_eq!(text, "unknown setting audio.nope (from --audio.nope)");
}

#[test]
fn out_of_range_values_name_key_and_source() {
    let (_, text) = env_fail("SONORA_AUDIO_UPLINK_QUEUE_MS", "20");
    let want = "audio.uplink_queue_ms = 20 (from SONORA_AUDIO_UPLINK_QUEUE_MS): \
                must be between 100 and 60000 ms";
    assert_eq!(text, want);
    let (err, text, path) = file_fail("[server]\nmax_message_bytes = 10\n");
    assert_eq!(err.key(), Some("server.max_message_bytes"));
    let want = format!("= 10 (from {path}): must be");
    assert!(text.contains(&want), "{text}");
    let (_, text) = flag_fail("server.idle_timeout_ms", "999");
    let want = "server.idle_timeout_ms = 999 (from --server.idle_timeout_ms): must be";
    assert!(text.starts_with(want), "{text}");
    let cap = ("audio.decoder_input_cap_bytes", "65536");
    let (err, _) = fail(&opts(
        None,
        &[],
        &[cap, ("audio.max_block_bytes", "131072")],
    ));
    assert_eq!(err.key(), Some("audio.max_block_bytes"));
    // The cap must hold a block plus one whole message.
    let (err, text) = flag_fail("audio.decoder_input_cap_bytes", "500000");
    assert_eq!(err.key(), Some("audio.decoder_input_cap_bytes"), "{text}");
    assert!(text.contains("at least 524288 bytes"), "{text}");
    // Values the TOML integer holds but the field type does not.
    let (err, text) = env_fail("SONORA_AUDIO_MAX_BLOCK_BYTES", "-5");
    assert!(matches!(err, ConfigError::Invalid { .. }), "{text}");
    let want = "-5 (from SONORA_AUDIO_MAX_BLOCK_BYTES): ";
    assert!(text.contains(want), "{text}");
    let (_, text) = flag_fail("audio.uplink_queue_ms", "5000000000");
    let want = "audio.uplink_queue_ms = 5000000000 (from --";
    assert!(text.starts_with(want), "{text}");
}

#[test]
fn listen_language_and_engine_kind_are_checked() {
    let (_, text) = flag_fail("listen", "nope");
    let want = "listen = \"nope\" (from --listen): not an address like 127.0.0.1:8080";
    assert_eq!(text, want);
    for bad in ["e", "es_ES", "a-very-long-language-tag"] {
        let (err, _) = env_fail("SONORA_ENGINE_LANGUAGE", bad);
        assert_eq!(err.key(), Some("engine.language"), "{bad}");
    }
    let (err, text) = env_fail("SONORA_ENGINE_KIND", "nova");
    assert_eq!(err.key(), Some("engine.kind"));
    assert!(text.contains("nova-sonic"), "{text}");
    let env = [("SONORA_ENGINE_KIND", "nova-sonic")];
    let kind = load(&opts(None, &env, &[]), &[]).unwrap().engine.kind;
    assert_eq!(kind, EngineKind::NovaSonic);
}

#[test]
fn config_file_sources_and_missing_files() {
    let nine = TempFile::new("[server]\nmax_sessions = 9\n");
    let eleven = TempFile::new("[server]\nmax_sessions = 11\n");
    let path = nine.0.display().to_string();
    let via_env = [("SONORA_CONFIG", path.as_str())];
    let sessions = |o: LoadOptions| load(&o, &[]).unwrap().server.max_sessions;
    assert_eq!(sessions(opts(None, &via_env, &[])), 9);
    assert_eq!(sessions(opts(Some(&eleven), &via_env, &[])), 11);
    let with_default = |env| {
        let base = opts(None, env, &[]);
        LoadOptions {
            default_file: eleven.0.clone(),
            ..base
        }
    };
    assert_eq!(sessions(with_default(&[])), 11);
    assert_eq!(sessions(with_default(&via_env)), 9);
    let missing = temp_path(usize::MAX).display().to_string();
    let (err, text) = env_fail("SONORA_CONFIG", &missing);
    assert!(matches!(err, ConfigError::File { .. }));
    let want = format!("{missing} (from SONORA_CONFIG): ");
    assert!(text.starts_with(&want), "{text}");
    let mut options = opts(None, &[], &[]);
    options.file = Some(missing.clone().into());
    assert!(fail(&options).1.contains("(from --config): cannot read"));
    let default_file = missing.into();
    let options = LoadOptions {
        default_file,
        ..LoadOptions::default()
    };
    assert_eq!(load(&options, &[]).unwrap(), Config::default());
}

#[test]
fn syntax_errors_are_one_line_with_position() {
    let (err, text, path) = file_fail("[audio]\nuplink_queue_ms = = 3\n");
    assert!(err.key().is_none());
    let want = format!("{path} (from --config): invalid TOML at line 2, column ");
    assert!(text.starts_with(&want), "{text}");
}

#[test]
fn arrays_from_env_in_both_syntaxes() {
    let env = |text: &str| opts(None, &[("SONORA_SERVER_AUTH_TOKENS", text)], &[]);
    let tokens = |text: &str| load(&env(text), &[]).unwrap().server.auth_tokens;
    assert_eq!(tokens(r#"["a","b"]"#), ["a", "b"]);
    assert_eq!(tokens("a, b ,c"), ["a", "b", "c"]);
    assert!(tokens("").is_empty());
    let (err, text) = fail(&env(r#"["hunter2", 3]"#));
    assert_eq!(err.key(), Some("server.auth_tokens"));
    assert!(!text.contains("hunter2"), "{text}");
    let (unclosed, blank) = (fail(&env(r#"["a", "#)).0, fail(&env(r#"["a", " "]"#)).0);
    assert!(matches!(unclosed, ConfigError::WrongType { .. }));
    assert!(matches!(blank, ConfigError::Invalid { .. }));
}

#[test]
fn redaction_hides_tokens_but_keeps_other_values() {
    let mut config = Config::default();
    config.server.auth_tokens = vec!["tok-one".to_owned(), "tok-two".to_owned()];
    config.engine.voice = "lupe".to_owned();
    let text = config.to_redacted_toml();
    assert!(!text.contains("tok-"), "{text}");
    let shown: Config = toml::from_str(&text).unwrap();
    assert_eq!(shown.server.auth_tokens, [REDACTED, REDACTED]);
    assert_eq!((shown.engine, shown.audio), (config.engine, config.audio));
    let plain = Config::default().to_redacted_toml();
    assert!(plain.contains("auth_tokens = []"), "{plain}");
    assert!(is_secret("engine.api_key") && is_secret("db.password"));
    assert!(!is_secret("engine.voice"));
}

#[test]
fn redaction_strips_credentials_and_queries_from_urls() {
    let mut config = Config::default();
    config.tools.http = vec![HttpToolConfig {
        name: "reservar".to_owned(),
        description: "Reserva una sala.".to_owned(),
        schema: "{}".to_owned(),
        url: "https://bot:s3cret@salas.example.edu/api?key=k3y".to_owned(),
    }];
    config.local.chat_url = "http://127.0.0.1:9/v1/chat?token=abc".to_owned();
    let text = config.to_redacted_toml();
    for secret in ["s3cret", "k3y", "token=abc", "bot:"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(
        text.contains("https://***@salas.example.edu/api?***"),
        "{text}"
    );
    assert!(text.contains("http://127.0.0.1:9/v1/chat?***"), "{text}");
}

#[test]
fn env_names_follow_keys_and_are_unique() {
    assert_eq!(env_name("listen"), "SONORA_LISTEN");
    assert_eq!(
        env_name("audio.uplink_queue_ms"),
        "SONORA_AUDIO_UPLINK_QUEUE_MS"
    );
    let all = keys();
    let names: std::collections::BTreeSet<_> = all.iter().map(|(k, _)| env_name(k)).collect();
    assert_eq!(names.len(), all.len());
    let has = |key: &str, default: &str| all.contains(&(key.into(), default.into()));
    assert!(has("audio.uplink_queue_ms", "5000") && has("engine.kind", "\"local\""));
    assert!(has("listen", "\"127.0.0.1:8080\"") && has("server.auth_tokens", "[]"));
}

#[test]
fn redacted_toml_without_secrets_round_trips() {
    let mut config = Config::default();
    config.engine.kind = EngineKind::NovaSonic;
    config.audio.uplink_queue_ms = 1234;
    config.listen = "[::1]:7000".to_owned();
    let text = config.to_redacted_toml();
    assert_eq!(toml::from_str::<Config>(&text).unwrap(), config);
    let file = TempFile::new(&text);
    assert_eq!(load(&opts(Some(&file), &[], &[]), &[]).unwrap(), config);
}

#[test]
fn nova_sonic_and_tool_settings_are_checked() {
    let bad = [
        ("nova_sonic.output_rate_hz", "22050"),
        ("nova_sonic.temperature", "1.5"),
        ("nova_sonic.endpointing", "SOMETIMES"),
        ("nova_sonic.rotate_after_s", "600"),
        ("nova_sonic.endpoint_url", "ftp://example"),
        ("nova_sonic.endpoint_url", "http://127.0.0.1:8443"),
        ("nova_sonic.ca_file", "/no/such/ca.pem"),
        ("nova_sonic.model", "gpt-4o"),
        ("nova_sonic.speech_out_usd_per_1k", "-1"),
        ("nova_sonic.breaker_cooldown_ms", "0"),
        ("nova_sonic.open_backoff_max_ms", "500"),
        ("nova_sonic.max_opens_per_minute", "1"),
    ];
    for (key, value) in bad {
        let (err, text) = fail(&opts(None, &[], &[(key, value)]));
        assert!(matches!(err, ConfigError::Invalid { .. }), "{key}: {text}");
        assert!(
            text.contains(key.split('.').next().unwrap_or(key)),
            "{key}: {text}"
        );
    }
    let file = TempFile::new(
        "[engine]\nkind = \"nova-sonic\"\n[nova_sonic]\nvoice = \"carlos\"\nrotate_after_s = 300\n\
         [[tools.http]]\nname = \"room_booking\"\ndescription = \"Books a study room.\"\n\
         schema = '{\"type\":\"object\"}'\nurl = \"https://rooms.example.edu/book\"\n",
    );
    let config = load(&opts(Some(&file), &[], &[]), &[]).unwrap();
    assert_eq!(config.engine.kind, EngineKind::NovaSonic);
    assert_eq!(config.nova_sonic.voice, "carlos");
    assert_eq!(config.nova_sonic.rotate_after_s, 300);
    assert_eq!(config.tools.http.len(), 1);
    assert_eq!(config.tools.http[0].name, "room_booking");
}

#[test]
fn ledger_amounts_are_whole_micro_dollars_and_a_turn_fits_a_conversation() {
    let bad = [
        ("ledger.global_daily_usd", "-1"),
        ("ledger.conversation_usd", "0.0000001"),
        ("ledger.turn_reserve_usd", "nan"),
        ("ledger.time_zone", "\"Mars/Olympus\""),
        ("ledger.url", "\"mysql://x\""),
    ];
    for (key, value) in bad {
        let (err, text) = fail(&opts(None, &[], &[(key, value)]));
        assert!(matches!(err, ConfigError::Invalid { .. }), "{key}: {text}");
        assert!(text.contains(key), "{key}: {text}");
    }
    let (_, text) = fail(&opts(None, &[], &[("ledger.conversation_usd", "0.01")]));
    assert!(text.contains("turn_reserve_usd"), "{text}");
    let file = TempFile::new(
        "[ledger]\nglobal_daily_usd = 25.5\nconversation_usd = 0.5\nturn_reserve_usd = 0.03\n",
    );
    let config = load(&opts(Some(&file), &[], &[]), &[]).unwrap();
    assert_eq!(config.ledger.global_daily_micro_usd(), Some(25_500_000));
    assert_eq!(config.ledger.conversation_micro_usd(), Some(500_000));
    assert_eq!(config.ledger.turn_reserve_micro_usd(), 30_000);
    assert_eq!(Config::default().ledger.global_daily_micro_usd(), None);
}

#[test]
fn the_turn_end_model_is_optional_and_its_threshold_a_probability() {
    for (key, value) in [
        ("local.turn_threshold", "1.5"),
        ("local.turn_threshold", "-0.1"),
        ("local.vad_quiet_db", "-1"),
        ("local.vad_quiet_db", "31"),
        ("local.onnxruntime_library", ""),
    ] {
        let (err, text) = fail(&opts(None, &[], &[(key, value)]));
        assert!(matches!(err, ConfigError::Invalid { .. }), "{key}: {text}");
        assert!(text.contains(key), "{key}: {text}");
    }
    // Off: no library needed.
    let off = [
        ("local.turn_model", ""),
        ("local.onnxruntime_library", ""),
        ("local.turn_threshold", "0.7"),
    ];
    let config = load(&opts(None, &[], &off), &[]).unwrap();
    assert!(config.local.turn_model.is_empty());
    assert_eq!(config.local.turn_threshold, 0.7);
    let defaults = Config::default().local;
    assert_eq!(
        defaults.turn_model,
        "models/smart-turn/smart-turn-v3.2-cpu.onnx"
    );
    assert_eq!(defaults.turn_threshold, 0.5);
}

#[test]
fn gemini_live_settings_are_checked_and_its_secrets_redacted() {
    let bad = [
        (
            "gemini_live.endpoint_url",
            "https://generativelanguage.googleapis.com",
        ),
        ("gemini_live.model", "models/a b"),
        ("gemini_live.voice", "  "),
        ("gemini_live.access_token", "Bearer ya29.x"),
        ("gemini_live.connect_timeout_ms", "100"),
        ("gemini_live.stall_timeout_ms", "500"),
        ("gemini_live.max_retries", "11"),
        ("gemini_live.cooldown_ms", "700000"),
        ("gemini_live.speech_out_usd_per_1k", "-1"),
        ("gemini_live.text_in_usd_per_1k", "0.0000001"),
    ];
    for (key, value) in bad {
        let (err, text) = fail(&opts(None, &[], &[(key, value)]));
        assert!(matches!(err, ConfigError::Invalid { .. }), "{key}: {text}");
        assert_eq!(err.key(), Some(key), "{text}");
        assert!(!text.contains("ya29"), "a token is never shown: {text}");
    }
    let file = TempFile::new(
        "[engine]\nkind = \"gemini-live\"\n[gemini_live]\nmodel = \
         \"gemini-2.5-flash-native-audio-preview-12-2025\"\nvoice = \"Puck\"\n\
         access_token = \"ya29.secret\"\nspeech_out_usd_per_1k = 0.015\n",
    );
    let config = load(&opts(Some(&file), &[], &[]), &[]).unwrap();
    assert_eq!(config.engine.kind, EngineKind::GeminiLive);
    assert!(config.engine.kind.is_cloud());
    assert_eq!(config.gemini_live.voice, "Puck");
    assert!((config.gemini_live.speech_out_usd_per_1k - 0.015).abs() < 1e-12);
    let shown = config.to_redacted_toml();
    assert!(!shown.contains("ya29.secret"), "{shown}");
    assert!(shown.contains("[gemini_live]"), "{shown}");
}

const TWO_INSTANCES: &str = r#"
[engine]
queue_max = 4

[[engine.instances]]
name = "nova-east"
kind = "nova-sonic"
max_concurrent = 2
region = "us-east-1"
top_p = 1

[[engine.instances]]
name = "openai-backup"
kind = "openai-realtime"
priority = 1
api_key = "sk-secret-value"
endpoint_url = "wss://example.test/v1/realtime?key=abc"
"#;

#[test]
fn instances_carry_their_own_settings_over_their_kinds_section() {
    let file = TempFile::new(TWO_INSTANCES);
    let config = load(&opts(Some(&file), &[], &[]), &[]).expect("loads");
    let instances = &config.engine.instances;
    assert_eq!(instances.len(), 2);
    assert_eq!(
        (instances[0].kind, instances[0].max_concurrent),
        (EngineKind::NovaSonic, 2)
    );
    let east = config.for_instance(0).expect("its configuration");
    assert_eq!(east.engine.kind, EngineKind::NovaSonic);
    assert_eq!(east.nova_sonic.region, "us-east-1");
    // An integer where the section has a float is widened.
    assert!((east.nova_sonic.top_p - 1.0).abs() < f64::EPSILON);
    assert!(east.engine.instances.is_empty());
    let backup = config.for_instance(1).expect("its configuration");
    assert_eq!(backup.openai_realtime.api_key, "sk-secret-value");
    // The main section is untouched.
    assert_eq!(config.nova_sonic.region, "");
    // Secrets and URL queries inside instances are redacted too.
    let shown = config.to_redacted_toml();
    assert!(!shown.contains("sk-secret-value"), "{shown}");
    assert!(!shown.contains("key=abc"), "{shown}");
}

#[test]
fn a_bad_instance_is_named_by_its_own_key() {
    let with =
        |extra: &str| format!("[[engine.instances]]\nname = \"a\"\nkind = \"nova-sonic\"\n{extra}");
    let (err, text, _) = file_fail(&with("regoin = \"us-east-1\"\n"));
    assert_eq!(err.key(), Some("engine.instances[0].regoin"), "{text}");
    assert!(text.contains("not a setting of [nova_sonic]"), "{text}");
    let (err, text, _) = file_fail(&with("top_p = 3.0\n"));
    assert_eq!(err.key(), Some("engine.instances[0].top_p"), "{text}");
    let (err, text, _) = file_fail(&with("region = 5\n"));
    assert_eq!(err.key(), Some("engine.instances[0].region"), "{text}");
    let twice = format!("{}{}", with(""), with(""));
    let (err, text, _) = file_fail(&twice);
    assert_eq!(err.key(), Some("engine.instances[1].name"), "{text}");
    assert!(text.contains("another instance"), "{text}");
    let (err, _, _) = file_fail("[[engine.instances]]\nname = \"Bad Name\"\nkind = \"local\"\n");
    assert_eq!(err.key(), Some("engine.instances[0].name"));
    let (err, text, _) = file_fail(&format!("[engine]\nvoice = \"lupe\"\n{}", with("")));
    assert_eq!(err.key(), Some("engine.voice"), "{text}");
}
