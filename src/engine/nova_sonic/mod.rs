//! Amazon Nova Sonic (Bedrock bidirectional streaming): the protocol layer.
//!
//! [`events`] builds every input event with serde types and parses every
//! output event; [`translate`] turns output events into `EngineEvent`s
//! (turns, transcripts by stage, audio, one barge-in per turn, tool calls,
//! usage through `usage::UsageMeter`). The stream itself (the AWS SDK call,
//! rotation, retries and tools) builds on these. Nova Sonic's types never
//! leave this module.

pub mod events;
pub mod translate;

#[cfg(test)]
mod tests;
