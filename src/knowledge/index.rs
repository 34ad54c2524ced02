//! The BM25 index over entries, with near matches for small recognition errors.

use std::collections::{BTreeMap, HashMap};

use super::Entry;
use super::text::{one_edit_apart, tokenize};

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

/// Term statistics of one entry.
#[derive(Debug)]
struct Doc {
    tf: HashMap<String, f32>,
    len: f32,
}

/// The BM25 statistics of every entry, in entry order.
#[derive(Debug)]
pub(super) struct Index {
    docs: Vec<Doc>,
    df: BTreeMap<String, usize>,
    avg_len: f32,
}

impl Index {
    /// Indexes each entry's question (and alternative wordings) at
    /// [`QUESTION_WEIGHT`] and its answer once.
    pub(super) fn build(parsed: &[(Entry, Vec<String>)]) -> Self {
        let mut docs = Vec::with_capacity(parsed.len());
        let mut df: BTreeMap<String, usize> = BTreeMap::new();
        for (entry, alternatives) in parsed {
            let mut tokens = Vec::new();
            for _ in 0..QUESTION_WEIGHT {
                tokens.extend(tokenize(&entry.question));
                for alt in alternatives {
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
        }
        let avg_len = (docs.iter().map(|d| d.len).sum::<f32>() / docs.len().max(1) as f32).max(1.0);
        Self { docs, df, avg_len }
    }

    /// Query terms with their weights: vocabulary hits, or for unknown tokens
    /// their nearest vocabulary term at [`FUZZY_WEIGHT`].
    pub(super) fn query_terms(&self, query: &str) -> Vec<(String, f32)> {
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
    pub(super) fn near_term(&self, token: &str) -> Option<&String> {
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
    pub(super) fn rank(&self, query: &str) -> Vec<(usize, f32, usize)> {
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
