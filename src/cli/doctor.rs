//! `sonora doctor`: what is installed, and what each missing piece disables.

use std::path::Path;
use std::process::Command;

use super::Failure;
use crate::config::Config;
use crate::engine::local::MODEL_FILES;
use crate::knowledge::KnowledgeBase;

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    /// What does not work while this is missing.
    disables: &'static str,
}

pub(crate) fn run(config: &Config) -> Result<(), Failure> {
    let local = &config.local;
    let checks = [
        model_check(Path::new(&local.model_dir)),
        program_check(
            "speech synthesis",
            &local.tts_program,
            &["--version"],
            "the local engine's spoken replies (apt-get install espeak-ng)",
        ),
        knowledge_check(Path::new(&local.knowledge_dir)),
        program_check(
            "ffmpeg",
            "ffmpeg",
            &["-hide_banner", "-version"],
            "only the baseline of `sonora bench decode` (apt-get install ffmpeg)",
        ),
        aws_check(),
    ];
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for check in &checks {
        let mark = if check.ok { "ok     " } else { "MISSING" };
        println!("{mark} {:<width$}  {}", check.name, check.detail);
        if !check.ok {
            println!("        {:<width$}  disables: {}", "", check.disables);
        }
    }
    let local_ready = checks[..3].iter().all(|c| c.ok);
    println!(
        "local engine: {}",
        if local_ready {
            "ready"
        } else {
            "not ready (see above; scripts/setup installs everything)"
        }
    );
    if local_ready {
        Ok(())
    } else {
        Err(anyhow::anyhow!("the local engine is missing parts").into())
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

fn aws_check() -> Check {
    let env = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let files = home
        .is_some_and(|h| h.join(".aws/credentials").is_file() || h.join(".aws/config").is_file());
    let source = if env("AWS_ACCESS_KEY_ID") && env("AWS_SECRET_ACCESS_KEY") {
        Some("environment variables")
    } else if env("AWS_PROFILE") || files {
        Some("~/.aws profile")
    } else if env("AWS_WEB_IDENTITY_TOKEN_FILE") || env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        Some("web identity / container role")
    } else {
        None
    };
    Check {
        name: "AWS credentials",
        ok: source.is_some(),
        detail: source.map_or_else(|| "none found".to_owned(), |s| format!("found ({s})")),
        disables: "only the nova-sonic engine (the local engine needs no account)",
    }
}
