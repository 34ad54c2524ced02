//! The `[telephony]` section: phone calls through Twilio Media Streams.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Phone calls (`crate::server::twilio`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelephonyConfig {
    /// The Twilio account's Auth Token, which signs every webhook and stream request; empty: calls are refused unless `allow_unsigned` (no unit).
    pub twilio_auth_token: String,
    /// Take unsigned Twilio requests, for local testing only (no unit).
    pub allow_unsigned: bool,
    /// What the assistant says when it answers a call; empty: nothing (no unit).
    pub greeting: String,
    /// The key that ends a call (one of 0-9 * #); empty: none (no unit).
    pub hangup_digit: String,
    /// What the assistant says before hanging up on that key; empty: nothing (no unit).
    pub farewell: String,
    /// Pass the caller's other keys to the engine as typed text (no unit).
    pub dtmf_as_text: bool,
    /// Longest a call's token (in the TwiML) stays usable, in seconds.
    pub token_ttl_s: u32,
    /// Most reply audio sent ahead of what the caller has heard, in milliseconds.
    pub playback_lead_ms: u32,
}

impl Default for TelephonyConfig {
    fn default() -> Self {
        Self {
            twilio_auth_token: String::new(),
            allow_unsigned: false,
            greeting: "Hola, gracias por llamar a la mesa de ayuda de la universidad. ¿En qué puedo ayudarte?"
                .to_owned(),
            hangup_digit: "0".to_owned(),
            farewell: "Gracias por llamar. ¡Hasta pronto!".to_owned(),
            dtmf_as_text: false,
            token_ttl_s: 30,
            playback_lead_ms: 200,
        }
    }
}

impl TelephonyConfig {
    /// Whether calls can be taken at all.
    pub fn enabled(&self) -> bool {
        !self.twilio_auth_token.is_empty() || self.allow_unsigned
    }

    /// The first bad setting, made into an error by `bad(key, value shown, reason)`.
    pub(super) fn check(
        &self,
        bad: &dyn Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let digit_ok = self.hangup_digit.is_empty()
            || (self.hangup_digit.len() == 1
                && self
                    .hangup_digit
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'*' || b == b'#'));
        if !digit_ok {
            let shown = toml::Value::from(self.hangup_digit.as_str()).to_string();
            return Err(bad(
                "telephony.hangup_digit",
                shown,
                "must be one of 0-9, * or #, or empty",
            ));
        }
        for (key, text) in [
            ("telephony.greeting", &self.greeting),
            ("telephony.farewell", &self.farewell),
        ] {
            if text.chars().count() > 500 {
                return Err(bad(
                    key,
                    format!("({} characters)", text.chars().count()),
                    "at most 500 characters",
                ));
            }
        }
        #[rustfmt::skip]
        let ranges = [
            ("telephony.token_ttl_s", self.token_ttl_s, 5, 600, "s"),
            ("telephony.playback_lead_ms", self.playback_lead_ms, 40, 2_000, "ms"),
        ];
        super::check_ranges(&ranges, &bad)?;
        Ok(())
    }
}
