use serde_json::{Value, json};

use super::{Ingested, UsageEvents};
use crate::engine::nova_sonic::models::{MODEL_2, MODEL_V1, builtin_prices, rates_confirmed};
use crate::usage::{Direction, Modality, PriceTable, Rates, Tokens, UsageDelta, UsageMeter};
fn event(delta: [u64; 4], total: [u64; 4]) -> Value {
    json!({
        "sessionId": "s", "promptName": "P", "completionId": "c",
        "details": {
            "delta": { "input": { "speechTokens": delta[0], "textTokens": delta[1] },
                       "output": { "speechTokens": delta[2], "textTokens": delta[3] } },
            "total": { "input": { "speechTokens": total[0], "textTokens": total[1] },
                       "output": { "speechTokens": total[2], "textTokens": total[3] } }
        },
        "totalInputTokens": total[0] + total[1],
        "totalOutputTokens": total[2] + total[3],
        "totalTokens": total.iter().sum::<u64>()
    })
}

fn totals_only(total: [u64; 4]) -> Value {
    json!({ "details": { "total": {
        "input": { "speechTokens": total[0], "textTokens": total[1] },
        "output": { "speechTokens": total[2], "textTokens": total[3] } } } })
}

fn delta_of(ingested: &Ingested) -> UsageDelta {
    match ingested {
        Ingested::Delta(d) => *d,
        other => panic!("expected a clean delta, got {other:?}"),
    }
}

/// The 3.9 worked example, split into two events.
fn worked_example(meter: &mut UsageEvents) -> u64 {
    let a = meter.ingest(&event([209, 408, 137, 66], [209, 408, 137, 66]));
    let b = meter.ingest(&event([0, 0, 12, 3], [209, 408, 149, 69]));
    delta_of(&a).cost_micro_usd + delta_of(&b).cost_micro_usd
}

#[test]
fn worked_example_on_v1() {
    let exact: u128 = 209 * 3_400 + 408 * 60 + 149 * 13_600 + 69 * 240;
    assert_eq!(exact, 2_778_040);
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_V1, &builtin_prices()));
    let shares = worked_example(&mut meter);
    assert!(meter.meter().priced());
    assert_eq!(meter.meter().cost_nano_usd(), exact);
    let totals = meter.meter().totals();
    assert_eq!(totals.cost_micro_usd, 2_778); // $0.0028
    assert_eq!(shares, 2_778);
    assert_eq!(
        (
            totals.speech_in_tokens,
            totals.text_in_tokens,
            totals.speech_out_tokens,
            totals.text_out_tokens
        ),
        (209, 408, 149, 69)
    );
    assert_eq!(
        meter.meter().tokens(Modality::Speech, Direction::Output),
        149
    );
}

#[test]
fn worked_example_on_nova_2() {
    let exact: u128 = 209 * 3_000 + 408 * 330 + 149 * 12_000 + 69 * 2_750;
    assert_eq!(exact, 2_739_390);
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_2, &builtin_prices()));
    let shares = worked_example(&mut meter);
    assert_eq!(meter.meter().cost_nano_usd(), exact);
    assert_eq!(meter.meter().totals().cost_micro_usd, 2_739); // $0.0027
    assert_eq!(shares, 2_739);
    assert!(rates_confirmed(MODEL_V1));
    assert!(!rates_confirmed(MODEL_2));
    assert!(!rates_confirmed("other"));
}

#[test]
fn stream_restart_does_not_double_count() {
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_V1, &builtin_prices()));
    delta_of(&meter.ingest(&event([10, 20, 30, 4], [10, 20, 30, 4])));
    meter.begin_stream();
    // The new stream's totals restart; its first delta equals its total.
    let d = delta_of(&meter.ingest(&event([5, 100, 6, 1], [5, 100, 6, 1])));
    assert_eq!(d.speech_in_tokens, 5);
    delta_of(&meter.ingest(&totals_only([7, 100, 9, 1])));
    let t = meter.meter().totals();
    assert_eq!(
        (
            t.speech_in_tokens,
            t.text_in_tokens,
            t.speech_out_tokens,
            t.text_out_tokens
        ),
        (17, 120, 39, 5)
    );
}

#[test]
fn totals_only_events_count_growth() {
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_V1, &builtin_prices()));
    let a = delta_of(&meter.ingest(&totals_only([100, 50, 0, 0])));
    assert_eq!((a.speech_in_tokens, a.text_in_tokens), (100, 50));
    let b = delta_of(&meter.ingest(&totals_only([100, 50, 40, 8])));
    assert_eq!(
        (b.speech_in_tokens, b.speech_out_tokens, b.text_out_tokens),
        (0, 40, 8)
    );
    // A repeated total adds nothing.
    let c = delta_of(&meter.ingest(&totals_only([100, 50, 40, 8])));
    assert!(c.is_empty());
    // A delta-carrying event keeps agreeing with the totals seen so far.
    delta_of(&meter.ingest(&event([1, 0, 0, 0], [101, 50, 40, 8])));
    let t = meter.meter().totals();
    assert_eq!((t.speech_in_tokens, t.speech_out_tokens), (101, 40));
    let exact: u128 = 101 * 3_400 + 50 * 60 + 40 * 13_600 + 8 * 240;
    assert_eq!(meter.meter().cost_nano_usd(), exact);
}

#[test]
fn decreasing_totals_without_begin_stream_warn_and_restart() {
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_V1, &builtin_prices()));
    delta_of(&meter.ingest(&totals_only([100, 50, 40, 8])));
    match meter.ingest(&totals_only([3, 60, 2, 0])) {
        Ingested::Mismatch { delta, warning } => {
            assert_eq!((delta.speech_in_tokens, delta.text_in_tokens), (3, 60));
            assert!(warning.contains("begin_stream"), "{warning}");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // The restarted stream continues cleanly.
    let d = delta_of(&meter.ingest(&totals_only([4, 60, 2, 0])));
    assert_eq!(d.speech_in_tokens, 1);
    assert_eq!(meter.meter().totals().speech_in_tokens, 104);

    // With deltas present the delta is counted and the stream restarts.
    match meter.ingest(&event([1, 1, 0, 0], [1, 1, 0, 0])) {
        Ingested::Mismatch { delta, warning } => {
            assert_eq!(delta.speech_in_tokens, 1);
            assert!(warning.contains("went down"), "{warning}");
            assert!(!warning.contains("disagree"), "{warning}");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(meter.meter().totals().speech_in_tokens, 105);
}

#[test]
fn mismatch_trusts_deltas_and_says_by_how_much() {
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_V1, &builtin_prices()));
    delta_of(&meter.ingest(&event([10, 0, 0, 0], [10, 0, 0, 0])));
    match meter.ingest(&event([5, 0, 3, 0], [17, 0, 3, 0])) {
        Ingested::Mismatch { delta, warning } => {
            assert_eq!(delta.speech_in_tokens, 5);
            assert_eq!(delta.speech_out_tokens, 3);
            assert!(
                warning.contains("input.speechTokens: deltas sum to 15, total says 17, off by -2"),
                "{warning}"
            );
            assert!(!warning.contains("output"), "{warning}");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(meter.meter().totals().speech_in_tokens, 15);
    assert_eq!(meter.meter().cost_nano_usd(), 15 * 3_400 + 3 * 13_600);
}

#[test]
fn old_style_fields_are_unknown_and_not_counted() {
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_V1, &builtin_prices()));
    let old = json!({
        "sessionId": "s",
        "inputTokenCount": 120, "outputTokenCount": 40,
        "inputTextTokenCount": 20, "inputTokens": 3, "outputTokens": 4
    });
    match meter.ingest(&old) {
        Ingested::Unknown { reason } => {
            for field in [
                "inputTokenCount",
                "outputTokenCount",
                "inputTextTokenCount",
                "inputTokens",
                "outputTokens",
            ] {
                assert!(reason.contains(field), "{reason}");
            }
            assert!(!reason.contains("sessionId"), "{reason}");
        }
        other => panic!("expected unknown, got {other:?}"),
    }
    // Other field names inside details are not guessed at either.
    let nested = json!({ "details": { "delta": { "input": { "tokens": 9 } } } });
    match meter.ingest(&nested) {
        Ingested::Unknown { reason } => {
            assert!(reason.contains("details.delta.input.tokens"), "{reason}");
        }
        other => panic!("expected unknown, got {other:?}"),
    }
    // A documented field holding garbage is refused, not guessed.
    let bad = json!({ "details": { "delta": { "input": { "speechTokens": -3 } } } });
    assert!(matches!(meter.ingest(&bad), Ingested::Unknown { .. }));
    assert!(matches!(
        meter.ingest(&json!(null)),
        Ingested::Unknown { .. }
    ));
    assert!(meter.meter().totals().is_empty());
    assert_eq!(meter.meter().cost_nano_usd(), 0);
}

#[test]
fn unknown_model_counts_tokens_but_no_cost() {
    let mut meter = UsageEvents::new(UsageMeter::new("amazon.nova-9-sonic", &builtin_prices()));
    assert!(!meter.meter().priced());
    assert_eq!(meter.meter().model(), "amazon.nova-9-sonic");
    let d = delta_of(&meter.ingest(&event([209, 408, 149, 69], [209, 408, 149, 69])));
    assert_eq!(d.cost_micro_usd, 0);
    assert_eq!(meter.meter().cost_nano_usd(), 0);
    assert_eq!(meter.meter().totals().cost_micro_usd, 0);
    assert_eq!(meter.meter().totals().speech_in_tokens, 209);
}

#[test]
fn a_price_override_replaces_a_built_in_model_and_keeps_the_others() {
    let rates = PriceTable::from_usd_per_1k(0.003, 0.012, 0.0004, 0.003).unwrap();
    let table = builtin_prices().with_override(MODEL_2, rates);
    assert_eq!(table.rates(MODEL_2), Some(&rates));
    assert_eq!(table.rates(MODEL_V1).map(|r| r.speech_out), Some(13_600));
    // Usage events are priced with the override: 10 text input tokens.
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_2, &table));
    meter.ingest(&event([0, 10, 0, 0], [0, 10, 0, 0]));
    assert_eq!(meter.meter().cost_nano_usd(), 4_000);
}

#[test]
fn cost_shares_sum_to_the_rounded_total() {
    let prices = builtin_prices().with_override(
        "odd",
        Rates {
            speech_in: 777,
            speech_out: 1_333,
            text_in: 1,
            text_out: 499,
        },
    );
    for model in [MODEL_V1, MODEL_2, "odd"] {
        let rates = *prices.rates(model).unwrap();
        let mut meter = UsageEvents::new(UsageMeter::new(model, &prices));
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |bound: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        };
        let mut stream_total = [0u64; 4];
        let mut expected = Tokens::default();
        let mut shares = 0u64;
        for i in 0..2_000 {
            if next(50) == 0 {
                meter.begin_stream();
                stream_total = [0; 4];
            }
            let delta = [next(40), next(300), next(60), next(20)];
            for (t, d) in stream_total.iter_mut().zip(delta) {
                *t += d;
            }
            let ev = if i % 3 == 0 {
                totals_only(stream_total)
            } else {
                event(delta, stream_total)
            };
            let d = delta_of(&meter.ingest(&ev));
            expected = expected.saturating_add(&Tokens {
                speech_in: delta[0],
                text_in: delta[1],
                speech_out: delta[2],
                text_out: delta[3],
            });
            shares += d.cost_micro_usd;
            assert_eq!(shares, meter.meter().totals().cost_micro_usd);
        }
        let exact = expected.cost_nano(&rates);
        assert_eq!(meter.meter().cost_nano_usd(), exact);
        assert_eq!(
            u128::from(meter.meter().totals().cost_micro_usd),
            (exact + 500) / 1_000
        );
        assert_eq!(meter.meter().totals().speech_in_tokens, expected.speech_in);
        assert_eq!(meter.meter().totals().text_out_tokens, expected.text_out);
    }
}

#[test]
fn cost_is_split_by_modality() {
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_V1, &builtin_prices()));
    let a = delta_of(&meter.ingest(&event([209, 408, 137, 66], [209, 408, 137, 66])));
    let b = delta_of(&meter.ingest(&event([0, 0, 12, 3], [209, 408, 149, 69])));
    // v1: speech 209 × 3.4 µ$ + 149 × 13.6 µ$; text 408 × 0.06 µ$ + 69 × 0.24 µ$.
    let speech_nano: u128 = 209 * 3_400 + 149 * 13_600;
    let text_nano: u128 = 408 * 60 + 69 * 240;
    let speech = a.speech_cost_micro_usd + b.speech_cost_micro_usd;
    let text = a.text_cost_micro_usd + b.text_cost_micro_usd;
    assert_eq!(u128::from(speech), (speech_nano + 500) / 1_000);
    assert_eq!(u128::from(text), (text_nano + 500) / 1_000);
    assert_eq!(meter.meter().totals().speech_cost_micro_usd, speech);
    assert_eq!(meter.meter().totals().text_cost_micro_usd, text);
    let total = a.cost_micro_usd + b.cost_micro_usd;
    assert!(
        total.abs_diff(speech + text) <= 1,
        "{total} vs {speech} + {text}"
    );
    assert!(speech > 50 * text, "speech is priced far above text");
}

#[test]
fn a_closing_stream_is_checked_against_its_own_totals() {
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_2, &builtin_prices()));
    delta_of(&meter.ingest(&event([100, 50, 0, 0], [100, 50, 0, 0])));
    meter.begin_overlapping_stream();
    // The new stream's totals start at zero …
    delta_of(&meter.ingest(&event([10, 400, 0, 0], [10, 400, 0, 0])));
    // … while the old one's late event continues its own totals: no warning.
    delta_of(&meter.ingest_previous(&event([0, 0, 80, 20], [100, 50, 80, 20])));
    delta_of(&meter.ingest(&event([0, 0, 5, 1], [10, 400, 5, 1])));
    assert_eq!(meter.meter().totals().speech_in_tokens, 110);
    assert_eq!(meter.meter().totals().speech_out_tokens, 85);
    assert_eq!(meter.meter().totals().text_in_tokens, 450);
    assert_eq!(meter.meter().totals().text_out_tokens, 21);
}
#[test]
fn each_delta_names_its_stream_and_the_totals_it_came_with() {
    let mut meter = UsageEvents::new(UsageMeter::new(MODEL_2, &builtin_prices()));
    let upstream = |ingested: &Ingested| delta_of(ingested).upstream.expect("upstream");
    let first = upstream(&meter.ingest(&event([100, 50, 0, 0], [100, 50, 0, 0])));
    assert_eq!(first.stream, 0);
    let reported = Tokens {
        speech_in: 100,
        speech_out: 0,
        text_in: 50,
        text_out: 0,
    };
    assert_eq!(first.reported, Some(reported));
    meter.begin_overlapping_stream();
    let second = upstream(&meter.ingest(&event([10, 0, 0, 0], [10, 0, 0, 0])));
    assert_eq!(second.stream, 1);
    // The closing stream's late event keeps its stream's number.
    let late = upstream(&meter.ingest_previous(&event([0, 0, 8, 2], [100, 50, 8, 2])));
    assert_eq!(late.stream, 0);
    meter.begin_stream();
    let Ingested::Delta(delta) = meter.ingest(&json!({"details": {"delta": {
        "input": {"speechTokens": 3, "textTokens": 0},
        "output": {"speechTokens": 0, "textTokens": 0}}}}))
    else {
        panic!("a delta");
    };
    // Without totals, nothing reported.
    assert_eq!(
        delta.upstream.map(|u| (u.stream, u.reported)),
        Some((2, None))
    );
}

#[test]
fn builtin_prices_are_the_published_usd_rates() {
    assert_eq!(
        PriceTable::from_usd_per_1k(0.0034, 0.0136, 0.00006, 0.00024),
        Ok(*builtin_prices().rates(MODEL_V1).unwrap())
    );
    assert_eq!(
        PriceTable::from_usd_per_1k(0.003, 0.012, 0.00033, 0.00275),
        Ok(*builtin_prices().rates(MODEL_2).unwrap())
    );
}
