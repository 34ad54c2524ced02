//! Reading the ledger back: conversations in a time range, and the check
//! that every conversation's totals are the sum of its usage rows.

use serde::Serialize;
use sqlx::AnyPool;
use sqlx::Row as _;
use sqlx::any::AnyRow;

/// One conversation as the ledger holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConversationRow {
    pub conversation: String,
    pub gateway: String,
    pub key: Option<String>,
    pub client: String,
    /// `web` or `phone`.
    pub channel: String,
    pub engine: String,
    pub model: String,
    pub voice: String,
    pub language: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<String>,
    pub turns: i64,
    pub audio_in_ms: i64,
    pub audio_out_ms: i64,
    pub speech_in_tokens: i64,
    pub speech_out_tokens: i64,
    pub text_in_tokens: i64,
    pub text_out_tokens: i64,
    pub speech_cost_micro_usd: i64,
    pub text_cost_micro_usd: i64,
    pub cost_micro_usd: i64,
}

/// The totals columns, in the order both tables name them.
const TOTALS: [&str; 9] = [
    "audio_in_ms",
    "audio_out_ms",
    "speech_in_tokens",
    "speech_out_tokens",
    "text_in_tokens",
    "text_out_tokens",
    "speech_cost_micro_usd",
    "text_cost_micro_usd",
    "cost_micro_usd",
];

impl ConversationRow {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            conversation: row.try_get("id")?,
            gateway: row.try_get("gateway")?,
            key: row.try_get("key_id")?,
            client: row.try_get("client")?,
            channel: row.try_get("channel")?,
            engine: row.try_get("engine")?,
            model: row.try_get("model")?,
            voice: row.try_get("voice")?,
            language: row.try_get("language")?,
            started_ms: row.try_get("started_ms")?,
            ended_ms: row.try_get("ended_ms")?,
            end_reason: row.try_get("end_reason")?,
            turns: row.try_get("turns")?,
            audio_in_ms: row.try_get("audio_in_ms")?,
            audio_out_ms: row.try_get("audio_out_ms")?,
            speech_in_tokens: row.try_get("speech_in_tokens")?,
            speech_out_tokens: row.try_get("speech_out_tokens")?,
            text_in_tokens: row.try_get("text_in_tokens")?,
            text_out_tokens: row.try_get("text_out_tokens")?,
            speech_cost_micro_usd: row.try_get("speech_cost_micro_usd")?,
            text_cost_micro_usd: row.try_get("text_cost_micro_usd")?,
            cost_micro_usd: row.try_get("cost_micro_usd")?,
        })
    }

    fn totals(&self) -> [i64; 9] {
        [
            self.audio_in_ms,
            self.audio_out_ms,
            self.speech_in_tokens,
            self.speech_out_tokens,
            self.text_in_tokens,
            self.text_out_tokens,
            self.speech_cost_micro_usd,
            self.text_cost_micro_usd,
            self.cost_micro_usd,
        ]
    }
}

/// Conversations started in `[since_ms, until_ms)`, oldest first.
pub async fn conversations(
    pool: &AnyPool,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<ConversationRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT * FROM conversations WHERE started_ms >= $1 AND started_ms < $2 \
         ORDER BY started_ms, id",
    )
    .bind(since_ms)
    .bind(until_ms)
    .fetch_all(pool)
    .await?;
    rows.iter().map(ConversationRow::from_row).collect()
}

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Check {
    pub conversations: u64,
    pub usage_rows: u64,
    /// One line per disagreement; empty when the ledger is consistent.
    pub mismatches: Vec<String>,
}

/// Compares every conversation's totals with the sum of its usage rows,
/// looks for usage rows of unknown conversations, checks each upstream
/// stream's deltas against the running totals its engine reported, and
/// each key budget's spend and holds against its conversations (days and
/// months in `zone`, `ledger.time_zone`).
pub async fn check(pool: &AnyPool, zone: &jiff::tz::TimeZone) -> Result<Check, sqlx::Error> {
    let sums: Vec<String> = TOTALS
        .iter()
        .map(|column| format!("CAST(COALESCE(SUM(u.{column}), 0) AS BIGINT) AS sum_{column}"))
        .collect();
    let sql = format!(
        "SELECT c.*, CAST(COUNT(u.sequence) AS BIGINT) AS usage_rows, {} \
         FROM conversations c LEFT JOIN usage u ON u.conversation = c.id \
         GROUP BY c.id ORDER BY c.started_ms, c.id",
        sums.join(", ")
    );
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    let mut check = Check::default();
    for row in &rows {
        let conversation = ConversationRow::from_row(row)?;
        check.conversations += 1;
        let usage_rows: i64 = row.try_get("usage_rows")?;
        check.usage_rows += u64::try_from(usage_rows).unwrap_or(0);
        for (column, total) in TOTALS.iter().zip(conversation.totals()) {
            let sum: i64 = row.try_get(format!("sum_{column}").as_str())?;
            if sum != total {
                check.mismatches.push(format!(
                    "conversation {}: {column} is {total} but its usage rows add up to {sum}",
                    conversation.conversation
                ));
            }
        }
    }
    let orphans: i64 = sqlx::query(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM usage u WHERE NOT EXISTS \
         (SELECT 1 FROM conversations c WHERE c.id = u.conversation)",
    )
    .fetch_one(pool)
    .await?
    .try_get(0)?;
    if orphans > 0 {
        check.mismatches.push(format!(
            "{orphans} usage rows name no recorded conversation"
        ));
    }
    check_streams(pool, &mut check).await?;
    check_budgets(pool, zone, &mut check).await?;
    Ok(check)
}

/// Each upstream stream's deltas, summed in order, equal every running
/// total the engine reported with them.
async fn check_streams(pool: &AnyPool, check: &mut Check) -> Result<(), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT conversation, stream, sequence, speech_in_tokens, speech_out_tokens, \
         text_in_tokens, text_out_tokens, reported_speech_in_tokens, \
         reported_speech_out_tokens, reported_text_in_tokens, reported_text_out_tokens \
         FROM usage u WHERE EXISTS (SELECT 1 FROM usage r WHERE r.conversation = u.conversation \
         AND r.stream = u.stream AND r.reported_speech_in_tokens IS NOT NULL) \
         ORDER BY conversation, stream, sequence",
    )
    .fetch_all(pool)
    .await?;
    let mut current: Option<(String, i64)> = None;
    let mut summed = [0i64; 4];
    for row in &rows {
        let key: (String, i64) = (row.try_get("conversation")?, row.try_get("stream")?);
        if current.as_ref() != Some(&key) {
            current = Some(key.clone());
            summed = [0; 4];
        }
        let mut reported = [None; 4];
        for (i, kind) in ["speech_in", "speech_out", "text_in", "text_out"]
            .iter()
            .enumerate()
        {
            summed[i] += row.try_get::<i64, _>(format!("{kind}_tokens").as_str())?;
            reported[i] =
                row.try_get::<Option<i64>, _>(format!("reported_{kind}_tokens").as_str())?;
        }
        let sequence: i64 = row.try_get("sequence")?;
        if reported.iter().all(Option::is_some) {
            let reported = reported.map(|r| r.unwrap_or_default());
            if reported != summed {
                check.mismatches.push(format!(
                    "conversation {} stream {}: the engine reported {reported:?} tokens \
                     (speech in, speech out, text in, text out) at delta {sequence}, \
                     but the deltas add up to {summed:?}",
                    key.0, key.1
                ));
            }
        }
    }
    Ok(())
}

/// Each key budget's spend equals its conversations' usage in the period,
/// and what it holds equals the holds of the conversations still open.
async fn check_budgets(
    pool: &AnyPool,
    zone: &jiff::tz::TimeZone,
    check: &mut Check,
) -> Result<(), sqlx::Error> {
    use std::collections::BTreeMap;
    let budgets = sqlx::query(
        "SELECT scope, period, spent_micro_usd, reserved_micro_usd FROM budgets \
         WHERE scope <> $1 ORDER BY scope, period",
    )
    .bind(super::budget::GLOBAL)
    .fetch_all(pool)
    .await?;
    if budgets.is_empty() {
        return Ok(());
    }
    let keys =
        sqlx::query("SELECT id, budget_period FROM api_keys WHERE budget_period IS NOT NULL")
            .fetch_all(pool)
            .await?;
    let mut periods = BTreeMap::new();
    for key in &keys {
        let id: String = key.try_get("id")?;
        let period: String = key.try_get("budget_period")?;
        if let Some(period) = super::keys::Period::parse(&period) {
            periods.insert(format!("key:{id}"), period);
        }
    }
    let usage = sqlx::query(
        "SELECT c.key_id, u.recorded_ms, u.cost_micro_usd FROM usage u \
         JOIN conversations c ON c.id = u.conversation WHERE c.key_id IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    let mut spent: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in &usage {
        let scope = format!("key:{}", row.try_get::<String, _>("key_id")?);
        let Some(period) = periods.get(&scope) else {
            continue;
        };
        let at: i64 = row.try_get("recorded_ms")?;
        let label = super::budget::period_label(*period, at, zone);
        *spent.entry((scope, label)).or_default() += row.try_get::<i64, _>("cost_micro_usd")?;
    }
    let open = sqlx::query(
        "SELECT held_micro_usd, hold FROM conversations WHERE ended_ms IS NULL AND held_micro_usd > 0",
    )
    .fetch_all(pool)
    .await?;
    let mut held: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in &open {
        let amount: i64 = row.try_get("held_micro_usd")?;
        let hold: String = row.try_get("hold")?;
        for key in super::budget::parse_hold(&hold) {
            *held.entry(key).or_default() += amount;
        }
    }
    for row in &budgets {
        let key: (String, String) = (row.try_get("scope")?, row.try_get("period")?);
        let recorded: i64 = row.try_get("spent_micro_usd")?;
        let expected = spent.get(&key).copied().unwrap_or(0);
        if recorded != expected {
            check.mismatches.push(format!(
                "budget {} {}: spent {recorded} but its conversations' usage adds up to {expected}",
                key.0, key.1
            ));
        }
        let reserved: i64 = row.try_get("reserved_micro_usd")?;
        let holds = held.get(&key).copied().unwrap_or(0);
        if reserved != holds {
            check.mismatches.push(format!(
                "budget {} {}: {reserved} reserved but open conversations hold {holds}",
                key.0, key.1
            ));
        }
    }
    Ok(())
}
