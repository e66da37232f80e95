"""Inference logs as earlier sqlops versions wrote them, for the upgrade tests."""

# The requests table before the `shadow` and `feedback_by` columns.
OLD_REQUESTS_DDL = (
    "CREATE TABLE requests (request_id VARCHAR(32) PRIMARY KEY, ts FLOAT NOT NULL, "
    "db_id VARCHAR(128) NOT NULL, question TEXT NOT NULL, lang VARCHAR(8), "
    "model_version VARCHAR(128), sql TEXT, status VARCHAR(16) NOT NULL, "
    "executed BOOLEAN NOT NULL, n_rows INTEGER, error TEXT, latency_ms FLOAT NOT NULL, "
    "cache_hit BOOLEAN NOT NULL, feedback_verdict VARCHAR(16), feedback_sql TEXT, "
    "feedback_ts FLOAT)"
)
