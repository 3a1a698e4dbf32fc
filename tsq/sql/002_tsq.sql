-- tsq's own additions, beside the reference tables.
CREATE SCHEMA IF NOT EXISTS tsq;

-- One row per effect tsq carried out (a decision, a refused signal's audit row, a move into the
-- troubleshooting queue), written in the same transaction as the effect itself: a retried
-- activity finds its own earlier success here instead of doing the work twice.
CREATE TABLE IF NOT EXISTS tsq.effect (
    effect_key   TEXT PRIMARY KEY,
    domain       TEXT NOT NULL,
    command_id   UUID NOT NULL,
    kind         TEXT NOT NULL,
    result       JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_tsq_effect_command ON tsq.effect (domain, command_id);

-- `tsq sync` and the SDK look troubleshooting commands up by domain and status.
CREATE INDEX IF NOT EXISTS ix_tsq_command_domain_status
    ON commandbus.command (domain, status, updated_at DESC);
