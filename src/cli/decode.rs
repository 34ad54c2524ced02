//! `sonora decode`: replay a recorded stream through the streaming decoder.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::Args;

use super::Failure;
use crate::audio::{self, DecoderLimits, ENGINE_RATE_HZ, StreamDecoder};
use crate::config::Config;

#[derive(Debug, Args)]
pub(crate) struct DecodeArgs {
    /// Recorded stream: .webm, .ogg/.opus, .wav, or raw s16le PCM with --mime.
    input: PathBuf,
    /// MIME type of the input, e.g. `audio/webm;codecs=opus` or `audio/pcm;rate=48000`
    /// (default: from the file name, else detected from the bytes).
    #[arg(long)]
    mime: Option<String>,
    /// JSON array of byte lengths to split the input at, as a browser delivered it
    /// (default: 4 KB pieces).
    #[arg(long, value_name = "CHUNKS.json")]
    chunks: Option<PathBuf>,
    /// Where to write the decoded 16 kHz mono 16-bit WAV.
    #[arg(long, value_name = "OUT.wav")]
    out: PathBuf,
}

/// A stream ready to replay: its bytes, their MIME type and the split points.
#[derive(Debug)]
pub(crate) struct Recording {
    pub(crate) mime: String,
    pub(crate) bytes: Vec<u8>,
    pub(crate) chunk_lengths: Vec<usize>,
}

impl Recording {
    /// Loads `input`; WAV files are turned into a PCM stream of their rate.
    pub(crate) fn load(
        input: &Path,
        mime: Option<&str>,
        chunks: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let is_wav = mime.is_none() && has_extension(input, &["wav"]);
        let (mime, bytes) = if is_wav {
            let wav = audio::wav::read(input).map_err(|e| anyhow!(e))?;
            let mime = format!("audio/pcm;rate={};channels={}", wav.rate_hz, wav.channels);
            (mime, wav.to_le_bytes())
        } else {
            let bytes =
                std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
            (
                mime.map_or_else(|| mime_from_name(input), str::to_owned),
                bytes,
            )
        };
        let chunk_lengths = match chunks {
            Some(path) => {
                if is_wav {
                    bail!("--chunks applies to the file's bytes; not usable with a WAV input");
                }
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let lengths: Vec<usize> = serde_json::from_str(&text).with_context(|| {
                    format!("{}: expected a JSON array of byte lengths", path.display())
                })?;
                let total = lengths.iter().try_fold(0usize, |t, &n| t.checked_add(n));
                if total != Some(bytes.len()) {
                    bail!(
                        "{}: chunk lengths add up to {} bytes, the input has {}",
                        path.display(),
                        total.map_or_else(|| "more than 2^64".to_owned(), |t| t.to_string()),
                        bytes.len()
                    );
                }
                lengths
            }
            None => {
                let mut lengths = vec![4096; bytes.len() / 4096];
                if bytes.len() % 4096 != 0 {
                    lengths.push(bytes.len() % 4096);
                }
                lengths
            }
        };
        Ok(Self {
            mime,
            bytes,
            chunk_lengths,
        })
    }

    pub(crate) fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.bytes[..];
        self.chunk_lengths.iter().map(move |&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        })
    }
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn mime_from_name(path: &Path) -> String {
    if has_extension(path, &["webm", "mkv", "mka"]) {
        "audio/webm".into()
    } else if has_extension(path, &["ogg", "opus", "oga"]) {
        "audio/ogg".into()
    } else if has_extension(path, &["pcm", "raw", "s16le"]) {
        "audio/pcm;rate=16000".into()
    } else {
        String::new()
    }
}

pub(crate) fn limits(config: &Config) -> DecoderLimits {
    DecoderLimits {
        input_cap_bytes: config.audio.decoder_input_cap_bytes,
        max_block_bytes: config.audio.max_block_bytes,
        // A file is decoded as fast as the machine goes.
        realtime: None,
    }
}

pub(crate) fn run(config: &Config, args: &DecodeArgs) -> Result<(), Failure> {
    let recording = Recording::load(&args.input, args.mime.as_deref(), args.chunks.as_deref())?;
    let mut decoder = StreamDecoder::for_mime(&recording.mime, limits(config))
        .map_err(|e| anyhow!("{}: {e}", args.input.display()))?;
    let mut pcm = Vec::new();
    let mut outcome = Ok(());
    for chunk in recording.chunks() {
        if let Err(e) = decoder.push(chunk, &mut pcm) {
            outcome = Err(e);
            break;
        }
    }
    if outcome.is_ok() {
        outcome = decoder.finish(&mut pcm);
    }
    audio::wav::write_mono(&args.out, ENGINE_RATE_HZ, &pcm).map_err(|e| anyhow!(e))?;
    let stats = serde_json::to_string(decoder.stats()).context("cannot print the stats")?;
    println!("{stats}");
    outcome.map_err(|e| anyhow!("{}: {e}", args.input.display()).into())
}
