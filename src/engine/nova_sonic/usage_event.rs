//! Nova Sonic's `usageEvent`s → token counts for the conversation's
//! [`UsageMeter`].
//!
//! Each event carries a delta and the stream's running totals; the totals
//! restart with every upstream stream. Deltas are what is counted, checked
//! against the totals of their own stream (also while a rotated-out stream
//! is still closing), so a new stream never counts twice.

use serde_json::Value;

use crate::usage::{Direction, KINDS, Modality, Tokens, Upstream, UsageDelta, UsageMeter};

/// Where each token kind sits in a `usageEvent`'s `details.delta` / `details.total`.
fn field_of(modality: Modality, direction: Direction) -> (&'static str, &'static str) {
    let side = match direction {
        Direction::Input => "input",
        Direction::Output => "output",
    };
    let field = match modality {
        Modality::Speech => "speechTokens",
        Modality::Text => "textTokens",
    };
    (side, field)
}

/// What [`UsageEvents::ingest`] made of one `usageEvent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ingested {
    /// Tokens of this event, with its share of the cost in `cost_micro_usd`.
    Delta(UsageDelta),
    /// Counted like [`Ingested::Delta`], but the event's deltas and running
    /// totals disagree (or the totals went backwards); the deltas were
    /// trusted and `warning` says by how much they disagree.
    Mismatch { delta: UsageDelta, warning: String },
    /// No recognisable token fields: nothing was counted.
    Unknown { reason: String },
}

/// Per-stream bookkeeping: the service's running totals restart with each
/// upstream stream.
#[derive(Debug, Clone, Copy, Default)]
struct StreamState {
    /// The stream's number in the conversation, from 0.
    id: u64,
    /// Sum of the deltas counted on this stream.
    summed: Tokens,
    /// The last running total the service reported on this stream.
    last_total: Option<Tokens>,
}

/// The usage of one conversation across all its upstream streams.
#[derive(Debug, Clone)]
pub(crate) struct UsageEvents {
    meter: UsageMeter,
    stream: StreamState,
    /// The stream before `stream` while it is still closing (rotation).
    previous: Option<StreamState>,
    /// The number the next stream gets.
    next_id: u64,
}

impl UsageEvents {
    pub(crate) fn new(meter: UsageMeter) -> Self {
        Self {
            meter,
            stream: StreamState::default(),
            previous: None,
            next_id: 1,
        }
    }

    /// A fresh stream's state, with the next number.
    fn new_stream(&mut self) -> StreamState {
        let id = self.next_id;
        self.next_id += 1;
        StreamState {
            id,
            ..StreamState::default()
        }
    }

    /// Tokens and cost so far.
    #[cfg(test)]
    pub(crate) fn meter(&self) -> &UsageMeter {
        &self.meter
    }

    /// A new upstream stream began (rotation or reconnect): the service's
    /// running totals restart at zero. The conversation's totals carry on.
    pub(crate) fn begin_stream(&mut self) {
        self.stream = self.new_stream();
    }

    /// A new stream began while the current one is still closing (a warm
    /// hand-off): the closing stream's late events go to
    /// [`UsageEvents::ingest_previous`] and are checked against its own totals.
    pub(crate) fn begin_overlapping_stream(&mut self) {
        let next = self.new_stream();
        self.previous = Some(std::mem::replace(&mut self.stream, next));
    }

    /// [`UsageEvents::ingest`] for the stream that was current before
    /// [`UsageEvents::begin_overlapping_stream`].
    pub(crate) fn ingest_previous(&mut self, usage_event: &Value) -> Ingested {
        let previous = self.previous.take().unwrap_or_default();
        let current = std::mem::replace(&mut self.stream, previous);
        let ingested = self.ingest(usage_event);
        self.previous = Some(std::mem::replace(&mut self.stream, current));
        ingested
    }

    /// Counts one `usageEvent` (the object inside
    /// `{"event":{"usageEvent": …}}`).
    ///
    /// `details.delta` is what gets counted. When `details.total` is present
    /// too, this stream's summed deltas must equal it field by field;
    /// otherwise the deltas are still counted and a [`Ingested::Mismatch`]
    /// says by how much they differ. An event with totals but no delta is
    /// counted as the growth since this stream's previous total. Running
    /// totals that go down mean a new stream began without
    /// [`UsageEvents::begin_stream`]: the stream restarts, the totals count
    /// from zero, and the result is a [`Ingested::Mismatch`] saying so.
    pub(crate) fn ingest(&mut self, usage_event: &Value) -> Ingested {
        let details = usage_event.get("details");
        let delta = parse_tokens(details.and_then(|d| d.get("delta")), "delta");
        let total = parse_tokens(details.and_then(|d| d.get("total")), "total");
        let (delta, total) = match (delta, total) {
            (Ok(delta), Ok(total)) => (delta, total),
            (Err(reason), _) | (_, Err(reason)) => return Ingested::Unknown { reason },
        };
        if delta.is_none() && total.is_none() {
            return Ingested::Unknown {
                reason: unrecognised(usage_event),
            };
        }

        let mut warnings = Vec::new();
        if let (Some(total), Some(previous)) = (total, self.stream.last_total)
            && total.checked_sub(&previous).is_none()
        {
            warnings.push(format!(
                "running totals went down ({previous} -> {total}): a new upstream stream \
                 began without begin_stream; counting its totals from zero"
            ));
            self.begin_stream();
        }

        let counted = match (delta, total) {
            (Some(delta), _) => delta,
            (None, Some(total)) => {
                let previous = self.stream.last_total.unwrap_or_default();
                // Cannot fail: a decrease restarted the stream above.
                total.checked_sub(&previous).unwrap_or(total)
            }
            (None, None) => Tokens::default(),
        };
        self.stream.summed = self.stream.summed.saturating_add(&counted);
        if let Some(total) = total {
            if let Some(diff) = describe_difference(&self.stream.summed, &total) {
                warnings.push(format!(
                    "deltas disagree with running totals on this stream ({diff}); deltas trusted"
                ));
            }
            self.stream.last_total = Some(total);
        }

        let mut delta = self.meter.count(&counted);
        delta.upstream = Some(Upstream {
            stream: self.stream.id,
            reported: total,
        });
        if warnings.is_empty() {
            Ingested::Delta(delta)
        } else {
            Ingested::Mismatch {
                delta,
                warning: warnings.join("; "),
            }
        }
    }
}

/// Reads `details.delta` or `details.total`. `Ok(None)` when absent or when
/// it holds none of the documented fields; `Err` when a documented field
/// holds something other than a non-negative integer.
fn parse_tokens(block: Option<&Value>, name: &str) -> Result<Option<Tokens>, String> {
    let Some(block) = block else {
        return Ok(None);
    };
    let Some(block) = block.as_object() else {
        return Err(format!("details.{name} is not an object: {block}"));
    };
    let mut tokens = Tokens::default();
    let mut seen = false;
    for (modality, direction) in KINDS {
        let (side, field) = field_of(modality, direction);
        let Some(side_value) = block.get(side) else {
            continue;
        };
        let Some(side_object) = side_value.as_object() else {
            return Err(format!(
                "details.{name}.{side} is not an object: {side_value}"
            ));
        };
        let Some(value) = side_object.get(field) else {
            continue;
        };
        let Some(count) = value.as_u64() else {
            return Err(format!(
                "details.{name}.{side}.{field} is not a non-negative integer: {value}"
            ));
        };
        *tokens.slot(modality, direction) = count;
        seen = true;
    }
    Ok(seen.then_some(tokens))
}

/// Per-field differences between summed deltas and running totals, if any.
fn describe_difference(summed: &Tokens, total: &Tokens) -> Option<String> {
    let parts: Vec<String> = KINDS
        .iter()
        .filter(|&&(m, d)| summed.get(m, d) != total.get(m, d))
        .map(|&(m, d)| {
            let (side, field) = field_of(m, d);
            let (sum, tot) = (summed.get(m, d), total.get(m, d));
            let off = i128::from(sum) - i128::from(tot);
            format!("{side}.{field}: deltas sum to {sum}, total says {tot}, off by {off:+}")
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Why an event without documented token fields was not counted, naming
/// the fields it did have.
fn unrecognised(event: &Value) -> String {
    let mut seen = Vec::new();
    collect_fields(event, "", &mut seen);
    let seen = if seen.is_empty() {
        "none".to_owned()
    } else {
        seen.join(", ")
    };
    format!(
        "no details.delta/details.total speechTokens or textTokens; nothing counted; fields seen: {seen}"
    )
}

/// Dotted paths of the leaf fields of `value`, ids left out.
fn collect_fields(value: &Value, prefix: &str, out: &mut Vec<String>) {
    let Some(object) = value.as_object() else {
        return;
    };
    for (key, child) in object {
        if prefix.is_empty() && matches!(key.as_str(), "sessionId" | "promptName" | "completionId")
        {
            continue;
        }
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if child.is_object() {
            collect_fields(child, &path, out);
        } else {
            out.push(path);
        }
    }
}

#[cfg(test)]
#[path = "usage_event_tests.rs"]
mod tests;
