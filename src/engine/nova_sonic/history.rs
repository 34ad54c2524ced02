//! The conversation as text, replayed into each new stream (rotation,
//! reconnection): USER and ASSISTANT FINAL transcripts, shaped to the
//! service's rules — same-role runs merged, the first message USER, at most
//! 1 KB per `textInput` and 40 KB in all, newest kept.

use super::input::BlockRole;

/// Most bytes in one `textInput` event.
pub(crate) const MAX_PIECE_BYTES: usize = 1024;
/// Most bytes of history sent to a new stream.
pub(crate) const MAX_TOTAL_BYTES: usize = 40 * 1024;
/// Most bytes kept of one message (longer ones keep their end: the most
/// recent words matter most when a reply was cut).
const MAX_MESSAGE_BYTES: usize = 4 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) role: BlockRole,
    pub(crate) text: String,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct History {
    messages: Vec<Message>,
}

impl History {
    /// A history that starts with a conversation carried over from another
    /// engine.
    pub(crate) fn carried(messages: &[(crate::engine::Role, String)]) -> Self {
        let mut history = Self::default();
        for (role, text) in messages {
            let role = match role {
                crate::engine::Role::User => BlockRole::User,
                crate::engine::Role::Assistant => BlockRole::Assistant,
            };
            history.push(role, text);
        }
        history
    }

    /// Records a final transcript; same-role runs become one message.
    pub(crate) fn push(&mut self, role: BlockRole, text: &str) {
        let text = text.trim();
        if text.is_empty() || !matches!(role, BlockRole::User | BlockRole::Assistant) {
            return;
        }
        match self.messages.last_mut() {
            Some(last) if last.role == role => {
                last.text.push(' ');
                last.text.push_str(text);
                keep_tail(&mut last.text, MAX_MESSAGE_BYTES);
            }
            _ => {
                let mut text = text.to_owned();
                keep_tail(&mut text, MAX_MESSAGE_BYTES);
                self.messages.push(Message { role, text });
            }
        }
        // Bound memory: older messages could never be sent anyway.
        let total: usize = self.messages.iter().map(|m| m.text.len()).sum();
        if total > 2 * MAX_TOTAL_BYTES && self.messages.len() > 2 {
            self.messages.remove(0);
        }
    }

    /// The last message if it is the user's.
    pub(crate) fn last_user(&self) -> Option<&str> {
        self.messages
            .last()
            .filter(|m| m.role == BlockRole::User)
            .map(|m| m.text.as_str())
    }

    /// The messages to send: newest first kept within [`MAX_TOTAL_BYTES`],
    /// leading ASSISTANT messages dropped, and a trailing USER message
    /// dropped when `replaying_audio` (its audio is replayed, so the model
    /// would otherwise answer it twice).
    pub(crate) fn shaped(&self, replaying_audio: bool) -> Vec<Message> {
        let mut messages = self.messages.clone();
        if replaying_audio && messages.last().is_some_and(|m| m.role == BlockRole::User) {
            messages.pop();
        }
        let mut kept = Vec::new();
        let mut total = 0;
        for message in messages.into_iter().rev() {
            if total + message.text.len() > MAX_TOTAL_BYTES {
                break;
            }
            total += message.text.len();
            kept.push(message);
        }
        kept.reverse();
        while kept.first().is_some_and(|m| m.role != BlockRole::User) {
            kept.remove(0);
        }
        kept
    }
}

/// Cuts `text` to its last `max_bytes` bytes, on a character boundary.
fn keep_tail(text: &mut String, max_bytes: usize) {
    if text.len() <= max_bytes {
        return;
    }
    let mut start = text.len() - max_bytes;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text.replace_range(..start, "");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_roles_merge_and_the_first_message_is_the_user() {
        let mut h = History::default();
        h.push(BlockRole::Assistant, "¡Hola! ¿En qué te ayudo?");
        h.push(BlockRole::User, "Quiero saber");
        h.push(BlockRole::User, "el horario de la biblioteca.");
        h.push(BlockRole::Assistant, "Abre de ocho a diez.");
        let shaped = h.shaped(false);
        assert_eq!(shaped.len(), 2);
        assert_eq!(shaped[0].role, BlockRole::User);
        assert_eq!(shaped[0].text, "Quiero saber el horario de la biblioteca.");
        assert_eq!(shaped[1].role, BlockRole::Assistant);
    }

    #[test]
    fn a_trailing_user_turn_is_dropped_when_its_audio_is_replayed() {
        let mut h = History::default();
        h.push(BlockRole::User, "uno");
        h.push(BlockRole::Assistant, "dos");
        h.push(BlockRole::User, "tres");
        assert_eq!(h.shaped(false).len(), 3);
        let replayed = h.shaped(true);
        assert_eq!(replayed.len(), 2);
        assert_eq!(replayed[1].text, "dos");
    }

    #[test]
    fn the_total_stays_under_40_kb_keeping_the_newest() {
        let mut h = History::default();
        for i in 0..200 {
            let role = if i % 2 == 0 {
                BlockRole::User
            } else {
                BlockRole::Assistant
            };
            h.push(role, &format!("{i} {}", "ñ".repeat(300)));
        }
        let shaped = h.shaped(false);
        let total: usize = shaped.iter().map(|m| m.text.len()).sum();
        assert!(total <= MAX_TOTAL_BYTES, "{total}");
        assert_eq!(shaped[0].role, BlockRole::User);
        assert!(shaped.last().is_some_and(|m| m.text.starts_with("199 ")));
    }

    #[test]
    fn long_messages_keep_their_end_on_a_character_boundary() {
        let mut h = History::default();
        h.push(BlockRole::User, &format!("{}fin", "é".repeat(5000)));
        let shaped = h.shaped(false);
        assert!(shaped[0].text.len() <= MAX_MESSAGE_BYTES);
        assert!(shaped[0].text.ends_with("fin"));
    }
}
