//! The driver under paused time, with the test playing the service: the
//! hand-off at the stream's age limit and the stall watch, checked to the
//! tick without waiting for them.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::FRAME;
use crate::config::NovaSonicConfig;
use crate::engine::nova_sonic::stream::{FakeCall, StreamItem, sent_json};
use crate::engine::nova_sonic::{NovaSonicEngine, NovaSonicSettings};
use crate::engine::{ConversationOptions, Engine, EngineEvent, EngineInput, ErrorKind};

/// A call the test answers; what the conversation sends is read by a task
/// of its own, as the network would.
struct Call {
    answer: mpsc::UnboundedSender<StreamItem>,
    sent: mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
}

impl Call {
    fn read(call: FakeCall) -> Self {
        let FakeCall { mut sent, answer } = call;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(input)) = sent.recv().await {
                if tx.send(sent_json(&input)).is_err() {
                    return;
                }
            }
        });
        Self {
            answer,
            sent: rx,
            seen: Vec::new(),
        }
    }

    /// The service answers the call.
    fn open(&self) {
        self.answer.send(StreamItem::Opened).unwrap();
    }

    fn collect(&mut self) -> &[Value] {
        while let Ok(event) = self.sent.try_recv() {
            self.seen.push(event);
        }
        &self.seen
    }

    /// The names of the events sent so far, audio frames left out.
    fn names(&mut self) -> Vec<String> {
        self.collect()
            .iter()
            .filter_map(|v| v["event"].as_object()?.keys().next().cloned())
            .filter(|name| name != "audioInput")
            .collect()
    }

    fn audio_frames(&mut self) -> usize {
        self.collect()
            .iter()
            .filter(|v| v["event"].get("audioInput").is_some())
            .count()
    }
}

/// A conversation's events, each with the (paused) time it arrived.
struct Talk {
    input: mpsc::Sender<EngineInput>,
    events: mpsc::UnboundedReceiver<(Instant, EngineEvent)>,
}

impl Talk {
    fn start(engine: &NovaSonicEngine) -> Self {
        let options = ConversationOptions {
            language: "es".into(),
            voice: String::new(),
            history: Vec::new(),
        };
        let session = engine.start(options).unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let mut from_engine = session.events;
        tokio::spawn(async move {
            while let Some(event) = from_engine.recv().await {
                if tx.send((Instant::now(), event)).is_err() {
                    return;
                }
            }
        });
        Self {
            input: session.input,
            events,
        }
    }

    async fn until(&mut self, pred: impl Fn(&EngineEvent) -> bool) -> (Instant, EngineEvent) {
        loop {
            let (at, event) = self.events.recv().await.unwrap();
            if pred(&event) {
                return (at, event);
            }
        }
    }
}

fn engine() -> (NovaSonicEngine, mpsc::UnboundedReceiver<FakeCall>) {
    NovaSonicEngine::fake(
        NovaSonicSettings::from_config(&NovaSonicConfig::default()),
        None,
    )
}

#[tokio::test(start_paused = true)]
async fn the_stream_is_handed_over_after_rotate_after_and_the_handoff_wait() {
    let (engine, mut calls) = engine();
    let settings = engine.settings().clone();
    let started = Instant::now();
    let mut talk = Talk::start(&engine);
    let mut first = Call::read(calls.recv().await.unwrap());
    first.open();

    // Nobody speaks: the next stream is prepared `handoff_wait` after the
    // hand-off was armed at `rotate_after`.
    let next = calls.recv().await.unwrap();
    let prepared = started.elapsed();
    let due = settings.rotate_after + settings.handoff_wait;
    assert!(
        prepared >= due && prepared <= due + 2 * FRAME,
        "{prepared:?}"
    );
    let mut second = Call::read(next);
    tokio::task::yield_now().await;
    assert_eq!(
        second.names(),
        [
            "sessionStart",
            "promptStart",
            "contentStart",
            "textInput",
            "contentEnd"
        ],
        "only the setup before the hand-off"
    );
    second.open();
    let (at, rotated) = talk
        .until(|e| matches!(e, EngineEvent::Rotated { .. }))
        .await;
    assert!(matches!(
        rotated,
        EngineEvent::Rotated { generation: 2, .. }
    ));
    assert!(at.duration_since(started) - prepared <= 2 * FRAME);

    // The old stream gets its closing events; audio goes to the new one.
    let before = second.audio_frames();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = first.names();
    assert_eq!(
        old[old.len() - 3..],
        ["contentEnd", "promptEnd", "sessionEnd"]
    );
    assert_eq!(
        second.names().last().map(String::as_str),
        Some("contentStart")
    );
    let silence = second.audio_frames() - before;
    assert!((30..=32).contains(&silence), "{silence} frames in 1 s");
    let old_frames = first.audio_frames();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        first.audio_frames(),
        old_frames,
        "nothing more to the old stream"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reply_that_never_comes_replaces_the_stream_after_the_stall_timeout() {
    const QUESTION: &str = "¿Dónde está la biblioteca?";
    let (engine, mut calls) = engine();
    let stall = engine.settings().stall_timeout;
    let mut talk = Talk::start(&engine);
    let mut first = Call::read(calls.recv().await.unwrap());
    first.open();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let asked = Instant::now();
    talk.input
        .send(EngineInput::Text(QUESTION.into()))
        .await
        .unwrap();
    let (at, error) = talk.until(|e| matches!(e, EngineEvent::Error { .. })).await;
    let waited = at.duration_since(asked);
    assert!(waited >= stall && waited <= stall + 2 * FRAME, "{waited:?}");
    let EngineEvent::Error {
        kind: ErrorKind::Transient,
        message,
    } = error
    else {
        panic!("a transient error, not {error:?}");
    };
    assert!(message.contains("Stalled"), "{message}");

    // A new stream at once (the first retry waits at most 250 ms of
    // jitter), asked the question again as interactive text.
    let mut second = Call::read(calls.recv().await.unwrap());
    let reopened = Instant::now().duration_since(at);
    assert!(
        reopened <= Duration::from_millis(250) + 2 * FRAME,
        "{reopened:?}"
    );
    tokio::task::yield_now().await;
    let asked_again = second
        .collect()
        .iter()
        .any(|v| v["event"]["textInput"]["content"] == QUESTION);
    assert!(asked_again, "{:?}", second.names());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old = first.names();
    assert_eq!(
        old[old.len() - 3..],
        ["contentEnd", "promptEnd", "sessionEnd"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_takes_no_audio_is_replaced_after_the_stall_timeout() {
    let (engine, mut calls) = engine();
    let stall = engine.settings().stall_timeout;
    let started = Instant::now();
    let mut talk = Talk::start(&engine);
    // The service answers but never reads: its input fills up in about 3 s
    // of silence frames, and from then on audio is refused.
    let stuck = calls.recv().await.unwrap();
    stuck.answer.send(StreamItem::Opened).unwrap();
    let (at, error) = talk.until(|e| matches!(e, EngineEvent::Error { .. })).await;
    let waited = at.duration_since(started);
    assert!(
        waited >= stall + Duration::from_secs(3) && waited <= stall + Duration::from_secs(4),
        "{waited:?}"
    );
    assert!(
        matches!(&error, EngineEvent::Error { kind: ErrorKind::Transient, message } if message.contains("Stalled")),
        "{error:?}"
    );
    let second = calls.recv().await.unwrap();
    drop((stuck, second));
}
