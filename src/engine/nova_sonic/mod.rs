//! Amazon Nova Sonic (Bedrock bidirectional streaming): the protocol layer.
//!
//! [`input`] builds every input event with serde types, [`output`] parses
//! every output event, and [`translate`] turns output events into `EngineEvent`s
//! (turns, transcripts by stage, audio, one barge-in per turn, tool calls,
//! usage through `usage::UsageMeter`). The stream itself (the AWS SDK call,
//! rotation, retries and tools) builds on these. Nova Sonic's types never
//! leave this module.

pub mod base64;
pub mod input;
pub mod output;
pub mod translate;

#[cfg(test)]
mod tests;
