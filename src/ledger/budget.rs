//! Budgets: a key's spend per day, month or in total, every key's spend per
//! day together (`ledger.global_daily_usd`) and one conversation's
//! (`ledger.conversation_usd`).
//!
//! Spend past a limit is bounded by reserving before spending. A
//! conversation holds one turn's worth (`ledger.turn_reserve_usd`) against
//! each of its limits from admission on; each usage delta is taken out of
//! that hold as it is settled, and the hold is topped up again at once. A
//! limit admits a reservation only while spent + reserved + the reservation
//! fits under it, checked and taken in one conditional `UPDATE` (row locks
//! on PostgreSQL, `BEGIN IMMEDIATE` on SQLite), so conversations on one key
//! in any number of gateways can never hold more than the limit between
//! them. A conversation whose top-up is refused ends after the reply in
//! progress, which its hold still pays for: spend passes a limit only by
//! what one turn costs beyond its reservation.
//!
//! Each limit's spend lives in a `budgets` row per (scope, period): scope
//! `global` or `key:{id}`, period the local date (`2026-11-30`), month
//! (`2026-11`) or `total`, in `ledger.time_zone`. A conversation's hold is
//! written on its row too, so a gateway that is killed gives back what its
//! conversations held when it starts again.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use sqlx::Row as _;
use sqlx::Transaction;
use sqlx::any::Any;

use super::int;
use super::keys::Period;

/// The scope of every key's spend together.
pub const GLOBAL: &str = "global";

/// One limit a conversation spends against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// [`GLOBAL`] or `key:{id}`.
    pub name: String,
    pub limit_micro_usd: u64,
    pub period: Period,
}

impl Scope {
    /// The period `at_ms` falls in, as stored: `2026-11-30`, `2026-11` or `total`.
    pub fn period_at(&self, at_ms: i64, zone: &TimeZone) -> String {
        period_label(self.period, at_ms, zone)
    }
}

/// The stored name of the period `at_ms` falls in.
pub fn period_label(period: Period, at_ms: i64, zone: &TimeZone) -> String {
    let date = Timestamp::from_millisecond(at_ms)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_zoned_datetime(zone.clone())
        .date();
    match period {
        Period::Day => date.to_string(),
        Period::Month => format!("{:04}-{:02}", date.year(), date.month()),
        Period::Total => "total".to_owned(),
    }
}

/// What a conversation holds against its limits: the same amount against
/// each, in the period each was taken in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hold {
    pub micro_usd: u64,
    /// One period per scope, in the account's scope order.
    pub periods: Vec<String>,
}

/// A conversation's standing against its limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// What is left under the tightest limit, spent counted and holds not.
    pub remaining_micro_usd: Option<u64>,
    /// No further turn fits: the conversation ends after the reply in
    /// progress.
    pub exhausted: bool,
}

/// A conversation's budgets: its limits, its hold and how much to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Sorted by name, the order every transaction locks them in.
    pub scopes: Vec<Scope>,
    /// Held before each turn; 0 for an engine that costs nothing.
    pub reserve_micro_usd: u64,
    /// `ledger.conversation_usd`.
    pub conversation_micro_usd: Option<u64>,
    pub hold: Hold,
    pub standing: Standing,
}

impl Account {
    /// Whether anything limits this conversation.
    pub fn limited(&self) -> bool {
        !self.scopes.is_empty() || self.conversation_micro_usd.is_some()
    }

    /// The conversation's own cap after spending `total`: exhausted once a
    /// further turn would not fit. Folded into the standing.
    pub fn apply_conversation_cap(&mut self, total_micro_usd: u64) {
        let Some(cap) = self.conversation_micro_usd else {
            return;
        };
        let left = cap.saturating_sub(total_micro_usd);
        let remaining = self
            .standing
            .remaining_micro_usd
            .map_or(left, |r| r.min(left));
        self.standing.remaining_micro_usd = Some(remaining);
        if total_micro_usd.saturating_add(self.reserve_micro_usd) > cap || left == 0 {
            self.standing.exhausted = true;
        }
    }

    /// The hold as stored on the conversation's row: `scope@period;…`.
    pub(super) fn hold_text(&self) -> String {
        hold_text(&self.scopes, &self.hold.periods)
    }
}

fn hold_text(scopes: &[Scope], periods: &[String]) -> String {
    scopes
        .iter()
        .zip(periods)
        .map(|(scope, period)| format!("{}@{period}", scope.name))
        .collect::<Vec<_>>()
        .join(";")
}

/// The (scope, period) pairs of a stored hold.
pub(super) fn parse_hold(text: &str) -> Vec<(String, String)> {
    text.split(';')
        .filter_map(|pair| pair.split_once('@'))
        .map(|(scope, period)| (scope.to_owned(), period.to_owned()))
        .collect()
}

/// Why a conversation was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A limit has no room for one more turn.
    Budget { scope: String, period: Period },
    /// The key's `max_sessions` conversations are running.
    Sessions { max: u64 },
}

impl Refusal {
    /// A message safe to show the client.
    pub fn message(&self) -> String {
        match self {
            Self::Budget { scope, .. } if scope == GLOBAL => {
                "the service's spending limit for today is reached; try again tomorrow".to_owned()
            }
            Self::Budget { period, .. } => match period {
                Period::Day => "this key's budget for today is spent".to_owned(),
                Period::Month => "this key's budget for this month is spent".to_owned(),
                Period::Total => "this key's budget is spent".to_owned(),
            },
            Self::Sessions { max } => {
                format!("this key already has its {max} conversations running; try again later")
            }
        }
    }
}

/// What one transaction does to the budget rows: every change gathered
/// first, then made row by row in sorted order, so two gateways' writers
/// always lock rows in the same order and never deadlock.
#[derive(Debug, Default)]
pub(super) struct Changes {
    rows: BTreeMap<(String, String), RowChange>,
    top_ups: Vec<TopUp>,
}

#[derive(Debug, Default)]
struct RowChange {
    spent: u64,
    released: u64,
    /// Spent after the change, once made.
    spent_after: u64,
    limit: u64,
}

/// A reservation to take on every row of `rows`, or on none.
#[derive(Debug)]
struct TopUp {
    /// Which of the caller's requests this is.
    tag: usize,
    want: u64,
    rows: Vec<(String, String)>,
    granted: bool,
    /// The row that refused it.
    refused_by: Option<(String, String)>,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Outcome {
    pub(super) granted: bool,
    /// The row that refused it: (scope, period).
    pub(super) refused_by: Option<(String, String)>,
    /// The lowest limit − spent over the request's rows.
    pub(super) remaining_micro_usd: Option<u64>,
}

impl Changes {
    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn row(&mut self, scope: &str, period: &str, limit: u64) -> &mut RowChange {
        let row = self
            .rows
            .entry((scope.to_owned(), period.to_owned()))
            .or_default();
        row.limit = limit;
        row
    }

    /// Gives back what a hold keeps on each of its rows.
    pub(super) fn release(&mut self, hold: &[(String, String)], micro_usd: u64) {
        if micro_usd == 0 {
            return;
        }
        for (scope, period) in hold {
            let row = self
                .rows
                .entry((scope.clone(), period.clone()))
                .or_default();
            row.released += micro_usd;
        }
    }

    /// Settles a delta of `spent` for `account` at `now_ms`, and asks to
    /// hold one turn's worth again (tagged `tag`). Returns the new hold,
    /// as it is if the top-up is granted, and the top-up asked for.
    pub(super) fn settle(
        &mut self,
        tag: usize,
        account: &Account,
        spent: u64,
        now_ms: i64,
        zone: &TimeZone,
    ) -> (Hold, u64) {
        let periods: Vec<String> = account
            .scopes
            .iter()
            .map(|scope| scope.period_at(now_ms, zone))
            .collect();
        let mut held = account.hold.micro_usd;
        if account.hold.periods != periods {
            // A new day or month: what was held in the old one goes back,
            // and the hold is taken afresh in the new one.
            let old: Vec<(String, String)> = account
                .scopes
                .iter()
                .map(|s| s.name.clone())
                .zip(account.hold.periods.iter().cloned())
                .collect();
            self.release(&old, held);
            held = 0;
        }
        let taken = spent.min(held);
        held -= taken;
        for (scope, period) in account.scopes.iter().zip(&periods) {
            let row = self.row(&scope.name, period, scope.limit_micro_usd);
            row.spent += spent;
            row.released += taken;
        }
        let want = account.reserve_micro_usd.saturating_sub(held);
        // Even with nothing to ask for, the rows' new spend is reported.
        self.ask(tag, account, &periods, want);
        let hold = Hold {
            micro_usd: held + want,
            periods,
        };
        (hold, want)
    }

    /// Asks to hold `want` more on each of the account's rows in `periods`.
    /// Asking for nothing is granted while a row has anything left.
    pub(super) fn ask(&mut self, tag: usize, account: &Account, periods: &[String], want: u64) {
        let rows: Vec<(String, String)> = account
            .scopes
            .iter()
            .zip(periods)
            .map(|(scope, period)| {
                self.row(&scope.name, period, scope.limit_micro_usd);
                (scope.name.clone(), period.clone())
            })
            .collect();
        self.top_ups.push(TopUp {
            tag,
            want,
            rows,
            granted: true,
            refused_by: None,
        });
    }

    /// Makes the changes, rows in sorted order; each top-up is granted on
    /// all its rows or none.
    pub(super) async fn apply(
        &mut self,
        tx: &mut Transaction<'_, Any>,
    ) -> Result<BTreeMap<usize, Outcome>, sqlx::Error> {
        let keys: Vec<(String, String)> = self.rows.keys().cloned().collect();
        for (index, key) in keys.iter().enumerate() {
            let (scope, period) = key;
            sqlx::query(
                "INSERT INTO budgets (scope, period, spent_micro_usd, reserved_micro_usd) \
                 VALUES ($1, $2, 0, 0) ON CONFLICT (scope, period) DO NOTHING",
            )
            .bind(scope.as_str())
            .bind(period.as_str())
            .execute(&mut **tx)
            .await?;
            let change = &self.rows[key];
            let row = sqlx::query(
                "UPDATE budgets SET spent_micro_usd = spent_micro_usd + $1, \
                 reserved_micro_usd = CASE WHEN reserved_micro_usd < $2 THEN 0 \
                 ELSE reserved_micro_usd - $2 END \
                 WHERE scope = $3 AND period = $4 RETURNING spent_micro_usd",
            )
            .bind(int(change.spent))
            .bind(int(change.released))
            .bind(scope.as_str())
            .bind(period.as_str())
            .fetch_one(&mut **tx)
            .await?;
            let spent_after: i64 = row.try_get(0)?;
            let limit = change.limit;
            if let Some(change) = self.rows.get_mut(key) {
                change.spent_after = u64::try_from(spent_after).unwrap_or(0);
            }
            for top_up in &mut self.top_ups {
                if !top_up.granted || !top_up.rows.contains(key) {
                    continue;
                }
                let taken = sqlx::query(
                    "UPDATE budgets SET reserved_micro_usd = reserved_micro_usd + $1 \
                     WHERE scope = $2 AND period = $3 \
                     AND spent_micro_usd + reserved_micro_usd + $4 <= $5 \
                     AND spent_micro_usd + reserved_micro_usd < $6",
                )
                .bind(int(top_up.want))
                .bind(scope.as_str())
                .bind(period.as_str())
                .bind(int(top_up.want))
                .bind(int(limit))
                .bind(int(limit))
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if taken == 1 {
                    continue;
                }
                top_up.granted = false;
                top_up.refused_by = Some(key.clone());
                // Give back what this top-up took on the rows before this
                // one (already locked by this transaction).
                for earlier in &keys[..index] {
                    if top_up.rows.contains(earlier) {
                        sqlx::query(
                            "UPDATE budgets SET reserved_micro_usd = reserved_micro_usd - $1 \
                             WHERE scope = $2 AND period = $3",
                        )
                        .bind(int(top_up.want))
                        .bind(earlier.0.as_str())
                        .bind(earlier.1.as_str())
                        .execute(&mut **tx)
                        .await?;
                    }
                }
            }
        }
        let mut outcomes = BTreeMap::new();
        for top_up in &self.top_ups {
            let remaining = top_up
                .rows
                .iter()
                .filter_map(|key| self.rows.get(key))
                .map(|row| row.limit.saturating_sub(row.spent_after))
                .min();
            outcomes.insert(
                top_up.tag,
                Outcome {
                    granted: top_up.granted,
                    refused_by: top_up.refused_by.clone(),
                    remaining_micro_usd: remaining,
                },
            );
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_local_days_and_months() {
        let lima = TimeZone::get("America/Lima").expect("zone");
        // 2026-12-01 03:00 UTC is still 30 November in Lima (UTC-5).
        let at = Timestamp::from_second(1_796_094_000)
            .expect("time")
            .as_millisecond();
        assert_eq!(period_label(Period::Day, at, &lima), "2026-11-30");
        assert_eq!(period_label(Period::Month, at, &lima), "2026-11");
        assert_eq!(period_label(Period::Day, at, &TimeZone::UTC), "2026-12-01");
        assert_eq!(period_label(Period::Total, at, &lima), "total");
    }

    #[test]
    fn holds_are_stored_and_read_back() {
        let scopes = vec![
            Scope {
                name: GLOBAL.to_owned(),
                limit_micro_usd: 10,
                period: Period::Day,
            },
            Scope {
                name: "key:key_ab".to_owned(),
                limit_micro_usd: 5,
                period: Period::Month,
            },
        ];
        let text = hold_text(&scopes, &["2026-11-30".to_owned(), "2026-11".to_owned()]);
        assert_eq!(text, "global@2026-11-30;key:key_ab@2026-11");
        assert_eq!(
            parse_hold(&text),
            vec![
                ("global".to_owned(), "2026-11-30".to_owned()),
                ("key:key_ab".to_owned(), "2026-11".to_owned())
            ]
        );
        assert!(parse_hold("").is_empty());
    }

    #[test]
    fn a_conversation_cap_leaves_room_for_one_more_turn_or_ends_it() {
        let mut account = Account {
            scopes: Vec::new(),
            reserve_micro_usd: 100,
            conversation_micro_usd: Some(1_000),
            hold: Hold::default(),
            standing: Standing::default(),
        };
        account.apply_conversation_cap(850);
        assert_eq!(account.standing.remaining_micro_usd, Some(150));
        assert!(!account.standing.exhausted);
        account.apply_conversation_cap(901);
        assert!(account.standing.exhausted);
    }
}
