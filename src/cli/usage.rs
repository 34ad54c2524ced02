//! `sonora usage`: what the ledger recorded, by day, key, model or
//! conversation, as a table, JSON or CSV; `--check` verifies it. Reads
//! while a gateway writes (SQLite's WAL, or PostgreSQL).

use std::collections::BTreeMap;

use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::Serialize;

use super::Failure;
use crate::config::Config;
use crate::ledger::report::{self, ConversationRow};

#[derive(Debug, Args)]
pub(crate) struct UsageArgs {
    /// The ledger's database (setting `ledger.url`, SONORA_LEDGER_URL).
    #[arg(long, value_name = "URL")]
    ledger: Option<String>,
    /// First day included, YYYY-MM-DD in `ledger.time_zone`.
    #[arg(long, value_name = "DATE")]
    since: Option<String>,
    /// Last day included, YYYY-MM-DD in `ledger.time_zone`.
    #[arg(long, value_name = "DATE")]
    until: Option<String>,
    /// One row per day, key, model or conversation.
    #[arg(long, value_enum, default_value_t = By::Day)]
    by: By,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Verify the ledger instead: each conversation's totals against its
    /// usage rows. Exits 1 on any disagreement.
    #[arg(long)]
    check: bool,
}

impl UsageArgs {
    pub(crate) fn overrides(&self) -> Vec<(String, String)> {
        self.ledger
            .iter()
            .map(|url| ("ledger.url".to_owned(), url.clone()))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum By {
    Day,
    Key,
    Model,
    Conversation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

/// One row of a grouped report.
#[derive(Debug, Clone, Default, Serialize)]
struct Group {
    group: String,
    conversations: u64,
    turns: i64,
    audio_in_ms: i64,
    audio_out_ms: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_micro_usd: i64,
}

pub(crate) fn run(config: &Config, args: &UsageArgs) -> Result<(), Failure> {
    if !config.ledger.enabled() {
        return Err(anyhow!("no ledger: ledger.url is off").into());
    }
    let zone = TimeZone::get(&config.ledger.time_zone)
        .with_context(|| format!("unknown time zone {}", config.ledger.time_zone))?;
    let since = match &args.since {
        Some(day) => day_start(day, &zone, 0)?,
        None => 0,
    };
    let until = match &args.until {
        Some(day) => day_start(day, &zone, 1)?,
        None => i64::MAX,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (_, pool) = crate::ledger::connect(&config.ledger)
            .await
            .map_err(anyhow::Error::from)?;
        if args.check {
            let check = report::check(&pool, &zone)
                .await
                .context("cannot read the ledger")?;
            return print_check(&check, args.format);
        }
        let rows = report::conversations(&pool, since, until)
            .await
            .context("cannot read the ledger")?;
        print_rows(&rows, args, &zone)
    })
}

/// Unix milliseconds at the start of `day` (+ `plus_days`) in `zone`.
fn day_start(day: &str, zone: &TimeZone, plus_days: u8) -> anyhow::Result<i64> {
    let date: Date = day
        .parse()
        .with_context(|| format!("{day:?} is not a date like 2026-11-30"))?;
    let date = if plus_days > 0 {
        date.tomorrow().context("date out of range")?
    } else {
        date
    };
    let start = date
        .to_zoned_datetime(zone.clone())
        .context("date out of range")?;
    Ok(start.timestamp().as_millisecond())
}

fn print_check(check: &report::Check, format: Format) -> Result<(), Failure> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(check).context("json")?),
        _ => {
            println!(
                "{} conversations, {} usage rows, {} disagreements",
                check.conversations,
                check.usage_rows,
                check.mismatches.len()
            );
            for line in &check.mismatches {
                println!("{line}");
            }
        }
    }
    if check.mismatches.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "the ledger disagrees with itself in {} places",
            check.mismatches.len()
        )
        .into())
    }
}

fn print_rows(rows: &[ConversationRow], args: &UsageArgs, zone: &TimeZone) -> Result<(), Failure> {
    if args.by == By::Conversation {
        return match args.format {
            Format::Json => {
                println!("{}", serde_json::to_string_pretty(rows).context("json")?);
                Ok(())
            }
            Format::Csv => print_csv(rows),
            Format::Table => {
                let table: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.conversation.clone(),
                            local_time(r.started_ms, zone),
                            r.key.clone().unwrap_or_else(|| "-".into()),
                            format!("{} {}", r.engine, r.model),
                            r.end_reason.clone().unwrap_or_else(|| "(running)".into()),
                            r.turns.to_string(),
                            usd(r.cost_micro_usd),
                        ]
                    })
                    .collect();
                let header = [
                    "conversation",
                    "started",
                    "key",
                    "engine",
                    "end",
                    "turns",
                    "cost (USD)",
                ];
                print_table(&header, &table);
                Ok(())
            }
        };
    }
    let groups = group(rows, args.by, zone);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&groups).context("json")?),
        Format::Csv => print_csv(&groups)?,
        Format::Table => {
            let table: Vec<Vec<String>> = groups
                .iter()
                .map(|g| {
                    vec![
                        g.group.clone(),
                        g.conversations.to_string(),
                        g.turns.to_string(),
                        format!("{:.1}", g.audio_in_ms as f64 / 60_000.0),
                        g.input_tokens.to_string(),
                        g.output_tokens.to_string(),
                        usd(g.cost_micro_usd),
                    ]
                })
                .collect();
            let name = match args.by {
                By::Day => "day",
                By::Key => "key",
                By::Model => "model",
                By::Conversation => "conversation",
            };
            let header = [
                name,
                "conversations",
                "turns",
                "minutes in",
                "tokens in",
                "tokens out",
                "cost (USD)",
            ];
            print_table(&header, &table);
        }
    }
    Ok(())
}

fn group(rows: &[ConversationRow], by: By, zone: &TimeZone) -> Vec<Group> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for row in rows {
        let name = match by {
            By::Day => local_day(row.started_ms, zone),
            By::Key => row.key.clone().unwrap_or_else(|| "-".into()),
            By::Model => format!("{} {}", row.engine, row.model).trim().to_owned(),
            By::Conversation => row.conversation.clone(),
        };
        let g = groups.entry(name.clone()).or_insert_with(|| Group {
            group: name,
            ..Group::default()
        });
        g.conversations += 1;
        g.turns += row.turns;
        g.audio_in_ms += row.audio_in_ms;
        g.audio_out_ms += row.audio_out_ms;
        g.input_tokens += row.speech_in_tokens + row.text_in_tokens;
        g.output_tokens += row.speech_out_tokens + row.text_out_tokens;
        g.cost_micro_usd += row.cost_micro_usd;
    }
    groups.into_values().collect()
}

fn local_day(ms: i64, zone: &TimeZone) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_zoned_datetime(zone.clone()).date().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn local_time(ms: i64, zone: &TimeZone) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| {
            t.to_zoned_datetime(zone.clone())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

/// Micro-dollars as dollars, exactly.
fn usd(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let micro = micro.unsigned_abs();
    format!("{sign}{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Rows as CSV: the header from the first row's JSON field names.
fn print_csv<T: Serialize>(rows: &[T]) -> Result<(), Failure> {
    let values: Vec<serde_json::Map<String, serde_json::Value>> = rows
        .iter()
        .map(|row| match serde_json::to_value(row) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            _ => Err(anyhow!("a report row is not an object")),
        })
        .collect::<Result<_, _>>()?;
    let Some(first) = values.first() else {
        return Ok(());
    };
    let columns: Vec<&String> = first.keys().collect();
    println!(
        "{}",
        columns
            .iter()
            .map(|c| csv_cell(c))
            .collect::<Vec<_>>()
            .join(",")
    );
    for row in &values {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| match &row[c.as_str()] {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => csv_cell(s),
                other => other.to_string(),
            })
            .collect();
        println!("{}", cells.join(","));
    }
    Ok(())
}

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_printed_exactly() {
        assert_eq!(usd(0), "0.000000");
        assert_eq!(usd(1_234_567), "1.234567");
        assert_eq!(usd(-5), "-0.000005");
    }

    #[test]
    fn days_start_at_local_midnight() {
        let lima = TimeZone::get("America/Lima").expect("zone");
        // Lima is UTC-5 all year.
        let start = day_start("2026-11-30", &lima, 0).expect("date");
        assert_eq!(start, 1_796_014_800_000);
        assert_eq!(
            day_start("2026-11-30", &lima, 1).expect("date"),
            start + 86_400_000
        );
        assert_eq!(local_day(start, &lima), "2026-11-30");
        assert_eq!(local_day(start - 1, &lima), "2026-11-29");
        assert!(day_start("30/11/2026", &lima, 0).is_err());
    }

    #[test]
    fn csv_cells_are_quoted_when_needed() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
