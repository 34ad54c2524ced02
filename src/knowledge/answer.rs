//! The answer policy: when the best entry is an answer to the question, and
//! what to say when none is.

use super::text::tokenize;
use super::{KnowledgeBase, Reply};

/// Lowest BM25 score that [`KnowledgeBase::answer`] accepts as an answer.
pub const MIN_SCORE: f32 = 1.5;

/// Share of the question's content words the best entry must match.
pub const MIN_COVERAGE: f32 = 0.4;

impl KnowledgeBase {
    /// The best entry if it clears the threshold, else a "not found" text in
    /// `language` (`es*` is Spanish, anything else English).
    pub fn answer(&self, query: &str, language: &str) -> Reply {
        let ranked = self.index.rank(query);
        let wanted = self
            .index
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
}
