//! Knowledge base for the offline engine: FAQ entries read from Markdown files
//! and retrieved with BM25.
//!
//! File format: every `## ` heading is a question (one entry) and the text under
//! it, up to the next `## ` or `# ` heading, is its answer. Lines starting with
//! `> ` inside an answer block are alternative wordings of the question: they
//! count for matching but are never spoken. A `# ` title and any text before the
//! first `## ` heading are ignored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// BM25 term-frequency saturation.
const K1: f32 = 1.2;
/// BM25 length normalisation.
const B: f32 = 0.75;
/// How many times question and alternative-phrasing tokens are counted.
const QUESTION_WEIGHT: usize = 2;
/// Weight of a query token that only has a near match (see `near_term`).
const FUZZY_WEIGHT: f32 = 0.8;
/// Shortest unknown query token (in characters) that may take a near match.
const FUZZY_MIN_CHARS: usize = 5;
/// Lowest BM25 score that [`KnowledgeBase::answer`] accepts as an answer.
pub const MIN_SCORE: f32 = 1.5;

/// Share of the question's content words the best entry must match.
pub const MIN_COVERAGE: f32 = 0.4;

/// Spanish function words and conversational fillers, without accents
/// (tokens are folded before the look-up).
const STOP_ES: &str = "a al algo alguien algun alguna alguno algunos alli ante aqui asi aunque \
    bajo bien bueno buenas buenos cada como con contra cual cuales cuando cuanta cuantas cuanto \
    cuantos de debe deben debes debo decir del desde dias dime donde durante e el ella ellas \
    ellos en entonces entre era eran eres es esa esas ese eso esos esta estan estar estas este \
    esto estos estoy favor fue fueron gracias ha haber habia hace hacen hacer haces hacia hago \
    han has hasta hay he hemos hola ir la las le les lo los mas me mi mis mucho muy nada nadie \
    necesita necesitas necesito ni no noches nos nosotros nuestra nuestro o ok oye os otra otro \
    para pero poco podria por porque pregunta preguntar pues puede pueden puedes puedo que \
    queria quiere quiero quien quienes quisiera saber se sea segun ser si sido sin sino sobre \
    solo somos son soy su sus tambien tardes te tener tengo tiene tienen tienes todo todos tras \
    tu tus u un una unas uno unos usted ustedes va vale van vas voy y ya yo";

/// English function words.
const STOP_EN: &str = "about after all also am an and any are as at be been before being \
    between but by can could did do does during each for from get had has have he hello her \
    here hey hi him his how i if in into is it its just know like may me might more most must \
    my need not of ok okay on only or other our please shall she should so some such tell than \
    thank thanks that the their them then there these they this those through to too under us \
    very want was we were what when where which who whom whose why will with would yes you your";

static STOP_WORDS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    STOP_ES
        .split_whitespace()
        .chain(STOP_EN.split_whitespace())
        .collect()
});

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

/// Term statistics of one entry.
#[derive(Debug)]
struct Doc {
    tf: HashMap<String, f32>,
    len: f32,
}

/// Entries plus their BM25 index.
#[derive(Debug)]
pub struct KnowledgeBase {
    entries: Vec<Entry>,
    docs: Vec<Doc>,
    df: BTreeMap<String, usize>,
    avg_len: f32,
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
        let mut entries = Vec::with_capacity(parsed.len());
        let mut docs = Vec::with_capacity(parsed.len());
        let mut df: BTreeMap<String, usize> = BTreeMap::new();
        for (entry, alternatives) in parsed {
            let mut tokens = Vec::new();
            for _ in 0..QUESTION_WEIGHT {
                tokens.extend(tokenize(&entry.question));
                for alt in &alternatives {
                    tokens.extend(tokenize(alt));
                }
            }
            tokens.extend(tokenize(&entry.answer));
            let len = tokens.len() as f32;
            let mut tf: HashMap<String, f32> = HashMap::new();
            for token in tokens {
                *tf.entry(token).or_insert(0.0) += 1.0;
            }
            for term in tf.keys() {
                *df.entry(term.clone()).or_insert(0) += 1;
            }
            docs.push(Doc { tf, len });
            entries.push(entry);
        }
        let avg_len = (docs.iter().map(|d| d.len).sum::<f32>() / docs.len() as f32).max(1.0);
        Ok(Self {
            entries,
            docs,
            df,
            avg_len,
        })
    }

    /// All entries, in load order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Entries matching `query`, best first, at most `limit`.
    pub fn search(&self, query: &str, limit: usize) -> Vec<Answer> {
        self.rank(query)
            .into_iter()
            .take(limit)
            .map(|(index, score, _)| self.make_answer(index, score))
            .collect()
    }

    /// The best entry if it clears the threshold, else a "not found" text in
    /// `language` (`es*` is Spanish, anything else English).
    pub fn answer(&self, query: &str, language: &str) -> Reply {
        let ranked = self.rank(query);
        let wanted = self
            .query_terms(query)
            .iter()
            .filter(|(_, weight)| *weight >= 1.0)
            .count()
            .max(1);
        // Content words of the question, known to the base or not: an entry
        // that explains only one of several (`¿qué tiempo hará mañana?`
        // matching only `tiempo`) is not an answer to it.
        let mut content = tokenize(query);
        content.sort_unstable();
        content.dedup();
        let covers = |matched: usize| matched as f32 >= MIN_COVERAGE * content.len() as f32;
        let runner_up = ranked.get(1).map_or(0.0, |r| r.1);
        match ranked.first() {
            Some(&(_, _, matched)) if !covers(matched) => Reply::NotFound {
                text: self.not_found_text(language),
            },
            Some(&(index, score, matched)) if matched > 0 && score >= MIN_SCORE => {
                Reply::Found(self.make_answer(index, score))
            }
            // In a small base every word is common, so scores stay low: a
            // clear winner that covers most of the question is still a match.
            Some(&(index, score, matched))
                if matched * 2 >= wanted
                    && score >= MIN_SCORE / 2.0
                    && score >= 2.0 * runner_up =>
            {
                Reply::Found(self.make_answer(index, score))
            }
            _ => Reply::NotFound {
                text: self.not_found_text(language),
            },
        }
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

    fn not_found_text(&self, language: &str) -> String {
        let topics = self.topics(3).join("; ");
        let spanish = language
            .get(..2)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("es"));
        if spanish {
            format!("No tengo información sobre eso. Puedo ayudarte con temas como: {topics}.")
        } else {
            format!(
                "I don't have information about that. I can help with topics such as: {topics}."
            )
        }
    }

    /// Query terms with their weights: vocabulary hits, or for unknown tokens
    /// their nearest vocabulary term at [`FUZZY_WEIGHT`].
    fn query_terms(&self, query: &str) -> Vec<(String, f32)> {
        let mut terms: Vec<(String, f32)> = Vec::new();
        for token in tokenize(query) {
            let term = if self.df.contains_key(&token) {
                Some((token, 1.0))
            } else {
                self.near_term(&token).map(|t| (t.clone(), FUZZY_WEIGHT))
            };
            if let Some(term) = term
                && !terms.iter().any(|(known, _)| *known == term.0)
            {
                terms.push(term);
            }
        }
        terms
    }

    /// For a token of [`FUZZY_MIN_CHARS`] or more, the vocabulary term with the
    /// same first letter that is one edit away (`bibloteca`) or shares a stem of
    /// at least 6 letters followed by at most 4 more (`matriculo`, `matricularme`).
    /// One-edit terms win, then the longest shared prefix, then the most frequent.
    fn near_term(&self, token: &str) -> Option<&String> {
        let chars: Vec<char> = token.chars().collect();
        if chars.len() < FUZZY_MIN_CHARS {
            return None;
        }
        self.df
            .iter()
            .filter_map(|(term, &count)| {
                let other: Vec<char> = term.chars().collect();
                let prefix = chars.iter().zip(&other).take_while(|(a, b)| a == b).count();
                let one_edit = one_edit_apart(&chars, &other);
                let stem = prefix >= 6 && chars.len().max(other.len()) - prefix <= 4;
                (one_edit || stem).then_some(((one_edit, prefix, count), term))
            })
            .max_by_key(|&(key, _)| key)
            .map(|(_, term)| term)
    }

    /// `(entry index, BM25 score, matched query terms)`, best first.
    fn rank(&self, query: &str) -> Vec<(usize, f32, usize)> {
        let terms = self.query_terms(query);
        let n = self.docs.len() as f32;
        let mut ranked = Vec::new();
        for (index, doc) in self.docs.iter().enumerate() {
            let (mut score, mut matched) = (0.0_f32, 0_usize);
            for (term, weight) in &terms {
                let Some(&tf) = doc.tf.get(term) else {
                    continue;
                };
                let df = self.df.get(term).copied().unwrap_or(0) as f32;
                let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
                let norm = K1 * (1.0 - B + B * doc.len / self.avg_len);
                score += weight * idf * tf * (K1 + 1.0) / (tf + norm);
                matched += 1;
            }
            if matched > 0 {
                ranked.push((index, score, matched));
            }
        }
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked
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

/// Lowercases, folds accents, splits on non-alphanumerics, drops stop words and
/// strips plural endings.
fn tokenize(text: &str) -> Vec<String> {
    let folded: String = text
        .nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect();
    folded
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty() && !STOP_WORDS.contains(t))
        .map(stem)
        .collect()
}

/// Light plural stemmer for tokens longer than 4 characters: `-es` goes after
/// the consonants that take it in Spanish (`papeles`, `ciudades`), otherwise a
/// single trailing `s` goes (`libros`, `clases`, `books`).
fn stem(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    let n = chars.len();
    if n <= 4 || chars[n - 1] != 's' {
        return token.to_string();
    }
    if chars[n - 2] == 'e' && matches!(chars[n - 3], 'l' | 'n' | 'r' | 'd' | 'z' | 'j') {
        return chars[..n - 2].iter().collect();
    }
    if chars[n - 2] == 's' {
        return token.to_string();
    }
    chars[..n - 1].iter().collect()
}

/// Whether two words that share their first letter differ by one edit
/// (substitution, insertion or deletion).
fn one_edit_apart(a: &[char], b: &[char]) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if long.len() - short.len() > 1 || short.first() != long.first() {
        return false;
    }
    let prefix = short.iter().zip(long).take_while(|(x, y)| x == y).count();
    if prefix == short.len() {
        return true;
    }
    if short.len() == long.len() {
        short[prefix + 1..] == long[prefix + 1..]
    } else {
        short[prefix..] == long[prefix + 1..]
    }
}

#[cfg(test)]
mod tests;
