//! The configured engine, loaded one way for `serve`, `talk` and the
//! microphone mode.

use std::sync::Arc;

use anyhow::{Context, anyhow};

use crate::config::{Config, EngineKind};
use crate::engine::Engine;
use crate::engine::local::{LocalEngine, LocalSettings};

/// An engine ready for conversations, and a few words about it for the
/// ready line.
pub(crate) struct Loaded {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) about: String,
}

/// The engine `config` names: the local one loads its models on the
/// blocking pool; Nova Sonic connects, with its tools.
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
    }
}
