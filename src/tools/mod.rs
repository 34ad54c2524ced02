//! The tools a speech-to-speech engine offers its model (Nova Sonic tool use).
//!
//! A model that can look things up answers from the institution's own
//! knowledge base instead of from memory, knows today's date in the help
//! desk's time zone, and can reach site-specific services over HTTP. Every
//! call returns a JSON object, and failures become an error object the model
//! can read aloud or work around, so a broken tool never ends a conversation.

mod clock;
mod http;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::{Config, SettingError, ToolsConfig};
use crate::knowledge::KnowledgeBase;

/// Name of the knowledge-base search tool.
pub const SEARCH_KNOWLEDGE: &str = "search_knowledge";
/// Name of the date and time tool.
pub const CURRENT_DATETIME: &str = "current_datetime";
/// Tool names that configured HTTP tools may not take.
pub const BUILT_IN_NAMES: [&str; 2] = [SEARCH_KNOWLEDGE, CURRENT_DATETIME];

/// Largest HTTP tool reply accepted, in bytes.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Longest knowledge-base query accepted, in characters.
pub const MAX_QUERY_CHARS: usize = 1_000;
/// How many entries a knowledge search returns at most.
const SEARCH_LIMIT: usize = 3;
/// Longest tool name, in bytes (names are ASCII).
const MAX_NAME_BYTES: usize = 64;
/// Bounds of [`ToolsConfig::timeout_ms`].
const TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u32> = 100..=120_000;
/// Longest configured value quoted in a validation error, in characters.
const QUOTE_CHARS: usize = 80;

impl ToolsConfig {
    /// Checks names, schemas, URLs, the time zone and the timeout. The error
    /// names the bad entry, e.g. `tools.http[1].url = "ftp://x": not an
    /// http(s) URL` (`http` indices count from 0).
    pub fn validate(&self) -> Result<(), SettingError> {
        if !TIMEOUT_RANGE_MS.contains(&self.timeout_ms) {
            let (min, max) = (TIMEOUT_RANGE_MS.start(), TIMEOUT_RANGE_MS.end());
            let reason = format!("must be between {min} and {max} ms");
            return Err(SettingError::new(
                "tools.timeout_ms",
                self.timeout_ms.to_string(),
                reason,
            ));
        }
        if let Err(e) = jiff::tz::TimeZone::get(&self.time_zone) {
            let reason = format!("not a known IANA time zone like America/Lima ({e})");
            return Err(SettingError::new(
                "tools.time_zone",
                quoted(&self.time_zone),
                reason,
            ));
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (index, tool) in self.http.iter().enumerate() {
            let bad = |field: &str, value: &str, reason: &str| {
                SettingError::new(
                    format!("tools.http[{index}].{field}"),
                    quoted(value),
                    reason,
                )
            };
            let name = tool.name.as_str();
            let name_ok = name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok || name.is_empty() || name.len() > MAX_NAME_BYTES {
                let reason = "must be 1 to 64 ASCII letters, digits, '_' or '-'";
                return Err(bad("name", name, reason));
            }
            if BUILT_IN_NAMES.contains(&name) {
                return Err(bad("name", name, "is the name of a built-in tool"));
            }
            if let Some(first) = seen.insert(name, index) {
                let reason = format!("already used by tools.http[{first}]");
                return Err(bad("name", name, &reason));
            }
            if tool.description.trim().is_empty() {
                let reason = "must say what the tool does, for the model";
                return Err(bad("description", &tool.description, reason));
            }
            match serde_json::from_str::<Value>(&tool.schema) {
                Ok(Value::Object(_)) => {}
                Ok(_) => return Err(bad("schema", &tool.schema, "not a JSON object")),
                Err(e) => {
                    let reason = format!("not JSON: {e}");
                    return Err(bad("schema", &tool.schema, &reason));
                }
            }
            match reqwest::Url::parse(&tool.url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
                Ok(_) => return Err(bad("url", &tool.url, "not an http(s) URL")),
                Err(e) => {
                    let reason = format!("not an http(s) URL: {e}");
                    return Err(bad("url", &tool.url, &reason));
                }
            }
        }
        Ok(())
    }
}

/// The `[tools]` section's check, run when the configuration is loaded.
pub fn check_settings(config: &Config) -> Result<(), SettingError> {
    config.tools.validate()
}

/// `text` as a JSON string, shortened to [`QUOTE_CHARS`] characters.
fn quoted(text: &str) -> String {
    if text.chars().count() <= QUOTE_CHARS {
        Value::from(text).to_string()
    } else {
        let head: String = text.chars().take(QUOTE_CHARS).collect();
        Value::from(format!("{head}…")).to_string()
    }
}

/// One tool as offered to a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// The name the model calls it by.
    pub name: String,
    /// What it does and when to use it.
    pub description: String,
    /// JSON Schema of its arguments (an object).
    pub schema: Value,
}

/// Errors while building the registry.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The configuration breaks a rule of [`ToolsConfig::validate`]. The
    /// caller reports it and stops at start-up.
    #[error("{0}")]
    Config(SettingError),
    /// The HTTP client for the HTTP tools cannot be built (no TLS backend).
    /// The caller reports it and stops at start-up, or runs without HTTP tools.
    #[error("cannot build the HTTP client for the HTTP tools: {0}")]
    HttpClient(String),
}

/// The registry: cheap to clone, shared by every conversation.
#[derive(Debug, Clone)]
pub struct Tools {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    specs: Vec<ToolSpec>,
    knowledge: Option<Arc<KnowledgeBase>>,
    time_zone: jiff::tz::TimeZone,
    /// The configured zone name, reported with every date.
    time_zone_name: String,
    timeout: Duration,
    /// Present when there are HTTP tools.
    http: Option<http::HttpTools>,
}

impl Tools {
    /// Validates `config` and builds the registry. `knowledge` is the base
    /// the search tool reads (the same one the local engine answers from);
    /// the search tool is offered only with `config.knowledge` and a base.
    pub fn new(
        config: &ToolsConfig,
        knowledge: Option<Arc<KnowledgeBase>>,
    ) -> Result<Self, ToolError> {
        config.validate().map_err(ToolError::Config)?;
        let time_zone = jiff::tz::TimeZone::get(&config.time_zone).map_err(|e| {
            let value = quoted(&config.time_zone);
            ToolError::Config(SettingError::new("tools.time_zone", value, e.to_string()))
        })?;
        let timeout = Duration::from_millis(config.timeout_ms.into());
        let knowledge = knowledge.filter(|_| config.knowledge);
        let mut specs = Vec::new();
        if knowledge.is_some() {
            specs.push(search_spec());
        }
        specs.push(clock::spec(&config.time_zone));
        let http = if config.http.is_empty() {
            None
        } else {
            let tools = http::HttpTools::new(&config.http)?;
            specs.extend(tools.specs());
            Some(tools)
        };
        let inner = Inner {
            specs,
            knowledge,
            time_zone,
            time_zone_name: config.time_zone.clone(),
            timeout,
            http,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The tools to offer a model, built-ins first, then HTTP tools in
    /// configuration order.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.inner.specs.clone()
    }

    /// Runs one call. Always returns a JSON object: the result, or
    /// `{"status":"error","error":"<message>"}` for an unknown tool, bad
    /// arguments, a timeout, an HTTP error status, or a reply that is not
    /// JSON or larger than [`MAX_REPLY_BYTES`]. `null` arguments count as `{}`.
    pub async fn call(&self, name: &str, arguments: &Value) -> Value {
        let empty = Value::Object(serde_json::Map::new());
        let arguments = if arguments.is_null() {
            &empty
        } else {
            arguments
        };
        if !self.inner.specs.iter().any(|spec| spec.name == name) {
            return error(format!("unknown tool {}", quoted(name)));
        }
        if !arguments.is_object() {
            return error(format!("{name}: the arguments must be a JSON object"));
        }
        let work = self.dispatch(name, arguments);
        match tokio::time::timeout(self.inner.timeout, work).await {
            Ok(Ok(value)) => value,
            Ok(Err(message)) => error(message),
            Err(_) => error(format!(
                "{name}: no answer within {} ms",
                self.inner.timeout.as_millis()
            )),
        }
    }

    /// The result of a known tool, or a message for the error object.
    async fn dispatch(&self, name: &str, arguments: &Value) -> Result<Value, String> {
        let inner = &self.inner;
        match name {
            SEARCH_KNOWLEDGE => match &inner.knowledge {
                Some(knowledge) => search(Arc::clone(knowledge), arguments).await,
                None => Err(format!("unknown tool {}", quoted(name))),
            },
            CURRENT_DATETIME => Ok(clock::datetime_at(
                jiff::Timestamp::now(),
                &inner.time_zone,
                &inner.time_zone_name,
            )),
            _ => match &inner.http {
                Some(http) => http.call(name, arguments).await,
                None => Err(format!("unknown tool {}", quoted(name))),
            },
        }
    }
}

/// `{"status":"error","error":message}`.
fn error(message: impl Into<String>) -> Value {
    json!({"status": "error", "error": message.into()})
}

fn search_spec() -> ToolSpec {
    ToolSpec {
        name: SEARCH_KNOWLEDGE.to_owned(),
        description: "Searches the university help desk knowledge base: library hours and loans, \
            enrolment and its deadlines and documents, fees, the student portal, certificates \
            and other campus services. Use it before answering any factual question about the \
            university, and answer only from what it returns; if it finds nothing, say so."
            .to_owned(),
        schema: json!({
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "description": "The user's question or its key words, in the user's language, e.g. \"horario de la biblioteca\"."
                }
            },
            "required": ["query"]
        }),
    }
}

/// Runs a knowledge search off the async threads. A usual query takes a few
/// microseconds, but each unknown word scans the whole vocabulary: 1 000
/// characters of them take 1.5 ms on the 14-entry example base, and more on
/// a larger one.
async fn search(knowledge: Arc<KnowledgeBase>, arguments: &Value) -> Result<Value, String> {
    let query = match arguments.get("query") {
        Some(Value::String(query)) => query.trim().to_owned(),
        Some(_) => return Err(format!("{SEARCH_KNOWLEDGE}: query must be a string")),
        None => return Err(format!("{SEARCH_KNOWLEDGE}: missing the query argument")),
    };
    if query.is_empty() {
        return Err(format!("{SEARCH_KNOWLEDGE}: the query is empty"));
    }
    if query.chars().count() > MAX_QUERY_CHARS {
        return Err(format!(
            "{SEARCH_KNOWLEDGE}: the query is longer than {MAX_QUERY_CHARS} characters"
        ));
    }
    let answers = knowledge
        .search_blocking(query, SEARCH_LIMIT)
        .await
        .map_err(|e| format!("{SEARCH_KNOWLEDGE}: the search failed: {e}"))?;
    if answers.is_empty() {
        return Ok(json!({"results": [], "note": "nothing relevant found"}));
    }
    let results: Vec<Value> = answers
        .into_iter()
        .map(|answer| {
            // Two decimals: f32 scores widened to f64 print with noise digits.
            let score = (f64::from(answer.score) * 100.0).round() / 100.0;
            json!({"question": answer.question, "answer": answer.text, "score": score})
        })
        .collect();
    Ok(json!({ "results": results }))
}

#[cfg(test)]
mod tests;
