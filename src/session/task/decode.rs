//! The conversation's decoding of client audio: pushing chunks into the
//! decoder (on the blocking pool unless a small raw PCM chunk) and turning
//! the result into queued PCM, warnings or an ending.

use bytes::Bytes;
use tokio::time::Instant;

use super::{BLOCKING_PCM_BYTES, Ending, State};
use crate::audio::{AudioFormat, DecodeError};
use crate::session::{CloseReason, Warning};

impl State {
    pub(super) async fn on_audio(&mut self, bytes: Bytes, now: Instant) -> Option<Ending> {
        if self.decoder.is_none() {
            self.counters.add_chunk_refused();
            let message = format!(
                "audio chunk of {} bytes refused: this conversation takes only PCM",
                bytes.len()
            );
            return self.warn(Warning::ChunkRefused, message, now);
        }
        if bytes.is_empty() {
            return None;
        }
        let chunk_bytes = bytes.len() as u64;
        let mut pcm = std::mem::take(&mut self.pcm);
        let result = match self.decode(bytes, &mut pcm).await {
            Ok(result) => result,
            Err(ending) => return ending,
        };
        if let Some(decoder) = &self.decoder {
            self.counters.set_decoder(decoder.stats());
        }
        let produced = !pcm.is_empty();
        // PCM decoded before a fatal error still counts, as the stream's end.
        let ending = self.accept_pcm(&pcm, now);
        pcm.clear();
        self.pcm = pcm;
        if ending.is_some() {
            return ending;
        }
        match result {
            Ok(()) => {
                if !produced {
                    let proven = self
                        .decoder
                        .as_ref()
                        .is_some_and(|d| d.stats().pcm_samples_out > 0);
                    self.watchdog.starving(now, chunk_bytes, proven);
                }
                None
            }
            Err(e @ DecodeError::ChunkRefused { .. }) => {
                self.counters.add_chunk_refused();
                self.warn(Warning::ChunkRefused, e.to_string(), now)
            }
            Err(e) => Ending::new(CloseReason::BadAudio, e.to_string()),
        }
    }

    /// Pushes one chunk into the decoder, on a blocking thread when it is
    /// big. The outer error ends the conversation (the decoder panicked).
    async fn decode(
        &mut self,
        bytes: Bytes,
        pcm: &mut Vec<i16>,
    ) -> Result<Result<(), DecodeError>, Option<Ending>> {
        // The decoder is pushed in place here: moving it out and back in
        // copied the whole struct for every frame.
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(Ok(()));
        };
        let raw_pcm = matches!(decoder.declared(), Some(AudioFormat::Pcm16 { .. }));
        if raw_pcm && bytes.len() < BLOCKING_PCM_BYTES {
            return Ok(decoder.push(&bytes, pcm));
        }
        let Some(mut decoder) = self.decoder.take() else {
            return Ok(Ok(()));
        };
        let mut out = std::mem::take(pcm);
        let job = tokio::task::spawn_blocking(move || {
            let result = decoder.push(&bytes, &mut out);
            (decoder, out, result)
        });
        match job.await {
            Ok((decoder, out, result)) => {
                self.decoder = Some(decoder);
                *pcm = out;
                Ok(result)
            }
            Err(e) => Err(Ending::new(
                CloseReason::BadAudio,
                format!("the audio decoder failed: {e}"),
            )),
        }
    }
}
