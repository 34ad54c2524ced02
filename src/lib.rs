//! Sonora: a real-time voice gateway.
//!
//! Layout (see `docs/architecture.md`):
//! - [`config`]: typed configuration from defaults, a TOML file, `SONORA_*` variables and flags.
//! - [`audio`]: `StreamDecoder` (sniff, WebM/Ogg demux, Opus decode, PCM resampling), WAV files.
//! - [`cli`]: the `sonora` subcommands (`decode`, `bench`, `config`).
//!
//! Planned beside them: `engine` (the `Engine` trait and its local and Nova
//! Sonic engines), `session` (one conversation), `usage` (cost), `store` (the
//! ledger) and `server` (the web gateway).

pub mod audio;
pub mod cli;
pub mod config;
