//! HTTP tools: site-specific services (opening hours, ticket status, …) that
//! a deployment adds without code. The call's arguments are POSTed as JSON
//! and the JSON reply goes back to the model. Error messages name the tool,
//! never the URL, which may carry a key and is read by the model.

use serde_json::{Value, json};

use super::{MAX_REPLY_BYTES, ToolError, ToolSpec};
use crate::config::{HttpToolConfig, SettingError};

/// Longest piece of an error reply's body quoted to the model, in characters.
const ERROR_BODY_CHARS: usize = 200;

/// The configured HTTP tools and one client for all of them.
#[derive(Debug)]
pub(super) struct HttpTools {
    client: reqwest::Client,
    tools: Vec<HttpTool>,
}

#[derive(Debug)]
struct HttpTool {
    spec: ToolSpec,
    url: reqwest::Url,
}

impl HttpTools {
    /// Builds the tools from an already validated configuration. The caller
    /// bounds each call with the tools' timeout.
    pub(super) fn new(configs: &[HttpToolConfig]) -> Result<Self, ToolError> {
        let mut tools = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let invalid = |field: &str, value: &str, e: &dyn std::fmt::Display| {
                let key = format!("tools.http[{index}].{field}");
                ToolError::Config(SettingError::new(key, value, e.to_string()))
            };
            let schema = serde_json::from_str(&config.schema)
                .map_err(|e| invalid("schema", &config.schema, &e))?;
            let url =
                reqwest::Url::parse(&config.url).map_err(|e| invalid("url", &config.url, &e))?;
            let spec = ToolSpec {
                name: config.name.clone(),
                description: config.description.clone(),
                schema,
            };
            tools.push(HttpTool { spec, url });
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ToolError::HttpClient(e.to_string()))?;
        Ok(Self { client, tools })
    }

    pub(super) fn specs(&self) -> impl Iterator<Item = ToolSpec> + '_ {
        self.tools.iter().map(|tool| tool.spec.clone())
    }

    /// POSTs `arguments` to the tool `name`: its JSON object reply, any
    /// other JSON value as `{"result": value}`, or an error message.
    pub(super) async fn call(&self, name: &str, arguments: &Value) -> Result<Value, String> {
        let Some(tool) = self.tools.iter().find(|tool| tool.spec.name == name) else {
            return Err(format!("unknown tool {name:?}"));
        };
        let mut response = self
            .client
            .post(tool.url.clone())
            .json(arguments)
            .send()
            .await
            .map_err(|e| format!("{name}: {}", describe(e)))?;
        let status = response.status();
        let too_large = || format!("{name}: the reply is larger than {MAX_REPLY_BYTES} bytes");
        if response
            .content_length()
            .is_some_and(|length| length > MAX_REPLY_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("{name}: reading the reply: {}", describe(e)))?
        {
            if body.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let text: String = text.chars().take(ERROR_BODY_CHARS).collect();
            return Err(if text.is_empty() {
                format!("{name}: the service answered {status}")
            } else {
                format!("{name}: the service answered {status}: {text}")
            });
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(object)) => Ok(Value::Object(object)),
            Ok(other) => Ok(json!({ "result": other })),
            Err(e) => Err(format!("{name}: the reply is not JSON ({e})")),
        }
    }
}

/// A transport error in words, without the URL.
fn describe(error: reqwest::Error) -> String {
    if error.is_timeout() {
        "no answer in time".into()
    } else if error.is_connect() {
        "cannot connect to the service".into()
    } else {
        let error = error.without_url();
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}
