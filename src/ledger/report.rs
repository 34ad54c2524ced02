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
/// and looks for usage rows of unknown conversations.
pub async fn check(pool: &AnyPool) -> Result<Check, sqlx::Error> {
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
    Ok(check)
}
