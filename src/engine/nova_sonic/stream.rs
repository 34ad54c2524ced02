//! One upstream stream: an `InvokeModelWithBidirectionalStream` call.
//!
//! The setup events go into the input channel before the call is awaited
//! (the service answers only once it has `sessionStart`, so awaiting first
//! would wait forever). A task reads the output side and hands parsed events
//! to the conversation; once the service ends the stream, or it fails, the
//! stream is marked closed and nothing more is written to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::operation::invoke_model_with_bidirectional_stream::InvokeModelWithBidirectionalStreamError as CallError;
use aws_sdk_bedrockruntime::primitives::Blob;
use aws_sdk_bedrockruntime::primitives::event_stream::EventStreamSender;
use aws_sdk_bedrockruntime::types::error::{
    InvokeModelWithBidirectionalStreamInputError as InputError,
    InvokeModelWithBidirectionalStreamOutputError as OutputError,
};
use aws_sdk_bedrockruntime::types::{
    BidirectionalInputPayloadPart, InvokeModelWithBidirectionalStreamInput as SdkInput,
    InvokeModelWithBidirectionalStreamOutput as SdkOutput,
};
use aws_smithy_types::error::display::DisplayErrorContext;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::input::Input;
use super::output::{Output, parse_output};

/// Input events that may wait for the network beyond the setup: about
/// three seconds of 32 ms audio frames (a new stream's set-up can take a
/// few hundred milliseconds). Past that the stream is stalled and audio is
/// refused, and counted.
const INPUT_CAPACITY: usize = 96;
/// Parsed output events waiting for the conversation.
const OUTPUT_CAPACITY: usize = 256;

/// What the output side reports.
#[derive(Debug)]
pub(crate) enum StreamItem {
    /// The service answered the call: events now flow.
    Opened,
    Output(Output),
    /// A chunk that is not a valid event: skipped, the stream goes on.
    Malformed(String),
    /// The stream failed; `Failure::retry` says whether a new one may help.
    Failed(Failure),
    /// The service ended the stream.
    Ended,
}

/// A failed stream, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The exception name (`throttlingException`, `AccessDeniedException`…)
    /// or the transport failure kind, for messages.
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) kind: FailureKind,
}

/// What a failure means for the conversation, decided where the SDK's
/// error variant is matched (never from a message's wording).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// `ThrottlingException`: too many requests or streams just now. Reopen
    /// after a backoff; the engine's breaker trips.
    Throttled,
    /// `ServiceQuotaExceededException`: the account is at a quota. The
    /// conversation ends; the engine's breaker trips.
    QuotaExceeded,
    /// A passing fault (service errors, model timeouts, resets, transport
    /// failures, a stall found here, an in-stream validation error on a
    /// stream that had been answering): reopen with the history.
    Transient,
    /// The service refused the request as invalid before the stream
    /// answered anything: the same request would fail again. Fatal.
    Invalid,
    /// Credentials, access or the model refused: fatal, never retried.
    Refused,
    /// The request could not be made here (no credentials, a request the
    /// client cannot build): fatal until the setup is fixed.
    Misconfigured,
}

impl Failure {
    /// A transient failure found here (a stall, an ended stream), not
    /// reported by the service.
    pub(crate) fn transient(code: &str, message: String) -> Self {
        Self {
            code: code.to_owned(),
            message,
            kind: FailureKind::Transient,
        }
    }

    /// Whether a new stream may help.
    pub(crate) fn retry(&self) -> bool {
        matches!(self.kind, FailureKind::Throttled | FailureKind::Transient)
    }

    /// Throttling or a quota refusal: the engine's breaker trips.
    pub(crate) fn overload(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Throttled | FailureKind::QuotaExceeded
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Why an input event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The network is not taking events (a stall): drop audio and count it.
    Full,
    /// The stream has ended: write nothing more.
    Closed,
}

/// Where streams are opened: Bedrock through the SDK or, in tests, a
/// service the test plays.
#[derive(Debug)]
pub(crate) enum Service {
    Bedrock(Client),
    #[cfg(test)]
    Fake(mpsc::UnboundedSender<FakeCall>),
}

impl Service {
    /// Opens a stream whose first events are `setup`; see [`Upstream::open`].
    pub(crate) fn open(&self, model: &str, setup: &[Input]) -> Upstream {
        match self {
            Self::Bedrock(client) => Upstream::open(client, model, setup),
            #[cfg(test)]
            Self::Fake(calls) => {
                let (upstream, call) = Upstream::fake(setup);
                let _ = calls.send(call);
                upstream
            }
        }
    }
}

/// One call to a service played by a test.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct FakeCall {
    /// What the conversation sends, in order, from `sessionStart` on.
    pub(crate) sent: mpsc::Receiver<Result<SdkInput, InputError>>,
    /// What the service answers; `Ended` or `Failed` closes the stream.
    pub(crate) answer: mpsc::UnboundedSender<StreamItem>,
}

/// The JSON event inside an input the conversation sent.
#[cfg(test)]
pub(crate) fn sent_json(input: &SdkInput) -> serde_json::Value {
    match input {
        SdkInput::Chunk(part) => part
            .bytes()
            .and_then(|blob| serde_json::from_slice(blob.as_ref()).ok())
            .unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

/// One open stream.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// `None` once the input side is finished.
    input: Option<mpsc::Sender<Result<SdkInput, InputError>>>,
    closed: Arc<AtomicBool>,
    pub(crate) events: mpsc::Receiver<StreamItem>,
    task: JoinHandle<()>,
    pub(crate) opened_at: Instant,
}

fn chunk(input: &Input) -> Result<SdkInput, InputError> {
    let part = BidirectionalInputPayloadPart::builder()
        .bytes(Blob::new(input.to_bytes()))
        .build();
    Ok(SdkInput::Chunk(part))
}

impl Upstream {
    /// Opens a stream whose first events are `setup` (from `sessionStart`
    /// on). Returns at once; failures arrive as [`StreamItem::Failed`].
    pub(crate) fn open(client: &Client, model: &str, setup: &[Input]) -> Self {
        let capacity = INPUT_CAPACITY + setup.len();
        let (input, mut input_rx) = mpsc::channel(capacity);
        for event in setup {
            // Cannot fail: the channel is empty and large enough.
            let _ = input.try_send(chunk(event));
        }
        let (events_tx, events) = mpsc::channel(OUTPUT_CAPACITY);
        let closed = Arc::new(AtomicBool::new(false));
        let body = futures_util::stream::poll_fn(move |cx| input_rx.poll_recv(cx));
        let call = client
            .invoke_model_with_bidirectional_stream()
            .model_id(model)
            .body(EventStreamSender::from(body));
        let flag = closed.clone();
        let task = tokio::spawn(async move {
            let mut opened = false;
            let mut answered = false;
            let item = match call.send().await {
                Err(e) => StreamItem::Failed(call_failure(&e)),
                Ok(mut output) => loop {
                    if !opened {
                        opened = true;
                        if events_tx.send(StreamItem::Opened).await.is_err() {
                            break StreamItem::Ended;
                        }
                    }
                    let item = match output.body.recv().await {
                        Ok(Some(SdkOutput::Chunk(part))) => match part.bytes() {
                            Some(blob) => match parse_output(blob.as_ref()) {
                                Ok(event) => StreamItem::Output(event),
                                Err(e) => StreamItem::Malformed(e),
                            },
                            None => StreamItem::Malformed("a chunk without bytes".into()),
                        },
                        Ok(Some(_)) => StreamItem::Malformed("an unknown output member".into()),
                        Ok(None) => break StreamItem::Ended,
                        Err(e) => break StreamItem::Failed(stream_failure(&e, answered)),
                    };
                    answered = true;
                    if events_tx.send(item).await.is_err() {
                        break StreamItem::Ended;
                    }
                },
            };
            flag.store(true, Ordering::Release);
            let _ = events_tx.send(item).await;
        });
        Self {
            input: Some(input),
            closed,
            events,
            task,
            opened_at: Instant::now(),
        }
    }

    /// A stream answered by a test instead of the SDK: the same channels,
    /// the same closing rules.
    #[cfg(test)]
    fn fake(setup: &[Input]) -> (Self, FakeCall) {
        let (input, sent) = mpsc::channel(INPUT_CAPACITY + setup.len());
        for event in setup {
            let _ = input.try_send(chunk(event));
        }
        let (events_tx, events) = mpsc::channel(OUTPUT_CAPACITY);
        let (answer, mut answers) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = answers.recv().await {
                let last = matches!(item, StreamItem::Ended | StreamItem::Failed(_));
                if last {
                    flag.store(true, Ordering::Release);
                }
                if events_tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        let upstream = Self {
            input: Some(input),
            closed,
            events,
            task,
            opened_at: Instant::now(),
        };
        (upstream, FakeCall { sent, answer })
    }

    /// True once the service ended or failed the stream.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Queues an event without waiting (audio: a full queue is a stall).
    pub(crate) fn try_send(&self, input: &Input) -> Result<(), SendError> {
        let Some(sender) = self.input.as_ref().filter(|_| !self.is_closed()) else {
            return Err(SendError::Closed);
        };
        sender.try_send(chunk(input)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Queues an event that must not be dropped (block boundaries, tool
    /// results, text), waiting at most `wait` for room.
    pub(crate) async fn send(&self, input: &Input, wait: Duration) -> Result<(), SendError> {
        let Some(sender) = self.input.as_ref().filter(|_| !self.is_closed()) else {
            return Err(SendError::Closed);
        };
        match tokio::time::timeout(wait, sender.send(chunk(input))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendError::Closed),
            Err(_) => Err(SendError::Full),
        }
    }

    /// Ends the stream in the background: the closing events (unless the
    /// service already ended it), then up to `wait` for the service to end
    /// it, reading (and handing to `drain`) whatever still arrives.
    pub(crate) fn finish(
        mut self,
        closing: Vec<Input>,
        wait: Duration,
        drain: Option<mpsc::Sender<StreamItem>>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let deadline = Instant::now() + wait;
            for event in &closing {
                let left = deadline.saturating_duration_since(Instant::now());
                if self.send(event, left).await.is_err() {
                    break;
                }
            }
            // Ending the input side lets the request body finish.
            self.input = None;
            while let Ok(Some(item)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
                let last = matches!(item, StreamItem::Ended | StreamItem::Failed(_));
                if let Some(drain) = &drain {
                    let _ = drain.send(item).await;
                }
                if last {
                    break;
                }
            }
            self.task.abort();
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A failure of the call itself (before or while the response started).
fn call_failure(
    error: &SdkError<CallError, aws_sdk_bedrockruntime::config::http::HttpResponse>,
) -> Failure {
    match error {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let (code, kind) = call_kind(e);
            let message = e.message().unwrap_or("no message").to_owned();
            Failure {
                code: code.to_owned(),
                message,
                kind,
            }
        }
        other => transport_failure(other),
    }
}

/// The name and kind of an error the service returned for the call.
pub(crate) fn call_kind(error: &CallError) -> (&str, FailureKind) {
    use FailureKind::{QuotaExceeded, Refused, Throttled, Transient};
    match error {
        CallError::ThrottlingException(_) => ("ThrottlingException", Throttled),
        CallError::ServiceUnavailableException(_) => ("ServiceUnavailableException", Transient),
        CallError::InternalServerException(_) => ("InternalServerException", Transient),
        CallError::ModelStreamErrorException(_) => ("ModelStreamErrorException", Transient),
        CallError::ModelTimeoutException(_) => ("ModelTimeoutException", Transient),
        CallError::ModelNotReadyException(_) => ("ModelNotReadyException", Transient),
        CallError::ModelErrorException(_) => ("ModelErrorException", Transient),
        CallError::ValidationException(e) => {
            ("ValidationException", validation_kind(e.message(), false))
        }
        CallError::AccessDeniedException(_) => ("AccessDeniedException", Refused),
        CallError::ResourceNotFoundException(_) => ("ResourceNotFoundException", Refused),
        CallError::ServiceQuotaExceededException(_) => {
            ("ServiceQuotaExceededException", QuotaExceeded)
        }
        // Errors the model does not list (`UnrecognizedClientException`,
        // `ExpiredTokenException`…) are about who is calling.
        other => (other.code().unwrap_or("UnknownError"), Refused),
    }
}

/// A failure on the output side of a running stream. In-stream exceptions
/// carry no error code, so the variant names them.
fn stream_failure(
    error: &SdkError<OutputError, aws_smithy_types::event_stream::RawMessage>,
    answered: bool,
) -> Failure {
    match error {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let (code, kind) = stream_kind(e, answered);
            let message = e.message().unwrap_or("no message").to_owned();
            Failure {
                code: code.to_owned(),
                message,
                kind,
            }
        }
        other => transport_failure(other),
    }
}

/// The name and kind of an exception inside a running stream; `answered`
/// says whether the stream had sent anything before it.
///
/// A validation error on a stream that had been answering is the service
/// dropping a conversation it was serving (its idle timeout, an
/// `RST_STREAM`, "system instability"): a new stream with the history helps.
/// Before the first answer, it is the request (setup, history, voice) that
/// the service refused, and it would refuse it again.
pub(crate) fn stream_kind(error: &OutputError, answered: bool) -> (&str, FailureKind) {
    use FailureKind::{Refused, Throttled, Transient};
    match error {
        OutputError::ThrottlingException(_) => ("throttlingException", Throttled),
        OutputError::ServiceUnavailableException(_) => ("serviceUnavailableException", Transient),
        OutputError::InternalServerException(_) => ("internalServerException", Transient),
        OutputError::ModelStreamErrorException(_) => ("modelStreamErrorException", Transient),
        OutputError::ModelTimeoutException(_) => ("modelTimeoutException", Transient),
        OutputError::ValidationException(e) => (
            "validationException",
            validation_kind(e.message(), answered),
        ),
        other => (other.code().unwrap_or("unknownException"), Refused),
    }
}

/// The runtime conditions the service reports as a validation exception,
/// told apart only by its message: its idle timeout, a reset stream and
/// "System instability detected. Please retry your request." A new stream
/// (with the history) helps with each, even before the first answer.
const TRANSIENT_VALIDATION: [&str; 3] = [
    "Timed out waiting for input events",
    "RST_STREAM",
    "System instability",
];

/// A validation exception is transient when the stream had been answering
/// or when its message names one of [`TRANSIENT_VALIDATION`]; otherwise the
/// request itself was refused and would be again.
fn validation_kind(message: Option<&str>, answered: bool) -> FailureKind {
    let transient = message.is_some_and(|m| TRANSIENT_VALIDATION.iter().any(|t| m.contains(t)));
    if answered || transient {
        FailureKind::Transient
    } else {
        FailureKind::Invalid
    }
}

/// A failure before any answer from the service, or of the connection.
fn transport_failure<E: std::error::Error + 'static, R: std::fmt::Debug + 'static>(
    error: &SdkError<E, R>,
) -> Failure {
    let message = DisplayErrorContext(error).to_string();
    let (code, kind) = match error {
        SdkError::ConstructionFailure(_) => ("ConstructionFailure", FailureKind::Misconfigured),
        SdkError::TimeoutError(_) => ("Timeout", FailureKind::Transient),
        // No credentials surface as a dispatch failure caused by the
        // credentials provider: retrying cannot help.
        SdkError::DispatchFailure(_) if caused_by_credentials(error) => {
            ("NoCredentials", FailureKind::Misconfigured)
        }
        SdkError::DispatchFailure(_) => ("DispatchFailure", FailureKind::Transient),
        SdkError::ResponseError(_) => ("ResponseError", FailureKind::Transient),
        _ => ("UnknownError", FailureKind::Transient),
    };
    Failure {
        code: code.to_owned(),
        message,
        kind,
    }
}

/// Whether a credentials provider's error is among the causes of `error`.
fn caused_by_credentials(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<CredentialsError>() {
            return true;
        }
        cause = e.source();
    }
    false
}
