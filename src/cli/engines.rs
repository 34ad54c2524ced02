//! The configured engine, loaded one way for `serve`, `talk` and the
//! microphone mode.

use std::sync::Arc;

use anyhow::{Context, anyhow};

use crate::config::{Config, EngineKind};
use crate::engine::Engine;
use crate::engine::gemini_live::{GeminiLiveEngine, GeminiLiveSettings};
use crate::engine::local::{LocalEngine, LocalSettings};
use crate::engine::openai_realtime::{OpenAiRealtimeEngine, OpenAiRealtimeSettings};

/// An engine ready for conversations, and a few words about it for the
/// ready line.
pub(crate) struct Loaded {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) about: String,
}

/// The engine `config` names: the local one loads its models on the
/// blocking pool; Nova Sonic connects, with its tools; OpenAI Realtime and
/// Gemini Live check their keys and certificates (they connect per
/// conversation).
pub(crate) async fn load(config: &Config) -> anyhow::Result<Loaded> {
    match config.engine.kind {
        EngineKind::Local => {
            let settings = LocalSettings::from_config(&config.local);
            let engine = tokio::task::spawn_blocking(move || LocalEngine::load(&settings))
                .await
                .context("the local engine's loader stopped")?
                .map_err(|e| anyhow!(e))?;
            let about = format!("{} knowledge entries", engine.knowledge_entries());
            Ok(Loaded {
                engine: Arc::new(engine),
                about,
            })
        }
        EngineKind::NovaSonic => Ok(Loaded {
            engine: Arc::new(super::nova::engine(config).await?),
            about: "Nova Sonic".to_owned(),
        }),
        EngineKind::OpenaiRealtime => {
            let tools = super::nova::tools(config)?;
            let names: Vec<String> = tools.specs().into_iter().map(|s| s.name).collect();
            let settings = OpenAiRealtimeSettings::from_config(&config.openai_realtime);
            let engine =
                OpenAiRealtimeEngine::new(settings, Some(tools)).map_err(|e| anyhow!(e))?;
            let settings = engine.settings();
            eprintln!(
                "sonora: OpenAI Realtime {} via {} (tools: {})",
                settings.model,
                settings.endpoint_url,
                names.join(", ")
            );
            Ok(Loaded {
                engine: Arc::new(engine),
                about: "OpenAI Realtime".to_owned(),
            })
        }
        EngineKind::GeminiLive => {
            let tools = super::nova::tools(config)?;
            let names: Vec<String> = tools.specs().into_iter().map(|s| s.name).collect();
            let settings = GeminiLiveSettings::from_config(&config.gemini_live);
            let engine = GeminiLiveEngine::new(settings, Some(tools)).map_err(|e| anyhow!(e))?;
            let settings = engine.settings();
            eprintln!(
                "sonora: Gemini Live {} via {} (tools: {})",
                settings.model,
                crate::redact::url(&settings.endpoint_url),
                names.join(", ")
            );
            Ok(Loaded {
                engine: Arc::new(engine),
                about: "Gemini Live".to_owned(),
            })
        }
    }
}
