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
mod tests {
    use super::*;

    fn example() -> KnowledgeBase {
        KnowledgeBase::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("knowledge")).unwrap()
    }

    fn inline(name: &str, markdown: &str) -> Result<KnowledgeBase, KnowledgeError> {
        KnowledgeBase::from_markdown(&[(name.to_string(), markdown.to_string())])
    }

    fn found(kb: &KnowledgeBase, query: &str) -> Answer {
        match kb.answer(query, "es") {
            Reply::Found(answer) => answer,
            Reply::NotFound { text } => panic!("{query:?} not found: {text}"),
        }
    }

    fn best_score(kb: &KnowledgeBase, query: &str) -> f32 {
        kb.search(query, 1).first().map_or(0.0, |a| a.score)
    }

    const UNRELATED: &[&str] = &[
        "¿quién ganó el partido de fútbol ayer?",
        "quien gano el partido de futbol ayer",
        "what is the capital of France",
        "cuál es la receta de la paella",
        "el portal",
        "hola",
    ];

    /// Recognised-speech queries: no accents or punctuation, other wordings.
    const ASR: &[(&str, &str)] = &[
        ("como me matriculo", "¿Cómo hago la matrícula?"),
        (
            "hola buenas tardes queria saber como me matriculo",
            "¿Cómo hago la matrícula?",
        ),
        (
            "cuando abre la biblioteca",
            "¿Cuál es el horario de la biblioteca?",
        ),
        (
            "horario de la bibloteca",
            "¿Cuál es el horario de la biblioteca?",
        ),
        (
            "olvide mi contrasena del portal",
            "¿Cómo restablezco la contraseña del portal del estudiante?",
        ),
        (
            "necesito una constancia de estudios",
            "¿Cómo pido una constancia o certificado de estudios?",
        ),
        ("quiero renovar un libro", "¿Cómo renuevo un préstamo?"),
        (
            "que papeles piden para la matricula",
            "¿Qué documentos necesito para matricularme?",
        ),
        (
            "se me paso el plazo de matricula",
            "¿Puedo matricularme fuera de plazo?",
        ),
        (
            "como pido prestados libros",
            "¿Cómo pido un libro prestado?",
        ),
        ("perdi el carnet", "¿Cómo obtengo el carnet de estudiante?"),
        ("hay becas para estudiantes", "¿Cómo solicito una beca?"),
        (
            "quiero reservar una sala para estudiar",
            "¿Hay wifi y salas de estudio en la biblioteca?",
        ),
        (
            "con quien hablo de un problema tecnico",
            "¿Cómo contacto con la mesa de ayuda?",
        ),
        (
            "quiero dar de baja una materia",
            "¿Puedo cambiar o retirar un curso?",
        ),
    ];

    #[test]
    fn example_base_loads_in_file_order() {
        let kb = example();
        assert!(
            (12..=16).contains(&kb.entries().len()),
            "{}",
            kb.entries().len()
        );
        let mut sources: Vec<&str> = kb.entries().iter().map(|e| e.source.as_str()).collect();
        sources.dedup();
        assert_eq!(
            sources,
            ["01-matricula.md", "02-biblioteca.md", "03-servicios.md"]
        );
        for entry in kb.entries() {
            assert!(
                !entry.answer.contains(['*', '`', '[', '>', '#']),
                "{}",
                entry.answer
            );
            assert!(!entry.answer.contains("EJEMPLO"), "{}", entry.answer);
        }
    }

    #[test]
    fn each_question_retrieves_itself_first() {
        let kb = example();
        for (index, entry) in kb.entries().iter().enumerate() {
            let hits = kb.search(&entry.question, 3);
            assert_eq!(hits[0].entry_index, index, "{}: {hits:?}", entry.question);
            assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
            assert_eq!(found(&kb, &entry.question).text, entry.answer);
        }
        assert_eq!(kb.search("biblioteca", 2).len(), 2);
        assert!(kb.search("biblioteca", 0).is_empty());
        assert!(kb.search("", 5).is_empty());
    }

    #[test]
    fn asr_like_queries_find_the_right_entry() {
        let kb = example();
        for (query, question) in ASR {
            assert_eq!(found(&kb, query).question, *question, "query {query:?}");
        }
    }

    #[test]
    fn threshold_separates_matched_from_unrelated() {
        let kb = example();
        let lowest = ASR
            .iter()
            .map(|(q, _)| best_score(&kb, q))
            .fold(f32::MAX, f32::min);
        let highest = UNRELATED
            .iter()
            .map(|q| best_score(&kb, q))
            .fold(0.0, f32::max);
        assert!(lowest >= MIN_SCORE, "lowest matched score {lowest}");
        assert!(highest < MIN_SCORE, "highest unrelated score {highest}");
    }

    #[test]
    fn tokens_fold_case_accents_stop_words_and_plurals() {
        assert_eq!(tokenize("MATRÍCULA"), tokenize("matricula"));
        assert_eq!(tokenize("MATRÍCULA"), ["matricula"]);
        assert!(tokenize("¿Cuándo? ¿Dónde? ¿Cuánto?").is_empty());
        assert_eq!(tokenize("contraseña"), ["contrasena"]);
        assert_eq!(tokenize("¿Dónde está la Biblioteca?"), ["biblioteca"]);
        assert_eq!(tokenize("What are the library hours"), ["library", "hour"]);
        let words = [
            "libros", "clases", "papeles", "ciudades", "mes", "class", "classes",
        ];
        let stems: Vec<String> = words.iter().map(|w| stem(w)).collect();
        assert_eq!(
            stems,
            [
                "libro", "clase", "papel", "ciudad", "mes", "class", "classe"
            ]
        );
        assert_eq!(stem("estudiantes"), stem("estudiante"));
    }

    #[test]
    fn near_matches_cover_small_recognition_errors() {
        let c = |s: &str| s.chars().collect::<Vec<_>>();
        assert!(one_edit_apart(&c("matriculo"), &c("matricula")));
        assert!(one_edit_apart(&c("bibloteca"), &c("biblioteca")));
        assert!(!one_edit_apart(&c("matriculo"), &c("matricularme")));
        assert!(!one_edit_apart(&c("xatricula"), &c("matricula")));
        let kb = example();
        assert_eq!(
            kb.near_term("bibloteca").map(String::as_str),
            Some("biblioteca")
        );
        assert_eq!(
            kb.near_term("matriculo").map(String::as_str),
            Some("matricula")
        );
        assert_eq!(kb.near_term("futbol"), None);
        assert_eq!(kb.near_term("pase"), None);
    }

    /// One distinctive word is not enough when the question is about
    /// something else.
    #[test]
    fn a_single_shared_word_does_not_make_an_answer() {
        let kb = example();
        for query in [
            "que tiempo hara manana",
            "a que hora juega el real madrid",
            "quiero comprar un libro de cocina",
        ] {
            assert!(
                matches!(kb.answer(query, "es"), Reply::NotFound { .. }),
                "{query}"
            );
        }
    }

    /// What Whisper base actually heard from eSpeak questions (rough, but
    /// still about the right topic) is answered.
    #[test]
    fn rough_recognised_questions_are_answered() {
        let kb = example();
        for (heard, topic) in [
            ("Como podemos renovar un libro prestado.", "renov"),
            ("¿Cuál es el olyón de la biblioteca?", "biblioteca"),
            (
                "Olíne la contraseña del portal del estudiante, que hago.",
                "contraseña",
            ),
            ("Donde pimo a constancia me estúlios.", "constancia"),
            ("¿Cómo tengo el carne de estudiante?", "carn"),
            ("que macumentos necesito para la matrícula.", "matr"),
        ] {
            let Reply::Found(answer) = kb.answer(heard, "es") else {
                panic!("not found: {heard}");
            };
            let entry = &kb.entries()[answer.entry_index];
            let text = format!("{} {}", entry.question, entry.answer).to_lowercase();
            assert!(text.contains(topic), "{heard} -> {}", entry.question);
        }
    }

    #[test]
    fn unrelated_questions_are_not_found_in_the_callers_language() {
        let kb = example();
        let topics = kb.topics(3).join("; ");
        assert_eq!(kb.topics(3)[0], "Cómo hago la matrícula");
        assert_eq!(kb.topics(100).len(), kb.entries().len());
        let es =
            format!("No tengo información sobre eso. Puedo ayudarte con temas como: {topics}.");
        let en = format!(
            "I don't have information about that. I can help with topics such as: {topics}."
        );
        for query in UNRELATED {
            assert_eq!(
                kb.answer(query, "es-ES"),
                Reply::NotFound { text: es.clone() }
            );
            assert_eq!(kb.answer(query, "en"), Reply::NotFound { text: en.clone() });
        }
    }

    #[test]
    fn markdown_is_stripped_for_speech() {
        let md = "# Título\nTexto ignorado.\n\n## ¿Qué traigo?\nTrae **tu carnet** y *una foto*\n\
                  al mostrador.\n\nLista:\n- Un `formulario` firmado\n\
                  * El [recibo de pago](https://example.invalid/pago)\n1. Una copia_extra\n\nFin";
        let kb = inline("a.md", md).unwrap();
        let expected = "Trae tu carnet y una foto al mostrador. Lista: Un formulario firmado. \
                        El recibo de pago. Una copiaextra. Fin.";
        assert_eq!(kb.entries()[0].answer, expected);
    }

    #[test]
    fn alternatives_match_but_are_not_spoken() {
        let md = "## ¿Cómo llego al campus?\n> transporte autobús\nToma la línea indicada.\n\
                  ## ¿Dónde está la cafetería?\nEn la planta baja.\n\
                  ## ¿Hay aparcamiento?\nSí, junto al edificio norte.\n\
                  ## ¿Hay casilleros?\nSí, en el pasillo central.";
        let kb = inline("a.md", md).unwrap();
        let answer = found(&kb, "que autobus de transporte tomo");
        assert_eq!(
            (answer.entry_index, answer.text.as_str()),
            (0, "Toma la línea indicada.")
        );
        assert_eq!(found(&kb, "cafeteria").entry_index, 1);
    }

    #[test]
    fn empty_answer_or_heading_names_file_and_line() {
        let md = "# T\n\n## Uno\nRespuesta.\n\n## Vacía\n> otra forma\n\n## Tres\nTexto.";
        let err = inline("x.md", md).err().unwrap();
        assert!(matches!(err, KnowledgeError::EmptyAnswer { ref file, line: 6 } if file == "x.md"));
        assert_eq!(err.to_string(), "question heading without answer in x.md:6");
        let err = inline("y.md", "## Uno\nRespuesta.\n##\nTexto.")
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "empty question heading in y.md:3");
        let err = inline("z.md", "# Solo título\nSin entradas.")
            .err()
            .unwrap();
        assert!(matches!(err, KnowledgeError::NoEntries { .. }), "{err}");
    }

    #[test]
    fn load_sorts_md_files_and_errors_name_the_path() {
        let dir = std::env::temp_dir().join(format!("knowledge-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let err = KnowledgeBase::load(&dir).err().unwrap();
        assert!(matches!(err, KnowledgeError::NoEntries { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
        let missing = dir.join("missing");
        let err = KnowledgeBase::load(&missing).err().unwrap();
        assert!(matches!(err, KnowledgeError::ReadDir { .. }), "{err}");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        fs::write(dir.join("b.md"), "## B\nSegunda.").unwrap();
        fs::write(dir.join("a.md"), "## A\nPrimera.").unwrap();
        fs::write(dir.join("c.txt"), "## C\nIgnorada.").unwrap();
        let kb = KnowledgeBase::load(&dir).unwrap();
        let sources: Vec<&str> = kb.entries().iter().map(|e| e.source.as_str()).collect();
        assert_eq!(sources, ["a.md", "b.md"]);

        fs::write(dir.join("c.md"), [0xff, 0xfe]).unwrap();
        let err = KnowledgeBase::load(&dir).err().unwrap();
        assert!(matches!(err, KnowledgeError::ReadFile { .. }), "{err}");
        assert!(err.to_string().contains("c.md"), "{err}");
        fs::write(dir.join("c.md"), "## Pregunta\n\n## Otra\nTexto.").unwrap();
        let err = KnowledgeBase::load(&dir).err().unwrap();
        assert!(err.to_string().ends_with("c.md:1"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn as_context_respects_max_bytes() {
        let kb = example();
        let first = &kb.entries()[0];
        let block = format!("Q: {}\nA: {}\n\n", first.question, first.answer);
        assert_eq!(kb.as_context(0), "");
        assert_eq!(kb.as_context(block.len() - 1), "");
        assert_eq!(kb.as_context(block.len()), block);
        for max in [50, 300, 1000, 2000] {
            assert!(kb.as_context(max).len() <= max);
        }
        let all = kb.as_context(usize::MAX);
        assert_eq!(all.matches("Q: ").count(), kb.entries().len());
    }
}
