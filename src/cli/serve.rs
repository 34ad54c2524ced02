//! `sonora serve`: the web gateway on the configured engine.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::Args;
use tokio::net::TcpListener;

use super::{Failure, engines};
use crate::config::Config;
use crate::engine::Engine;
use crate::engine::pool::{InstanceSpec, Pool};
use crate::engine::scripted::ScriptedEngine;
use crate::server::Server;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (setting `listen`, SONORA_LISTEN); port 0 picks a free one.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Engine: `local` (offline, the default), `nova-sonic`, `openai-realtime` or `gemini-live`.
    #[arg(long)]
    engine: Option<String>,
    /// Knowledge base directory (Markdown FAQ files): the local engine's
    /// answers and Nova Sonic's search tool.
    #[arg(long, value_name = "DIR")]
    knowledge: Option<std::path::PathBuf>,
    /// Default reply voice (setting `engine.voice`).
    #[arg(long)]
    voice: Option<String>,
    /// The ledger's database: sqlite://PATH, postgres://… or off (setting
    /// `ledger.url`, SONORA_LEDGER_URL).
    #[arg(long, value_name = "URL")]
    ledger: Option<String>,
    #[command(flatten)]
    nova: super::nova::NovaFlags,
    /// Serve beyond the loopback with no authentication (no
    /// `server.auth_tokens`, `server.auth` not `keys`): anyone who reaches
    /// the port spends what the engine costs. Refused without this flag.
    #[arg(long)]
    allow_anonymous: bool,
    /// Load tests only: answer every TURN_MS of audio with REPLY_MS of tone.
    #[arg(long, hide = true, value_name = "TURN_MS:REPLY_MS")]
    scripted_echo: Option<String>,
    /// Load tests only: route over this many echo engines (0: one, no
    /// routing).
    #[arg(long, hide = true, default_value_t = 0)]
    scripted_echo_instances: usize,
}

impl ServeArgs {
    pub(crate) fn overrides(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(listen) = &self.listen {
            out.push(("listen".into(), listen.clone()));
        }
        if let Some(engine) = &self.engine {
            out.push(("engine.kind".into(), engine.clone()));
        }
        if let Some(dir) = &self.knowledge {
            out.push(("local.knowledge_dir".into(), dir.display().to_string()));
        }
        if let Some(voice) = &self.voice {
            out.push(("engine.voice".into(), voice.clone()));
        }
        if let Some(url) = &self.ledger {
            out.push(("ledger.url".into(), url.clone()));
        }
        out.extend(self.nova.overrides());
        out
    }
}

pub(crate) fn run(config: &Config, args: &ServeArgs) -> Result<(), Failure> {
    let echo = match &args.scripted_echo {
        Some(spec) => {
            let (turn_ms, reply_ms) = parse_echo(spec)?;
            Some((turn_ms, reply_ms, args.scripted_echo_instances))
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, echo, args.allow_anonymous))?;
    Ok(())
}

fn parse_echo(spec: &str) -> anyhow::Result<(u64, u64)> {
    let (turn, reply) = spec
        .split_once(':')
        .ok_or_else(|| anyhow!("--scripted-echo takes TURN_MS:REPLY_MS, not {spec:?}"))?;
    Ok((
        turn.parse().context("TURN_MS")?,
        reply.parse().context("REPLY_MS")?,
    ))
}

async fn serve(
    config: &Config,
    echo: Option<(u64, u64, usize)>,
    allow_anonymous: bool,
) -> anyhow::Result<()> {
    let address = config.listen_addr();
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let bound = listener.local_addr().context("no local address")?;
    let metrics_listener = match config.server.metrics_listen.as_str() {
        "" => None,
        address => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} (server.metrics_listen)"))?,
        ),
    };
    let server = Server::new(config);
    if config.ledger.enabled() {
        let ledger = crate::ledger::Ledger::open(&config.ledger).await?;
        eprintln!(
            "sonora: ledger {} ({}, gateway {})",
            ledger.shown_url(),
            ledger.backend().as_str(),
            ledger.gateway()
        );
        server.set_ledger(ledger).map_err(|e| anyhow!(e))?;
    }
    // The first stdout line says where to connect (scripts read it).
    println!("listening on http://{bound}");
    if let Some(metrics) = &metrics_listener {
        let at = metrics.local_addr().context("no local address")?;
        eprintln!("sonora: /metrics on http://{at}/metrics only");
    }
    if let Some(warning) = exposure_warning(bound, config) {
        if !allow_anonymous {
            return Err(anyhow!(
                "listening on {bound}, beyond this machine, with no authentication: set \
                 server.auth = \"keys\" (API keys) or server.auth_tokens, listen on 127.0.0.1 \
                 behind a proxy, or pass --allow-anonymous to serve anyone who reaches the port"
            ));
        }
        eprint!("{warning}");
    }
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel::<String>(1);
    match echo {
        Some((turn_ms, reply_ms, 0)) => {
            let engine: Arc<dyn Engine> = Arc::new(ScriptedEngine::echo_turns(turn_ms, reply_ms));
            server.set_engine(engine).map_err(|e| anyhow!(e))?;
        }
        Some((turn_ms, reply_ms, instances)) => {
            let specs = (0..instances)
                .map(|i| InstanceSpec {
                    name: format!("echo-{i}"),
                    engine: Arc::new(ScriptedEngine::echo_turns(turn_ms, reply_ms)),
                    max_concurrent: 0,
                    priority: 0,
                })
                .collect();
            let pool = Pool::new(specs, engines::pool_settings(config));
            server.set_pool(pool).map_err(|e| anyhow!(e))?;
        }
        None if !engines::loads_models(config) => {
            let (pool, about) = engines::load_pool(config).await?;
            server.set_pool(pool).map_err(|e| anyhow!(e))?;
            eprintln!("sonora: ready — open http://{bound} ({about})");
        }
        None => {
            // The page is served while the speech model loads.
            let (loading, config) = (server.clone(), config.clone());
            eprintln!("sonora: loading the local engine…");
            tokio::spawn(async move {
                match engines::load_pool(&config).await {
                    Ok((pool, about)) => {
                        eprintln!("sonora: ready — open http://{bound} ({about})");
                        let _ = loading.set_pool(pool);
                    }
                    Err(e) => {
                        let _ = failed_tx.try_send(format!("{e:#}"));
                    }
                }
            });
        }
    }
    let failure = Arc::new(std::sync::OnceLock::<String>::new());
    let failed = Arc::clone(&failure);
    let stop = async move {
        tokio::select! {
            () = terminate() => eprintln!("sonora: shutting down; letting conversations finish"),
            Some(message) = failed_rx.recv() => {
                let _ = failed.set(message);
            }
        }
    };
    server
        .serve_with_metrics(listener, metrics_listener, stop)
        .await
        .context("serving")?;
    match failure.get() {
        Some(message) => Err(anyhow!("the local engine could not load: {message}")),
        None => {
            eprintln!("sonora: stopped");
            Ok(())
        }
    }
}

/// A warning for a server reachable beyond this machine without tokens:
/// what anyone who can reach it can do, and what to set.
fn exposure_warning(bound: std::net::SocketAddr, config: &Config) -> Option<String> {
    let server = &config.server;
    if bound.ip().is_loopback() || !server.auth_tokens.is_empty() || server.auth == "keys" {
        return None;
    }
    let hosts = if server.allowed_hosts.is_empty() {
        let answered = if bound.ip().is_unspecified() {
            "localhost, 127.0.0.1 or [::1]".to_owned()
        } else {
            format!("{bound}, localhost, 127.0.0.1 or [::1]")
        };
        format!(
            "server.allowed_hosts is empty: browsers get 421 unless they ask for {answered};\n\
             sonora: !!   list the names clients use, e.g. server.allowed_hosts = [\"voz.example.edu\"]"
        )
    } else {
        format!(
            "keep server.allowed_hosts to the names clients use (now {})",
            server.allowed_hosts.join(", ")
        )
    };
    let metrics = if server.metrics_listen.is_empty() {
        "/metrics is served here too: set server.metrics_listen to a private address"
    } else {
        "/metrics is on server.metrics_listen"
    };
    let rule = "sonora: !! ".to_owned() + &"=".repeat(66);
    Some(format!(
        "{rule}\n\
         sonora: !! WARNING: listening on {bound}, beyond this machine, with no authentication.\n\
         sonora: !! Anyone who can reach this port can start conversations on the engine (and\n\
         sonora: !!   spend what it costs), read /api/engine and use the web page.\n\
         sonora: !! {metrics}.\n\
         sonora: !! To close it:\n\
         sonora: !!   set server.auth = \"keys\" (API keys and one-time client tokens) or\n\
         sonora: !!   server.auth_tokens (SONORA_SERVER_AUTH_TOKENS=one,two); clients send one in hello\n\
         sonora: !!   {hosts}\n\
         sonora: !!   put it behind an HTTPS proxy and list the proxy in server.trusted_proxies\n\
         sonora: !!   (or listen on 127.0.0.1 and let only the proxy reach it)\n\
         {rule}\n"
    ))
}

/// SIGINT or SIGTERM.
async fn terminate() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_open_address_without_tokens_is_warned_about() {
        let config = Config::default();
        let loopback = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(exposure_warning(loopback, &config), None);
        let open = "0.0.0.0:8080".parse().unwrap();
        let warning = exposure_warning(open, &config).unwrap();
        assert!(warning.lines().count() >= 8, "{warning}");
        assert!(
            warning.lines().all(|l| l.starts_with("sonora: ")),
            "{warning}"
        );
        for words in [
            "no authentication",
            "server.auth_tokens",
            "server.allowed_hosts",
            "server.trusted_proxies",
            "server.metrics_listen",
        ] {
            assert!(warning.contains(words), "{words}: {warning}");
        }
        let mut with_tokens = Config::default();
        with_tokens.server.auth_tokens = vec!["t".into()];
        assert_eq!(exposure_warning(open, &with_tokens), None);
    }
}
