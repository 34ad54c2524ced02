//! The Nova Sonic flags shared by `talk` and `serve`, and building the engine
//! with its tools (the knowledge base the local engine answers from, the
//! clock, HTTP tools from the configuration).

use std::sync::Arc;

use anyhow::anyhow;
use clap::Args;

use crate::config::Config;
use crate::engine::nova_sonic::{NovaSonicEngine, NovaSonicSettings};
use crate::knowledge::KnowledgeBase;
use crate::tools::Tools;

#[derive(Debug, Args)]
pub(crate) struct NovaFlags {
    /// Nova Sonic model id (setting `nova_sonic.model`).
    #[arg(long, value_name = "ID")]
    model: Option<String>,
    /// AWS Region for Nova Sonic (setting `nova_sonic.region`).
    #[arg(long)]
    region: Option<String>,
    /// Bedrock endpoint instead of the Region's, e.g. a VPC endpoint or a
    /// compatible server (setting `nova_sonic.endpoint_url`).
    #[arg(long, value_name = "URL")]
    bedrock_endpoint: Option<String>,
    /// PEM certificates to trust for the engine's endpoint besides the system's
    /// (settings `nova_sonic.ca_file`, `openai_realtime.ca_file`, `gemini_live.ca_file`).
    #[arg(long, value_name = "PEM")]
    ca_file: Option<std::path::PathBuf>,
    /// Hand a conversation over to a new Nova Sonic stream after this many
    /// seconds (setting `nova_sonic.rotate_after_s`; the service ends streams at 8 minutes).
    #[arg(long, value_name = "SECS")]
    rotate_after: Option<u32>,
}

impl NovaFlags {
    pub(crate) fn overrides(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut set = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                out.push((key.to_owned(), value));
            }
        };
        set("nova_sonic.model", self.model.clone());
        set("nova_sonic.region", self.region.clone());
        set("nova_sonic.endpoint_url", self.bedrock_endpoint.clone());
        let ca_file = self.ca_file.as_ref().map(|p| p.display().to_string());
        set("nova_sonic.ca_file", ca_file.clone());
        set("openai_realtime.ca_file", ca_file.clone());
        set("gemini_live.ca_file", ca_file);
        set(
            "nova_sonic.rotate_after_s",
            self.rotate_after.map(|s| s.to_string()),
        );
        out
    }
}

/// The tools a cloud engine's model may call: the knowledge base the local
/// engine answers from (when it loads), the clock, HTTP tools from the
/// configuration.
pub(crate) fn tools(config: &Config) -> anyhow::Result<Tools> {
    let knowledge = if config.tools.knowledge {
        let dir = std::path::PathBuf::from(&config.local.knowledge_dir);
        match KnowledgeBase::load(&dir) {
            Ok(kb) => Some(Arc::new(kb)),
            Err(e) => {
                eprintln!(
                    "sonora: the knowledge-base tool is off: {} ({e})",
                    dir.display()
                );
                None
            }
        }
    } else {
        None
    };
    Tools::new(&config.tools, knowledge).map_err(|e| anyhow!(e))
}

/// The Nova Sonic engine as configured, with its tools.
pub(crate) async fn engine(config: &Config) -> anyhow::Result<NovaSonicEngine> {
    let tools = tools(config)?;
    let settings = NovaSonicSettings::from_config(&config.nova_sonic);
    let names: Vec<String> = tools.specs().into_iter().map(|s| s.name).collect();
    let engine = NovaSonicEngine::connect(settings, Some(tools))
        .await
        .map_err(|e| anyhow!(e))?;
    let settings = engine.settings();
    let (region, source) = engine.region();
    eprintln!(
        "sonora: Nova Sonic {} in {region} (from {}) via {} (tools: {})",
        settings.model,
        source.describe(),
        settings.client.endpoint_url.as_deref().unwrap_or("Bedrock"),
        names.join(", ")
    );
    Ok(engine)
}
