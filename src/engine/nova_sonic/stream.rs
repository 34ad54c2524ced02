//! One upstream stream: an `InvokeModelWithBidirectionalStream` call.
//!
//! The setup events go into the input channel before the call is awaited
//! (the service answers only once it has `sessionStart`, so awaiting first
//! would wait forever). A task reads the output side and hands parsed events
//! to the conversation; once the service ends the stream, or it fails, the
//! stream is marked closed and nothing more is written to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
pub enum StreamItem {
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
pub struct Failure {
    /// The exception name (`throttlingException`, `AccessDeniedException`…)
    /// or the transport failure kind.
    pub code: String,
    pub message: String,
    /// Transient (throttling, timeouts, resets, service faults): reopen with
    /// history. Otherwise (auth, access, bad input): fatal, never retried.
    pub retry: bool,
    /// Whether the service is shedding load (throttling, quota).
    pub load: Load,
}

/// What a failure says about the service's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Load {
    /// Nothing: a fault, a timeout, a refusal of this request.
    #[default]
    Normal,
    /// `ThrottlingException`: too many requests or streams just now.
    Throttled,
    /// `ServiceQuotaExceededException`: the account is at a quota.
    QuotaExceeded,
}

impl Failure {
    /// A transient failure found here (a stall, an ended stream), not
    /// reported by the service.
    pub fn transient(code: &str, message: String) -> Self {
        Self {
            code: code.to_owned(),
            message,
            retry: true,
            load: Load::Normal,
        }
    }

    /// Throttling or a quota refusal: the engine's breaker trips.
    pub fn overload(&self) -> bool {
        self.load != Load::Normal
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Why an input event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The network is not taking events (a stall): drop audio and count it.
    Full,
    /// The stream has ended: write nothing more.
    Closed,
}

/// One open stream.
#[derive(Debug)]
pub struct Upstream {
    /// `None` once the input side is finished.
    input: Option<mpsc::Sender<Result<SdkInput, InputError>>>,
    closed: Arc<AtomicBool>,
    pub events: mpsc::Receiver<StreamItem>,
    task: JoinHandle<()>,
    pub opened_at: Instant,
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
    pub fn open(client: &Client, model: &str, setup: &[Input]) -> Self {
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
                        Err(e) => break StreamItem::Failed(stream_failure(&e)),
                    };
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

    /// True once the service ended or failed the stream.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Queues an event without waiting (audio: a full queue is a stall).
    pub fn try_send(&self, input: &Input) -> Result<(), SendError> {
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
    pub async fn send(&self, input: &Input, wait: Duration) -> Result<(), SendError> {
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
    pub fn finish(
        mut self,
        closing: Vec<Input>,
        wait: Duration,
        drain: Option<mpsc::Sender<StreamItem>>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + wait;
            for event in &closing {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
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
            let code = match e {
                CallError::ThrottlingException(_) => "ThrottlingException",
                CallError::ServiceUnavailableException(_) => "ServiceUnavailableException",
                CallError::InternalServerException(_) => "InternalServerException",
                CallError::ModelStreamErrorException(_) => "ModelStreamErrorException",
                CallError::ModelTimeoutException(_) => "ModelTimeoutException",
                CallError::ModelNotReadyException(_) => "ModelNotReadyException",
                CallError::ModelErrorException(_) => "ModelErrorException",
                CallError::ValidationException(_) => "ValidationException",
                CallError::AccessDeniedException(_) => "AccessDeniedException",
                CallError::ResourceNotFoundException(_) => "ResourceNotFoundException",
                CallError::ServiceQuotaExceededException(_) => "ServiceQuotaExceededException",
                other => other.code().unwrap_or("UnknownError"),
            };
            let message = e.message().unwrap_or("no message").to_owned();
            classified(code, message)
        }
        other => transport_failure(other),
    }
}

/// A failure on the output side of a running stream. In-stream exceptions
/// carry no error code, so the variant names them.
fn stream_failure(
    error: &SdkError<OutputError, aws_smithy_types::event_stream::RawMessage>,
) -> Failure {
    match error {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = match e {
                OutputError::ThrottlingException(_) => "throttlingException",
                OutputError::ServiceUnavailableException(_) => "serviceUnavailableException",
                OutputError::InternalServerException(_) => "internalServerException",
                OutputError::ModelStreamErrorException(_) => "modelStreamErrorException",
                OutputError::ModelTimeoutException(_) => "modelTimeoutException",
                OutputError::ValidationException(_) => "validationException",
                other => other.code().unwrap_or("unknownException"),
            };
            let message = e.message().unwrap_or("no message").to_owned();
            classified(code, message)
        }
        other => transport_failure(other),
    }
}

fn transport_failure<E: std::error::Error + 'static, R: std::fmt::Debug>(
    error: &SdkError<E, R>,
) -> Failure {
    let message = DisplayErrorContext(error).to_string();
    let (code, retry) = match error {
        SdkError::ConstructionFailure(_) => ("ConstructionFailure", false),
        SdkError::TimeoutError(_) => ("Timeout", true),
        SdkError::DispatchFailure(_) => ("DispatchFailure", true),
        SdkError::ResponseError(_) => ("ResponseError", true),
        _ => ("UnknownError", true),
    };
    // Missing credentials surface as a dispatch failure; retrying cannot help.
    let retry = retry && !message.to_ascii_lowercase().contains("credentials");
    Failure {
        code: code.to_owned(),
        message,
        retry,
        load: Load::Normal,
    }
}

/// The retry policy: transient service faults and the idle/instability
/// validation messages are retried; auth, access and input errors are not.
/// Throttling and quota refusals are also marked as load ([`Load`]).
pub fn classified(code: &str, message: String) -> Failure {
    let lower = code.to_ascii_lowercase();
    let retry = match lower.as_str() {
        "throttlingexception"
        | "serviceunavailableexception"
        | "internalserverexception"
        | "modelstreamerrorexception"
        | "modeltimeoutexception"
        | "modelnotreadyexception"
        | "modelerrorexception" => true,
        "validationexception" => {
            const TRANSIENT: [&str; 4] = [
                "Timed out waiting for input events",
                "RST_STREAM",
                "System instability",
                "unexpected error during processing",
            ];
            TRANSIENT.iter().any(|t| message.contains(t))
        }
        _ => false,
    };
    let load = match lower.as_str() {
        "throttlingexception" => Load::Throttled,
        "servicequotaexceededexception" => Load::QuotaExceeded,
        _ => Load::Normal,
    };
    Failure {
        code: code.to_owned(),
        message,
        retry,
        load,
    }
}
