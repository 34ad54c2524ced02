//! The configured engine, loaded one way for `serve`, `talk` and the
//! microphone mode.

use std::sync::Arc;

use anyhow::{Context, anyhow};

use crate::config::{Config, EngineKind};
use crate::engine::Engine;
use crate::engine::gemini_live::{GeminiLiveEngine, GeminiLiveSettings};
use crate::engine::local::{LocalEngine, LocalSettings};
use crate::engine::openai_realtime::{OpenAiRealtimeEngine, OpenAiRealtimeSettings};
use crate::engine::pool::{InstanceSpec, Pool, PoolSettings};

/// An engine ready for conversations, and a few words about it for the
/// ready line.
pub(crate) struct Loaded {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) about: String,
}

/// The engines `config` names: each `[[engine.instances]]` table loaded
/// with its own configuration, or the one `engine.kind`.
pub(crate) async fn load_pool(config: &Config) -> anyhow::Result<(Pool, String)> {
    let instances = &config.engine.instances;
    if instances.is_empty() {
        let loaded = load(config).await?;
        return Ok((Pool::single(loaded.engine), loaded.about));
    }
    let mut specs = Vec::with_capacity(instances.len());
    let mut about = Vec::with_capacity(instances.len());
    for (index, instance) in instances.iter().enumerate() {
        let own = config.for_instance(index).map_err(|e| anyhow!(e))?;
        let loaded = load(&own)
            .await
            .with_context(|| format!("engine instance {}", instance.name))?;
        let limit = match instance.max_concurrent {
            0 => "no limit".to_owned(),
            n => format!("at most {n}"),
        };
        about.push(format!(
            "{} ({}, {limit})",
            instance.name,
            instance.kind.as_str()
        ));
        specs.push(InstanceSpec {
            name: instance.name.clone(),
            engine: loaded.engine,
            max_concurrent: instance.max_concurrent,
            priority: instance.priority,
        });
    }
    let pool = Pool::new(specs, pool_settings(config));
    Ok((pool, format!("engines: {}", about.join(", "))))
}

/// How configured instances queue and fail over.
pub(crate) fn pool_settings(config: &Config) -> PoolSettings {
    let engine = &config.engine;
    PoolSettings {
        queue_max: engine.queue_max as usize,
        queue_timeout: std::time::Duration::from_secs(engine.queue_timeout_s.into()),
        failover: engine.failover,
        failure_cooldown: std::time::Duration::from_millis(engine.failure_cooldown_ms.into()),
    }
}

/// Whether loading takes a while (models on this machine): the page is
/// served meanwhile.
pub(crate) fn loads_models(config: &Config) -> bool {
    let instances = &config.engine.instances;
    if instances.is_empty() {
        !config.engine.kind.is_cloud()
    } else {
        instances.iter().any(|i| !i.kind.is_cloud())
    }
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
