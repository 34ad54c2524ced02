//! A conversation as text, replayed into a new upstream session of a cloud
//! engine (a hand-off, a reconnection that cannot resume): user and
//! assistant messages, same-role runs merged, the newest kept within a byte
//! budget.

use super::Role;

/// Most bytes of history kept.
const MAX_TOTAL_BYTES: usize = 32 * 1024;
/// Most bytes kept of one message (its end: the latest words matter most).
const MAX_MESSAGE_BYTES: usize = 4 * 1024;

#[derive(Debug, Default, Clone)]
pub(crate) struct History {
    messages: Vec<(Role, String)>,
}

impl History {
    /// A history that starts with `messages` (a conversation carried over
    /// from another engine).
    pub(crate) fn from_messages(messages: &[(Role, String)]) -> Self {
        let mut history = Self::default();
        for (role, text) in messages {
            history.push(*role, text);
        }
        history
    }

    pub(crate) fn push(&mut self, role: Role, text: &str) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        match self.messages.last_mut() {
            Some((last, body)) if *last == role => {
                body.push(' ');
                body.push_str(text);
                keep_tail(body, MAX_MESSAGE_BYTES);
            }
            _ => {
                let mut body = text.to_owned();
                keep_tail(&mut body, MAX_MESSAGE_BYTES);
                self.messages.push((role, body));
            }
        }
        while self.bytes() > MAX_TOTAL_BYTES && self.messages.len() > 1 {
            self.messages.remove(0);
        }
    }

    fn bytes(&self) -> usize {
        self.messages.iter().map(|(_, t)| t.len()).sum()
    }

    /// The messages, oldest first.
    pub(crate) fn messages(&self) -> &[(Role, String)] {
        &self.messages
    }
}

/// Cuts `text` to its last `max` bytes, at a character boundary.
fn keep_tail(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text.drain(..start);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_the_newest_is_kept_within_the_budget() {
        let mut history = History::default();
        history.push(Role::User, "hola");
        history.push(Role::User, "¿qué tal?");
        history.push(Role::Assistant, "  ");
        history.push(Role::Assistant, "bien");
        assert_eq!(
            history.messages(),
            [
                (Role::User, "hola ¿qué tal?".to_owned()),
                (Role::Assistant, "bien".to_owned())
            ]
        );
        for i in 0..100 {
            let role = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            history.push(role, &"ñ".repeat(3_000));
        }
        assert!(history.bytes() <= MAX_TOTAL_BYTES);
        assert!(history.messages().len() > 4);
        assert!(
            history
                .messages()
                .iter()
                .all(|(_, t)| t.len() <= MAX_MESSAGE_BYTES)
        );
        assert_eq!(
            history.messages().last().map(|m| m.0),
            Some(Role::Assistant)
        );
    }

    #[test]
    fn a_long_message_keeps_its_end_at_a_character_boundary() {
        let mut text = format!("a{}", "é".repeat(5_000));
        keep_tail(&mut text, 4_001);
        assert!(text.len() <= 4_001);
        assert!(text.chars().all(|c| c == 'é'));
    }
}
