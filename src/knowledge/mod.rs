//! The knowledge base: FAQ entries read from Markdown files and retrieved
//! with BM25. The local engine answers from it; the `search_knowledge` tool
//! (Nova Sonic and any engine with tools) searches it.
//!
//! File format: every `## ` heading is a question (one entry) and the text under
//! it, up to the next `## ` or `# ` heading, is its answer. Lines starting with
//! `> ` inside an answer block are alternative wordings of the question: they
//! count for matching but are never spoken. A `# ` title and any text before the
//! first `## ` heading are ignored.
//!
//! Layers: [`load`](self::load) (Markdown → entries), `text` (folding,
//! stop words, stemming), `index` (BM25 and near matches), `answer` (when
//! the best entry is an answer), `lexicon` (a transcript's near misses of
//! the questions' words).

mod answer;
mod index;
mod lexicon;
mod load;
mod text;

use std::sync::Arc;

pub use answer::{MIN_COVERAGE, MIN_SCORE};
pub use lexicon::{Correction, Lexicon};
pub use load::KnowledgeError;

use index::Index;

/// One question and its spoken answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The heading as written, e.g. `¿Cómo renuevo un préstamo?`.
    pub question: String,
    /// The answer as plain text for speech (Markdown stripped, lines joined).
    pub answer: String,
    /// The file name the entry comes from.
    pub source: String,
}

/// A retrieved entry with its BM25 score.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub entry_index: usize,
    pub question: String,
    pub text: String,
    pub score: f32,
}

/// Result of [`KnowledgeBase::answer`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The best entry scored at least [`MIN_SCORE`].
    Found(Answer),
    /// Nothing relevant; `text` says so and lists topics that are covered.
    NotFound { text: String },
}

/// Entries plus their BM25 index.
#[derive(Debug)]
pub struct KnowledgeBase {
    entries: Vec<Entry>,
    /// Every question and alternative wording, in order.
    phrasings: Vec<String>,
    index: Index,
}

impl KnowledgeBase {
    /// All entries, in load order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Entries matching `query`, best first, at most `limit`.
    pub fn search(&self, query: &str, limit: usize) -> Vec<Answer> {
        self.index
            .rank(query)
            .into_iter()
            .take(limit)
            .map(|(index, score, _)| self.make_answer(index, score))
            .collect()
    }

    /// The first `n` questions without the `¿`/`?` marks.
    pub fn topics(&self, n: usize) -> Vec<&str> {
        self.entries
            .iter()
            .take(n)
            .map(|e| {
                e.question
                    .trim()
                    .trim_start_matches('¿')
                    .trim_end_matches('?')
                    .trim()
            })
            .collect()
    }

    /// What a caller is likely to ask, for a speech recogniser's prompt:
    /// the headings as written, in order, while whole ones fit in
    /// `max_chars`. Whole questions give the recogniser the words and the
    /// way they are put together.
    pub fn questions_text(&self, max_chars: usize) -> String {
        let mut out = String::new();
        for entry in &self.entries {
            let question = entry.question.trim();
            let separator = if out.is_empty() { "" } else { " " };
            if out.len() + separator.len() + question.len() > max_chars {
                break;
            }
            out.push_str(separator);
            out.push_str(question);
        }
        out
    }

    /// The words a caller is likely to say, for a speech recogniser's
    /// prompt: the content words of the headings (no stop words, nothing
    /// under four letters), each once, as written, in order, comma
    /// separated, up to `max_chars`.
    pub fn vocabulary(&self, max_chars: usize) -> String {
        let mut seen = std::collections::HashSet::new();
        let mut out = String::new();
        let words = self.entries.iter().flat_map(|e| text::words(&e.question));
        for word in words {
            let folded = text::fold(word);
            if word.chars().count() < 4 || text::is_stop_word(&folded) || !seen.insert(folded) {
                continue;
            }
            let separator = if out.is_empty() { "" } else { ", " };
            if out.len() + separator.len() + word.len() > max_chars {
                break;
            }
            out.push_str(separator);
            out.push_str(word);
        }
        out
    }

    /// Whole entries as `Q: …\nA: …\n\n`, in order, while the total fits in `max_bytes`.
    pub fn as_context(&self, max_bytes: usize) -> String {
        let mut out = String::new();
        for entry in &self.entries {
            let block = format!("Q: {}\nA: {}\n\n", entry.question, entry.answer);
            if out.len() + block.len() > max_bytes {
                break;
            }
            out.push_str(&block);
        }
        out
    }

    fn make_answer(&self, index: usize, score: f32) -> Answer {
        let entry = &self.entries[index];
        Answer {
            entry_index: index,
            question: entry.question.clone(),
            text: entry.answer.clone(),
            score,
        }
    }
}

/// Searching and answering take CPU time in proportion to the base's
/// vocabulary, so from async code they run on the blocking pool.
impl KnowledgeBase {
    /// [`search`](Self::search) off the async workers.
    pub async fn search_blocking(
        self: Arc<Self>,
        query: String,
        limit: usize,
    ) -> Result<Vec<Answer>, tokio::task::JoinError> {
        tokio::task::spawn_blocking(move || self.search(&query, limit)).await
    }

    /// [`answer`](Self::answer) off the async workers.
    pub async fn answer_blocking(
        self: Arc<Self>,
        query: String,
        language: String,
    ) -> Result<Reply, tokio::task::JoinError> {
        tokio::task::spawn_blocking(move || self.answer(&query, &language)).await
    }
}

#[cfg(test)]
mod tests;
