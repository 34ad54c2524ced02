//! Twilio's Media Stream messages as the call reads them.

use serde_json::Value;

use super::RATE_HZ;

/// A message after `start`, read where it lies.
#[derive(serde::Deserialize)]
pub(super) struct Inbound<'a> {
    #[serde(borrow)]
    pub(super) event: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    pub(super) media: Option<MediaIn<'a>>,
    #[serde(default)]
    pub(super) dtmf: Option<DtmfIn>,
}

#[derive(serde::Deserialize)]
pub(super) struct MediaIn<'a> {
    #[serde(borrow, default)]
    pub(super) payload: std::borrow::Cow<'a, str>,
}

#[derive(serde::Deserialize)]
pub(super) struct DtmfIn {
    #[serde(default)]
    pub(super) digit: String,
}

/// What `start` says.
pub(super) struct Start {
    pub(super) stream_sid: String,
    pub(super) call_sid: String,
    pub(super) token: String,
}

impl Start {
    /// A `start` message (`message["event"] == "start"`); the reason when
    /// its audio is not μ-law at 8 kHz, mono.
    pub(super) fn parse(message: &Value) -> Result<Self, &'static str> {
        let start = &message["start"];
        let text_of = |value: &Value| value.as_str().unwrap_or("").to_owned();
        let format = &start["mediaFormat"];
        let ulaw = format["encoding"].as_str() == Some("audio/x-mulaw")
            && number(&format["sampleRate"]) == Some(u64::from(RATE_HZ))
            && number(&format["channels"]).unwrap_or(1) == 1;
        if !ulaw {
            return Err("only audio/x-mulaw at 8000 Hz, mono, is taken");
        }
        let stream_sid = match text_of(&start["streamSid"]) {
            sid if sid.is_empty() => text_of(&message["streamSid"]),
            sid => sid,
        };
        Ok(Self {
            stream_sid,
            call_sid: text_of(&start["callSid"]),
            token: text_of(&start["customParameters"]["token"]),
        })
    }
}

/// A number Twilio may send as a number or as a string.
fn number(value: &Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}
