//! One reply of the local engine: recognise the user's turn (unless it was
//! typed), answer it from the chat endpoint or the knowledge base, speak it,
//! and report what was heard, said and used.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Shared;
use super::asr::{Hypothesis, Pass};
use crate::engine::{EngineEvent, ErrorKind, Pcm, Role, Stage, TurnEndReason};
use crate::knowledge::{Lexicon, Reply};
use crate::tts;
use crate::usage::UsageDelta;

/// Recognition started before the end of the turn; `None` when it was
/// skipped as stale.
pub(super) type EarlyRecognition = JoinHandle<Result<Option<String>, String>>;

/// A user turn waiting for its reply.
#[derive(Debug)]
pub(super) struct Turn {
    pub(super) id: u64,
    pub(super) input: TurnInput,
}

#[derive(Debug)]
pub(super) enum TurnInput {
    /// Speech, with recognition possibly already started on it.
    Speech {
        audio: Vec<i16>,
        early: Option<EarlyRecognition>,
    },
    Text(String),
}

/// How far the reply being spoken has got, on the input audio clock: the
/// client streams its microphone continuously, so input time is the
/// client's time, and the reply is "playing" until its length has passed.
#[derive(Debug)]
pub(super) struct ReplyProgress {
    /// Input clock when the first reply frame went out (`u64::MAX`: not yet).
    pub(super) started_at_ms: AtomicU64,
    pub(super) audio_ms: AtomicU64,
    /// What the user said and what is being answered, once known, so an
    /// interrupted reply still reaches the usage ledger and the history.
    pub(super) texts: std::sync::Mutex<Option<(String, String)>>,
}

impl ReplyProgress {
    pub(super) fn playing_until_ms(&self) -> Option<u64> {
        let start = self.started_at_ms.load(Ordering::Acquire);
        (start != u64::MAX).then(|| start + self.audio_ms.load(Ordering::Acquire))
    }
}

/// Final user and assistant texts, oldest first, for the chat endpoint.
pub(super) type History = Arc<std::sync::Mutex<VecDeque<(Role, String)>>>;

/// Messages of history sent to the chat endpoint.
const HISTORY_MESSAGES: usize = 12;

/// Adds one exchange to the history, keeping the last messages.
pub(super) fn remember(history: &History, heard: &str, answer: &str) {
    if heard.is_empty() && answer.is_empty() {
        return;
    }
    if let Ok(mut history) = history.lock() {
        history.push_back((Role::User, heard.to_owned()));
        history.push_back((Role::Assistant, answer.to_owned()));
        while history.len() > HISTORY_MESSAGES {
            history.pop_front();
        }
    }
}

/// Runs recognition on the blocking pool, one at a time per engine
/// ([`super::gate::run`]). With a `wanted` generation, the job is skipped
/// (`Ok(None)`) if the generation moved on while it waited for its turn.
pub(super) async fn recognise(
    shared: Arc<Shared>,
    audio: Vec<i16>,
    language: String,
    wanted: Option<(Arc<AtomicU64>, u64)>,
) -> Result<Option<String>, String> {
    let gate = Arc::clone(&shared.asr_gate);
    // A turn the user went on speaking in is not worth a second decode.
    let current = wanted.clone();
    let still_wanted = move || super::gate::is_current(current.as_ref());
    super::gate::run(&gate, wanted, "speech recognition", move || {
        let lexicon = shared.lexicon.as_ref();
        let transcript = |pass: Pass| -> Result<String, String> {
            let started = std::time::Instant::now();
            let hypotheses = shared.asr.transcribe(&audio, &language, pass)?;
            tracing::debug!(
                audio_ms = audio.len() / 16,
                ms = started.elapsed().as_millis() as u64,
                ?pass,
                ?hypotheses,
                "recognised"
            );
            Ok(without_repeats(&choose(
                hypotheses,
                lexicon.map(|(l, _)| l),
            )))
        };
        shared.stats.recognitions.fetch_add(1, Ordering::Relaxed);
        let mut text = transcript(Pass::First)?;
        // Now and then Whisper keeps only the last sentence of a question
        // ("¿Qué hago?" for "Olvidé la contraseña…, ¿qué hago?"): decoded
        // again, the same audio says more.
        let mut retried = false;
        for pass in [Pass::WiderWindow, Pass::AudioAlone] {
            if pass == Pass::AudioAlone && !shared.asr.has_prompt() {
                break;
            }
            if !collapsed(&text, audio.len()) || !still_wanted() {
                break;
            }
            retried = true;
            let again = transcript(pass)?;
            if word_count(&again) > word_count(&text) {
                text = again;
            }
        }
        if retried {
            shared
                .stats
                .recognitions_retried
                .fetch_add(1, Ordering::Relaxed);
        }
        let corrected = lexicon
            .filter(|(_, correct)| *correct)
            .and_then(|(l, _)| l.correct(&text));
        Ok(match corrected {
            Some((corrected, corrections)) => {
                tracing::debug!(?corrections, "words corrected to the knowledge base's");
                corrected
            }
            None => text,
        })
    })
    .await
}

/// Audio per word (ms) beyond which a transcript looks collapsed: speech
/// runs at two to three words a second, and a slow speaker's pauses end the
/// turn before they make it this sparse.
const COLLAPSED_MS_PER_WORD: usize = 1_300;

/// Audio (ms) under which no transcript is judged collapsed: a short
/// answer ("sí, gracias") is short.
const COLLAPSE_FROM_MS: usize = 2_000;

/// Whether `text`, heard in `samples` of 16 kHz audio, has far fewer words
/// than that much speech holds. An empty transcript is not: it is what
/// Whisper rightly makes of a cough or a door, where a second decode would
/// only invent words.
fn collapsed(text: &str, samples: usize) -> bool {
    let ms = samples / super::SAMPLES_PER_MS as usize;
    let words = word_count(text);
    ms >= COLLAPSE_FROM_MS && words > 0 && words * COLLAPSED_MS_PER_WORD < ms
}

/// Words of a transcript (runs with a letter or digit in them).
fn word_count(text: &str) -> usize {
    text.split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .count()
}

/// What one word no list knows costs a hypothesis, in mean log probability
/// per token: a transcript of real words wins over a likelier one with a
/// made-up word ("¿Qué becas puedo…" over "que recastuemos…") only when
/// the model found them nearly as likely.
const UNKNOWN_WORD_COST: f32 = 0.05;

/// The hypothesis to go on with: the likeliest, each word that neither the
/// knowledge base nor the word list knows counted against it.
fn choose(hypotheses: Vec<Hypothesis>, lexicon: Option<&Lexicon>) -> String {
    hypotheses
        .into_iter()
        .map(|h| {
            let unknown = lexicon.map_or(0, |l| l.unknown_words(&h.text));
            (h.score - UNKNOWN_WORD_COST * unknown as f32, h.text)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, text)| text)
        .unwrap_or_default()
}

/// The transcript with each sentence said again right after itself kept
/// once: on a short clip Whisper sometimes loops ("¿Qué hago? ¿Qué hago?
/// ¿Qué hago?"); a speaker repeating a sentence word for word means it once.
fn without_repeats(text: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut last = String::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        let at_end = end == text.len();
        if matches!(c, '.' | '?' | '!') || at_end {
            let sentence = text[start..end].trim();
            let key: String = sentence
                .chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect();
            if !key.is_empty() && key != last {
                kept.push(sentence);
                last = key;
            }
            start = end;
        }
    }
    kept.join(" ")
}

/// One reply: recognise (unless typed), answer, speak.
pub(super) struct ReplyJob {
    pub(super) shared: Arc<Shared>,
    pub(super) language: String,
    pub(super) voice: String,
    pub(super) events: mpsc::Sender<EngineEvent>,
    pub(super) clock_ms: Arc<AtomicU64>,
    pub(super) progress: Arc<ReplyProgress>,
    pub(super) history: History,
}

impl ReplyJob {
    pub(super) async fn run(self, turn: Turn) {
        let id = turn.id;
        let reason = match self.reply(turn).await {
            Ok(reason) => reason,
            Err(message) => {
                let _ = self
                    .events
                    .send(EngineEvent::Error {
                        kind: ErrorKind::Transient,
                        message,
                    })
                    .await;
                TurnEndReason::Error
            }
        };
        let _ = self
            .events
            .send(EngineEvent::TurnEnd {
                turn_id: id,
                reason,
            })
            .await;
    }

    async fn send(&self, event: EngineEvent) -> Result<(), String> {
        self.events
            .send(event)
            .await
            .map_err(|_| "the conversation ended".to_owned())
    }

    /// The chat endpoint's answer when one is configured and answers in
    /// time; else (and then with a transient error event) the knowledge base's.
    async fn answer(&self, heard: &str) -> Result<String, String> {
        let from_knowledge = || async {
            let reply = Arc::clone(&self.shared.knowledge)
                .answer_blocking(heard.to_owned(), self.language.clone())
                .await
                .map_err(|e| format!("the knowledge search stopped: {e}"))?;
            Ok::<_, String>(match reply {
                Reply::Found(answer) => answer.text,
                Reply::NotFound { text } => text,
            })
        };
        let Some(chat) = &self.shared.chat else {
            return from_knowledge().await;
        };
        let history: Vec<(Role, String)> = self
            .history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        match chat
            .reply(&self.shared.knowledge, &self.language, &history, heard)
            .await
        {
            Ok(text) => Ok(text),
            Err(message) => {
                self.send(EngineEvent::Error {
                    kind: ErrorKind::Transient,
                    message: format!("{message}; answering from the knowledge base"),
                })
                .await?;
                from_knowledge().await
            }
        }
    }

    async fn reply(&self, turn: Turn) -> Result<TurnEndReason, String> {
        let id = turn.id;
        let heard = match turn.input {
            TurnInput::Text(text) => text,
            TurnInput::Speech { audio, early } => {
                let early = match early {
                    Some(task) => task
                        .await
                        .map_err(|e| format!("speech recognition stopped: {e}"))??,
                    None => None,
                };
                match early {
                    Some(text) => text,
                    None => recognise(Arc::clone(&self.shared), audio, self.language.clone(), None)
                        .await?
                        .unwrap_or_default(),
                }
            }
        };
        let heard = heard.trim().to_owned();
        if !heard.chars().any(char::is_alphanumeric) {
            return Ok(TurnEndReason::Empty);
        }
        self.send(EngineEvent::Transcript {
            role: Role::User,
            text: heard.clone(),
            stage: Stage::Final,
            turn_id: id,
        })
        .await?;
        let answer = self.answer(&heard).await?;
        self.send(EngineEvent::Transcript {
            role: Role::Assistant,
            text: answer.clone(),
            stage: Stage::Speculative,
            turn_id: id,
        })
        .await?;

        if let Ok(mut texts) = self.progress.texts.lock() {
            *texts = Some((heard.clone(), answer.clone()));
        }
        let rate_hz = self.shared.tts.output_rate_hz;
        let (frames_tx, mut frames_rx) = mpsc::channel::<Vec<i16>>(8);
        let tts = self.shared.tts.clone();
        let voice = self.voice.clone();
        let text = answer.clone();
        let speaking =
            tokio::spawn(async move { tts::speak(&tts, &voice, &text, &frames_tx).await });
        let mut audio_ms = 0u64;
        while let Some(samples) = frames_rx.recv().await {
            if audio_ms == 0 {
                self.progress
                    .started_at_ms
                    .store(self.clock_ms.load(Ordering::Acquire), Ordering::Release);
            }
            audio_ms += samples.len() as u64 * 1000 / u64::from(rate_hz);
            self.progress.audio_ms.store(audio_ms, Ordering::Release);
            self.send(EngineEvent::Audio(Pcm { rate_hz, samples }))
                .await?;
        }
        speaking
            .await
            .map_err(|e| format!("speech synthesis stopped: {e}"))??;
        self.send(EngineEvent::Transcript {
            role: Role::Assistant,
            text: answer.clone(),
            stage: Stage::Final,
            turn_id: id,
        })
        .await?;
        if self
            .progress
            .texts
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .is_some()
        {
            remember(&self.history, &heard, &answer);
        }
        self.send(EngineEvent::Usage(UsageDelta {
            audio_out_ms: audio_ms,
            text_in_chars: heard.chars().count() as u64,
            text_out_chars: answer.chars().count() as u64,
            ..UsageDelta::default()
        }))
        .await?;
        Ok(TurnEndReason::Completed)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sentence_looped_by_the_recogniser_is_kept_once() {
        assert_eq!(
            without_repeats("¿Qué hago? ¿Qué hago? ¿Qué hago?"),
            "¿Qué hago?"
        );
        assert_eq!(
            without_repeats("¿Qué recaso hemos solicitar? ¿qué recaso hemos solicitar"),
            "¿Qué recaso hemos solicitar?"
        );
        // Other sentences, and words said twice within one, stay.
        for same in [
            "Hola. ¿Dónde pido una constancia? Gracias.",
            "no, no, no lo encuentro",
            "del portal del estudiante",
            "Sí. No. Sí.",
            "",
        ] {
            assert_eq!(without_repeats(same), same);
        }
    }

    use super::*;
    use crate::knowledge::KnowledgeBase;

    #[test]
    fn a_transcript_far_shorter_than_its_speech_has_collapsed() {
        let ms = |ms: usize| ms * 16;
        // Four seconds of a question heard as its last two words.
        assert!(collapsed("¿Qué hago?", ms(3_996)));
        assert!(!collapsed(
            "¿Por dinero a contraseña del portal del estudiante? ¿Qué hago?",
            ms(3_996)
        ));
        // Three words in 3.2 s is a slow speaker, not a collapse.
        assert!(!collapsed("la biblioteca central", ms(3_200)));
        assert!(collapsed("biblioteca", ms(3_200)));
        // A short answer is short; nothing heard is not a collapse.
        assert!(!collapsed("Sí.", ms(1_800)));
        assert!(!collapsed("", ms(5_000)));
        assert!(!collapsed("... ¿?", ms(5_000)));
    }

    #[test]
    fn words_are_counted_without_punctuation() {
        assert_eq!(word_count("¿Qué hago? ¿Qué hago?"), 4);
        assert_eq!(word_count(" -- ¿ ? "), 0);
        assert_eq!(word_count("Aula 3, edificio B"), 4);
    }

    fn hypothesis(text: &str, score: f32) -> Hypothesis {
        Hypothesis {
            text: text.to_owned(),
            score,
        }
    }

    #[test]
    fn a_nearly_as_likely_hypothesis_of_known_words_wins() {
        let base = KnowledgeBase::from_markdown(&[(
            "faq.md".to_owned(),
            "## ¿Dónde está el portal del estudiante?\nEn la web.\n".to_owned(),
        )])
        .unwrap();
        let lexicon = Lexicon::new(&base, "contraseña\n");
        let heard = || {
            vec![
                hypothesis("contraseña, nel portal, nel estudiante", -0.51),
                hypothesis("contraseña, del portal, del estudiante", -0.57),
            ]
        };
        // Two made-up words cost 0.1: more than the 0.06 between them.
        assert_eq!(
            choose(heard(), Some(&lexicon)),
            "contraseña, del portal, del estudiante"
        );
        // Without the lexicon the likeliest stands; so it does when the
        // known one is much less likely.
        assert_eq!(
            choose(heard(), None),
            "contraseña, nel portal, nel estudiante"
        );
        let far = vec![
            hypothesis("nel portal", -0.5),
            hypothesis("del portal", -0.9),
        ];
        assert_eq!(choose(far, Some(&lexicon)), "nel portal");
        assert_eq!(choose(Vec::new(), Some(&lexicon)), "");
    }
}
