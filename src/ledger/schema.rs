//! The ledger's tables, as numbered migrations run at open. The SQL is the
//! same on SQLite and PostgreSQL: integers are `BIGINT` (money in
//! micro-dollars, times in Unix milliseconds), text is `TEXT`, and no
//! column relies on a database's own clock or sequences.

/// Migrations in order; each runs once, in one transaction, and is
/// recorded in `ledger_migrations` with its number.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "conversations, usage and turns",
        "CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        gateway TEXT NOT NULL,
        key_id TEXT,
        client TEXT NOT NULL,
        engine TEXT NOT NULL,
        model TEXT NOT NULL DEFAULT '',
        voice TEXT NOT NULL DEFAULT '',
        language TEXT NOT NULL,
        started_ms BIGINT NOT NULL,
        ended_ms BIGINT,
        end_reason TEXT,
        turns BIGINT NOT NULL DEFAULT 0,
        audio_in_ms BIGINT NOT NULL DEFAULT 0,
        audio_out_ms BIGINT NOT NULL DEFAULT 0,
        speech_in_tokens BIGINT NOT NULL DEFAULT 0,
        speech_out_tokens BIGINT NOT NULL DEFAULT 0,
        text_in_tokens BIGINT NOT NULL DEFAULT 0,
        text_out_tokens BIGINT NOT NULL DEFAULT 0,
        speech_cost_micro_usd BIGINT NOT NULL DEFAULT 0,
        text_cost_micro_usd BIGINT NOT NULL DEFAULT 0,
        cost_micro_usd BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX conversations_started ON conversations (started_ms);
    CREATE INDEX conversations_open ON conversations (gateway, ended_ms);
    CREATE TABLE usage (
        conversation TEXT NOT NULL REFERENCES conversations (id),
        stream BIGINT NOT NULL,
        sequence BIGINT NOT NULL,
        recorded_ms BIGINT NOT NULL,
        prices TEXT NOT NULL,
        audio_in_ms BIGINT NOT NULL,
        audio_out_ms BIGINT NOT NULL,
        speech_in_tokens BIGINT NOT NULL,
        speech_out_tokens BIGINT NOT NULL,
        text_in_tokens BIGINT NOT NULL,
        text_out_tokens BIGINT NOT NULL,
        speech_cost_micro_usd BIGINT NOT NULL,
        text_cost_micro_usd BIGINT NOT NULL,
        cost_micro_usd BIGINT NOT NULL,
        PRIMARY KEY (conversation, stream, sequence)
    );
    CREATE TABLE turns (
        conversation TEXT NOT NULL REFERENCES conversations (id),
        turn BIGINT NOT NULL,
        ended_ms BIGINT NOT NULL,
        latency_ms BIGINT,
        outcome TEXT NOT NULL,
        user_text TEXT,
        reply_text TEXT,
        PRIMARY KEY (conversation, turn)
    )",
    ),
    (
        2,
        "API keys and client tokens",
        "CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_ms BIGINT NOT NULL,
        revoked_ms BIGINT,
        budget_micro_usd BIGINT,
        budget_period TEXT,
        max_sessions BIGINT
    );
    CREATE TABLE client_tokens (
        token_sha256 TEXT PRIMARY KEY,
        key_id TEXT NOT NULL REFERENCES api_keys (id),
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        used_ms BIGINT,
        engine TEXT,
        voice TEXT,
        language TEXT
    );
    CREATE INDEX client_tokens_expiry ON client_tokens (expires_ms)",
    ),
    (
        3,
        "budgets and the holds of running conversations",
        "CREATE TABLE budgets (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        spent_micro_usd BIGINT NOT NULL DEFAULT 0,
        reserved_micro_usd BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, period)
    );
    ALTER TABLE conversations ADD COLUMN held_micro_usd BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE conversations ADD COLUMN hold TEXT NOT NULL DEFAULT '';
    CREATE INDEX conversations_key_open ON conversations (key_id, ended_ms)",
    ),
    (
        4,
        "the running totals an engine reported with each delta",
        "ALTER TABLE usage ADD COLUMN reported_speech_in_tokens BIGINT;
    ALTER TABLE usage ADD COLUMN reported_speech_out_tokens BIGINT;
    ALTER TABLE usage ADD COLUMN reported_text_in_tokens BIGINT;
    ALTER TABLE usage ADD COLUMN reported_text_out_tokens BIGINT",
    ),
    (
        5,
        "the channel a conversation came by",
        "ALTER TABLE conversations ADD COLUMN channel TEXT NOT NULL DEFAULT 'web'",
    ),
];
