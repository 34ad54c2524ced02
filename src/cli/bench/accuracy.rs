//! The Spanish question set of `sonora bench local` and how a transcript is
//! scored against it: keyword recall and word error rate.

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// A question about the example knowledge base, with the words that carry
/// its meaning (what the answer depends on hearing).
#[derive(Debug, Clone, Copy)]
pub(super) struct Question {
    pub(super) text: &'static str,
    /// Folded words; `a|b` for a word with two standard spellings.
    pub(super) keywords: &'static [&'static str],
}

/// 2–5 s each when spoken.
pub(super) const QUESTIONS: [Question; 8] = [
    Question {
        text: "¿Cómo me matriculo en un curso?",
        keywords: &["matriculo", "curso"],
    },
    Question {
        text: "¿Cuál es el horario de la biblioteca?",
        keywords: &["horario", "biblioteca"],
    },
    Question {
        text: "¿Cómo puedo renovar un libro prestado?",
        keywords: &["renovar", "libro", "prestado"],
    },
    Question {
        text: "Olvidé la contraseña del portal del estudiante, ¿qué hago?",
        keywords: &["olvide", "contrasena", "portal", "estudiante"],
    },
    Question {
        text: "¿Dónde pido una constancia de estudios?",
        keywords: &["pido", "constancia", "estudios"],
    },
    Question {
        text: "¿Qué becas puedo solicitar?",
        keywords: &["becas", "solicitar"],
    },
    Question {
        text: "¿Cómo obtengo el carné de estudiante?",
        // "carnet" is the same word (both spellings are standard).
        keywords: &["obtengo", "carne|carnet", "estudiante"],
    },
    Question {
        text: "¿Qué documentos necesito para la matrícula?",
        keywords: &["documentos", "necesito", "matricula"],
    },
];

/// eSpeak NG voices the questions are spoken with.
pub(super) const VOICES: [&str; 2] = ["es", "es-419"];

/// Lowercase words without accents or punctuation.
pub(super) fn words(text: &str) -> Vec<String> {
    let folded: String = text
        .nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect();
    folded
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Keywords of `question` found among the transcript's words (a keyword
/// `a|b` is found as either spelling).
pub(super) fn keywords_heard(question: &Question, transcript: &str) -> usize {
    let heard = words(transcript);
    question
        .keywords
        .iter()
        .filter(|k| k.split('|').any(|k| heard.iter().any(|w| w == k)))
        .count()
}

/// Word-level edit distance between the question and the transcript
/// (substitutions, insertions, deletions), and the question's word count.
pub(super) fn word_errors(reference: &str, transcript: &str) -> (usize, usize) {
    let reference = words(reference);
    let hypothesis = words(transcript);
    let mut previous: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut current = vec![i + 1; hypothesis.len() + 1];
        for (j, h) in hypothesis.iter().enumerate() {
            let substitution = previous[j] + usize::from(r != h);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    (previous[hypothesis.len()], reference.len())
}

/// Totals over many transcripts.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Score {
    pub(super) keywords: usize,
    pub(super) keywords_heard: usize,
    pub(super) words: usize,
    pub(super) word_errors: usize,
}

impl Score {
    pub(super) fn add(&mut self, question: &Question, transcript: &str) {
        self.keywords += question.keywords.len();
        self.keywords_heard += keywords_heard(question, transcript);
        let (errors, words) = word_errors(question.text, transcript);
        self.word_errors += errors;
        self.words += words;
    }

    pub(super) fn keyword_recall(&self) -> f64 {
        self.keywords_heard as f64 / self.keywords.max(1) as f64
    }

    pub(super) fn word_error_rate(&self) -> f64 {
        self.word_errors as f64 / self.words.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_fold_accents_and_punctuation() {
        let q = QUESTIONS[3];
        assert_eq!(
            keywords_heard(
                &q,
                "Olvidé la contraseña del portal del estudiante. ¿Qué hago?"
            ),
            4
        );
        assert_eq!(keywords_heard(&q, "olvide la contra sena del portal"), 2);
        assert_eq!(keywords_heard(&q, ""), 0);
        let q = QUESTIONS[6];
        assert_eq!(
            keywords_heard(&q, "como obtengo el carnet de estudiante"),
            3
        );
        assert_eq!(keywords_heard(&q, "como obtengo el carne de estudiante"), 3);
        assert_eq!(keywords_heard(&q, "como obtengo el car de estudiante"), 2);
    }

    #[test]
    fn word_errors_count_edits() {
        assert_eq!(
            word_errors("¿Qué becas puedo solicitar?", "que becas puedo solicitar"),
            (0, 4)
        );
        assert_eq!(
            word_errors("¿Qué becas puedo solicitar?", "que vecas puedo"),
            (2, 4)
        );
        assert_eq!(word_errors("a b", "x a b y"), (2, 2));
        assert_eq!(word_errors("a b", ""), (2, 2));
    }

    #[test]
    fn every_keyword_is_in_its_question() {
        for q in QUESTIONS {
            assert_eq!(keywords_heard(&q, q.text), q.keywords.len(), "{}", q.text);
        }
    }
}
