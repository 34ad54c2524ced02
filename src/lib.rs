//! Sonora: a real-time voice gateway.
//!
//! Layout (see `docs/architecture.md`):
//! - [`config`]: typed configuration from defaults, a TOML file, `SONORA_*` variables and flags.
//! - [`audio`]: `StreamDecoder` (sniff, WebM/Ogg demux, Opus decode, PCM resampling), WAV files.
//! - [`engine`]: the `Engine` trait, `EngineInput` / `EngineEvent`, and the engines.
//! - [`usage`]: usage deltas per modality and direction, cost in micro-dollars.
//! - [`cli`]: the `sonora` subcommands (`decode`, `bench`, `config`).
//!
//! Planned beside them: `session` (one conversation), `store` (the ledger)
//! and `server` (the web gateway).

pub mod audio;
pub mod cli;
pub mod config;
pub mod engine;
pub mod usage;
