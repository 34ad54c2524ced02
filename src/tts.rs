//! Speech synthesis with eSpeak NG (the local engine's voice, a phone
//! call's greeting and farewell), run as a separate program (it is GPL;
//! Sonora does not link it). Audio streams out as it is produced, resampled
//! to the transport rate, in short frames.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::audio::StreamResampler;

/// Frame length of reply audio handed on, in milliseconds.
pub const FRAME_MS: u32 = 40;

/// Synthesis settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtsConfig {
    pub program: PathBuf,
    /// Voice for each language when none is chosen (`es` → `es`, else `en-us`).
    pub voice: String,
    pub rate_wpm: u32,
    pub output_rate_hz: u32,
}

impl Default for TtsConfig {
    fn default() -> Self {
        Self {
            program: PathBuf::from("espeak-ng"),
            voice: String::new(),
            rate_wpm: 160,
            output_rate_hz: 24_000,
        }
    }
}

/// The eSpeak NG voice for a conversation: the configured or requested one,
/// else one matching the language.
pub fn voice_for(configured: &str, requested: &str, language: &str) -> String {
    let chosen = if requested.is_empty() {
        configured
    } else {
        requested
    };
    if !chosen.is_empty() {
        return chosen.to_owned();
    }
    let lower = language.to_ascii_lowercase();
    match lower.split(['-', '_']).next().unwrap_or("") {
        "es" if lower.len() > 2 && lower != "es-es" => "es-419".into(),
        "es" => "es".into(),
        "en" if lower == "en-gb" => "en-gb".into(),
        "en" | "" => "en-us".into(),
        other => other.to_owned(),
    }
}

/// Speaks `text` with `voice`, sending each frame of audio at
/// `output_rate_hz` to `frames` as soon as it exists. Returns the samples
/// produced; stops early (killing the synthesiser) when `frames` closes.
pub async fn speak(
    config: &TtsConfig,
    voice: &str,
    text: &str,
    frames: &mpsc::Sender<Vec<i16>>,
) -> Result<u64, String> {
    let mut child = Command::new(&config.program)
        .args(["-v", voice, "-s", &config.rate_wpm.to_string(), "--stdout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Warnings on stderr could fill a pipe nobody reads and stall it.
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (install espeak-ng)",
                config.program.display()
            )
        })?;
    let mut stdin = child.stdin.take().ok_or("espeak-ng stdin unavailable")?;
    let mut stdout = child.stdout.take().ok_or("espeak-ng stdout unavailable")?;
    // Text goes through stdin, never the command line.
    let text = text.to_owned();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(text.as_bytes()).await;
        let _ = stdin.write_all(b"\n").await;
    });

    // Bytes not yet turned into samples: the WAV header until it is parsed,
    // then at most half a sample.
    let mut raw: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8192];
    let mut resampler: Option<StreamResampler> = None;
    let mut mono: Vec<i16> = Vec::new();
    let mut pending: Vec<i16> = Vec::new();
    let mut produced = 0u64;
    let frame_samples = (config.output_rate_hz * FRAME_MS / 1000) as usize;
    loop {
        let n = stdout
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading espeak-ng output: {e}"))?;
        let end = n == 0;
        raw.extend_from_slice(&buf[..n]);
        let resampler = match resampler.as_mut() {
            Some(r) => r,
            None => {
                let Some((rate, offset)) = wav_data_start(&raw) else {
                    if end {
                        return Err(format!("espeak-ng produced no audio for voice {voice:?}"));
                    }
                    continue;
                };
                raw.drain(..offset);
                resampler.insert(StreamResampler::new(rate, config.output_rate_hz)?)
            }
        };
        let whole = raw.len() / 2 * 2;
        mono.clear();
        mono.extend(crate::audio::samples_from_le(&raw[..whole]));
        raw.drain(..whole);
        resampler.push(&mono, &mut pending);
        if end {
            resampler.finish(&mut pending);
        }
        while pending.len() >= frame_samples || (end && !pending.is_empty()) {
            let take = frame_samples.min(pending.len());
            let out: Vec<i16> = pending.drain(..take).collect();
            produced += out.len() as u64;
            if frames.send(out).await.is_err() {
                return Ok(produced);
            }
        }
        if end {
            break;
        }
    }
    let _ = writer.await;
    let status = child.wait().await.map_err(|e| format!("espeak-ng: {e}"))?;
    if !status.success() {
        return Err(format!("espeak-ng failed ({status}) for voice {voice:?}"));
    }
    Ok(produced)
}

/// Finds the sample rate and the start of the samples in a streamed WAV
/// header (eSpeak writes placeholder sizes when streaming).
fn wav_data_start(header: &[u8]) -> Option<(u32, usize)> {
    if header.len() < 12 || &header[..4] != b"RIFF" || &header[8..12] != b"WAVE" {
        return None;
    }
    let mut pos = 12;
    let mut rate = None;
    while pos + 8 <= header.len() {
        let id = &header[pos..pos + 4];
        let size = u32::from_le_bytes([
            header[pos + 4],
            header[pos + 5],
            header[pos + 6],
            header[pos + 7],
        ]) as usize;
        if id == b"data" {
            return rate.map(|r| (r, pos + 8));
        }
        if id == b"fmt " && pos + 16 <= header.len() {
            rate = Some(u32::from_le_bytes([
                header[pos + 12],
                header[pos + 13],
                header[pos + 14],
                header[pos + 15],
            ]));
        }
        pos += 8 + size + (size & 1);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voices_follow_the_language() {
        assert_eq!(voice_for("", "", "es"), "es");
        assert_eq!(voice_for("", "", "es-MX"), "es-419");
        assert_eq!(voice_for("", "", "en"), "en-us");
        assert_eq!(voice_for("es-419", "", "en"), "es-419");
        assert_eq!(voice_for("es", "en-gb", "es"), "en-gb");
    }

    #[test]
    fn wav_header_is_found_in_pieces() {
        let mut h = b"RIFF\xff\xff\xff\x7fWAVEfmt \x10\0\0\0\x01\0\x01\0\x22\x56\0\0\x44\xac\0\0\x02\0\x10\0data\xff\xff\xff\x7f".to_vec();
        assert_eq!(wav_data_start(&h), Some((22_050, 44)));
        h.truncate(40);
        assert_eq!(wav_data_start(&h), None);
    }
}
