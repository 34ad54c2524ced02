//! `sonora doctor`'s look at each configured cloud engine: its
//! credentials, and its endpoint reached for real. OpenAI Realtime and
//! Gemini Live open one session (the key and the setup are checked by the
//! service) and close it; Nova Sonic, whose credentials the doctor checks
//! already, has its Region's endpoint reached over TCP and TLS.

use std::time::Duration;

use crate::config::{Config, EngineKind};
use crate::engine::gemini_live::{GeminiLiveEngine, GeminiLiveSettings};
use crate::engine::nova_sonic::resolve_region;
use crate::engine::openai_realtime::{OpenAiRealtimeEngine, OpenAiRealtimeSettings};
use crate::engine::{Engine, ProbeError};

/// The longest a probe may take.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// One engine's verdict.
pub(super) struct Verdict {
    pub(super) label: String,
    /// `None` when it answered; else whether it refused (the setup is
    /// wrong) rather than could not be reached.
    pub(super) failed: Option<ProbeError>,
    pub(super) detail: String,
}

/// Each configured engine: every `[[engine.instances]]`, or the one
/// `engine.kind` when it is a cloud engine.
pub(super) async fn engines(config: &Config) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    if config.engine.instances.is_empty() {
        if config.engine.kind.is_cloud() {
            let label = format!("engine {}", config.engine.kind.as_str());
            verdicts.push(probe(label, config).await);
        }
        return verdicts;
    }
    for (index, instance) in config.engine.instances.iter().enumerate() {
        let limit = match instance.max_concurrent {
            0 => "no limit".to_owned(),
            n => format!("at most {n}"),
        };
        let label = format!(
            "instance {} ({}, {limit})",
            instance.name,
            instance.kind.as_str()
        );
        let verdict = match config.for_instance(index) {
            Ok(own) => probe(label, &own).await,
            Err(e) => Verdict {
                label,
                detail: e.to_string(),
                failed: Some(ProbeError::Refused(e.to_string())),
            },
        };
        verdicts.push(verdict);
    }
    verdicts
}

async fn probe(label: String, config: &Config) -> Verdict {
    let result = match config.engine.kind {
        EngineKind::Local => Ok("runs here (see the local engine's parts above)".to_owned()),
        EngineKind::NovaSonic => nova(config).await,
        EngineKind::OpenaiRealtime => {
            let settings = OpenAiRealtimeSettings::from_config(&config.openai_realtime);
            if settings.api_key.is_empty() {
                Err(ProbeError::Refused("no API key".to_owned()))
            } else {
                match OpenAiRealtimeEngine::new(settings, None) {
                    Ok(engine) => session(&engine).await,
                    Err(e) => Err(ProbeError::Refused(e.to_string())),
                }
            }
        }
        EngineKind::GeminiLive => {
            let settings = GeminiLiveSettings::from_config(&config.gemini_live);
            if settings.credential.is_none() {
                Err(ProbeError::Refused("no API key or access token".to_owned()))
            } else {
                match GeminiLiveEngine::new(settings, None) {
                    Ok(engine) => session(&engine).await,
                    Err(e) => Err(ProbeError::Refused(e.to_string())),
                }
            }
        }
    };
    match result {
        Ok(detail) => Verdict {
            label,
            failed: None,
            detail,
        },
        Err(e) => Verdict {
            label,
            detail: crate::redact::urls_in(&e.to_string()),
            failed: Some(e),
        },
    }
}

async fn session(engine: &dyn Engine) -> Result<String, ProbeError> {
    let Some(probe) = engine.probe() else {
        return Ok("no check for this engine".to_owned());
    };
    tokio::time::timeout(PROBE_WAIT, probe)
        .await
        .unwrap_or_else(|_| {
            let message = format!("no answer within {} s", PROBE_WAIT.as_secs());
            Err(ProbeError::Unreached(message))
        })
}

/// Nova Sonic's endpoint (the configured one, or the Region's) reached
/// over TCP and TLS.
async fn nova(config: &Config) -> Result<String, ProbeError> {
    let (region, _) = resolve_region(&config.nova_sonic.region).await;
    let url = match config.nova_sonic.endpoint_url.as_str() {
        "" => format!("https://bedrock-runtime.{region}.amazonaws.com"),
        url => url.to_owned(),
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(&url);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => (host, port.parse().unwrap_or(443)),
        _ => (authority, 443),
    };
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(PROBE_WAIT, connect).await {
        Ok(Ok(_)) => Ok(format!("{region}: {} reached", crate::redact::url(&url))),
        Ok(Err(e)) => Err(ProbeError::Unreached(format!(
            "{region}: {} not reached: {e}",
            crate::redact::url(&url)
        ))),
        Err(_) => Err(ProbeError::Unreached(format!(
            "{region}: {} not reached within {} s",
            crate::redact::url(&url),
            PROBE_WAIT.as_secs()
        ))),
    }
}
