//! What a stream claims to be (its MIME type) and what its first bytes say.

use super::DecodeError;

/// The PCM rates a live stream may declare: those capture devices really
/// use. Any other rate would only build an odd, large resampler.
pub const PCM_RATES_HZ: [u32; 9] = [
    8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000,
];

/// [`PCM_RATES_HZ`] for messages: `8000, 11025, …`.
pub fn pcm_rates_list() -> String {
    PCM_RATES_HZ.map(|r| r.to_string()).join(", ")
}

/// A stream format the decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    /// WebM/Matroska with one Opus audio track (Chrome's MediaRecorder).
    Webm,
    /// Ogg with an Opus stream (Firefox's MediaRecorder).
    Ogg,
    /// Raw signed 16-bit little-endian PCM, interleaved if `channels > 1`.
    Pcm16 { rate_hz: u32, channels: u16 },
}

impl AudioFormat {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Webm => "webm",
            Self::Ogg => "ogg",
            Self::Pcm16 { .. } => "pcm16",
        }
    }

    /// Parses a MIME type such as `audio/webm;codecs=opus`,
    /// `audio/ogg; codecs="opus"` or `audio/pcm;rate=48000;channels=2`.
    /// `Ok(None)` (for an empty string) means "detect from the bytes".
    pub fn from_mime(mime: &str) -> Result<Option<Self>, DecodeError> {
        let mut parts = mime.split(';');
        let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut codecs = None;
        let mut rate_hz = 16_000;
        let mut channels = 1;
        for param in parts {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"').to_ascii_lowercase();
            match key.trim().to_ascii_lowercase().as_str() {
                "codecs" => codecs = Some(value),
                "rate" => {
                    rate_hz = value.parse().map_err(|_| {
                        DecodeError::Unsupported(format!("{mime}: rate {value:?} is not a number"))
                    })?;
                }
                "channels" => {
                    channels = value.parse().map_err(|_| {
                        DecodeError::Unsupported(format!(
                            "{mime}: channels {value:?} is not a number"
                        ))
                    })?;
                }
                _ => {}
            }
        }
        let opus_only = |container: Self| match codecs.as_deref() {
            None | Some("opus") => Ok(Some(container)),
            Some(other) => Err(DecodeError::Unsupported(format!(
                "{essence} with codec {other} (only Opus is supported)"
            ))),
        };
        match essence.as_str() {
            "" => Ok(None),
            "audio/webm" | "video/webm" | "audio/x-matroska" | "video/x-matroska" => {
                opus_only(Self::Webm)
            }
            "audio/ogg" | "application/ogg" | "audio/opus" => opus_only(Self::Ogg),
            "audio/pcm" | "audio/x-pcm" | "audio/s16le" | "pcm16" => {
                if !PCM_RATES_HZ.contains(&rate_hz) {
                    return Err(DecodeError::Unsupported(format!(
                        "PCM at {rate_hz} Hz (supported: the rates capture devices use, {} Hz)",
                        pcm_rates_list()
                    )));
                }
                if !(1..=8).contains(&channels) {
                    return Err(DecodeError::Unsupported(format!(
                        "PCM with {channels} channels (supported: 1..=8)"
                    )));
                }
                Ok(Some(Self::Pcm16 { rate_hz, channels }))
            }
            other => Err(DecodeError::Unsupported(format!(
                "{other} (supported: audio/webm or audio/ogg with Opus, audio/pcm)"
            ))),
        }
    }
}

/// What the first bytes of a stream look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Magic {
    Webm,
    Ogg,
    Mp4,
    Wav,
    Flac,
    Mp3,
    Adts,
    Other,
}

/// Bytes needed to tell every format in [`Magic`] apart.
pub(crate) const SNIFF_BYTES: usize = 12;

impl Magic {
    pub(crate) fn of(head: &[u8]) -> Self {
        let at =
            |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
        if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
            Self::Webm
        } else if at(0, b"OggS") {
            Self::Ogg
        } else if at(4, b"ftyp") || at(4, b"moov") || at(4, b"moof") || at(4, b"styp") {
            Self::Mp4
        } else if at(0, b"RIFF") && at(8, b"WAVE") {
            Self::Wav
        } else if at(0, b"fLaC") {
            Self::Flac
        } else if at(0, b"ID3") {
            Self::Mp3
        } else if let [0xFF, second, ..] = head {
            match second {
                s if s & 0xF6 == 0xF0 => Self::Adts,
                s if s & 0xE0 == 0xE0 && s & 0x06 != 0 => Self::Mp3,
                _ => Self::Other,
            }
        } else {
            Self::Other
        }
    }

    pub(crate) fn describe(self, head: &[u8]) -> String {
        match self {
            Self::Webm => "WebM".into(),
            Self::Ogg => "Ogg".into(),
            Self::Mp4 => "MP4".into(),
            Self::Wav => "WAV".into(),
            Self::Flac => "FLAC".into(),
            Self::Mp3 => "MP3".into(),
            Self::Adts => "AAC (ADTS)".into(),
            Self::Other => {
                let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
                format!("unrecognised bytes [{}]", hex.join(" "))
            }
        }
    }
}

/// Checks the first bytes against the declared format (or picks one when
/// nothing was declared). `head` holds at least [`SNIFF_BYTES`] bytes unless
/// the stream is shorter.
pub(crate) fn check(
    declared: Option<AudioFormat>,
    head: &[u8],
) -> Result<AudioFormat, DecodeError> {
    let magic = Magic::of(head);
    let seen = magic.describe(head);
    match (declared, magic) {
        (Some(AudioFormat::Webm), Magic::Webm) | (None, Magic::Webm) => Ok(AudioFormat::Webm),
        (Some(AudioFormat::Ogg), Magic::Ogg) | (None, Magic::Ogg) => Ok(AudioFormat::Ogg),
        (Some(pcm @ AudioFormat::Pcm16 { .. }), Magic::Other | Magic::Mp3 | Magic::Adts) => Ok(pcm),
        (Some(declared), _) => Err(DecodeError::Unsupported(format!(
            "declared {} but the stream starts like {seen}",
            declared.name()
        ))),
        (None, _) => Err(DecodeError::Unsupported(format!(
            "{seen} (supported: WebM or Ogg with Opus, raw PCM)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types() {
        assert_eq!(
            AudioFormat::from_mime("audio/webm;codecs=opus"),
            Ok(Some(AudioFormat::Webm))
        );
        assert_eq!(
            AudioFormat::from_mime("audio/ogg; codecs=\"opus\""),
            Ok(Some(AudioFormat::Ogg))
        );
        assert_eq!(AudioFormat::from_mime(""), Ok(None));
        assert_eq!(
            AudioFormat::from_mime("audio/pcm;rate=48000;channels=2"),
            Ok(Some(AudioFormat::Pcm16 {
                rate_hz: 48_000,
                channels: 2
            }))
        );
        for bad in [
            "audio/mp4",
            "audio/webm;codecs=vorbis",
            "audio/aac",
            "audio/pcm;rate=1",
            "audio/pcm;rate=x",
            "audio/pcm;rate=47999",
        ] {
            assert!(
                matches!(
                    AudioFormat::from_mime(bad),
                    Err(DecodeError::Unsupported(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn magic_is_checked_against_the_declaration() {
        let wav = b"RIFF\x24\0\0\0WAVEfmt ";
        let err = check(Some(AudioFormat::Webm), wav).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported audio: declared webm but the stream starts like WAV"
        );
        let mp4 = b"\0\0\0\x1cftypiso6";
        assert!(check(None, mp4).unwrap_err().to_string().contains("MP4"));
        assert_eq!(check(None, b"OggS\0\x02"), Ok(AudioFormat::Ogg));
        let pcm = AudioFormat::Pcm16 {
            rate_hz: 16_000,
            channels: 1,
        };
        assert_eq!(check(Some(pcm), &[1, 2, 3, 4]), Ok(pcm));
        assert!(check(Some(pcm), b"OggS").is_err());
        assert!(
            check(None, &[0xFF, 0xF1, 0x50])
                .unwrap_err()
                .to_string()
                .contains("AAC")
        );
    }
}
