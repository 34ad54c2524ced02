//! Conversations driven through channels with the scripted engine, under
//! paused time: turns and latency, barge-in, the bounded queues and their
//! counters, the watchdogs, every way a conversation ends, and real Chrome
//! WebM through the decoder.

#![allow(
    clippy::unwrap_used,
    reason = "a helper that cannot read a fixture or reach a task must fail the test"
)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use sonora::audio::{DecoderLimits, StreamDecoder};
use sonora::engine::scripted::{Arrival, ScriptedEngine, Step};
use sonora::engine::{
    ConversationOptions, Engine, EngineEvent, ErrorKind, Pcm, Role, Stage, TurnEndReason,
};
use sonora::session::{
    ClientInput, ClientOutput, CloseReason, Conversation, ConversationHandle, ConversationSummary,
    SessionLimits,
};
use sonora::usage::UsageDelta;
use tokio::time::{Instant, sleep};

const FRAME_SAMPLES: usize = 640;

fn start(
    script: Vec<Step>,
    decoder: Option<StreamDecoder>,
    limits: SessionLimits,
) -> (ScriptedEngine, ConversationHandle) {
    start_engine(ScriptedEngine::new(script), decoder, limits)
}

fn start_engine(
    engine: ScriptedEngine,
    decoder: Option<StreamDecoder>,
    limits: SessionLimits,
) -> (ScriptedEngine, ConversationHandle) {
    let options = ConversationOptions {
        language: "es".into(),
        voice: String::new(),
        history: Vec::new(),
    };
    let session = engine.start(options).unwrap();
    (engine, Conversation::spawn(session, decoder, limits))
}

/// `ms` of 16 kHz audio, every sample `mark`.
fn pcm(ms: usize, mark: i16) -> Vec<i16> {
    vec![mark; ms * 16]
}

/// `ms` of 24 kHz reply audio, every sample `mark`.
fn reply(ms: usize, mark: i16) -> EngineEvent {
    EngineEvent::Audio(Pcm {
        rate_hz: 24_000,
        samples: vec![mark; ms * 24],
    })
}

async fn send(handle: &ConversationHandle, input: ClientInput) {
    handle.input.send(input).await.unwrap();
}

/// Everything the client receives until the conversation ends, split into
/// the messages before `Closed` and `Closed` itself.
async fn read_to_end(
    handle: &mut ConversationHandle,
) -> (Vec<ClientOutput>, CloseReason, String, ConversationSummary) {
    let mut outputs = Vec::new();
    while let Some(output) = handle.output.recv().await {
        outputs.push(output);
    }
    let Some(ClientOutput::Closed {
        reason,
        message,
        summary,
    }) = outputs.pop()
    else {
        panic!("the last message is not Closed: {outputs:?}");
    };
    assert!(
        !outputs
            .iter()
            .any(|o| matches!(o, ClientOutput::Closed { .. })),
        "Closed came twice"
    );
    let returned = (&mut handle.task).await.unwrap();
    assert_eq!(returned, *summary, "the task returns the summary it sent");
    (outputs, reason, message, *summary)
}

fn events(outputs: &[ClientOutput]) -> Vec<&EngineEvent> {
    outputs
        .iter()
        .filter_map(|o| match o {
            ClientOutput::Event(event) => Some(event),
            _ => None,
        })
        .collect()
}

fn warnings(outputs: &[ClientOutput]) -> Vec<&'static str> {
    outputs
        .iter()
        .filter_map(|o| match o {
            ClientOutput::Warning { code, .. } => Some(code.as_str()),
            _ => None,
        })
        .collect()
}

/// The first sample of every audio frame the client received.
fn audio_marks(outputs: &[ClientOutput]) -> Vec<i16> {
    events(outputs)
        .into_iter()
        .filter_map(|e| match e {
            EngineEvent::Audio(pcm) => pcm.samples.first().copied(),
            _ => None,
        })
        .collect()
}

fn engine_audio_marks(engine: &ScriptedEngine) -> Vec<i16> {
    engine
        .received()
        .log
        .iter()
        .filter_map(|a| match a {
            Arrival::Audio { first_sample, .. } => Some(*first_sample),
            _ => None,
        })
        .collect()
}

/// Lets the engine task run after the conversation ended.
async fn settle() {
    sleep(Duration::from_millis(1)).await;
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `chrome_5s.webm` cut into the blobs Chrome's MediaRecorder delivered.
fn chrome_chunks() -> Vec<Vec<u8>> {
    let bytes = fixture("chrome_5s.webm");
    let lengths: Vec<usize> =
        serde_json::from_slice(&fixture("chrome_5s.webm.chunks.json")).unwrap();
    let mut rest = bytes.as_slice();
    let chunks: Vec<Vec<u8>> = lengths
        .iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head.to_vec()
        })
        .collect();
    assert!(rest.is_empty());
    chunks
}

fn webm_decoder() -> StreamDecoder {
    StreamDecoder::for_mime("audio/webm;codecs=opus", DecoderLimits::default()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_full_turn_reaches_the_client_with_its_latency() {
    let usage = UsageDelta {
        speech_in_tokens: 25,
        speech_out_tokens: 12,
        audio_in_ms: 1_000,
        audio_out_ms: 480,
        ..UsageDelta::default()
    };
    let transcript = |role, text: &str| EngineEvent::Transcript {
        role,
        text: text.into(),
        stage: Stage::Final,
        turn_id: 1,
    };
    let turn = vec![
        EngineEvent::SpeechEnded { turn_id: 1 },
        transcript(Role::User, "hola"),
        reply(240, 1),
        reply(240, 2),
        transcript(Role::Assistant, "buenos días"),
        EngineEvent::TurnEnd {
            turn_id: 1,
            reason: TurnEndReason::Completed,
        },
        EngineEvent::Usage(usage),
    ];
    let mut script = vec![Step::AwaitAudioMs(1_000)];
    script.extend(turn[..2].iter().cloned().map(Step::Emit));
    script.push(Step::Sleep(Duration::from_millis(300)));
    script.extend(turn[2..].iter().cloned().map(Step::Emit));
    let (engine, mut handle) = start(script, None, SessionLimits::default());

    // One second of speech at real-time pace.
    for i in 0..25 {
        send(&handle, ClientInput::Pcm(pcm(40, i))).await;
        sleep(Duration::from_millis(40)).await;
    }
    let mut seen = Vec::new();
    let mut latency_seen = false;
    while seen.last() != Some(&turn[6]) {
        match handle.output.recv().await.unwrap() {
            ClientOutput::Event(event) => seen.push(event),
            // The latency comes right before the first reply audio.
            ClientOutput::Latency {
                turn_id: 1,
                ms: 300,
            } => {
                assert_eq!(seen.len(), 2, "{seen:?}");
                latency_seen = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(latency_seen);
    assert_eq!(seen, turn);
    send(&handle, ClientInput::Stop).await;
    let (rest, reason, message, summary) = read_to_end(&mut handle).await;

    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(
        (reason, reason.code()),
        (CloseReason::ClientStopped, "client_stopped")
    );
    assert_eq!(message, "the client stopped");
    assert_eq!(summary.turns, 1);
    assert_eq!(summary.latency_ms, [300]);
    assert_eq!(summary.usage, usage);
    assert_eq!(summary.counters.audio_in_ms, 1_000);
    assert_eq!(summary.counters.audio_out_ms, 480);
    assert_eq!(summary.counters.uplink_dropped_ms, 0);
    assert_eq!(summary.decoder, None);
    let received = engine.received();
    assert_eq!(received.audio_samples, 16_000);
    assert!(received.closed);
    assert_eq!(engine_audio_marks(&engine), (0..25).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn barge_in_clears_reply_audio_the_client_has_not_taken() {
    let mut script = vec![
        Step::AwaitAudioMs(200),
        Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 }),
    ];
    // Four seconds of reply, emitted at once, while the client reads nothing.
    script.extend((0..100).map(|_| Step::Emit(reply(40, 1))));
    script.push(Step::Emit(EngineEvent::Interrupted { turn_id: 1 }));
    script.extend((0..3).map(|_| Step::Emit(reply(40, 2))));
    script.push(Step::Emit(EngineEvent::TurnEnd {
        turn_id: 1,
        reason: TurnEndReason::Interrupted,
    }));
    let (_engine, mut handle) = start(script, None, SessionLimits::default());

    send(&handle, ClientInput::Pcm(pcm(200, 0))).await;
    sleep(Duration::from_secs(1)).await;
    let live = handle.counters.snapshot();
    assert_eq!((live.interruptions, live.downlink_cleared_ms), (1, 4_000));
    send(&handle, ClientInput::Stop).await;
    let (outputs, reason, _, summary) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(
        audio_marks(&outputs),
        [2, 2, 2],
        "no audio from before the barge-in"
    );
    assert_eq!(
        events(&outputs)[..2],
        [
            &EngineEvent::SpeechEnded { turn_id: 1 },
            &EngineEvent::Interrupted { turn_id: 1 }
        ]
    );
    assert_eq!(summary.counters.interruptions, 1);
    assert_eq!(summary.counters.downlink_cleared_ms, 4_000);
    assert_eq!(summary.counters.audio_out_ms, 120);
    assert_eq!(summary.latency_ms, [0]);
}

#[tokio::test(start_paused = true)]
async fn a_full_uplink_drops_the_oldest_audio() {
    let script = vec![Step::Stall(Duration::from_secs(2)), Step::AwaitClose];
    let (engine, mut handle) = start(script, None, SessionLimits::default());

    // Eight seconds at once; every 40 ms frame is marked with its index.
    let burst: Vec<i16> = (0..200).flat_map(|i| vec![i; FRAME_SAMPLES]).collect();
    send(&handle, ClientInput::Pcm(burst)).await;
    sleep(Duration::from_secs(3)).await;
    send(&handle, ClientInput::Stop).await;
    let (outputs, reason, _, summary) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(warnings(&outputs), ["uplink_dropped", "engine_stall"]);
    let counters = &summary.counters;
    assert_eq!(counters.audio_in_ms, 8_000);
    assert_eq!(counters.uplink_dropped_ms, 3_000);
    assert_eq!(counters.uplink_high_water_ms, 5_000);
    assert_eq!(counters.uplink_queued_ms, 0);
    assert_eq!(counters.engine_send_stalls, 1);
    assert_eq!(engine_audio_marks(&engine), (75..200).collect::<Vec<_>>());
    assert_eq!(engine.received().log.last(), Some(&Arrival::Close));
}

#[tokio::test(start_paused = true)]
async fn an_engine_that_takes_nothing_closes_the_conversation() {
    let (engine, mut handle) = start(
        vec![Step::Stall(Duration::from_secs(60))],
        None,
        SessionLimits::default(),
    );
    let started = Instant::now();
    // More messages than the input channel holds: they only get through if
    // the conversation keeps reading while the engine is stalled.
    for i in 0..100 {
        send(&handle, ClientInput::Pcm(pcm(40, i))).await;
    }
    sleep(Duration::from_secs(1)).await;
    send(&handle, ClientInput::Text("¿hola?".into())).await;
    sleep(Duration::from_millis(10)).await;
    let live = handle.counters.snapshot();
    assert_eq!(live.audio_in_ms, 4_000);
    // 64 frames (2.56 s) sit in the engine's channel.
    assert_eq!(live.uplink_queued_ms, 1_440);
    assert_eq!(live.engine_send_stalls, 1);
    let (outputs, reason, message, _) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::EngineStalled);
    assert!(
        message.contains("accepted no input for 5000 ms"),
        "{message}"
    );
    assert_eq!(Instant::now() - started, Duration::from_secs(5));
    assert_eq!(warnings(&outputs), ["engine_stall"]);
    settle().await;
    assert_eq!(engine.received().audio_frames, 0);
}

#[tokio::test(start_paused = true)]
async fn messages_piling_up_for_a_stalled_engine_close_the_conversation() {
    let (_engine, mut handle) = start(
        vec![Step::Stall(Duration::from_secs(60))],
        None,
        SessionLimits::default(),
    );
    // 64 fill the engine's channel, 256 wait in the uplink, one more is too many.
    for i in 0..64 + 256 + 1 {
        send(&handle, ClientInput::Text(format!("{i}"))).await;
    }
    let (_, reason, message, _) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::EngineStalled);
    assert_eq!(
        message,
        "the engine is not taking input: 256 messages waiting"
    );
}

#[tokio::test(start_paused = true)]
async fn bytes_that_never_complete_a_packet_trip_the_watchdog() {
    // The longest prefix of the recording that decodes to nothing.
    let bytes = fixture("chrome_5s.webm");
    let mut probe = webm_decoder();
    let mut out = Vec::new();
    let mut silent = 0;
    while out.is_empty() {
        probe.push(&bytes[silent..=silent], &mut out).unwrap();
        silent += 1;
    }
    silent -= 1;
    assert_eq!(probe.stats().format, Some("webm"), "the header was read");

    let (_engine, mut handle) = start(vec![], Some(webm_decoder()), SessionLimits::default());
    let started = Instant::now();
    let third = silent / 3;
    for piece in [
        &bytes[..third],
        &bytes[third..2 * third],
        &bytes[2 * third..silent],
    ] {
        send(&handle, ClientInput::Audio(piece.to_vec().into())).await;
        sleep(Duration::from_secs(1)).await;
    }
    let (outputs, reason, message, summary) = read_to_end(&mut handle).await;

    assert!(outputs.is_empty(), "{outputs:?}");
    assert_eq!(reason, CloseReason::NoAudio);
    assert_eq!(Instant::now() - started, Duration::from_secs(5));
    let want = format!("no audio decoded from the last {silent} bytes received over 5000 ms");
    assert_eq!(message, want);
    let decoder = summary.decoder.unwrap();
    assert_eq!(
        (decoder.bytes_in, decoder.pcm_samples_out),
        (silent as u64, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_as_idle() {
    let (engine, mut handle) = start(vec![Step::AwaitClose], None, SessionLimits::default());
    let started = Instant::now();
    sleep(Duration::from_secs(100)).await;
    send(&handle, ClientInput::Text("sigo aquí".into())).await;
    let (outputs, reason, message, _) = read_to_end(&mut handle).await;

    assert!(outputs.is_empty(), "{outputs:?}");
    assert_eq!(reason, CloseReason::Idle);
    assert_eq!(message, "no speech or text from the client for 120000 ms");
    assert_eq!(Instant::now() - started, Duration::from_secs(220));
    settle().await;
    let received = engine.received();
    assert!(received.closed, "the engine is told to close");
    assert_eq!(received.texts, ["sigo aquí"]);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_read_is_closed_with_bounded_memory() {
    let mut script = vec![Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 })];
    script.extend((0..400).map(|_| Step::Emit(reply(40, 1))));
    let (_engine, mut handle) = start(script, None, SessionLimits::default());

    // The client reads nothing: reply audio waiting less than the limit is
    // no fault, waiting the limit is.
    sleep(Duration::from_millis(9_990)).await;
    assert!(!handle.task.is_finished(), "closed before the limit");
    sleep(Duration::from_millis(20)).await;
    assert!(handle.task.is_finished());
    let (outputs, reason, message, summary) = read_to_end(&mut handle).await;
    assert_eq!(reason, CloseReason::SlowClient);
    assert!(
        message.contains("reply audio waited 10000 ms (limit 10000 ms)"),
        "{message}"
    );
    assert_eq!(
        outputs,
        [
            ClientOutput::Event(EngineEvent::SpeechEnded { turn_id: 1 }),
            ClientOutput::Latency { turn_id: 1, ms: 0 }
        ]
    );
    let counters = &summary.counters;
    assert_eq!(counters.downlink_high_water_ms, 16_000, "{counters:?}");
    assert_eq!((counters.downlink_queued_ms, counters.audio_out_ms), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn reply_audio_past_the_memory_cap_closes_at_once() {
    let mut script = vec![Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 })];
    script.extend((0..400).map(|_| Step::Emit(reply(40, 1))));
    // 100 KB: a little over 2 s of 24 kHz audio.
    let limits = SessionLimits {
        downlink_max_bytes: 100_000,
        ..SessionLimits::default()
    };
    let (_engine, mut handle) = start(script, None, limits);

    sleep(Duration::from_millis(10)).await;
    assert!(handle.task.is_finished(), "the cap does not wait");
    let (_, reason, message, summary) = read_to_end(&mut handle).await;
    assert_eq!(reason, CloseReason::SlowClient);
    assert!(message.ends_with("over the 100000-byte limit"), "{message}");
    let high_water = summary.counters.downlink_high_water_ms;
    assert!((2_040..=2_120).contains(&high_water), "{high_water}");
}

#[tokio::test(start_paused = true)]
async fn a_reading_client_takes_a_long_reply_made_all_at_once() {
    // Twenty seconds of reply at once, twice the time audio may wait.
    let mut script = vec![
        Step::AwaitAudioMs(200),
        Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 }),
    ];
    script.extend((0..500).map(|_| Step::Emit(reply(40, 1))));
    let (_engine, mut handle) = start(script, None, SessionLimits::default());

    send(&handle, ClientInput::Pcm(pcm(200, 0))).await;
    let mut audio_ms = 0;
    while audio_ms < 20_000 {
        match handle.output.recv().await.unwrap() {
            ClientOutput::Event(EngineEvent::Audio(pcm)) => audio_ms += pcm.duration_ms(),
            ClientOutput::Closed {
                reason, message, ..
            } => panic!("{reason:?}: {message}"),
            _ => {}
        }
    }
    send(&handle, ClientInput::Stop).await;
    let (_, reason, _, summary) = read_to_end(&mut handle).await;
    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(summary.counters.audio_out_ms, 20_000);
}

#[tokio::test(start_paused = true)]
async fn reply_audio_goes_out_in_batches_of_at_most_200_ms() {
    let mut script = vec![
        Step::AwaitAudioMs(200),
        Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 }),
    ];
    script.extend((0..10).map(|_| Step::Emit(reply(40, 1))));
    script.push(Step::Sleep(Duration::from_secs(1)));
    script.push(Step::Emit(EngineEvent::Interrupted { turn_id: 1 }));
    script.extend((0..2).map(|_| Step::Emit(reply(40, 2))));
    let (_engine, mut handle) = start(script, None, SessionLimits::default());

    send(&handle, ClientInput::Pcm(pcm(200, 0))).await;
    // The client takes the turn's start, then stops reading while the
    // engine is interrupted: only the batch handed over before is heard.
    for _ in 0..2 {
        handle.output.recv().await.unwrap();
    }
    sleep(Duration::from_secs(2)).await;
    send(&handle, ClientInput::Stop).await;
    let (outputs, reason, _, summary) = read_to_end(&mut handle).await;
    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(audio_marks(&outputs), [1, 1, 1, 1, 1, 2, 2]);
    assert_eq!(summary.counters.downlink_cleared_ms, 200);
}

#[tokio::test(start_paused = true)]
async fn a_client_flooded_with_events_still_gets_closed() {
    let transcript = EngineEvent::Transcript {
        role: Role::Assistant,
        text: "bla".into(),
        stage: Stage::Speculative,
        turn_id: 1,
    };
    let script = vec![Step::Emit(transcript.clone()); 2_000];
    let (_engine, mut handle) = start(script, None, SessionLimits::default());

    sleep(Duration::from_secs(1)).await;
    assert!(handle.task.is_finished());
    let (outputs, reason, message, _) = read_to_end(&mut handle).await;
    assert_eq!(reason, CloseReason::SlowClient);
    assert!(message.ends_with("messages waiting"), "{message}");
    // The channel holds 32: 31 events and the slot kept for Closed.
    assert_eq!(outputs, vec![ClientOutput::Event(transcript); 31]);
}

#[tokio::test(start_paused = true)]
async fn stop_waits_for_what_the_engine_still_has_to_say() {
    let farewell = [
        EngineEvent::Transcript {
            role: Role::Assistant,
            text: "adiós".into(),
            stage: Stage::Final,
            turn_id: 3,
        },
        reply(40, 9),
        EngineEvent::Usage(UsageDelta {
            text_out_tokens: 2,
            ..UsageDelta::default()
        }),
    ];
    let mut script = vec![Step::AwaitClose, Step::Sleep(Duration::from_millis(500))];
    script.extend(farewell.iter().cloned().map(Step::Emit));
    script.push(Step::Emit(EngineEvent::Closed));
    let (engine, mut handle) = start(script, None, SessionLimits::default());

    let started = Instant::now();
    send(&handle, ClientInput::Pcm(pcm(120, 4))).await;
    send(&handle, ClientInput::Stop).await;
    let (outputs, reason, message, summary) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(message, "the client stopped");
    assert_eq!(events(&outputs), farewell.iter().collect::<Vec<_>>());
    assert_eq!(Instant::now() - started, Duration::from_millis(500));
    assert_eq!(summary.usage.text_out_tokens, 2);
    let received = engine.received();
    assert_eq!(received.audio_samples, 1_920, "the uplink is flushed first");
    assert_eq!(received.log.last(), Some(&Arrival::Close));
}

#[tokio::test(start_paused = true)]
async fn server_shutdown_closes_like_stop() {
    let script = vec![
        Step::AwaitClose,
        Step::Emit(EngineEvent::Transcript {
            role: Role::Assistant,
            text: "hasta luego".into(),
            stage: Stage::Final,
            turn_id: 1,
        }),
    ];
    let (engine, mut handle) = start(script, None, SessionLimits::default());
    send(&handle, ClientInput::Pcm(pcm(40, 1))).await;
    handle.shutdown();
    let (outputs, reason, message, _) = read_to_end(&mut handle).await;

    assert_eq!((reason, reason.code()), (CloseReason::Shutdown, "shutdown"));
    assert_eq!(message, "the server is shutting down");
    assert_eq!(events(&outputs).len(), 1);
    assert!(engine.received().closed);
}

#[tokio::test(start_paused = true)]
async fn an_engine_that_never_closes_is_left_after_the_grace_period() {
    let script = vec![Step::AwaitClose, Step::Sleep(Duration::from_secs(60))];
    let (_engine, mut handle) = start(script, None, SessionLimits::default());
    let started = Instant::now();
    send(&handle, ClientInput::Stop).await;
    let (_, reason, message, _) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(
        message,
        "the client stopped; the engine did not close within 10000 ms"
    );
    assert_eq!(Instant::now() - started, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn the_engine_closing_on_its_own_ends_the_conversation() {
    let ready = EngineEvent::Ready {
        engine: "scripted".into(),
        model: "m".into(),
        voice: "v".into(),
    };
    let script = vec![Step::Emit(ready.clone()), Step::Emit(EngineEvent::Closed)];
    let (_engine, mut handle) = start(script, None, SessionLimits::default());
    let (outputs, reason, message, _) = read_to_end(&mut handle).await;

    assert_eq!(outputs, [ClientOutput::Event(ready)]);
    assert_eq!(
        (reason, reason.code()),
        (CloseReason::EngineClosed, "engine_closed")
    );
    assert_eq!(message, "the engine closed the conversation");
}

#[tokio::test(start_paused = true)]
async fn a_fatal_engine_error_is_forwarded_then_closes() {
    let transient = EngineEvent::Error {
        kind: ErrorKind::Transient,
        message: "retrying".into(),
    };
    let fatal = EngineEvent::Error {
        kind: ErrorKind::Fatal,
        message: "quota exceeded".into(),
    };
    let script = vec![
        Step::Emit(transient.clone()),
        Step::Emit(fatal.clone()),
        Step::AwaitClose,
    ];
    let (engine, mut handle) = start(script, None, SessionLimits::default());
    let (outputs, reason, message, _) = read_to_end(&mut handle).await;

    assert_eq!(
        outputs,
        [ClientOutput::Event(transient), ClientOutput::Event(fatal)]
    );
    assert_eq!(
        (reason, reason.code()),
        (CloseReason::EngineError, "engine_error")
    );
    assert_eq!(message, "quota exceeded");
    settle().await;
    assert!(engine.received().closed);
}

#[tokio::test(start_paused = true)]
async fn a_refused_chunk_is_a_warning_and_the_conversation_goes_on() {
    let limits = DecoderLimits {
        input_cap_bytes: 4_096,
        ..DecoderLimits::default()
    };
    let decoder = StreamDecoder::for_mime("audio/pcm;rate=16000", limits).unwrap();
    let (engine, mut handle) = start(vec![], Some(decoder), SessionLimits::default());

    send(&handle, ClientInput::Audio(vec![0; 8_000].into())).await;
    for _ in 0..5 {
        // 100 ms of 16 kHz s16le.
        send(&handle, ClientInput::Audio(vec![1; 3_200].into())).await;
    }
    send(&handle, ClientInput::Stop).await;
    let (outputs, reason, _, summary) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(warnings(&outputs), ["chunk_refused"]);
    let ClientOutput::Warning { message, .. } = &outputs[0] else {
        panic!("{outputs:?}");
    };
    assert!(message.contains("8000 bytes refused"), "{message}");
    assert_eq!(summary.counters.chunks_refused, 1);
    assert_eq!(summary.counters.audio_in_ms, 500);
    assert_eq!(summary.decoder.unwrap().bytes_refused, 8_000);
    assert_eq!(engine.received().audio_samples, 8_000);
}

#[tokio::test(start_paused = true)]
async fn audio_bytes_without_a_decoder_are_refused() {
    let (engine, mut handle) = start(vec![], None, SessionLimits::default());
    send(&handle, ClientInput::Audio(vec![0; 100].into())).await;
    send(&handle, ClientInput::Pcm(pcm(80, 3))).await;
    send(&handle, ClientInput::Stop).await;
    let (outputs, reason, _, summary) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(warnings(&outputs), ["chunk_refused"]);
    assert_eq!(summary.counters.chunks_refused, 1);
    assert_eq!(engine.received().audio_samples, 1_280);
}

#[tokio::test(start_paused = true)]
async fn undecodable_audio_closes_with_the_decoder_message() {
    let (_engine, mut handle) = start(vec![], Some(webm_decoder()), SessionLimits::default());
    send(
        &handle,
        ClientInput::Audio(b"RIFF this is no WebM".to_vec().into()),
    )
    .await;
    let (_, reason, message, _) = read_to_end(&mut handle).await;

    assert_eq!(
        (reason, reason.code()),
        (CloseReason::BadAudio, "bad_audio")
    );
    assert!(message.starts_with("unsupported audio: "), "{message}");
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_inside_a_packet_still_ends_normally() {
    let chunks = chrome_chunks();
    let (engine, mut handle) = start(vec![], Some(webm_decoder()), SessionLimits::default());
    for chunk in &chunks[..10] {
        send(&handle, ClientInput::Audio(chunk.clone().into())).await;
    }
    send(
        &handle,
        ClientInput::Audio(chunks[10][..100].to_vec().into()),
    )
    .await;
    send(&handle, ClientInput::Stop).await;
    let (_, reason, message, summary) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    assert!(
        message.starts_with("the client stopped; WebM stream ended early: "),
        "{message}"
    );
    let decoded = summary.decoder.unwrap().pcm_samples_out;
    assert!(decoded > 0);
    assert_eq!(engine.received().audio_samples, decoded);
}

#[tokio::test(start_paused = true)]
async fn chrome_webm_reaches_the_engine_through_the_decoder() {
    let (engine, mut handle) = start(vec![], Some(webm_decoder()), SessionLimits::default());
    for chunk in chrome_chunks() {
        send(&handle, ClientInput::Audio(chunk.into())).await;
        sleep(Duration::from_millis(120)).await;
    }
    send(&handle, ClientInput::Stop).await;
    let (outputs, reason, message, summary) = read_to_end(&mut handle).await;

    assert!(outputs.is_empty(), "{outputs:?}");
    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(message, "the client stopped");
    assert_eq!(engine.received().audio_samples, 89_280);
    assert_eq!(summary.counters.audio_in_ms, 5_580);
    let decoder = summary.decoder.unwrap();
    assert_eq!(decoder.format, Some("webm"));
    assert_eq!(decoder.pcm_samples_out, 89_280);
}

#[tokio::test(start_paused = true)]
async fn a_whole_recording_in_one_chunk_decodes_the_same() {
    // 5.58 s arrive at once: the uplink must hold them all.
    let limits = SessionLimits {
        uplink_queue_ms: 6_000,
        ..SessionLimits::default()
    };
    let (engine, mut handle) = start(vec![], Some(webm_decoder()), limits);
    send(
        &handle,
        ClientInput::Audio(fixture("chrome_5s.webm").into()),
    )
    .await;
    send(&handle, ClientInput::Stop).await;
    let (_, reason, _, summary) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    assert_eq!(engine.received().audio_samples, 89_280);
    assert_eq!(summary.counters.audio_in_ms, 5_580);
    assert_eq!(summary.counters.uplink_dropped_ms, 0);
}

#[tokio::test(start_paused = true)]
async fn texts_and_tool_results_reach_the_engine_in_order_with_the_audio() {
    let (engine, mut handle) = start(vec![Step::AwaitText], None, SessionLimits::default());
    send(&handle, ClientInput::Pcm(pcm(40, 1))).await;
    send(&handle, ClientInput::Text("a".into())).await;
    send(&handle, ClientInput::Pcm(pcm(40, 2))).await;
    let result = json!({"temperature": 21});
    send(
        &handle,
        ClientInput::ToolResult {
            id: "t1".into(),
            json: result.clone(),
        },
    )
    .await;
    send(&handle, ClientInput::Stop).await;
    let (_, reason, _, _) = read_to_end(&mut handle).await;

    assert_eq!(reason, CloseReason::ClientStopped);
    let received = engine.received();
    let audio = |mark| Arrival::Audio {
        samples: FRAME_SAMPLES,
        first_sample: mark,
    };
    let want = [
        audio(1),
        Arrival::Text("a".into()),
        audio(2),
        Arrival::ToolResult { id: "t1".into() },
        Arrival::Close,
    ];
    assert_eq!(received.log, want);
    assert_eq!(received.tool_results, [("t1".to_owned(), result)]);
}

#[tokio::test(start_paused = true)]
async fn the_echo_engine_answers_every_turn_of_a_streaming_client() {
    let engine = ScriptedEngine::echo_turns(1_000, 400);
    let (_engine, mut handle) = start_engine(engine, None, SessionLimits::default());
    let mut output = std::mem::replace(&mut handle.output, tokio::sync::mpsc::channel(1).1);
    let reader = tokio::spawn(async move {
        let mut outputs = Vec::new();
        while let Some(o) = output.recv().await {
            outputs.push(o);
        }
        outputs
    });
    for i in 0..75 {
        send(&handle, ClientInput::Pcm(pcm(40, i))).await;
        sleep(Duration::from_millis(40)).await;
    }
    send(&handle, ClientInput::Stop).await;
    let summary = (&mut handle.task).await.unwrap();
    let outputs = reader.await.unwrap();

    assert!(matches!(
        outputs.last(),
        Some(ClientOutput::Closed {
            reason: CloseReason::ClientStopped,
            ..
        })
    ));
    assert_eq!(summary.turns, 3);
    assert_eq!(summary.latency_ms, [0, 0, 0]);
    assert_eq!(summary.usage.audio_in_ms, 3_000);
    assert_eq!(summary.usage.audio_out_ms, 1_200);
    assert_eq!(summary.counters.audio_out_ms, 1_200);
    assert_eq!(audio_marks(&outputs).len(), 30);
}
