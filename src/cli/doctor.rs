//! `sonora doctor`: what is installed, and what each missing piece disables.
//! It fails only when the configured engine is missing a part.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;

use super::Failure;
use crate::config::{Config, EngineKind};
use crate::engine::ProbeError;
use crate::engine::gemini_live::{Credential, GeminiLiveSettings};
use crate::engine::local::{LocalSettings, MODEL_FILES};
use crate::engine::nova_sonic::resolve_region;
use crate::engine::openai_realtime::OpenAiRealtimeSettings;
use crate::knowledge::KnowledgeBase;

/// The longest wait for the AWS credential chain (the instance metadata
/// service answers in milliseconds where there is one).
const CREDENTIALS_WAIT: Duration = Duration::from_secs(3);

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    /// What does not work while this is missing.
    disables: &'static str,
}

pub(crate) fn run(config: &Config) -> Result<(), Failure> {
    let local = &config.local;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    let (aws, region, ledger, engines) = runtime.block_on(async {
        let region = resolve_region(&config.nova_sonic.region).await;
        (
            aws_check(&region.0).await,
            region,
            ledger_check(config).await,
            super::probe::engines(config).await,
        )
    });
    let checks = [
        model_check(Path::new(&local.model_dir)),
        program_check(
            "speech synthesis",
            &local.tts_program,
            &["--version"],
            "the local engine's spoken replies (apt-get install espeak-ng)",
        ),
        knowledge_check(Path::new(&local.knowledge_dir)),
        turn_check(config),
        word_list_check(config),
        program_check(
            "ffmpeg",
            "ffmpeg",
            &["-hide_banner", "-version"],
            "only the baseline of `sonora bench decode` (apt-get install ffmpeg)",
        ),
        aws,
        ledger,
        openai_check(config),
        gemini_check(config),
    ];
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for check in &checks {
        let mark = if check.ok { "ok     " } else { "MISSING" };
        println!("{mark} {:<width$}  {}", check.name, check.detail);
        if !check.ok {
            println!("        {:<width$}  disables: {}", "", check.disables);
        }
    }
    let (region, source) = region;
    println!(
        "        {:<width$}  Nova Sonic calls {region} (from {})",
        "AWS Region",
        source.describe()
    );
    // Each engine's parts, by the checks' names.
    let ready = |names: &[&str]| {
        names
            .iter()
            .all(|name| checks.iter().any(|c| c.name == *name && c.ok))
    };
    let local_ready = ready(&["speech model", "speech synthesis", "knowledge base"]);
    let nova_ready = ready(&["AWS credentials"]);
    println!(
        "local engine: {}",
        if local_ready {
            "ready"
        } else {
            "not ready (see above; scripts/setup installs everything)"
        }
    );
    println!(
        "nova-sonic engine: {}",
        if nova_ready {
            "ready"
        } else {
            "not ready (no AWS credentials)"
        }
    );
    for (engine, check, missing) in [
        ("openai-realtime", "OpenAI API key", "no API key"),
        (
            "gemini-live",
            "Gemini API key",
            "no API key or access token",
        ),
    ] {
        let state = if ready(&[check]) {
            "ready".to_owned()
        } else {
            format!("not ready ({missing})")
        };
        println!("{engine} engine: {state}");
    }
    // Each configured cloud engine reached for real.
    // A service that refuses fails the check; one not reached from here
    // (no network, a fault, throttling) is reported only.
    for verdict in &engines {
        let mark = match verdict.failed {
            None => "ok     ",
            Some(ProbeError::Refused(_)) => "REFUSED",
            Some(ProbeError::Unreached(_)) => "unreached",
        };
        println!("{mark} {}: {}", verdict.label, verdict.detail);
    }
    if let Some(failed) = engines
        .iter()
        .find(|v| matches!(v.failed, Some(ProbeError::Refused(_))))
    {
        return Err(anyhow::anyhow!("{} cannot serve: {}", failed.label, failed.detail).into());
    }
    if !config.engine.instances.is_empty() {
        let needs_local = config.engine.instances.iter().any(|i| !i.kind.is_cloud());
        let needs_nova = config
            .engine
            .instances
            .iter()
            .any(|i| i.kind == EngineKind::NovaSonic);
        if needs_local && !local_ready {
            return Err(anyhow::anyhow!("a configured local instance is missing parts").into());
        }
        if needs_nova && !nova_ready {
            return Err(anyhow::anyhow!(
                "the configured nova-sonic instances have no AWS credentials"
            )
            .into());
        }
        return Ok(());
    }
    // Only the configured engine's parts decide the exit code.
    let kind = config.engine.kind;
    match kind {
        EngineKind::Local if !local_ready => {
            Err(anyhow::anyhow!("the configured local engine is missing parts").into())
        }
        EngineKind::NovaSonic if !nova_ready => {
            Err(anyhow::anyhow!("the configured nova-sonic engine has no AWS credentials").into())
        }
        EngineKind::OpenaiRealtime if !ready(&["OpenAI API key"]) => {
            Err(anyhow::anyhow!("the configured openai-realtime engine has no API key").into())
        }
        EngineKind::GeminiLive if !ready(&["Gemini API key"]) => Err(anyhow::anyhow!(
            "the configured gemini-live engine has no API key or access token"
        )
        .into()),
        EngineKind::Local
        | EngineKind::NovaSonic
        | EngineKind::OpenaiRealtime
        | EngineKind::GeminiLive => Ok(()),
    }
}

/// Whether OpenAI Realtime has a key (it is tried on the first conversation).
fn openai_check(config: &Config) -> Check {
    let settings = OpenAiRealtimeSettings::from_config(&config.openai_realtime);
    let ok = !settings.api_key.is_empty();
    let detail = if ok {
        format!("{} at {}", settings.model, settings.endpoint_url)
    } else {
        "no openai_realtime.api_key and no OPENAI_API_KEY".to_owned()
    };
    Check {
        name: "OpenAI API key",
        ok,
        detail,
        disables: "the openai-realtime engine",
    }
}

/// Whether Gemini Live has a key or a token (tried on the first conversation).
fn gemini_check(config: &Config) -> Check {
    let settings = GeminiLiveSettings::from_config(&config.gemini_live);
    let (ok, detail) = match &settings.credential {
        Some(credential) => {
            let how = match credential {
                Credential::ApiKey(_) => "API key",
                Credential::Bearer(_) => "access token",
            };
            let at = crate::redact::url(&settings.endpoint_url);
            (true, format!("{how}; {} at {at}", settings.model))
        }
        None => (
            false,
            "no gemini_live.api_key or access_token, no GEMINI_API_KEY or GOOGLE_API_KEY"
                .to_owned(),
        ),
    };
    Check {
        name: "Gemini API key",
        ok,
        detail,
        disables: "the gemini-live engine",
    }
}

/// Whether the ledger opens (a SQLite file is created when missing).
async fn ledger_check(config: &Config) -> Check {
    let disables = "sonora serve, which does not start without its ledger (ledger.url = \"off\" records nothing)";
    if !config.ledger.enabled() {
        return Check {
            name: "ledger",
            ok: true,
            detail: "off: conversations and costs are not recorded".to_owned(),
            disables,
        };
    }
    match crate::ledger::connect(&config.ledger).await {
        Ok((backend, pool)) => {
            pool.close().await;
            Check {
                name: "ledger",
                ok: true,
                detail: format!(
                    "{} ({})",
                    crate::redact::url(&config.ledger.url),
                    backend.as_str()
                ),
                disables,
            }
        }
        Err(e) => Check {
            name: "ledger",
            ok: false,
            detail: e.to_string(),
            disables,
        },
    }
}

fn model_check(dir: &Path) -> Check {
    let missing: Vec<&str> = MODEL_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    let size = std::fs::metadata(dir.join("model.bin")).map_or(0, |m| m.len());
    Check {
        name: "speech model",
        ok: missing.is_empty(),
        detail: if missing.is_empty() {
            format!("{} ({} MB)", dir.display(), size / 1_000_000)
        } else {
            format!("{}: missing {}", dir.display(), missing.join(", "))
        },
        disables: "the local engine's speech recognition (scripts/install-model)",
    }
}

/// The optional turn-end model: loaded and run once when configured.
fn turn_check(config: &Config) -> Check {
    let disables = "only the turn-end model: turns end after local.vad_hangover_ms of silence alone (scripts/install-turn-model)";
    let Some(turn) = LocalSettings::from_config(&config.local).turn else {
        return Check {
            name: "turn-end model",
            ok: true,
            detail: "off (local.turn_model is empty): turns end on silence alone".to_owned(),
            disables,
        };
    };
    let (ok, detail) = match turn.check() {
        Ok(took) => (
            true,
            format!(
                "{} with {} (one run: {} ms)",
                turn.model.display(),
                turn.library.display(),
                took.as_millis()
            ),
        ),
        Err(e) => (false, e),
    };
    Check {
        name: "turn-end model",
        ok,
        detail,
        disables,
    }
}

/// The optional list of words recognition never corrects.
fn word_list_check(config: &Config) -> Check {
    let disables = "only part of the word correction: without the list, only the knowledge base's own words are known to be right (apt-get install wspanish)";
    let local = &config.local;
    let detail = if !local.correct_words {
        "off (local.correct_words = false)".to_owned()
    } else if local.word_list.is_empty() {
        "none (local.word_list is empty): only the knowledge base's words are known".to_owned()
    } else {
        match std::fs::read_to_string(&local.word_list) {
            Ok(words) => format!("{} ({} words)", local.word_list, words.lines().count()),
            Err(e) => {
                return Check {
                    name: "word list",
                    ok: false,
                    detail: format!("{}: {e}", local.word_list),
                    disables,
                };
            }
        }
    };
    Check {
        name: "word list",
        ok: true,
        detail,
        disables,
    }
}

fn program_check(
    name: &'static str,
    program: &str,
    args: &[&str],
    disables: &'static str,
) -> Check {
    let output = Command::new(program).args(args).output();
    let (ok, detail) = match output {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            (
                true,
                text.lines().next().unwrap_or(program).trim().to_owned(),
            )
        }
        Ok(out) => (false, format!("{program} exited with {}", out.status)),
        Err(e) => (false, format!("{program}: {e}")),
    };
    Check {
        name,
        ok,
        detail,
        disables,
    }
}

fn knowledge_check(dir: &Path) -> Check {
    let (ok, detail) = match KnowledgeBase::load(dir) {
        Ok(kb) => (
            true,
            format!("{} ({} entries)", dir.display(), kb.entries().len()),
        ),
        Err(e) => (false, e.to_string()),
    };
    Check {
        name: "knowledge base",
        ok,
        detail,
        disables: "the local engine's answers",
    }
}

/// Credentials from the AWS SDK's default chain, as the engine gets them:
/// environment, profile (SSO, a process, a role to assume), web identity,
/// the container's or the instance's role.
async fn aws_check(region: &aws_config::Region) -> Check {
    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .region(region.clone())
        .build()
        .await;
    let found = tokio::time::timeout(CREDENTIALS_WAIT, chain.provide_credentials()).await;
    let (ok, detail) = match found {
        Ok(Ok(credentials)) => {
            let key = credentials.access_key_id();
            let shown = key.get(key.len().saturating_sub(4)..).unwrap_or("");
            let lifetime = if credentials.expiry().is_some() {
                "temporary"
            } else {
                "long-term"
            };
            (true, format!("found (access key …{shown}, {lifetime})"))
        }
        // The chain's error names the last source it tried and that
        // source's whole response; the sources are what helps.
        Ok(Err(_)) => (
            false,
            "none found (environment, profile, SSO, web identity, container or instance role)"
                .to_owned(),
        ),
        Err(_) => (
            false,
            format!("none found within {} s", CREDENTIALS_WAIT.as_secs()),
        ),
    };
    Check {
        name: "AWS credentials",
        ok,
        detail,
        disables: "only the nova-sonic engine (the local engine needs no account)",
    }
}
