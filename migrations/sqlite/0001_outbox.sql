-- prism-sync outbox schema (SQLite). An application inserts only (record_id, patch) and,
-- optionally, object_type; every other column has a default. Timestamps are UTC text in
-- ISO 8601 with milliseconds, so they sort and compare as strings.

CREATE TABLE prism_outbox (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after purge
    record_id          TEXT    NOT NULL,
    patch              TEXT    NOT NULL,
    object_type        TEXT    NOT NULL DEFAULT 'contact',
    enqueued_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    state              TEXT    NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'in_flight', 'retrying', 'succeeded', 'dead')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    batch_id           TEXT,
    last_error_code    TEXT,
    last_error_message TEXT,
    completed_at       TEXT
);

-- Claim scan: only rows that can still be sent, in id order.
CREATE INDEX prism_outbox_active ON prism_outbox (id) WHERE state IN ('pending', 'retrying');
-- Per-record order guard ("is there an older active row of this record?") and followers.
CREATE INDEX prism_outbox_record ON prism_outbox (record_id, id);
-- Inspect, purge ("batches no row refers to") and replay by batch.
CREATE INDEX prism_outbox_batch ON prism_outbox (batch_id);
-- Retention and status of finished rows.
CREATE INDEX prism_outbox_completed ON prism_outbox (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE prism_batches (
    id               TEXT    PRIMARY KEY,
    idempotency_key  TEXT    NOT NULL UNIQUE,
    object_type      TEXT    NOT NULL,
    body             BLOB    NOT NULL,          -- the exact request bytes, sent on every try
    items            TEXT    NOT NULL,          -- JSON: [{"r": record_id, "rows": [ids], "a": attempts}]
    item_count       INTEGER NOT NULL,
    row_count        INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'open'
                     CHECK (state IN ('open', 'done', 'split', 'released')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    lease_owner      TEXT,
    lease_expires_at TEXT,
    created_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    completed_at     TEXT,
    parent_id        TEXT,
    last_status      INTEGER,
    last_error       TEXT
);

CREATE INDEX prism_batches_open ON prism_batches (next_attempt_at) WHERE state = 'open';
CREATE INDEX prism_batches_completed ON prism_batches (completed_at) WHERE state <> 'open';

-- One row per HTTP try of a batch, for `inspect --batch`.
CREATE TABLE prism_batch_attempts (
    batch_id    TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    owner       TEXT    NOT NULL,
    finished_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    http_status INTEGER,
    outcome     TEXT    NOT NULL,
    detail      TEXT,
    replay      INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, attempt)
);

-- Operators' replays and purges.
CREATE TABLE prism_audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    filter  TEXT    NOT NULL,
    rows    INTEGER NOT NULL
);
