//! An optional OpenAI-compatible chat endpoint (`/v1/chat/completions`) as
//! the local engine's responder: any local or hosted model server that
//! speaks that API. The knowledge base goes in as context, so answers stay
//! grounded in it; replies are asked to be short and speakable.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::Role;
use crate::knowledge::KnowledgeBase;

/// Where and how to reach the chat endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatConfig {
    /// Base URL (`http://127.0.0.1:11434`) or the full `.../chat/completions` URL.
    pub url: String,
    pub model: String,
    /// Sent as a bearer token when not empty.
    pub api_key: String,
    pub timeout: Duration,
    pub max_tokens: u32,
}

/// Most knowledge-base text sent as context, in bytes.
const CONTEXT_BYTES: usize = 12_000;

#[derive(Debug, Serialize)]
struct Request<'a> {
    model: &'a str,
    messages: Vec<Message>,
    max_tokens: u32,
    temperature: f32,
    stream: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Message {
    role: &'static str,
    content: String,
}

#[derive(Debug, Deserialize)]
struct Response {
    choices: Vec<Choice>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: ResponseMessage,
}

#[derive(Debug, Deserialize)]
struct ResponseMessage {
    content: Option<String>,
}

/// A client for one endpoint, shared by all conversations.
#[derive(Debug, Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    endpoint: String,
    config: ChatConfig,
}

impl ChatClient {
    pub fn new(config: ChatConfig) -> Result<Self, String> {
        let base = config.url.trim_end_matches('/');
        let endpoint = if base.ends_with("/chat/completions") {
            base.to_owned()
        } else if base.ends_with("/v1") {
            format!("{base}/chat/completions")
        } else {
            format!("{base}/v1/chat/completions")
        };
        reqwest::Url::parse(&endpoint).map_err(|e| format!("chat endpoint {endpoint:?}: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            http,
            endpoint,
            config,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Asks for a reply to `user`, after `history` (oldest first), with the
    /// knowledge base as context, in `language`.
    pub async fn reply(
        &self,
        knowledge: &KnowledgeBase,
        language: &str,
        history: &[(Role, String)],
        user: &str,
    ) -> Result<String, String> {
        let mut messages = vec![Message {
            role: "system",
            content: system_prompt(knowledge, language),
        }];
        for (role, text) in history {
            messages.push(Message {
                role: match role {
                    Role::User => "user",
                    Role::Assistant => "assistant",
                },
                content: text.clone(),
            });
        }
        messages.push(Message {
            role: "user",
            content: user.to_owned(),
        });
        let request = Request {
            model: &self.config.model,
            messages,
            max_tokens: self.config.max_tokens,
            temperature: 0.3,
            stream: false,
        };
        let mut call = self.http.post(&self.endpoint).json(&request);
        if !self.config.api_key.is_empty() {
            call = call.bearer_auth(&self.config.api_key);
        }
        let response = call
            .send()
            .await
            .map_err(|e| format!("chat endpoint {}: {}", self.endpoint, describe(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(200).collect();
            return Err(format!(
                "chat endpoint {} answered {status}: {}",
                self.endpoint,
                body.trim()
            ));
        }
        let parsed: Response = response.json().await.map_err(|e| {
            format!(
                "chat endpoint {}: unexpected reply: {}",
                self.endpoint,
                describe(&e)
            )
        })?;
        let text = parsed
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.message.content)
            .map(|t| speakable(&t))
            .unwrap_or_default();
        if text.is_empty() {
            return Err(format!("chat endpoint {} returned no text", self.endpoint));
        }
        Ok(text)
    }
}

fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "no answer in time".into()
    } else if error.is_connect() {
        "cannot connect".into()
    } else {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

fn system_prompt(knowledge: &KnowledgeBase, language: &str) -> String {
    let context = knowledge.as_context(CONTEXT_BYTES);
    if language.to_ascii_lowercase().starts_with("es") {
        format!(
            "Eres el asistente de voz de una mesa de ayuda. Responde en español, en una a tres frases \
             cortas que se puedan decir en voz alta, sin listas ni formato. Usa solo la información de \
             la base de conocimiento de abajo; si la respuesta no está, dilo con honestidad y menciona \
             los temas con los que sí puedes ayudar.\n\nBase de conocimiento:\n{context}"
        )
    } else {
        format!(
            "You are the voice assistant of a help desk. Answer in the user's language ({language}), in \
             one to three short sentences that can be spoken aloud, with no lists or formatting. Use only \
             the knowledge base below; if the answer is not there, say so honestly and mention the topics \
             you can help with.\n\nKnowledge base:\n{context}"
        )
    }
}

/// Removes Markdown marks a speech synthesiser would read out.
fn speakable(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .filter(|c| !matches!(c, '*' | '#' | '`' | '_'))
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> ChatConfig {
        ChatConfig {
            url: url.into(),
            model: "m".into(),
            api_key: String::new(),
            timeout: Duration::from_secs(1),
            max_tokens: 100,
        }
    }

    #[test]
    fn endpoint_urls() {
        let e = |u: &str| ChatClient::new(config(u)).unwrap().endpoint().to_owned();
        assert_eq!(
            e("http://127.0.0.1:8000"),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
        assert_eq!(e("http://h/v1/"), "http://h/v1/chat/completions");
        assert_eq!(
            e("https://h/api/v1/chat/completions"),
            "https://h/api/v1/chat/completions"
        );
        assert!(ChatClient::new(config("not a url")).is_err());
    }

    #[test]
    fn markdown_is_not_spoken() {
        assert_eq!(
            speakable("**Hola**, usa `el portal`\n# ya"),
            "Hola, usa el portal ya"
        );
    }
}
