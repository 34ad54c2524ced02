//! The settings themselves: one struct per section, with the defaults the
//! old system hard-coded. Ranges are checked in `Config::validate`.

use serde::{Deserialize, Serialize};

use super::DEFAULT_LISTEN;

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the server binds, as `ip:port` (no unit).
    pub listen: String,
    /// Audio buffering limits (section, no unit).
    pub audio: AudioConfig,
    /// Speech engine selection (section, no unit).
    pub engine: EngineConfig,
    /// Connection and session limits (section, no unit).
    pub server: ServerConfig,
    /// The local offline engine (section, no unit).
    pub local: LocalConfig,
    /// Amazon Nova Sonic (section, no unit).
    pub nova_sonic: NovaSonicConfig,
    /// OpenAI Realtime (section, no unit).
    pub openai_realtime: super::OpenAiRealtimeConfig,
    /// Gemini Live (section, no unit).
    pub gemini_live: super::GeminiLiveConfig,
    /// Tools a speech model may call (section, no unit).
    pub tools: ToolsConfig,
    /// Log lines (section, no unit).
    pub log: super::LogConfig,
    /// Span export (section, no unit).
    pub telemetry: super::TelemetryConfig,
    /// The record of conversations, usage and cost (section, no unit).
    pub ledger: super::LedgerConfig,
    /// Phone calls (section, no unit).
    pub telephony: super::TelephonyConfig,
}

/// Amazon Nova Sonic over Bedrock's bidirectional stream. Credentials come
/// from the standard AWS chain (environment, profile, SSO, instance role).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NovaSonicConfig {
    /// Bedrock model id, `amazon.nova-2-sonic-v1:0` or `amazon.nova-sonic-v1:0` (no unit).
    pub model: String,
    /// AWS Region; empty (the default) takes the AWS chain's: `AWS_REGION`, the profile's, the instance's; us-east-1 if none (no unit).
    pub region: String,
    /// Voice when the client asks for none, e.g. `lupe`, `carlos` (no unit).
    pub voice: String,
    /// Rate of the reply audio asked of Nova Sonic: 8000, 16000 or 24000, in
    /// Hz (web clients get 24 kHz whatever it is; phone calls 8 kHz).
    pub output_rate_hz: u32,
    /// System prompt; empty uses the built-in Spanish help-desk prompt (text).
    pub system_prompt: String,
    /// Most tokens in one reply, in tokens.
    pub max_tokens: u32,
    /// Nucleus sampling, 0 to 1 (no unit).
    pub top_p: f64,
    /// Sampling temperature, 0 to 1 (no unit).
    pub temperature: f64,
    /// Nova 2 end-of-turn sensitivity: `HIGH`, `MEDIUM`, `LOW`, or empty to omit (no unit).
    pub endpointing: String,
    /// Endpoint URL instead of Bedrock's regional one (VPC endpoint, proxy), `https://…` (no unit).
    pub endpoint_url: String,
    /// PEM file of the certificates to trust for `endpoint_url` (path).
    pub ca_file: String,
    /// Stream age at which a warm hand-off to a new stream begins, in seconds.
    pub rotate_after_s: u32,
    /// Longest wait for the assistant to start speaking before the hand-off is forced, in seconds.
    pub handoff_wait_s: u32,
    /// No reply for this long after the user's turn means a stalled stream, in milliseconds.
    pub stall_timeout_ms: u32,
    /// Reconnections allowed within one turn, in tries.
    pub max_retries: u32,
    /// Wait before the second try to open a stream after a failure (the first is at once, each later one waits three times longer, plus jitter), in milliseconds.
    pub open_backoff_ms: u32,
    /// Longest wait between tries to open a stream, before jitter, in milliseconds.
    pub open_backoff_max_ms: u32,
    /// Streams one conversation may open within a minute, in streams.
    pub max_opens_per_minute: u32,
    /// After throttling or a quota refusal, how long new conversations are refused and no stream is opened (doubled on repeated trips, up to 8 times), in milliseconds.
    pub breaker_cooldown_ms: u32,
    /// Speech input price; 0 keeps the built-in one, in USD per 1,000 tokens.
    pub speech_in_usd_per_1k: f64,
    /// Speech output price; 0 keeps the built-in one, in USD per 1,000 tokens.
    pub speech_out_usd_per_1k: f64,
    /// Text input price; 0 keeps the built-in one, in USD per 1,000 tokens.
    pub text_in_usd_per_1k: f64,
    /// Text output price; 0 keeps the built-in one, in USD per 1,000 tokens.
    pub text_out_usd_per_1k: f64,
}

impl Default for NovaSonicConfig {
    fn default() -> Self {
        Self {
            model: "amazon.nova-2-sonic-v1:0".into(),
            region: String::new(),
            voice: "lupe".into(),
            output_rate_hz: 24_000,
            system_prompt: String::new(),
            max_tokens: 1024,
            top_p: 0.9,
            temperature: 0.7,
            endpointing: "MEDIUM".into(),
            endpoint_url: String::new(),
            ca_file: String::new(),
            rotate_after_s: 360,
            handoff_wait_s: 20,
            stall_timeout_ms: 10_000,
            max_retries: 3,
            open_backoff_ms: 1_000,
            open_backoff_max_ms: 30_000,
            max_opens_per_minute: 20,
            breaker_cooldown_ms: 30_000,
            speech_in_usd_per_1k: 0.0,
            speech_out_usd_per_1k: 0.0,
            text_in_usd_per_1k: 0.0,
            text_out_usd_per_1k: 0.0,
        }
    }
}

/// The local offline engine: speech detection, recognition, answers, synthesis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Directory of the faster-whisper (CTranslate2) speech model (path).
    pub model_dir: String,
    /// Directory of the Markdown FAQ files the answers come from (path).
    pub knowledge_dir: String,
    /// Beam width of speech recognition, in hypotheses.
    pub asr_beam_size: u32,
    /// CPU threads for one recognition, in threads; 0 lets the library choose.
    pub asr_threads: u32,
    /// Silence after the speech that recognition hears, in milliseconds:
    /// the encoder's time grows with it; 30000 gives Whisper's whole window.
    pub asr_margin_ms: u32,
    /// Whether a recognised word that no list knows, one or two letters off a word of the knowledge base's questions, becomes that word (no unit).
    pub correct_words: bool,
    /// Words known to be right besides the knowledge base's, one a line, never corrected (path; empty: the base's words only).
    pub word_list: String,
    /// Voice activity score at or above which a frame is speech, from 0.05 to 0.95.
    pub vad_threshold: f64,
    /// Silence that ends the user's turn, in milliseconds.
    pub vad_hangover_ms: u32,
    /// Audio kept from before speech starts, in milliseconds.
    pub vad_preroll_ms: u32,
    /// Silence after which recognition starts early, in milliseconds.
    pub vad_pause_ms: u32,
    /// A frame less than this many decibels over the noise floor (and 25 dB under the turn's loudest) is silence even while voice activity still scores it speech, from 0 (off) to 30.
    pub vad_quiet_db: f64,
    /// Speech synthesiser program, eSpeak NG (path or command name).
    pub tts_program: String,
    /// eSpeak NG voice; empty picks one from the conversation language (no unit).
    pub tts_voice: String,
    /// Speaking rate, in words per minute.
    pub tts_rate_wpm: u32,
    /// Sample rate the engine synthesizes reply audio at, in hertz (web
    /// clients get 24 kHz whatever it is; phone calls 8 kHz).
    pub output_rate_hz: u32,
    /// OpenAI-compatible chat endpoint answering instead of the knowledge base alone (URL; empty: off).
    pub chat_url: String,
    /// Model name sent to the chat endpoint (no unit).
    pub chat_model: String,
    /// Bearer key for the chat endpoint; empty sends none. Secret.
    pub chat_api_key: String,
    /// Time the chat endpoint has to answer before the knowledge base answers instead, in milliseconds.
    pub chat_timeout_ms: u32,
    /// Smart Turn v3 ONNX model judging from the audio whether the user has finished (path; empty: off, silence alone ends a turn).
    pub turn_model: String,
    /// ONNX Runtime shared library that runs the turn-end model (path).
    pub onnxruntime_library: String,
    /// Turn-end model probability above which the user has finished, from 0 to 1.
    pub turn_threshold: f64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            model_dir: "models/whisper-base".to_owned(),
            knowledge_dir: "knowledge".to_owned(),
            asr_beam_size: 3,
            asr_threads: 0,
            asr_margin_ms: 3_000,
            correct_words: true,
            word_list: "/usr/share/dict/spanish".to_owned(),
            vad_threshold: 0.5,
            vad_hangover_ms: 600,
            vad_preroll_ms: 150,
            vad_pause_ms: 150,
            vad_quiet_db: 9.0,
            tts_program: "espeak-ng".to_owned(),
            tts_voice: String::new(),
            tts_rate_wpm: 160,
            output_rate_hz: 24_000,
            chat_url: String::new(),
            chat_model: String::new(),
            chat_api_key: String::new(),
            chat_timeout_ms: 8_000,
            turn_model: "models/smart-turn/smart-turn-v3.2-cpu.onnx".to_owned(),
            onnxruntime_library: "models/onnxruntime/libonnxruntime.so.1.32.0".to_owned(),
            turn_threshold: 0.5,
        }
    }
}

/// Audio buffering limits, per session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioConfig {
    /// Most encoded input held ahead of the decoder, in bytes.
    pub decoder_input_cap_bytes: usize,
    /// Largest single audio block accepted from a client, in bytes.
    pub max_block_bytes: usize,
    /// Client-to-engine audio that may be queued, in milliseconds of audio.
    pub uplink_queue_ms: u32,
    /// Longest the oldest queued reply audio may wait for a client that does
    /// not read before the client counts as too slow, in milliseconds.
    pub downlink_queue_ms: u32,
    /// Time without client audio before the session is closed, in milliseconds.
    pub no_audio_timeout_ms: u32,
    /// Sustained speed a live stream may deliver audio at, in multiples of real time.
    pub max_realtime_factor: f64,
    /// Audio a live stream may deliver at once beyond that pace, in milliseconds.
    pub realtime_burst_ms: u32,
}

/// Which speech engine serves sessions, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Engine implementation, `local`, `nova-sonic`, `openai-realtime` or `gemini-live` (no unit).
    pub kind: EngineKind,
    /// Language tag such as `es` or `en-US`, 2 to 16 characters (no unit).
    pub language: String,
    /// Voice name; empty selects the engine's default voice (no unit).
    pub voice: String,
    /// Several engines at once (`[[engine.instances]]`), routed by capacity
    /// in priority order; empty: `engine.kind` serves every conversation.
    pub instances: Vec<super::EngineInstanceConfig>,
    /// Conversations that may wait for an instance when all are full, in
    /// conversations; with no instances there is no queue.
    pub queue_max: u32,
    /// Longest a conversation waits for an instance before it is refused, in seconds.
    pub queue_timeout_s: u32,
    /// Whether a conversation whose instance fails goes on with another at a
    /// turn boundary, carrying the history as text (no unit).
    pub failover: bool,
    /// How long an instance that failed to start or keep a conversation gets
    /// no new ones, in milliseconds.
    pub failure_cooldown_ms: u32,
}

/// Speech engine implementations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// The in-process engine.
    #[default]
    Local,
    /// Amazon Nova Sonic.
    NovaSonic,
    /// OpenAI Realtime.
    OpenaiRealtime,
    /// Google's Gemini Live.
    GeminiLive,
}

impl EngineKind {
    /// The name in configuration and on the wire: `nova-sonic`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::NovaSonic => "nova-sonic",
            Self::OpenaiRealtime => "openai-realtime",
            Self::GeminiLive => "gemini-live",
        }
    }

    /// The configuration section with its settings: `nova_sonic`.
    pub fn section(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::NovaSonic => "nova_sonic",
            Self::OpenaiRealtime => "openai_realtime",
            Self::GeminiLive => "gemini_live",
        }
    }

    /// Whether the engine is a service that hears in real time (input paced
    /// like a microphone) and costs money.
    pub fn is_cloud(self) -> bool {
        !matches!(self, Self::Local)
    }
}

/// Connection and session limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Most concurrent sessions, in sessions.
    pub max_sessions: u32,
    /// Largest message accepted from a client, in bytes.
    pub max_message_bytes: usize,
    /// Time a new connection has to send its hello, in milliseconds.
    pub hello_timeout_ms: u32,
    /// Time without speech or typed text before a conversation is closed, in milliseconds.
    pub idle_timeout_ms: u32,
    /// Longest conversation; it then ends with reason `max_duration`, in seconds.
    pub max_conversation_s: u32,
    /// Accepted client tokens, a list of strings; empty disables auth. Secret.
    pub auth_tokens: Vec<String>,
    /// `tokens` (the static `auth_tokens`) or `keys`: every conversation needs a one-time client token bought with an API key (`POST /api/tokens`) (no unit).
    pub auth: String,
    /// How long a client token from `POST /api/tokens` stays usable, in seconds.
    pub client_token_ttl_s: u32,
    /// The host application's URL the page POSTs to (with its cookies) for a client token before each conversation; empty: the page uses the `#token=` of its address (no unit).
    pub client_token_url: String,
    /// The server's public base URL as clients reach it (through a proxy), e.g. `https://voz.example.edu`; Twilio's signatures are checked against it, and calls are told to stream to it. Empty: calls are refused (no unit).
    pub public_url: String,
    /// Browser origins allowed on `/ws` besides the server's own, e.g.
    /// `["https://ayuda.example.edu"]`; `["*"]` allows any.
    pub allowed_origins: Vec<String>,
    /// Longest wait for one write to a client before it is dropped, in milliseconds.
    pub write_timeout_ms: u32,
    /// On SIGINT/SIGTERM, how long conversations get to close, in milliseconds.
    pub shutdown_grace_ms: u32,
    /// Most concurrent conversations from one client address, in sessions.
    pub max_sessions_per_client: u32,
    /// New requests one client address may make in a minute (probes and
    /// `/metrics` not counted), in requests.
    pub connections_per_minute_per_client: u32,
    /// Proxies whose `X-Forwarded-For` / `Forwarded` and `X-Forwarded-Proto`
    /// are believed, a list of IPs or CIDRs such as `["127.0.0.1", "10.0.0.0/8"]`.
    pub trusted_proxies: Vec<String>,
    /// `Host` names the server answers for, as `host` (any port) or
    /// `host:port`; the listen address and `localhost`, `127.0.0.1`, `[::1]`
    /// on the listen port are always allowed (no unit).
    pub allowed_hosts: Vec<String>,
    /// Time a connection has to send a complete request head, in milliseconds.
    pub header_read_timeout_ms: u32,
    /// Time an HTTP connection (not a WebSocket) may wait idle between requests, in milliseconds.
    pub keepalive_timeout_ms: u32,
    /// Most open TCP connections, WebSockets included, in connections.
    pub max_connections: u32,
    /// Address serving `/metrics` instead of the main listener, as `ip:port`; empty keeps it on `listen` (no unit).
    pub metrics_listen: String,
    /// How long a conversation whose socket dropped (without `stop`) waits for its client to re-attach with the `resume` secret of its `ready`; 0 ends it at once, in milliseconds.
    pub resume_window_ms: u32,
    /// Most server frames (reply audio first) a conversation keeps for a client that may re-attach: the frames its client has not yet acknowledged, and everything said while it is away; past it the oldest reply audio is dropped and counted, in bytes.
    pub resume_buffer_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_string(),
            audio: AudioConfig::default(),
            engine: EngineConfig::default(),
            server: ServerConfig::default(),
            local: LocalConfig::default(),
            nova_sonic: NovaSonicConfig::default(),
            openai_realtime: super::OpenAiRealtimeConfig::default(),
            gemini_live: super::GeminiLiveConfig::default(),
            tools: ToolsConfig::default(),
            log: super::LogConfig::default(),
            telemetry: super::TelemetryConfig::default(),
            ledger: super::LedgerConfig::default(),
            telephony: super::TelephonyConfig::default(),
        }
    }
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            decoder_input_cap_bytes: 512 * 1024,
            max_block_bytes: 256 * 1024,
            uplink_queue_ms: 5_000,
            downlink_queue_ms: 30_000,
            no_audio_timeout_ms: 5_000,
            max_realtime_factor: 2.0,
            realtime_burst_ms: 10_000,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        let language = "es".to_owned();
        Self {
            kind: EngineKind::Local,
            language,
            voice: String::new(),
            instances: Vec::new(),
            queue_max: 32,
            queue_timeout_s: 120,
            failover: true,
            failure_cooldown_ms: 30_000,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_sessions: 200,
            max_message_bytes: 256 * 1024,
            hello_timeout_ms: 5_000,
            idle_timeout_ms: 120_000,
            max_conversation_s: 3_600,
            auth_tokens: Vec::new(),
            auth: "tokens".to_owned(),
            client_token_ttl_s: 60,
            client_token_url: String::new(),
            public_url: String::new(),
            allowed_origins: Vec::new(),
            write_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            max_sessions_per_client: 4,
            connections_per_minute_per_client: 120,
            trusted_proxies: Vec::new(),
            allowed_hosts: Vec::new(),
            header_read_timeout_ms: 10_000,
            keepalive_timeout_ms: 30_000,
            max_connections: 2_000,
            metrics_listen: String::new(),
            resume_window_ms: 30_000,
            resume_buffer_bytes: 1024 * 1024,
        }
    }
}

/// Configuration of the tools, deserialised from the `[tools]` TOML section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    /// Offer the knowledge-base search tool (no unit).
    pub knowledge: bool,
    /// IANA time zone of the date/time tool, e.g. `America/Lima` (no unit).
    pub time_zone: String,
    /// Longest wait for one tool call, in milliseconds.
    pub timeout_ms: u32,
    /// HTTP tools: Sonora POSTs the call's arguments as JSON to `url` and
    /// returns the JSON reply.
    pub http: Vec<HttpToolConfig>,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self {
            knowledge: true,
            time_zone: "America/Lima".to_owned(),
            timeout_ms: 5_000,
            http: Vec::new(),
        }
    }
}

/// One HTTP tool (`[[tools.http]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToolConfig {
    /// Name the model calls it by: 1 to 64 of `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// What it does and when to use it, for the model.
    pub description: String,
    /// JSON Schema of the arguments, as a JSON string holding an object.
    pub schema: String,
    /// `http://` or `https://` URL the arguments are POSTed to.
    pub url: String,
}
