//! Sonora: a real-time voice gateway.
//!
//! Layout (see `docs/architecture.md`):
//! - [`config`]: typed configuration from defaults, a TOML file, `SONORA_*` variables and flags.
//! - [`audio`]: `StreamDecoder` (sniff, WebM/Ogg demux, Opus decode, PCM resampling), WAV files.
//! - [`engine`]: the `Engine` trait, `EngineInput` / `EngineEvent`, and the engines.
//! - [`knowledge`]: the FAQ knowledge base (Markdown files, BM25 retrieval, answer policy).
//! - [`tools`]: the tools an engine offers its model: knowledge search, date and time, HTTP calls.
//! - [`session`]: one conversation: client ⇄ decoder ⇄ engine, bounded queues, barge-in, watchdogs.
//! - [`usage`]: usage deltas, token counts, price tables, cost in integer micro-dollars.
//! - [`server`]: the web gateway: embedded UI, `/ws` conversations, health, readiness, metrics.
//! - `names`: `named_enum!`, enums with stable names (`ALL`, `as_str`, serde) from one list.
//! - [`redact`]: URLs without credentials or query strings, for clients, logs and `config show`.
//! - [`telemetry`]: log lines, connection/conversation/turn spans, OTLP export of the turns.
//! - [`ledger`]: the durable record of conversations, usage, API keys and budgets (SQLite or PostgreSQL).
//! - [`tts`]: speech synthesis with eSpeak NG (the local engine's voice, a call's greeting).
//! - `base64`: standard base64, for audio inside JSON (Nova Sonic's events, Twilio's media).
//! - [`cli`]: the `sonora` subcommands (`serve`, `talk`, `decode`, `bench`, `doctor`, `usage`,
//!   `keys`, `config`).
//!
//! Dependencies run one way, from `redact`/`usage` and `config` at the bottom up to `cli`
//! (`tests/layers.rs` checks it).

pub mod audio;
mod base64;
pub mod cli;
pub mod config;
pub mod engine;
pub mod knowledge;
pub mod ledger;
mod names;
pub mod redact;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tools;
pub mod tts;
pub mod usage;
