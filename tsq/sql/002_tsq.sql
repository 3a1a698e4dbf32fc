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

-- The original message of a command, from its queue's PGMQ archive: by msg_id, else the newest
-- message naming the command. The archive table's name depends on the queue, so it is built
-- here, with the queue name validated and quoted, and callers pass plain parameters.
CREATE OR REPLACE FUNCTION tsq.archived_message(p_queue TEXT, p_msg_id BIGINT, p_command_id UUID)
RETURNS JSONB LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    v_table TEXT;
    v_message JSONB;
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[A-Za-z_][A-Za-z0-9_]{0,46}$' THEN
        RETURN NULL;
    END IF;
    v_table := pgmq.format_table_name(p_queue, 'a');
    IF to_regclass(format('pgmq.%I', v_table)) IS NULL THEN
        RETURN NULL;
    END IF;
    IF p_msg_id IS NOT NULL THEN
        EXECUTE format('SELECT message FROM pgmq.%I WHERE msg_id = $1', v_table)
            INTO v_message USING p_msg_id;
    END IF;
    IF v_message IS NULL THEN
        EXECUTE format(
            'SELECT message FROM pgmq.%I WHERE message->>''command_id'' = $1 '
            'ORDER BY msg_id DESC LIMIT 1', v_table)
            INTO v_message USING p_command_id::text;
    END IF;
    RETURN v_message;
END;
$fn$;

-- Send a message to a PGMQ queue in one round trip: create the queue if it is missing (a reply
-- is never dropped for want of one), send, and wake the reference command bus's consumers,
-- which wait on the queue's notification channel. Callers validate the name first; this
-- refuses anything else before it becomes part of a table name.
CREATE OR REPLACE FUNCTION tsq.send(p_queue TEXT, p_message JSONB)
RETURNS BIGINT LANGUAGE plpgsql AS $fn$
DECLARE
    v_msg_id BIGINT;
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[A-Za-z_][A-Za-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'invalid PGMQ queue name: %', p_queue
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        PERFORM pgmq.create(p_queue);
    END IF;
    SELECT * INTO v_msg_id FROM pgmq.send(p_queue, p_message);
    PERFORM pg_notify('pgmq_notify_' || p_queue, '');
    RETURN v_msg_id;
END;
$fn$;

-- The audit trail is append-only, whoever is connected: rows are added, never changed or
-- removed. Statement-level, so even an UPDATE or DELETE that matches no row is refused.
CREATE OR REPLACE FUNCTION tsq.forbid_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'commandbus.audit is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Audit rows are never changed or removed; record a new event instead.';
END;
$fn$;

DO $migration$
BEGIN
IF NOT EXISTS (
    SELECT 1 FROM pg_trigger
    WHERE tgname = 'tsq_audit_append_only' AND tgrelid = 'commandbus.audit'::regclass
) THEN
    CREATE TRIGGER tsq_audit_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON commandbus.audit
        FOR EACH STATEMENT EXECUTE FUNCTION tsq.forbid_audit_change();
END IF;
END
$migration$;
