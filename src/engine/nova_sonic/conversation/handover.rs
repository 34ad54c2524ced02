//! Streams coming and going: opening one (setup, history, audio block,
//! replay), the warm hand-off to a prepared stream, reconnection after a
//! failure, and closing streams properly. Every open asks the policy first:
//! a reconnection past the cap ends the conversation, a rotation past it (or
//! whose next stream failed) is put off while the current stream serves.

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::pump::FRAME_SAMPLES;
use super::{CONTROL_WAIT, Driver, END_WAIT, MAX_EARLY_EVENTS, Rotation, SETTLE, Step, Stream};
use crate::audio::ENGINE_RATE_HZ;
use crate::engine::nova_sonic::history::MAX_PIECE_BYTES;
use crate::engine::nova_sonic::input::{BlockRole, Builder, Input, Tool};
use crate::engine::nova_sonic::is_v1;
use crate::engine::nova_sonic::output::Output;
use crate::engine::nova_sonic::policy::{Count, Gate};
use crate::engine::nova_sonic::stream::{Failure, StreamItem};
use crate::engine::{EngineEvent, ErrorKind, TurnEndReason};

impl Stream {
    /// The closing events: the audio block's end (once it is open), then
    /// `promptEnd` and `sessionEnd`.
    fn closing(&self) -> Vec<Input> {
        let mut closing = Vec::new();
        if let Some(audio) = &self.audio {
            closing.push(self.builder.content_end(audio));
        }
        closing.extend(self.builder.prompt_and_session_end());
        closing
    }
}

impl Driver {
    /// The events that open a stream: session, prompt (voice, tools), system.
    pub(super) fn setup(&self, builder: &mut Builder) -> Vec<Input> {
        let s = &self.shared.settings;
        let tools: Vec<Tool> = self
            .shared
            .tools
            .iter()
            .flat_map(|t| t.specs())
            .map(|spec| Tool::new(&spec.name, &spec.description, &spec.schema))
            .collect();
        let mut events = vec![
            builder.session_start(s.inference, s.endpointing),
            builder.prompt_start(&self.voice, s.output_rate_hz, &tools),
        ];
        // Every AWS sample sends the system prompt in one event.
        events.extend(builder.text_block(BlockRole::System, false, &s.system_prompt, 64 * 1024));
        events
    }

    /// History, the audio block and the replay, for a stream taking over.
    pub(super) fn takeover(
        &mut self,
        builder: &mut Builder,
        ask_again: bool,
    ) -> (Vec<Input>, String) {
        let mut events = Vec::new();
        for message in self.history.shaped(ask_again) {
            events.extend(builder.text_block(message.role, false, &message.text, MAX_PIECE_BYTES));
        }
        let (start, audio) = builder.audio_start(ENGINE_RATE_HZ);
        events.push(start);
        if let Some(text) = self.unanswered.take()
            && !is_v1(&self.shared.settings.model)
        {
            events.extend(builder.text_block(BlockRole::User, true, &text, MAX_PIECE_BYTES));
            self.stall.expect_reply(Instant::now());
        }
        for frame in self.pump.unheard().chunks(FRAME_SAMPLES) {
            events.push(builder.audio_input(&audio, frame));
        }
        (events, audio)
    }

    pub(super) fn new_builder(&mut self) -> Builder {
        self.generation += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Builder::new(&format!("sonora-{nanos:x}-{}", self.generation))
    }

    /// Opens a stream (the caller asked the policy). Unless `prepare_only`:
    /// with history, audio block and replay queued at once (first stream,
    /// reconnection); otherwise only the setup (a rotation's next stream,
    /// finished at the hand-off).
    pub(super) fn open_stream(&mut self, prepare_only: bool) -> Stream {
        self.policy.opened(Instant::now());
        self.shared.stats.add(Count::Opened);
        let mut builder = self.new_builder();
        let mut events = self.setup(&mut builder);
        let mut audio = None;
        if !prepare_only {
            // v1 takes no typed text: the question stays in the history.
            let ask_again = self.unanswered.is_some() && !is_v1(&self.shared.settings.model);
            let (more, name) = self.takeover(&mut builder, ask_again);
            events.extend(more);
            audio = Some(name);
        }
        let up = self
            .shared
            .service
            .open(&self.shared.settings.model, &events);
        Stream {
            up,
            builder,
            audio,
            generation: self.generation,
            opened: false,
            settled: false,
            early: Vec::new(),
        }
    }

    pub(super) fn on_next_item(&mut self, item: Option<StreamItem>) {
        let Some(next) = self.next.as_mut() else {
            return;
        };
        match item {
            Some(StreamItem::Opened) => next.opened = true,
            Some(StreamItem::Failed(failure)) => {
                self.prepare_failed(&failure.to_string(), Some(&failure))
            }
            Some(StreamItem::Ended) | None => self.prepare_failed("the service ended it", None),
            Some(item) if next.early.len() < MAX_EARLY_EVENTS => next.early.push(item),
            Some(_) => {
                // A stream that talks before it has anything to answer.
                self.prepare_failed("it sent too much before taking over", None);
            }
        }
    }

    /// The next stream failed before the hand-off: the rotation waits out a
    /// backoff (never the next tick) while the current stream goes on.
    fn prepare_failed(&mut self, why: &str, failure: Option<&Failure>) {
        self.next = None;
        let now = Instant::now();
        if let Some(failure) = failure {
            self.note_load(failure, now);
        }
        self.prepare_failures += 1;
        let wait = self.policy.backoff(self.prepare_failures + 1);
        self.prepare_at = Some(now + wait);
        self.shared.stats.add(Count::Postponed);
        tracing::warn!(
            reason = why,
            wait_ms = wait.as_millis() as u64,
            "nova-sonic: the next stream failed; the hand-off is put off, the current stream goes on"
        );
    }

    /// Throttling or a quota refusal trips the engine's breaker.
    pub(super) fn note_load(&self, failure: &Failure, now: Instant) {
        if failure.overload()
            && let Some(cooldown) = self.shared.breaker.trip(now)
        {
            tracing::warn!(
                failure = %failure,
                cooldown_ms = cooldown.as_millis() as u64,
                "nova-sonic: Bedrock is shedding load: no new conversations and no new streams"
            );
        }
    }

    /// Streams the service answered that stayed up for [`SETTLE`] tell the
    /// breaker that Bedrock takes streams again.
    pub(super) fn check_settled(&mut self, now: Instant) {
        let breaker = &self.shared.breaker;
        for stream in [&mut self.current, &mut self.next].into_iter().flatten() {
            if !stream.settled
                && stream.opened
                && !stream.up.is_closed()
                && now.duration_since(stream.up.opened_at) >= SETTLE
            {
                stream.settled = true;
                breaker.success(stream.up.opened_at, now);
            }
        }
    }

    pub(super) async fn on_drained(&mut self, item: StreamItem) {
        if let StreamItem::Output(Output::Usage(event)) = item {
            for event in self.translator.on_previous_usage(&event) {
                self.emit(event).await;
            }
        }
    }

    pub(super) async fn on_failure(&mut self, failure: Failure) -> Step {
        let Some(failed) = self.current.take() else {
            return Step::Go;
        };
        let now = Instant::now();
        self.note_load(&failure, now);
        // A stream the service ended takes no more events; one given up
        // here (a stall) still gets its closing events, to free it.
        self.close_in_background(failed);
        if let Some(event) = self.translator.end_open_turn(TurnEndReason::Error) {
            self.emit(event).await;
        }
        if self.closing_since.is_some() {
            return Step::Stop;
        }
        if !failure.retry() {
            let message = format!("Nova Sonic refused the conversation: {failure}");
            self.emit(EngineEvent::Error {
                kind: ErrorKind::Fatal,
                message,
            })
            .await;
            return Step::Stop;
        }
        self.retries += 1;
        let max = self.shared.settings.max_retries;
        if self.retries > max {
            let message = format!(
                "Nova Sonic failed {} times in one turn, last: {failure}",
                self.retries
            );
            self.emit(EngineEvent::Error {
                kind: ErrorKind::Fatal,
                message,
            })
            .await;
            return Step::Stop;
        }
        if self.stall.reply_due() {
            // The user's last message was heard but not answered: ask again.
            self.unanswered = self.history.last_user().map(str::to_owned);
            self.stall.answered();
        }
        let backoff = self.policy.backoff(self.retries);
        let mut message = format!(
            "Nova Sonic stream failed ({failure}); reconnecting with the conversation so far (try {} of {max})",
            self.retries
        );
        if let Some(wait) = self.shared.breaker.wait(now) {
            let wait = wait.max(backoff).as_secs_f64();
            message.push_str(&format!(
                " once Bedrock takes streams again, in {wait:.1} s or more"
            ));
        }
        self.emit(EngineEvent::Error {
            kind: ErrorKind::Transient,
            message,
        })
        .await;
        self.next = None;
        self.rotation = Rotation::default();
        self.prepare_at = None;
        self.prepare_failures = 0;
        self.reconnect_at = Some(now + backoff);
        if backoff.is_zero() {
            return self.reconnect().await;
        }
        self.shared.stats.add(Count::Postponed);
        Step::Go
    }

    /// Opens the current stream (the first, or after a failure) if the
    /// policy lets it; otherwise schedules it, or past the cap ends the
    /// conversation.
    pub(super) async fn reconnect(&mut self) -> Step {
        self.reconnect_at = None;
        let now = Instant::now();
        match self.policy.gate(&self.shared.breaker, now) {
            Gate::Open => {}
            Gate::Wait(wait) => {
                self.shared.stats.add(Count::Postponed);
                self.reconnect_at = Some(now + wait);
                return Step::Go;
            }
            Gate::Capped(_) => {
                self.shared.stats.add(Count::Capped);
                let message = format!(
                    "Nova Sonic: this conversation opened {} streams within a minute (nova_sonic.max_opens_per_minute); giving up",
                    self.policy.recent_opens()
                );
                self.emit(EngineEvent::Error {
                    kind: ErrorKind::Fatal,
                    message,
                })
                .await;
                return Step::Stop;
            }
        }
        if self.generation > 0 {
            // The failed stream may still report late usage while it closes.
            self.translator.begin_overlapping_stream();
        }
        let stream = self.open_stream(false);
        self.current = Some(stream);
        Step::Go
    }

    /// Opens the next stream in the background (setup only), unless a
    /// backoff, the breaker or the cap holds it back.
    pub(super) fn prepare_next(&mut self) {
        let now = Instant::now();
        if self.prepare_at.is_some_and(|at| now < at) || self.closing_since.is_some() {
            return;
        }
        match self.policy.gate(&self.shared.breaker, now) {
            Gate::Open => {}
            Gate::Wait(wait) => {
                self.shared.stats.add(Count::Postponed);
                self.prepare_at = Some(now + wait);
                return;
            }
            Gate::Capped(room) => {
                self.shared.stats.add(Count::Capped);
                self.prepare_at = Some(now + room);
                tracing::warn!(
                    wait_ms = room.as_millis() as u64,
                    "nova-sonic: at nova_sonic.max_opens_per_minute; the hand-off is put off"
                );
                return;
            }
        }
        self.prepare_at = None;
        let stream = self.open_stream(true);
        self.next = Some(stream);
    }

    /// Rotation: armed once the current stream is `rotate_after` old; the
    /// next stream is prepared when the assistant starts speaking (see
    /// `on_output`) or `handoff_wait` after that.
    pub(super) fn rotation_tick(&mut self, now: Instant) {
        let settings = &self.shared.settings;
        let (rotate_after, handoff_wait) = (settings.rotate_after, settings.handoff_wait);
        let Some(current) = &self.current else {
            return;
        };
        if current.audio.is_none() {
            return;
        }
        let age = now.duration_since(current.up.opened_at);
        if self.rotation.armed_at.is_none() && age >= rotate_after && self.closing_since.is_none() {
            self.rotation.armed_at = Some(now);
        }
        if let Some(armed) = self.rotation.armed_at
            && self.next.is_none()
            && now.duration_since(armed) >= handoff_wait
        {
            self.prepare_next();
        }
    }

    pub(super) fn assistant_done(&self) -> bool {
        !self.translator.turn_open() && self.tools.idle() && !self.stall.reply_due()
    }

    pub(super) async fn maybe_hand_off(&mut self) {
        let ready = self
            .next
            .as_ref()
            .is_some_and(|n| n.opened && !n.up.is_closed());
        if ready && self.assistant_done() {
            self.hand_off().await;
        }
    }

    /// Switches to the prepared stream: history, audio block, unheard audio,
    /// then live audio; the old stream closes in the background.
    pub(super) async fn hand_off(&mut self) {
        let Some(mut next) = self.next.take() else {
            return;
        };
        let started = Instant::now();
        let (events, audio) = self.takeover(&mut next.builder, false);
        for event in &events {
            if next.up.send(event, CONTROL_WAIT).await.is_err() {
                // The next stream is not taking events: keep the current one.
                self.close_in_background(next);
                self.prepare_failed("it took no events at the hand-off", None);
                return;
            }
        }
        let first_new = Instant::now();
        let gap = first_new.duration_since(started);
        next.audio = Some(audio);
        let early = std::mem::take(&mut next.early);
        let old = self.current.replace(next);
        self.rotation = Rotation::default();
        self.prepare_at = None;
        self.prepare_failures = 0;
        self.translator.begin_overlapping_stream();
        if let Some(old) = old {
            self.close_in_background(old);
        }
        self.emit(EngineEvent::Rotated {
            generation: self.generation,
            gap_ms: (gap.as_secs_f64() * 100_000.0).round() / 100.0,
        })
        .await;
        for item in early {
            if let StreamItem::Output(output) = item {
                self.on_output(output).await;
            }
        }
    }

    /// The closing triple (when the stream still takes events), then its
    /// last events, in the background; late usage is still counted.
    pub(super) fn close_in_background(&self, stream: Stream) {
        let closing = stream.closing();
        stream
            .up
            .finish(closing, END_WAIT, Some(self.drain_tx.clone()));
    }

    /// Ends the current stream: the closing triple, then its last events
    /// (usage) until the service ends it.
    pub(super) async fn finish(&mut self) {
        self.next = None;
        let Some(mut stream) = self.current.take() else {
            return;
        };
        let closing = stream.closing();
        // Events that already arrived come first.
        let mut early = Vec::new();
        while let Ok(item) = stream.up.events.try_recv() {
            early.push(item);
        }
        let (tx, mut rx) = mpsc::channel(64);
        let finishing = stream.up.finish(closing, END_WAIT, Some(tx));
        for item in early {
            self.on_last_item(item).await;
        }
        while let Some(item) = rx.recv().await {
            self.on_last_item(item).await;
        }
        let _ = finishing.await;
        if let Some(event) = self.translator.end_open_turn(TurnEndReason::Completed) {
            self.emit(event).await;
        }
    }

    /// An event from the stream being finished: translated, nothing else.
    async fn on_last_item(&mut self, item: StreamItem) {
        if let StreamItem::Output(output) = item {
            for event in self.translator.on_output(output) {
                self.emit(event).await;
            }
        }
    }
}
