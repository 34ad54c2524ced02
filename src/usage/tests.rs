use super::*;

const V1: Rates = Rates {
    speech_in: 3_400,
    speech_out: 13_600,
    text_in: 60,
    text_out: 240,
};

fn tokens(speech_in: u64, text_in: u64, speech_out: u64, text_out: u64) -> Tokens {
    Tokens {
        speech_in,
        speech_out,
        text_in,
        text_out,
    }
}

#[test]
fn deltas_add_up() {
    let mut total = UsageDelta::default();
    assert!(total.is_empty());
    let d = UsageDelta {
        speech_in_tokens: 3,
        audio_out_ms: 20,
        cost_micro_usd: 7,
        ..UsageDelta::default()
    };
    total.add(&d);
    total.add(&d);
    assert_eq!(total.speech_in_tokens, 6);
    assert_eq!(total.audio_out_ms, 40);
    assert_eq!(total.cost_micro_usd, 14);
}

#[test]
fn rounding_is_half_up() {
    let prices = PriceTable::default().with_override(
        "m",
        Rates {
            speech_in: 500,
            ..Rates::default()
        },
    );
    let mut meter = UsageMeter::new("m", &prices);
    let one = tokens(1, 0, 0, 0);
    assert_eq!(meter.count(&one).cost_micro_usd, 1); // 500 n$ -> 1 µ$
    assert_eq!(meter.count(&one).cost_micro_usd, 0); // 1000 n$ -> still 1 µ$
    assert_eq!(meter.count(&one).cost_micro_usd, 1); // 1500 n$ -> 2 µ$
    assert_eq!(meter.totals().cost_micro_usd, 2);
}

#[test]
fn unknown_model_counts_tokens_but_no_cost() {
    let mut meter = UsageMeter::new("m9", &PriceTable::default().with_override("m", V1));
    assert!(!meter.priced());
    assert_eq!(meter.model(), "m9");
    let d = meter.count(&tokens(209, 408, 149, 69));
    assert_eq!(d.cost_micro_usd, 0);
    assert_eq!(meter.cost_nano_usd(), 0);
    assert_eq!(meter.totals().cost_micro_usd, 0);
    assert_eq!(meter.totals().speech_in_tokens, 209);
    assert_eq!(meter.tokens(Modality::Text, Direction::Input), 408);
}

#[test]
fn overrides_replace_and_add_models() {
    let rates = PriceTable::from_usd_per_1k(0.003, 0.012, 0.0004, 0.003).unwrap();
    assert_eq!(
        rates,
        Rates {
            speech_in: 3_000,
            speech_out: 12_000,
            text_in: 400,
            text_out: 3_000
        }
    );
    let table = PriceTable::default()
        .with_override("a", V1)
        .with_override("a", rates)
        .with_override("custom", Rates::default());
    assert_eq!(table.rates("a"), Some(&rates));
    assert_eq!(table.rates("custom"), Some(&Rates::default()));
    assert_eq!(table.rates("missing"), None);
    let mut meter = UsageMeter::new("a", &table);
    meter.count(&tokens(0, 10, 0, 0));
    assert_eq!(meter.cost_nano_usd(), 4_000);
    assert!(UsageMeter::new("custom", &table).priced());
    assert_eq!(rates.per_token(Modality::Text, Direction::Input), 400);
}

#[test]
fn from_usd_per_1k_validates() {
    assert_eq!(
        PriceTable::from_usd_per_1k(0.0034, 0.0136, 0.00006, 0.00024),
        Ok(V1)
    );
    assert_eq!(
        PriceTable::from_usd_per_1k(0.0, 1.0, 0.000001, 0.0),
        Ok(Rates {
            speech_in: 0,
            speech_out: 1_000_000,
            text_in: 1,
            text_out: 0
        })
    );
    for bad in [
        -0.001,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1.5,
        0.0000005,
    ] {
        assert!(
            PriceTable::from_usd_per_1k(0.001, 0.001, bad, 0.001).is_err(),
            "{bad}"
        );
    }
    let err = PriceTable::from_usd_per_1k(0.001, -1.0, 0.001, 0.001).unwrap_err();
    assert!(err.contains("speech output"), "{err}");
}

#[test]
fn cost_is_split_by_modality() {
    let mut meter = UsageMeter::new("v1", &PriceTable::default().with_override("v1", V1));
    let a = meter.count(&tokens(209, 408, 137, 66));
    let b = meter.count(&tokens(0, 0, 12, 3));
    // speech 209 × 3.4 µ$ + 149 × 13.6 µ$; text 408 × 0.06 µ$ + 69 × 0.24 µ$.
    let speech_nano: u128 = 209 * 3_400 + 149 * 13_600;
    let text_nano: u128 = 408 * 60 + 69 * 240;
    assert_eq!(meter.cost_nano_usd(), speech_nano + text_nano);
    let speech = a.speech_cost_micro_usd + b.speech_cost_micro_usd;
    let text = a.text_cost_micro_usd + b.text_cost_micro_usd;
    assert_eq!(u128::from(speech), (speech_nano + 500) / 1_000);
    assert_eq!(u128::from(text), (text_nano + 500) / 1_000);
    assert_eq!(meter.totals().speech_cost_micro_usd, speech);
    assert_eq!(meter.totals().text_cost_micro_usd, text);
    let total = a.cost_micro_usd + b.cost_micro_usd;
    assert_eq!(total, meter.totals().cost_micro_usd);
    assert!(
        total.abs_diff(speech + text) <= 1,
        "{total} vs {speech} + {text}"
    );
    assert_eq!(
        tokens(1, 2, 3, 4).checked_sub(&tokens(1, 1, 1, 1)),
        Some(tokens(0, 1, 2, 3))
    );
    assert_eq!(tokens(1, 2, 3, 4).checked_sub(&tokens(2, 0, 0, 0)), None);
}

#[test]
fn other_rates_and_charges_join_one_exactly_rounded_total() {
    let prices = PriceTable::default().with_override("m", V1);
    let mut meter = UsageMeter::new("m", &prices);
    let cached = Rates {
        speech_in: 300,
        text_in: 15,
        ..Rates::default()
    };
    let full = meter.count(&tokens(100, 10, 0, 0)); // 340,000 + 600 n$
    let discounted = meter.count_at(&tokens(100, 100, 0, 0), &cached); // 30,000 + 1,500 n$
    assert_eq!(discounted.speech_in_tokens, 100);
    let charged = meter.charge(&tokens(0, 0, 0, 7), &V1); // 1,680 n$, no tokens
    assert_eq!(charged.text_out_tokens, 0);
    assert_eq!(meter.tokens(Modality::Speech, Direction::Input), 200);
    assert_eq!(meter.tokens(Modality::Text, Direction::Output), 0);
    assert_eq!(meter.cost_nano_usd(), 373_780);
    let sum = full.cost_micro_usd + discounted.cost_micro_usd + charged.cost_micro_usd;
    assert_eq!(sum, 374);
    assert_eq!(meter.totals().cost_micro_usd, 374);

    // An unpriced meter stays unpriced whatever rates a call brings.
    let mut unpriced = UsageMeter::new("other", &prices);
    assert_eq!(
        unpriced.count_at(&tokens(5, 5, 5, 5), &V1).cost_micro_usd,
        0
    );
    assert_eq!(unpriced.charge(&tokens(5, 5, 5, 5), &V1).cost_micro_usd, 0);
    assert!(!unpriced.priced());
}
