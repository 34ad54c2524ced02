//! Recognition errors near the base's own words. A speech recogniser that
//! has never heard a place or office name well writes something close to
//! it ("rilioteca" for "biblioteca", "estúlios" for "estudios"); a word of
//! the transcript that neither the base nor the language's word list knows,
//! and that is a small edit away from exactly one word of the base's
//! questions, becomes that word.
//!
//! Only the questions' words (headings and alternative wordings) are
//! targets: they are what callers say. Every word of the base, answers
//! included, and every word of the word list is known and never changed,
//! so a correct word is left alone even when it is near a target; so is
//! a word that differs from a target only in its last two letters, which
//! is another form of it ("matriculo", "matrícula") rather than a miss.

use std::collections::HashSet;

use super::KnowledgeBase;
use super::text::{fold, is_stop_word, stem, words};

/// Shortest transcript word (in characters) that may be corrected: shorter
/// words are one edit away from too many others.
const MIN_CHARS: usize = 5;

/// From this many characters on, two edits may be corrected; below, one.
const TWO_EDITS_FROM: usize = 8;

/// A word the base's questions use, as written there (lowercase, accents kept).
#[derive(Debug)]
struct Target {
    folded: Vec<char>,
    written: String,
}

/// The base's question words and every word known to be right.
#[derive(Debug)]
pub struct Lexicon {
    known: HashSet<String>,
    targets: Vec<Target>,
}

/// One word replaced by [`Lexicon::correct`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correction {
    pub heard: String,
    pub written: String,
}

impl Lexicon {
    /// The lexicon of `base`, knowing besides the words of `word_list`
    /// (one word a line, as `/usr/share/dict/*` files are; anything after
    /// a `/` on a line, as in Hunspell's lists, is ignored).
    pub fn new(base: &KnowledgeBase, word_list: &str) -> Self {
        let mut known = HashSet::new();
        let mut targets: Vec<Target> = Vec::new();
        for phrasing in &base.phrasings {
            for word in words(phrasing) {
                let folded = fold(word);
                let chars: Vec<char> = folded.chars().collect();
                if chars.len() < MIN_CHARS || is_stop_word(&folded) {
                    continue;
                }
                if !targets.iter().any(|t| t.folded == chars) {
                    targets.push(Target {
                        folded: chars,
                        written: word.to_lowercase(),
                    });
                }
            }
        }
        let base_text = base
            .phrasings
            .iter()
            .chain(base.entries.iter().map(|e| &e.answer));
        for text in base_text {
            known.extend(words(text).map(fold));
        }
        for line in word_list.lines() {
            let word = line.split('/').next().unwrap_or_default().trim();
            if !word.is_empty() {
                known.insert(fold(word));
            }
        }
        Self { known, targets }
    }

    /// How many words are known (the base's and the word list's).
    pub fn known_words(&self) -> usize {
        self.known.len()
    }

    /// How many words of `text` neither the base nor the word list knows
    /// (stop words and numbers are known).
    pub fn unknown_words(&self, text: &str) -> usize {
        words(text)
            .map(fold)
            .filter(|w| {
                w.chars().any(char::is_alphabetic)
                    && !is_stop_word(w)
                    && !self.known.contains(w)
                    && !self.known.contains(&stem(w))
            })
            .count()
    }

    /// `text` with its near misses of the base's words replaced, and what
    /// was replaced; `None` when nothing was.
    pub fn correct(&self, text: &str) -> Option<(String, Vec<Correction>)> {
        let mut out = String::with_capacity(text.len());
        let mut corrections = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(char::is_alphanumeric) {
            out.push_str(&rest[..start]);
            rest = &rest[start..];
            let end = rest
                .find(|c: char| !c.is_alphanumeric())
                .unwrap_or(rest.len());
            let word = &rest[..end];
            match self.target_for(word) {
                Some(target) => {
                    let written = with_case_of(word, &target.written);
                    out.push_str(&written);
                    corrections.push(Correction {
                        heard: word.to_owned(),
                        written,
                    });
                }
                None => out.push_str(word),
            }
            rest = &rest[end..];
        }
        out.push_str(rest);
        (!corrections.is_empty()).then_some((out, corrections))
    }

    /// The one target `word` is a near miss of, if it is an unknown word
    /// with exactly one nearest target within its allowance of edits.
    fn target_for(&self, word: &str) -> Option<&Target> {
        let folded = fold(word);
        let chars: Vec<char> = folded.chars().collect();
        if chars.len() < MIN_CHARS
            || chars.iter().any(|c| !c.is_alphabetic())
            || self.known.contains(&folded)
            || self.known.contains(&stem(&folded))
            || is_stop_word(&folded)
        {
            return None;
        }
        let allowed = if chars.len() >= TWO_EDITS_FROM { 2 } else { 1 };
        let mut best: Option<(usize, &Target)> = None;
        let mut tied = false;
        for target in &self.targets {
            if target.folded.len().abs_diff(chars.len()) > allowed {
                continue;
            }
            // Differing only in the last two letters, the word is another
            // form of the target (`matriculo`, `matrícula`), not a miss.
            let prefix = chars
                .iter()
                .zip(&target.folded)
                .take_while(|(a, b)| a == b)
                .count();
            if prefix + 2 >= chars.len().min(target.folded.len()) {
                return None;
            }
            let Some(distance) = edit_distance(&chars, &target.folded, allowed) else {
                continue;
            };
            match best {
                Some((d, _)) if distance > d => {}
                Some((d, _)) if distance == d => tied = true,
                _ => {
                    best = Some((distance, target));
                    tied = false;
                }
            }
        }
        best.filter(|_| !tied).map(|(_, target)| target)
    }
}

/// `written` capitalised as `heard` is: all capitals, a capital first
/// letter, or lowercase.
fn with_case_of(heard: &str, written: &str) -> String {
    let mut letters = heard.chars().filter(|c| c.is_alphabetic());
    let first_upper = letters.next().is_some_and(char::is_uppercase);
    let all_upper = first_upper && heard.chars().count() > 1 && letters.all(char::is_uppercase);
    if all_upper {
        return written.to_uppercase();
    }
    if first_upper {
        let mut chars = written.chars();
        return chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default();
    }
    written.to_owned()
}

/// Edits (substitutions, insertions, deletions and swaps of two neighbours)
/// between `a` and `b`, or `None` past `limit`.
fn edit_distance(a: &[char], b: &[char], limit: usize) -> Option<usize> {
    let width = b.len() + 1;
    let mut rows = vec![vec![0_usize; width]; 3];
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        let (current, previous, before) = (i % 3, (i + 2) % 3, (i + 1) % 3);
        rows[current][0] = i;
        let mut row_min = i;
        for j in 1..width {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut value = (rows[previous][j] + 1)
                .min(rows[current][j - 1] + 1)
                .min(rows[previous][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                value = value.min(rows[before][j - 2] + 1);
            }
            rows[current][j] = value;
            row_min = row_min.min(value);
        }
        if row_min > limit {
            return None;
        }
    }
    let distance = rows[a.len() % 3][b.len()];
    (distance <= limit).then_some(distance)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> KnowledgeBase {
        KnowledgeBase::from_markdown(&[(
            "faq.md".to_owned(),
            "## ¿Cuál es el horario de la biblioteca?\n\
             > ¿A qué hora abre la biblioteca?\n\
             Abre de 8 a 21 horas; los sábados de 9 a 14.\n\n\
             ## ¿Dónde pido una constancia de estudios?\n\
             En la oficina de registro. Para estudiar, las salas.\n\n\
             ## ¿Cómo renuevo un préstamo?\n\
             Desde el catálogo.\n"
                .to_owned(),
        )])
        .unwrap()
    }

    #[test]
    fn near_misses_of_question_words_are_corrected() {
        let lexicon = Lexicon::new(&base(), "");
        let (text, corrections) = lexicon
            .correct("Quiero saber el horario de la rilioteca.")
            .unwrap();
        assert_eq!(text, "Quiero saber el horario de la biblioteca.");
        assert_eq!(
            corrections,
            [Correction {
                heard: "rilioteca".into(),
                written: "biblioteca".into()
            }]
        );
        let (text, _) = lexicon
            .correct("¿Dónde pido una Constansia de estúlios?")
            .unwrap();
        assert_eq!(text, "¿Dónde pido una Constancia de estudios?");
        // Accents come from the heading; a swap of two letters is one edit.
        let (text, _) = lexicon.correct("PRESTMAO").unwrap();
        assert_eq!(text, "PRÉSTAMO");
    }

    #[test]
    fn known_short_far_and_ambiguous_words_are_left_alone() {
        let lexicon = Lexicon::new(&base(), "hovario\nsabana/S\n");
        for text in [
            "Quiero estudiar",             // in an answer
            "el horario de la biblioteca", // right already
            "el hovario",                  // in the word list
            "las sabanas",                 // the list's word, plural
            "pimo",                        // too short
            "una lavadora",                // far from every target
            "horas 2024 b1blioteca",       // digits
            "",
        ] {
            assert_eq!(lexicon.correct(text), None, "{text}");
        }
        // Equally near two targets: no guess.
        let tied = KnowledgeBase::from_markdown(&[(
            "t.md".to_owned(),
            "## ¿Qué es carta?\nUna.\n\n## ¿Qué es marta?\nOtra.\n".to_owned(),
        )])
        .unwrap();
        assert_eq!(Lexicon::new(&tied, "").correct("la barta"), None);
        assert_eq!(
            Lexicon::new(&tied, "").correct("la cadta").unwrap().0,
            "la carta"
        );
    }

    #[test]
    fn seven_letters_allow_one_edit_and_eight_two() {
        let lexicon = Lexicon::new(&base(), "");
        assert_eq!(lexicon.correct("hoxaxio"), None);
        assert_eq!(lexicon.correct("hovario").unwrap().0, "horario");
        // Other endings are other forms of the word.
        assert_eq!(lexicon.correct("horaria"), None);
        assert_eq!(lexicon.correct("bivlioteka").unwrap().0, "biblioteca");
        assert_eq!(lexicon.correct("bixxiotexa"), None);
    }

    #[test]
    fn unknown_words_are_those_no_list_knows() {
        let lexicon = Lexicon::new(&base(), "casa\n");
        assert_eq!(lexicon.unknown_words("el horario de la casa, 2024"), 0);
        assert_eq!(lexicon.unknown_words("Nel horarios de las casas"), 1);
        assert_eq!(lexicon.unknown_words("que recastuemos solicitar"), 2);
    }

    #[test]
    fn edit_distance_counts_swaps_once_and_stops_at_the_limit() {
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        assert_eq!(edit_distance(&chars("abcd"), &chars("abdc"), 2), Some(1));
        assert_eq!(
            edit_distance(&chars("kitten"), &chars("sitting"), 3),
            Some(3)
        );
        assert_eq!(edit_distance(&chars("kitten"), &chars("sitting"), 2), None);
        assert_eq!(edit_distance(&chars(""), &chars("ab"), 2), Some(2));
    }
}
