//! Validation: the range and format rules of plain values, then each owner's
//! [`Check`] of its own section, with the source of a rejected value named.

use std::net::SocketAddr;
use std::path::Path;

use toml::Value;

use super::load::invalid;
use super::{Check, Config, ConfigError, KIB, MIB, REDACTED, SettingError, quoted};

impl Config {
    /// Checks every generic range and format rule, then each of `checks`.
    pub fn validate(&self, checks: &[Check]) -> Result<(), ConfigError> {
        self.validate_from(checks, &|_| None)
    }

    fn validate_nova_sonic(
        &self,
        bad: &dyn Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let n = &self.nova_sonic;
        if !n.model.starts_with("amazon.nova")
            && !n.model.starts_with("arn:")
            && !n.model.contains(".amazon.nova")
        {
            let reason = "not a Nova Sonic model id, like amazon.nova-2-sonic-v1:0";
            return Err(bad("nova_sonic.model", quoted(&n.model), reason));
        }
        if ![8_000, 16_000, 24_000].contains(&n.output_rate_hz) {
            let reason = "must be 8000, 16000 or 24000 Hz";
            return Err(bad(
                "nova_sonic.output_rate_hz",
                n.output_rate_hz.to_string(),
                reason,
            ));
        }
        if !["", "HIGH", "MEDIUM", "LOW"].contains(&n.endpointing.to_ascii_uppercase().as_str()) {
            let reason = "must be HIGH, MEDIUM, LOW or empty";
            return Err(bad(
                "nova_sonic.endpointing",
                quoted(&n.endpointing),
                reason,
            ));
        }
        if !n.endpoint_url.is_empty() && !n.endpoint_url.starts_with("https://") {
            let reason = "must be an https:// URL";
            return Err(bad(
                "nova_sonic.endpoint_url",
                quoted(&n.endpoint_url),
                reason,
            ));
        }
        if !n.ca_file.is_empty() && !Path::new(&n.ca_file).is_file() {
            return Err(bad(
                "nova_sonic.ca_file",
                quoted(&n.ca_file),
                "no such file",
            ));
        }
        if n.voice.is_empty() || !n.voice.bytes().all(|b| b.is_ascii_alphabetic()) {
            let reason = "must be a voice id such as lupe or carlos";
            return Err(bad("nova_sonic.voice", quoted(&n.voice), reason));
        }
        let prices = [
            ("nova_sonic.speech_in_usd_per_1k", n.speech_in_usd_per_1k),
            ("nova_sonic.speech_out_usd_per_1k", n.speech_out_usd_per_1k),
            ("nova_sonic.text_in_usd_per_1k", n.text_in_usd_per_1k),
            ("nova_sonic.text_out_usd_per_1k", n.text_out_usd_per_1k),
        ];
        super::check_prices(&prices, bad)
    }

    /// [`Config::validate`], naming the source of a bad value by its key.
    pub(super) fn validate_from(
        &self,
        checks: &[Check],
        origin: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, reason: &str| invalid(key, value, origin(key), reason);
        if self.listen.parse::<SocketAddr>().is_err() {
            let reason = "not an address like 127.0.0.1:8080";
            return Err(bad("listen", quoted(&self.listen), reason));
        }
        let (a, s, l, n) = (&self.audio, &self.server, &self.local, &self.nova_sonic);
        let (cap, block) = (a.decoder_input_cap_bytes as u64, a.max_block_bytes as u64);
        let block_unit = "bytes (audio.decoder_input_cap_bytes)";
        let e = &self.engine;
        #[rustfmt::skip]
        let ranges: [(&str, u64, u64, u64, &str); 42] = [
            ("engine.queue_max", e.queue_max.into(), 0, 100_000, "conversations"),
            ("engine.queue_timeout_s", e.queue_timeout_s.into(), 1, 3_600, "s"),
            ("engine.failure_cooldown_ms", e.failure_cooldown_ms.into(), 0, 3_600_000, "ms"),
            ("audio.decoder_input_cap_bytes", cap, 64 * KIB, 64 * MIB, "bytes"),
            ("audio.max_block_bytes", block, KIB, cap, block_unit),
            ("audio.uplink_queue_ms", a.uplink_queue_ms.into(), 100, 60_000, "ms"),
            ("audio.downlink_queue_ms", a.downlink_queue_ms.into(), 100, 120_000, "ms"),
            ("audio.no_audio_timeout_ms", a.no_audio_timeout_ms.into(), 500, 600_000, "ms"),
            ("audio.realtime_burst_ms", a.realtime_burst_ms.into(), 1_000, 120_000, "ms"),
            ("server.max_sessions", s.max_sessions.into(), 1, 100_000, "sessions"),
            ("server.max_message_bytes", s.max_message_bytes as u64, KIB, 16 * MIB, "bytes"),
            ("server.hello_timeout_ms", s.hello_timeout_ms.into(), 100, 60_000, "ms"),
            ("server.idle_timeout_ms", s.idle_timeout_ms.into(), 1_000, 3_600_000, "ms"),
            ("server.max_conversation_s", s.max_conversation_s.into(), 10, 86_400, "s"),
            ("server.write_timeout_ms", s.write_timeout_ms.into(), 100, 600_000, "ms"),
            ("server.shutdown_grace_ms", s.shutdown_grace_ms.into(), 0, 600_000, "ms"),
            ("server.max_sessions_per_client", s.max_sessions_per_client.into(), 1, 100_000, "sessions"),
            ("server.connections_per_minute_per_client", s.connections_per_minute_per_client.into(), 1, 1_000_000, "requests"),
            ("server.header_read_timeout_ms", s.header_read_timeout_ms.into(), 100, 600_000, "ms"),
            ("server.keepalive_timeout_ms", s.keepalive_timeout_ms.into(), 100, 3_600_000, "ms"),
            ("server.resume_window_ms", s.resume_window_ms.into(), 0, 600_000, "ms"),
            ("server.resume_buffer_bytes", s.resume_buffer_bytes as u64, 64 * KIB, 64 * MIB, "bytes"),
            ("server.max_connections", s.max_connections.into(), s.max_sessions.into(), 1_000_000, "connections (each conversation holds one: at least server.max_sessions)"),
            ("local.asr_beam_size", l.asr_beam_size.into(), 1, 16, "hypotheses"),
            ("local.asr_threads", l.asr_threads.into(), 0, 256, "threads"),
            ("local.asr_margin_ms", l.asr_margin_ms.into(), 0, 30_000, "ms"),
            ("local.vad_hangover_ms", l.vad_hangover_ms.into(), 100, 5_000, "ms"),
            ("local.vad_preroll_ms", l.vad_preroll_ms.into(), 0, 1_000, "ms"),
            ("local.vad_pause_ms", l.vad_pause_ms.into(), 50, 5_000, "ms"),
            ("local.tts_rate_wpm", l.tts_rate_wpm.into(), 80, 450, "words per minute"),
            ("local.output_rate_hz", l.output_rate_hz.into(), 8_000, 48_000, "Hz"),
            ("local.chat_timeout_ms", l.chat_timeout_ms.into(), 500, 120_000, "ms"),
            ("local.vad_pause_ms", l.vad_pause_ms.into(), 50, l.vad_hangover_ms.into(), "ms (local.vad_hangover_ms)"),
            ("nova_sonic.max_tokens", n.max_tokens.into(), 1, 10_000, "tokens"),
            ("nova_sonic.rotate_after_s", n.rotate_after_s.into(), 1, 460, "s (the service ends a stream at 8 minutes)"),
            ("nova_sonic.handoff_wait_s", n.handoff_wait_s.into(), 0, 120, "s"),
            ("nova_sonic.stall_timeout_ms", n.stall_timeout_ms.into(), 200, 120_000, "ms"),
            ("nova_sonic.max_retries", n.max_retries.into(), 0, 10, "tries"),
            ("nova_sonic.open_backoff_ms", n.open_backoff_ms.into(), 100, 60_000, "ms"),
            ("nova_sonic.open_backoff_max_ms", n.open_backoff_max_ms.into(), n.open_backoff_ms.into(), 600_000, "ms (nova_sonic.open_backoff_ms)"),
            ("nova_sonic.max_opens_per_minute", n.max_opens_per_minute.into(), 2, 600, "streams"),
            ("nova_sonic.breaker_cooldown_ms", n.breaker_cooldown_ms.into(), 100, 3_600_000, "ms"),
        ];
        super::check_ranges(&ranges, &bad)?;
        #[rustfmt::skip]
        let fractions: [(&str, f64, f64, f64, &str); 6] = [
            ("audio.max_realtime_factor", a.max_realtime_factor, 1.0, 20.0, "times real time"),
            ("local.vad_quiet_db", l.vad_quiet_db, 0.0, 30.0, "dB (0: off)"),
            ("local.turn_threshold", l.turn_threshold, 0.0, 1.0, ""),
            ("local.vad_threshold", l.vad_threshold, 0.05, 0.95, ""),
            ("nova_sonic.top_p", n.top_p, 0.0, 1.0, ""),
            ("nova_sonic.temperature", n.temperature, 0.0, 1.0, ""),
        ];
        super::check_ranges(&fractions, &bad)?;
        let lang = &self.engine.language;
        let lang_ok = lang.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !lang_ok || !(2..=16).contains(&lang.len()) {
            let reason = "must be 2 to 16 ASCII letters, digits or '-', like es or en-US";
            return Err(bad("engine.language", quoted(lang), reason));
        }
        // A block or a whole message must fit beside what is already waiting.
        let needed = block.max(256 * KIB) + s.max_message_bytes as u64;
        if cap < needed {
            let reason = format!(
                "must hold a block (audio.max_block_bytes, or 256 KiB of Tracks) plus one message (server.max_message_bytes): at least {needed} bytes"
            );
            return Err(bad(
                "audio.decoder_input_cap_bytes",
                cap.to_string(),
                &reason,
            ));
        }
        self.validate_nova_sonic(&bad)?;
        self.telemetry.check(&bad)?;
        self.ledger.check(&bad)?;
        self.telephony.check(&bad)?;
        self.openai_realtime.check(&bad)?;
        self.gemini_live.check(&bad)?;
        let public = &self.server.public_url;
        let public_ok = public.is_empty()
            || ((public.starts_with("https://") || public.starts_with("http://"))
                && !public.contains('?')
                && !public.ends_with('/'));
        if !public_ok {
            let reason = "must be an http(s):// URL with no query and no trailing /";
            return Err(bad("server.public_url", quoted(public), reason));
        }
        if !l.chat_url.is_empty() && l.chat_model.is_empty() {
            let reason = "must name the model when local.chat_url is set";
            return Err(bad("local.chat_model", quoted(&l.chat_model), reason));
        }
        if !l.turn_model.is_empty() && l.onnxruntime_library.is_empty() {
            let reason = "must name the ONNX Runtime library when local.turn_model is set";
            return Err(bad(
                "local.onnxruntime_library",
                quoted(&l.onnxruntime_library),
                reason,
            ));
        }
        if !s.metrics_listen.is_empty() && s.metrics_listen.parse::<SocketAddr>().is_err() {
            let reason = "not an address like 10.0.0.5:9100 (empty: /metrics stays on listen)";
            return Err(bad(
                "server.metrics_listen",
                quoted(&s.metrics_listen),
                reason,
            ));
        }
        if s.auth_tokens.iter().any(|t| t.trim().is_empty()) {
            let shown = Value::from(vec![REDACTED; s.auth_tokens.len()]).to_string();
            return Err(bad("server.auth_tokens", shown, "tokens must not be empty"));
        }
        for check in checks {
            check(self).map_err(|e| bad(&e.key, e.value, &e.reason))?;
        }
        self.check_instances(&|config| {
            config.validate(checks).map_err(|e| match e {
                ConfigError::Invalid {
                    key, value, reason, ..
                } => SettingError::new(key, value, reason),
                other => SettingError::new("engine.instances", "", other.to_string()),
            })
        })
        .map_err(|e| bad(&e.key, e.value, &e.reason))?;
        Ok(())
    }
}
