-- The reference command bus layout. Everything is IF NOT EXISTS: on a database the command bus
-- already uses, this changes nothing.
CREATE SCHEMA IF NOT EXISTS commandbus;

CREATE TABLE IF NOT EXISTS commandbus.batch (
    domain                    TEXT NOT NULL,
    batch_id                  UUID NOT NULL,
    name                      TEXT,
    custom_data               JSONB,
    status                    TEXT NOT NULL DEFAULT 'PENDING',
    total_count               INT NOT NULL DEFAULT 0,
    completed_count           INT NOT NULL DEFAULT 0,
    canceled_count            INT NOT NULL DEFAULT 0,
    in_troubleshooting_count  INT NOT NULL DEFAULT 0,
    created_at                TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at                TIMESTAMPTZ,
    completed_at              TIMESTAMPTZ,
    PRIMARY KEY (domain, batch_id)
);
ALTER TABLE commandbus.batch ADD COLUMN IF NOT EXISTS failed_count INT NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS commandbus.command (
    domain            TEXT NOT NULL,
    queue_name        TEXT NOT NULL,
    msg_id            BIGINT,
    command_id        UUID NOT NULL,
    command_type      TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          INT NOT NULL DEFAULT 0,
    max_attempts      INT NOT NULL,
    lease_expires_at  TIMESTAMPTZ,
    last_error_type   TEXT,
    last_error_code   TEXT,
    last_error_msg    TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    reply_queue       TEXT NOT NULL DEFAULT '',
    correlation_id    UUID,
    batch_id          UUID
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_command_domain_cmdid ON commandbus.command (domain, command_id);
CREATE INDEX IF NOT EXISTS ix_command_status_type ON commandbus.command (status, command_type);
CREATE INDEX IF NOT EXISTS ix_command_updated ON commandbus.command (updated_at);
CREATE INDEX IF NOT EXISTS ix_command_batch ON commandbus.command (domain, batch_id)
    WHERE batch_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS commandbus.audit (
    audit_id      BIGSERIAL PRIMARY KEY,
    domain        TEXT NOT NULL,
    command_id    UUID NOT NULL,
    event_type    TEXT NOT NULL,
    ts            TIMESTAMPTZ NOT NULL DEFAULT now(),
    details_json  JSONB
);
CREATE INDEX IF NOT EXISTS ix_audit_cmd_ts ON commandbus.audit (command_id, ts);

CREATE TABLE IF NOT EXISTS commandbus.payload_archive (
    domain        TEXT NOT NULL,
    command_id    UUID NOT NULL,
    payload_json  JSONB NOT NULL,
    archived_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, command_id)
);

-- Batch counters move on every operator decision. Where the command bus already installed its
-- own functions, those are kept (CREATE ... only when missing), so tsq moves the counters exactly
-- as the command bus's own operator tools do.
DO $migration$
BEGIN
IF to_regprocedure('commandbus.sp_update_batch_counters(text, uuid, text)') IS NULL THEN
    CREATE FUNCTION commandbus.sp_update_batch_counters(p_domain TEXT, p_batch_id UUID, p_update_type TEXT)
    RETURNS BOOLEAN LANGUAGE plpgsql AS $fn$
    DECLARE
        v_batch commandbus.batch%ROWTYPE;
    BEGIN
        UPDATE commandbus.batch b SET
            completed_count = b.completed_count
                + CASE WHEN p_update_type IN ('complete', 'tsq_complete') THEN 1 ELSE 0 END,
            canceled_count = b.canceled_count + CASE WHEN p_update_type = 'tsq_cancel' THEN 1 ELSE 0 END,
            failed_count = b.failed_count + CASE WHEN p_update_type = 'failed' THEN 1 ELSE 0 END,
            in_troubleshooting_count = b.in_troubleshooting_count + CASE
                WHEN p_update_type = 'tsq_move' THEN 1
                WHEN p_update_type IN ('tsq_complete', 'tsq_cancel', 'tsq_retry') THEN -1
                ELSE 0 END
        WHERE b.domain = p_domain AND b.batch_id = p_batch_id
          AND p_update_type IN ('complete', 'failed', 'tsq_move', 'tsq_complete', 'tsq_cancel', 'tsq_retry')
        RETURNING b.* INTO v_batch;
        IF NOT FOUND THEN
            IF p_update_type NOT IN ('complete', 'failed', 'tsq_move', 'tsq_complete', 'tsq_cancel', 'tsq_retry') THEN
                RAISE EXCEPTION 'Unknown update_type: %', p_update_type;
            END IF;
            RETURN FALSE;
        END IF;
        IF v_batch.completed_at IS NOT NULL
           OR v_batch.completed_count + v_batch.canceled_count + v_batch.failed_count <> v_batch.total_count
           OR v_batch.in_troubleshooting_count <> 0 THEN
            RETURN FALSE;
        END IF;
        UPDATE commandbus.batch SET
            status = CASE WHEN v_batch.canceled_count > 0 OR v_batch.failed_count > 0
                          THEN 'COMPLETED_WITH_FAILURES' ELSE 'COMPLETED' END,
            completed_at = now()
        WHERE domain = p_domain AND batch_id = p_batch_id;
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        VALUES (p_domain, p_batch_id, 'BATCH_COMPLETED', jsonb_build_object(
            'batch_id', p_batch_id, 'total_count', v_batch.total_count,
            'completed_count', v_batch.completed_count, 'failed_count', v_batch.failed_count,
            'canceled_count', v_batch.canceled_count));
        RETURN TRUE;
    END;
    $fn$;
END IF;
IF to_regprocedure('commandbus.sp_tsq_cancel(text, uuid)') IS NULL THEN
    CREATE FUNCTION commandbus.sp_tsq_cancel(p_domain TEXT, p_batch_id UUID)
    RETURNS BOOLEAN LANGUAGE sql AS $fn$
        SELECT CASE WHEN p_batch_id IS NULL THEN FALSE
               ELSE commandbus.sp_update_batch_counters(p_domain, p_batch_id, 'tsq_cancel') END
    $fn$;
END IF;
IF to_regprocedure('commandbus.sp_tsq_complete(text, uuid)') IS NULL THEN
    CREATE FUNCTION commandbus.sp_tsq_complete(p_domain TEXT, p_batch_id UUID)
    RETURNS BOOLEAN LANGUAGE sql AS $fn$
        SELECT CASE WHEN p_batch_id IS NULL THEN FALSE
               ELSE commandbus.sp_update_batch_counters(p_domain, p_batch_id, 'tsq_complete') END
    $fn$;
END IF;
IF to_regprocedure('commandbus.sp_tsq_retry(text, uuid)') IS NULL THEN
    CREATE FUNCTION commandbus.sp_tsq_retry(p_domain TEXT, p_batch_id UUID)
    RETURNS BOOLEAN LANGUAGE sql AS $fn$
        SELECT CASE WHEN p_batch_id IS NULL THEN FALSE
               ELSE commandbus.sp_update_batch_counters(p_domain, p_batch_id, 'tsq_retry') END
    $fn$;
END IF;
END
$migration$;
