//! Loading: Markdown files into entries and their alternative wordings.

use std::fs;
use std::path::{Path, PathBuf};

use super::index::Index;
use super::{Entry, KnowledgeBase};

/// Errors while loading a knowledge base.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    /// The knowledge directory cannot be listed. The caller reports it and stops at start-up.
    #[error("cannot read knowledge directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A knowledge file cannot be read or is not UTF-8. The caller reports it and stops at start-up.
    #[error("cannot read knowledge file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No `## ` entry was found in any file. The caller reports it and stops at start-up.
    #[error("no knowledge entries found in {location}")]
    NoEntries { location: String },
    /// A `## ` heading has no text. The caller reports it and stops at start-up.
    #[error("empty question heading in {file}:{line}")]
    EmptyQuestion { file: String, line: usize },
    /// A `## ` heading has no answer text under it. The caller reports it and stops at start-up.
    #[error("question heading without answer in {file}:{line}")]
    EmptyAnswer { file: String, line: usize },
}

/// An entry being parsed.
struct Draft {
    question: String,
    line: usize,
    alternatives: Vec<String>,
    segments: Vec<String>,
    /// Whether the next plain line continues the last segment.
    open: bool,
}

impl Draft {
    fn new(question: &str, line: usize) -> Self {
        Self {
            question: question.to_string(),
            line,
            alternatives: Vec::new(),
            segments: Vec::new(),
            open: false,
        }
    }

    /// The finished entry and its alternative phrasings.
    fn finish(self, source: &str, label: &str) -> Result<(Entry, Vec<String>), KnowledgeError> {
        if self.segments.is_empty() {
            let (file, line) = (label.to_string(), self.line);
            return Err(KnowledgeError::EmptyAnswer { file, line });
        }
        let sentences: Vec<String> = self
            .segments
            .into_iter()
            .map(|s| {
                if s.ends_with(['.', '!', '?', ':', ';', '…']) {
                    s
                } else {
                    format!("{s}.")
                }
            })
            .collect();
        let answer = sentences.join(" ");
        let entry = Entry {
            question: self.question,
            answer,
            source: source.to_string(),
        };
        Ok((entry, self.alternatives))
    }

    fn push_line(&mut self, line: &str) {
        if line.is_empty() {
            self.open = false;
            return;
        }
        if let Some(alt) = line.strip_prefix('>') {
            let alt = strip_inline(alt);
            if !alt.is_empty() {
                self.alternatives.push(alt);
            }
            return;
        }
        let (item, body) = match list_item(line) {
            Some(body) => (true, body),
            None => (false, line),
        };
        let text = strip_inline(body.trim_start_matches('#'));
        if text.is_empty() {
            return;
        }
        match self.segments.last_mut() {
            Some(last) if self.open && !item => {
                last.push(' ');
                last.push_str(&text);
            }
            _ => self.segments.push(text),
        }
        self.open = true;
    }
}

impl KnowledgeBase {
    /// Loads every `*.md` file of `dir`, in file-name order.
    pub fn load(dir: &Path) -> Result<Self, KnowledgeError> {
        let dir_error = |source| KnowledgeError::ReadDir {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths = Vec::new();
        for item in fs::read_dir(dir).map_err(dir_error)? {
            let path = item.map_err(dir_error)?.path();
            let is_md = path
                .extension()
                .is_some_and(|ext| ext.eq_ignore_ascii_case("md"));
            if is_md && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut parsed = Vec::new();
        for path in &paths {
            let content = fs::read_to_string(path).map_err(|source| KnowledgeError::ReadFile {
                path: path.clone(),
                source,
            })?;
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            parse_file(&name, &path.display().to_string(), &content, &mut parsed)?;
        }
        Self::build(parsed, &dir.display().to_string())
    }

    /// Builds a base from `(file name, content)` pairs, in the given order.
    pub fn from_markdown(files: &[(String, String)]) -> Result<Self, KnowledgeError> {
        let mut parsed = Vec::new();
        for (name, content) in files {
            parse_file(name, name, content, &mut parsed)?;
        }
        Self::build(parsed, "inline markdown")
    }

    fn build(parsed: Vec<(Entry, Vec<String>)>, location: &str) -> Result<Self, KnowledgeError> {
        if parsed.is_empty() {
            return Err(KnowledgeError::NoEntries {
                location: location.to_string(),
            });
        }
        let index = Index::build(&parsed);
        let mut entries = Vec::with_capacity(parsed.len());
        let mut phrasings = Vec::new();
        for (entry, alternatives) in parsed {
            phrasings.push(entry.question.clone());
            phrasings.extend(alternatives);
            entries.push(entry);
        }
        Ok(Self {
            entries,
            phrasings,
            index,
        })
    }
}

/// Parses one file's entries into `out`; `label` names the file in errors.
fn parse_file(
    source: &str,
    label: &str,
    content: &str,
    out: &mut Vec<(Entry, Vec<String>)>,
) -> Result<(), KnowledgeError> {
    let mut draft: Option<Draft> = None;
    for (number, raw) in content.lines().enumerate() {
        let line = raw.trim();
        let question = heading(line, "##");
        if question.is_some() || heading(line, "#").is_some() {
            if let Some(done) = draft.take() {
                out.push(done.finish(source, label)?);
            }
            let Some(question) = question else { continue };
            if question.is_empty() {
                let (file, line) = (label.to_string(), number + 1);
                return Err(KnowledgeError::EmptyQuestion { file, line });
            }
            draft = Some(Draft::new(question, number + 1));
        } else if let Some(draft) = draft.as_mut() {
            draft.push_line(line);
        }
    }
    if let Some(done) = draft {
        out.push(done.finish(source, label)?);
    }
    Ok(())
}

/// The heading text if `line` is a heading made exactly of `marks`.
fn heading<'a>(line: &'a str, marks: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(marks)?;
    if rest.is_empty() {
        return Some("");
    }
    rest.strip_prefix(' ').map(str::trim)
}

/// The item text if `line` starts with a list marker (`- `, `* `, `+ `, `1. `, `1) `).
fn list_item(line: &str) -> Option<&str> {
    for marker in ["- ", "* ", "+ "] {
        if let Some(rest) = line.strip_prefix(marker) {
            return Some(rest);
        }
    }
    let rest = line.trim_start_matches(|c: char| c.is_ascii_digit());
    if rest.len() == line.len() {
        return None;
    }
    rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") "))
}

/// Removes inline Markdown: `[text](url)` becomes `text`; `*`, `_` and backticks go.
fn strip_inline(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let link = after.find("](").and_then(|close| {
            let tail = &after[close + 2..];
            tail.find(')').map(|end| (close, close + 2 + end + 1))
        });
        match link {
            Some((close, consumed)) => {
                out.push_str(rest[..open].trim_end_matches('!'));
                out.push_str(&after[..close]);
                rest = &after[consumed..];
            }
            None => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    let cleaned: String = out
        .chars()
        .filter(|c| !matches!(c, '*' | '_' | '`'))
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}
