//! The tool runner an engine's conversation uses: calls of tools in the
//! engine's registry run on tasks of their own, so the conversation never
//! waits on one; each result comes back with the upstream generation (stream
//! or connection) that asked for it.

use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::tools::Tools;

/// Results that may wait for the conversation.
const RESULTS_CAPACITY: usize = 16;

/// A tool call's result.
#[derive(Debug)]
pub(crate) struct ToolDone {
    pub(crate) id: String,
    /// The stream generation that asked.
    pub(crate) generation: u32,
    pub(crate) result: serde_json::Value,
}

#[derive(Debug)]
pub(crate) struct ToolRunner {
    tools: Option<Tools>,
    /// Calls running here, by id, with the generation that asked.
    pending: HashMap<String, u32>,
    done: mpsc::Sender<ToolDone>,
}

impl ToolRunner {
    pub(crate) fn new(tools: Option<Tools>) -> (Self, mpsc::Receiver<ToolDone>) {
        let (done, results) = mpsc::channel(RESULTS_CAPACITY);
        let runner = Self {
            tools,
            pending: HashMap::new(),
            done,
        };
        (runner, results)
    }

    /// Starts the call if the tool is in the registry; `false` when it is
    /// not, and the client is asked instead.
    pub(crate) fn run(
        &mut self,
        id: &str,
        name: &str,
        json: &serde_json::Value,
        generation: u32,
    ) -> bool {
        let Some(tools) = &self.tools else {
            return false;
        };
        if !tools.specs().iter().any(|s| s.name == name) {
            return false;
        }
        self.pending.insert(id.to_owned(), generation);
        let (tools, done) = (tools.clone(), self.done.clone());
        let (id, name, json) = (id.to_owned(), name.to_owned(), json.clone());
        tokio::spawn(async move {
            let result = tools.call(&name, &json).await;
            let _ = done
                .send(ToolDone {
                    id,
                    generation,
                    result,
                })
                .await;
        });
        true
    }

    /// A result went back (or was dropped): the call is over.
    pub(crate) fn finished(&mut self, id: &str) {
        self.pending.remove(id);
    }

    /// No call of this conversation is running.
    pub(crate) fn idle(&self) -> bool {
        self.pending.is_empty()
    }
}
