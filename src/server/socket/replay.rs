//! The frames a conversation keeps for a client that may re-attach after
//! its connection drops.
//!
//! Every frame of a conversation is numbered (`seq`, from 1): a text frame
//! carries its number as its first field; a binary frame (reply audio)
//! takes the next number without saying so. The frames the client's
//! WebSocket has not yet acknowledged (by answering a ping that carries a
//! later `seq`) are kept, and so is everything said while the client is
//! away, up to `server.resume_buffer_bytes`: past it the oldest reply audio
//! goes first, counted, and text only when no audio is left.

use std::collections::VecDeque;

use axum::extract::ws::Message;
use bytes::Bytes;

use super::super::REPLY_RATE_HZ;

/// Bytes of one millisecond of reply audio (16-bit mono).
const AUDIO_BYTES_PER_MS: u64 = REPLY_RATE_HZ as u64 * 2 / 1000;

/// Most dropped frames remembered one by one for telling a returning client
/// what it missed; older ones are summed.
const MAX_DROPS: usize = 4096;

/// A conversation's numbered frames. See the module docs.
#[derive(Debug)]
pub(super) struct Replay {
    next_seq: u64,
    kept: VecDeque<Kept>,
    kept_bytes: usize,
    /// 0: nothing is kept (the server does not keep conversations).
    max_bytes: usize,
    /// The last `seq` the client's WebSocket acknowledged.
    acked: u64,
    drops: VecDeque<Dropped>,
    /// Drops no longer remembered one by one: the last `seq` among them and
    /// their reply audio.
    folded: Dropped,
    /// Reply audio dropped since [`Replay::take_dropped_ms`] last looked.
    dropped_ms: u64,
}

#[derive(Debug)]
struct Kept {
    seq: u64,
    message: Message,
    bytes: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Dropped {
    seq: u64,
    audio_ms: u64,
}

/// What a client that re-attaches after `last_seq` missed.
#[derive(Debug)]
pub(super) struct Missed {
    /// The frames kept, in order, as they were first sent.
    pub(super) frames: Vec<Message>,
    /// Frames after `last_seq` that were not kept, and their reply audio.
    pub(super) skipped: u64,
    pub(super) skipped_audio_ms: u64,
}

impl Replay {
    /// Numbers frames and keeps up to `max_bytes` of them (0: none).
    pub(super) fn new(max_bytes: usize) -> Self {
        Self {
            next_seq: 1,
            kept: VecDeque::new(),
            kept_bytes: 0,
            max_bytes,
            acked: 0,
            drops: VecDeque::new(),
            folded: Dropped::default(),
            dropped_ms: 0,
        }
    }

    /// The `seq` of the last frame numbered.
    pub(super) fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Numbers a text or binary frame and keeps a copy; other frames (ping,
    /// pong, close) pass as they are.
    pub(super) fn number(&mut self, message: Message) -> Message {
        let seq = self.next_seq;
        let message = match message {
            Message::Text(text) => Message::Text(with_seq(seq, &text).into()),
            binary @ Message::Binary(_) => binary,
            other => return other,
        };
        self.next_seq += 1;
        if self.max_bytes > 0 {
            self.keep(seq, message.clone());
        }
        message
    }

    fn keep(&mut self, seq: u64, message: Message) {
        let bytes = match &message {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
            _ => 0,
        };
        self.kept.push_back(Kept {
            seq,
            message,
            bytes,
        });
        self.kept_bytes += bytes;
        while self.kept_bytes > self.max_bytes {
            let oldest_audio = self
                .kept
                .iter()
                .position(|kept| matches!(kept.message, Message::Binary(_)));
            let Some(gone) = self.kept.remove(oldest_audio.unwrap_or(0)) else {
                break;
            };
            self.kept_bytes -= gone.bytes;
            let audio_ms = match gone.message {
                Message::Binary(_) => gone.bytes as u64 / AUDIO_BYTES_PER_MS,
                _ => 0,
            };
            self.dropped_ms += audio_ms;
            self.drops.push_back(Dropped {
                seq: gone.seq,
                audio_ms,
            });
            if self.drops.len() > MAX_DROPS
                && let Some(old) = self.drops.pop_front()
            {
                self.folded.seq = old.seq;
                self.folded.audio_ms += old.audio_ms;
            }
        }
    }

    /// A ping carrying the last `seq`: the client's WebSocket answers it
    /// once it has read every frame before it.
    pub(super) fn ping(&self) -> Message {
        Message::Ping(Bytes::copy_from_slice(&self.last_seq().to_be_bytes()))
    }

    /// A pong's payload: frames up to the `seq` it carries reached the
    /// client and need not be kept. Anything else is ignored.
    pub(super) fn pong(&mut self, payload: &[u8]) {
        let Ok(seq) = <[u8; 8]>::try_from(payload).map(u64::from_be_bytes) else {
            return;
        };
        if seq <= self.acked || seq > self.last_seq() {
            return;
        }
        self.acked = seq;
        while let Some(kept) = self.kept.front()
            && kept.seq <= seq
        {
            self.kept_bytes -= kept.bytes;
            self.kept.pop_front();
        }
        while self.drops.front().is_some_and(|drop| drop.seq <= seq) {
            self.drops.pop_front();
        }
    }

    /// What a client whose last frame was `last_seq` missed; `Err` with the
    /// last `seq` sent when `last_seq` is past it.
    pub(super) fn missed(&self, last_seq: u64) -> Result<Missed, u64> {
        if last_seq > self.last_seq() {
            return Err(self.last_seq());
        }
        let frames: Vec<Message> = self
            .kept
            .iter()
            .filter(|kept| kept.seq > last_seq)
            .map(|kept| kept.message.clone())
            .collect();
        let skipped = self.last_seq() - last_seq - frames.len() as u64;
        let mut skipped_audio_ms: u64 = self
            .drops
            .iter()
            .filter(|drop| drop.seq > last_seq)
            .map(|drop| drop.audio_ms)
            .sum();
        if self.folded.seq > last_seq {
            skipped_audio_ms += self.folded.audio_ms;
        }
        Ok(Missed {
            frames,
            skipped,
            skipped_audio_ms,
        })
    }

    /// Reply audio dropped since the last call, in ms.
    pub(super) fn take_dropped_ms(&mut self) -> u64 {
        std::mem::take(&mut self.dropped_ms)
    }

    /// Bytes kept now.
    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        self.kept_bytes
    }
}

/// A server message (a JSON object) with `seq` as its first field.
fn with_seq(seq: u64, text: &str) -> String {
    let rest = text.strip_prefix('{').unwrap_or(text).trim_start();
    use std::fmt::Write as _;
    let mut numbered = String::with_capacity(text.len() + 28);
    // Writing into a String cannot fail.
    let _ = write!(numbered, "{{\"seq\":{seq}");
    if !rest.starts_with('}') {
        numbered.push(',');
    }
    numbered.push_str(rest);
    numbered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(message: &Message) -> serde_json::Value {
        match message {
            Message::Text(text) => serde_json::from_str(text).expect("JSON"),
            other => panic!("{other:?}"),
        }
    }

    fn audio(ms: usize) -> Message {
        Message::Binary(vec![0; ms * AUDIO_BYTES_PER_MS as usize].into())
    }

    #[test]
    fn text_frames_say_their_number_and_audio_takes_one() {
        let mut replay = Replay::new(0);
        let first = replay.number(Message::Text(r#"{"type":"ready"}"#.into()));
        assert_eq!(text(&first), serde_json::json!({"seq": 1, "type": "ready"}));
        replay.number(audio(20));
        let third = replay.number(Message::Text("{}".into()));
        assert_eq!(text(&third), serde_json::json!({"seq": 3}));
        assert!(matches!(
            replay.number(Message::Ping(Bytes::new())),
            Message::Ping(_)
        ));
        assert_eq!(replay.last_seq(), 3);
        // Nothing kept when the server keeps no conversation.
        assert_eq!(replay.missed(0).map(|m| m.skipped), Ok(3));
    }

    #[test]
    fn what_the_client_acknowledged_is_let_go() {
        let mut replay = Replay::new(1 << 20);
        for _ in 0..5 {
            replay.number(audio(100));
        }
        let Message::Ping(payload) = replay.ping() else {
            panic!("a ping")
        };
        assert_eq!(payload.as_ref(), 5u64.to_be_bytes());
        replay.pong(&3u64.to_be_bytes());
        assert_eq!(replay.kept_bytes(), 2 * 100 * AUDIO_BYTES_PER_MS as usize);
        // Stale, future and malformed acknowledgements change nothing.
        replay.pong(&2u64.to_be_bytes());
        replay.pong(&9u64.to_be_bytes());
        replay.pong(b"hello");
        let missed = replay.missed(3).expect("within");
        assert_eq!((missed.frames.len(), missed.skipped), (2, 0));
        // A client claiming frames it was never sent is refused.
        assert_eq!(replay.missed(6).map(|m| m.skipped), Err(5));
    }

    #[test]
    fn the_oldest_audio_goes_first_and_is_counted() {
        // Room for 2 s of reply audio and a little text.
        let max = 2_000 * AUDIO_BYTES_PER_MS as usize + 1_000;
        let mut replay = Replay::new(max);
        replay.number(Message::Text(r#"{"type":"ready"}"#.into()));
        for _ in 0..5 {
            replay.number(audio(1_000));
            replay.number(Message::Text(
                r#"{"type":"transcript","text":"hola"}"#.into(),
            ));
        }
        assert!(replay.kept_bytes() <= max);
        assert_eq!(replay.take_dropped_ms(), 3_000);
        assert_eq!(replay.take_dropped_ms(), 0);
        let missed = replay.missed(0).expect("within");
        // Every text frame and the last two seconds of audio, in order.
        assert_eq!(missed.frames.len(), 1 + 5 + 2);
        assert_eq!((missed.skipped, missed.skipped_audio_ms), (3, 3_000));
        let seqs: Vec<u64> = missed
            .frames
            .iter()
            .filter_map(|m| match m {
                Message::Text(_) => text(m)["seq"].as_u64(),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [1, 3, 5, 7, 9, 11]);
        // A client that had the first four frames missed less audio.
        let later = replay.missed(4).expect("within");
        assert_eq!((later.skipped, later.skipped_audio_ms), (1, 1_000));
    }

    #[test]
    fn text_goes_only_when_no_audio_is_left() {
        let mut replay = Replay::new(64);
        for _ in 0..10 {
            replay.number(Message::Text(r#"{"type":"x","pad":"0123456789"}"#.into()));
        }
        assert!(replay.kept_bytes() <= 64);
        let missed = replay.missed(0).expect("within");
        assert_eq!(missed.skipped + missed.frames.len() as u64, 10);
        assert_eq!(missed.skipped_audio_ms, 0);
    }
}
