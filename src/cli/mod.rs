//! The `sonora` command line: one subcommand per job, errors as one line.

mod bench;
mod decode;
mod doctor;
mod engines;
mod keys;
mod live;
mod nova;
mod probe;
mod serve;
mod talk;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, LoadOptions};
use crate::telemetry;
use crate::{server, tools};

/// Sonora, a real-time voice gateway.
#[derive(Debug, Parser)]
#[command(name = "sonora", version, about, max_term_width = 100)]
pub struct Cli {
    /// Configuration file (default: ./sonora.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one setting, e.g. `--set audio.uplink_queue_ms=3000`.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Log lines on stderr as `text` or `json` (setting `log.format`); `SONORA_LOG`
    /// filters them, e.g. `SONORA_LOG=debug`.
    #[arg(long, global = true, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the web UI and the conversation socket (open http://127.0.0.1:8080).
    Serve(serve::ServeArgs),
    /// Decode a recorded browser stream (WebM/Ogg Opus, PCM, WAV) to a 16 kHz mono WAV,
    /// feeding it through the streaming decoder piece by piece.
    Decode(decode::DecodeArgs),
    /// Hold a spoken conversation from the terminal (a WAV file in, replies to a WAV file).
    Talk(talk::TalkArgs),
    /// Report what is installed and what each missing piece disables.
    Doctor,
    /// Measure Sonora against baselines in one run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// What the ledger recorded: conversations, usage and cost, by day, key,
    /// model or conversation; `--check` verifies it.
    Usage(usage::UsageArgs),
    /// API keys: create (the secret is shown once), list, revoke.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (secrets redacted).
    Show,
    /// List every setting with its environment variable and default.
    Keys,
}

/// The checks of the sections whose rules belong to their owners: the
/// server's addresses, host names and origins, and the tools.
pub const SETTING_CHECKS: [config::Check; 2] = [server::check_settings, tools::check_settings];

/// A failure that decides the exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Bad configuration or usage: exit 64.
    Config(config::ConfigError),
    /// Anything else: exit 1.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

impl From<config::ConfigError> for Failure {
    fn from(e: config::ConfigError) -> Self {
        Self::Config(e)
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("sonora: configuration: {e}");
            ExitCode::from(config::EXIT_CODE as u8)
        }
        Err(Failure::Other(e)) => {
            // One line: the error and its causes, never a backtrace.
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("sonora: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// Runs the command, then flushes the span export.
fn run(cli: Cli) -> Result<(), Failure> {
    let mut telemetry = None;
    let result = dispatch(cli, &mut telemetry);
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    result
}

fn dispatch(cli: Cli, telemetry: &mut Option<telemetry::Telemetry>) -> Result<(), Failure> {
    // The gateway logs what it does; other commands' own output is what the
    // user reads, so they log only warnings unless `SONORA_LOG` says more.
    let default_filter = match cli.command {
        Command::Serve(_) => telemetry::SERVER_FILTER,
        _ => telemetry::COMMAND_FILTER,
    };
    let mut overrides = cli
        .set
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                .ok_or_else(|| config::ConfigError::Invalid {
                    key: kv.clone(),
                    value: String::new(),
                    origin: Some("--set".into()),
                    reason: "expected KEY=VALUE".into(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(format) = &cli.log_format {
        overrides.push(("log.format".to_owned(), format.clone()));
    }
    // Loads the configuration and, the first time, starts logging with it.
    let mut load = |extra: Vec<(String, String)>| -> Result<Config, Failure> {
        let mut all = overrides.clone();
        all.extend(extra);
        let env: Vec<(String, String)> = std::env::vars().collect();
        let options = LoadOptions {
            file: cli.config.clone(),
            default_file: PathBuf::from("sonora.toml"),
            env: env.clone(),
            overrides: all,
        };
        let config = config::load(&options, &SETTING_CHECKS)?;
        if telemetry.is_none() {
            *telemetry = Some(telemetry::init(&config, &env, default_filter)?);
        }
        Ok(config)
    };
    match cli.command {
        Command::Serve(args) => serve::run(&load(args.overrides())?, &args),
        Command::Decode(args) => decode::run(&load(Vec::new())?, &args),
        Command::Talk(args) => talk::run(&load(args.overrides())?, &args),
        Command::Doctor => doctor::run(&load(Vec::new())?),
        Command::Usage(args) => usage::run(&load(args.overrides())?, &args),
        Command::Keys(command) => keys::run(&load(command.overrides())?, &command),
        Command::Bench(command) => bench::run(&load(Vec::new())?, command),
        Command::Config(ConfigCommand::Show) => {
            println!("{}", load(Vec::new())?.to_redacted_toml().trim_end());
            Ok(())
        }
        Command::Config(ConfigCommand::Keys) => {
            for (key, default) in config::keys() {
                println!("{key}\t{}\t{default}", config::env_name(&key));
            }
            Ok(())
        }
    }
}
