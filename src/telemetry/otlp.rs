//! The tracing layer that turns closed conversation and turn spans into OTLP
//! spans, and their encoding as an OTLP/JSON `ExportTraceServiceRequest`
//! (trace and span ids as hex, 64-bit integers as strings, per the OTLP
//! JSON mapping). A turn span carries its conversation's id, engine and model
//! besides its own fields, so each one can be read on its own.

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::export::Queue;

/// Spans that are exported; the connection span is only their context.
const EXPORTED: [&str; 2] = ["conversation", "turn"];
/// Conversation fields copied onto each of its turns.
const INHERITED: [&str; 3] = ["conversation.id", "engine", "model"];
/// OTLP `SPAN_KIND_INTERNAL` and `SPAN_KIND_SERVER`.
const KIND_INTERNAL: u8 = 1;
const KIND_SERVER: u8 = 2;

/// One attribute value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
}

/// A finished span, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SpanRecord {
    pub(super) trace_id: [u8; 16],
    pub(super) span_id: [u8; 8],
    pub(super) parent_span_id: Option<[u8; 8]>,
    pub(super) name: &'static str,
    pub(super) start_unix_nanos: u64,
    pub(super) end_unix_nanos: u64,
    pub(super) attributes: Vec<(&'static str, AttrValue)>,
}

/// What the layer keeps in a live span's extensions.
#[derive(Debug)]
struct Open {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    start_unix_nanos: u64,
    attributes: Vec<(&'static str, AttrValue)>,
}

impl Open {
    fn get(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// The layer; its filter (see `super::init`) lets only this module's spans in.
#[derive(Debug)]
pub(super) struct OtlpLayer {
    queue: Queue,
}

impl OtlpLayer {
    pub(super) fn new(queue: Queue) -> Self {
        Self { queue }
    }
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        if !EXPORTED.contains(&span.name()) {
            return;
        }
        // A turn joins its conversation's trace; a conversation starts one.
        let parent = span.parent().and_then(|p| {
            p.extensions()
                .get::<Open>()
                .map(|o| (o.trace_id, o.span_id))
        });
        let mut open = Open {
            trace_id: parent.map_or_else(random_trace_id, |(trace, _)| trace),
            span_id: random_span_id(),
            parent_span_id: parent.map(|(_, id)| id),
            start_unix_nanos: unix_nanos(),
            attributes: Vec::new(),
        };
        attrs.record(&mut Visitor(&mut open.attributes));
        span.extensions_mut().insert(open);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(open) = span.extensions_mut().get_mut::<Open>()
        {
            values.record(&mut Visitor(&mut open.attributes));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(mut open) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        if let Some(parent) = span.parent()
            && let Some(outer) = parent.extensions().get::<Open>()
        {
            for key in INHERITED {
                if open.get(key).is_none()
                    && let Some(value) = outer.get(key)
                {
                    open.attributes.push((key, value.clone()));
                }
            }
        }
        self.queue.push(SpanRecord {
            trace_id: open.trace_id,
            span_id: open.span_id,
            parent_span_id: open.parent_span_id,
            name: span.name(),
            start_unix_nanos: open.start_unix_nanos,
            end_unix_nanos: unix_nanos(),
            attributes: open.attributes,
        });
    }
}

/// Records fields as attributes; a field recorded again replaces its value.
struct Visitor<'a>(&'a mut Vec<(&'static str, AttrValue)>);

impl Visitor<'_> {
    fn set(&mut self, field: &Field, value: AttrValue) {
        let key = field.name();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }
}

impl Visit for Visitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field, AttrValue::Int(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        self.set(field, AttrValue::Int(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field, AttrValue::Double(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field, AttrValue::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, AttrValue::Str(value.to_owned()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.set(field, AttrValue::Str(format!("{value:?}")));
    }
}

/// An `ExportTraceServiceRequest` in OTLP/JSON.
pub(super) fn encode(spans: &[SpanRecord]) -> Vec<u8> {
    let spans: Vec<Value> = spans.iter().map(span_json).collect();
    let request = json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                attribute("service.name", &AttrValue::Str("sonora".into())),
                attribute("service.version", &AttrValue::Str(env!("CARGO_PKG_VERSION").into())),
            ]},
            "scopeSpans": [{
                "scope": {"name": "sonora", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    });
    request.to_string().into_bytes()
}

fn span_json(span: &SpanRecord) -> Value {
    let kind = if span.name == "conversation" {
        KIND_SERVER
    } else {
        KIND_INTERNAL
    };
    let attributes: Vec<Value> = span
        .attributes
        .iter()
        .map(|(key, value)| attribute(key, value))
        .collect();
    json!({
        "traceId": hex(&span.trace_id),
        "spanId": hex(&span.span_id),
        "parentSpanId": span.parent_span_id.as_ref().map(|id| hex(id)).unwrap_or_default(),
        "name": span.name,
        "kind": kind,
        "startTimeUnixNano": span.start_unix_nanos.to_string(),
        "endTimeUnixNano": span.end_unix_nanos.to_string(),
        "attributes": attributes,
        "status": {},
    })
}

fn attribute(key: &str, value: &AttrValue) -> Value {
    let value = match value {
        AttrValue::Str(s) => json!({"stringValue": s}),
        AttrValue::Int(i) => json!({"intValue": i.to_string()}),
        AttrValue::Bool(b) => json!({"boolValue": b}),
        AttrValue::Double(d) => json!({"doubleValue": d}),
    };
    json!({"key": key, "value": value})
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn unix_nanos() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// 64 unpredictable, never-zero bits: ids need to be unique, not secret.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u64(unix_nanos());
    hasher.finish().max(1)
}

fn random_trace_id() -> [u8; 16] {
    let mut id = [0; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&random_u64().to_be_bytes());
    id
}

fn random_span_id() -> [u8; 8] {
    random_u64().to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_follows_the_otlp_json_mapping() {
        let span = SpanRecord {
            trace_id: [0xab; 16],
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            parent_span_id: Some([9; 8]),
            name: "turn",
            start_unix_nanos: 1_700_000_000_000_000_000,
            end_unix_nanos: 1_700_000_000_500_000_000,
            attributes: vec![
                ("conversation.id", AttrValue::Str("7-5000".into())),
                ("turn.first_byte_ms", AttrValue::Int(120)),
                ("turn.interrupted", AttrValue::Bool(true)),
                ("ratio", AttrValue::Double(0.5)),
            ],
        };
        let value: Value = serde_json::from_slice(&encode(&[span])).expect("JSON");
        let scope = &value["resourceSpans"][0]["scopeSpans"][0];
        assert_eq!(
            value["resourceSpans"][0]["resource"]["attributes"][0],
            json!({"key": "service.name", "value": {"stringValue": "sonora"}})
        );
        assert_eq!(scope["scope"]["name"], "sonora");
        let span = &scope["spans"][0];
        assert_eq!(span["traceId"], "ab".repeat(16));
        assert_eq!(span["spanId"], "0102030405060708");
        assert_eq!(span["parentSpanId"], "09".repeat(8));
        assert_eq!(span["kind"], 1);
        assert_eq!(span["startTimeUnixNano"], "1700000000000000000");
        assert_eq!(span["endTimeUnixNano"], "1700000000500000000");
        assert_eq!(
            span["attributes"],
            json!([
                {"key": "conversation.id", "value": {"stringValue": "7-5000"}},
                {"key": "turn.first_byte_ms", "value": {"intValue": "120"}},
                {"key": "turn.interrupted", "value": {"boolValue": true}},
                {"key": "ratio", "value": {"doubleValue": 0.5}},
            ])
        );
    }

    #[test]
    fn ids_are_never_zero_and_do_not_repeat() {
        let ids: std::collections::HashSet<[u8; 8]> =
            (0..10_000).map(|_| random_span_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(!ids.contains(&[0; 8]));
        assert_ne!(random_trace_id(), random_trace_id());
    }
}
