-- Parkings: every stay of a command in the troubleshooting queue, seen by a trigger on
-- commandbus.command, whoever moved it there (the bus's own SQL, another tool, tsq). A decision
-- is bound to the parking it was made for: a command parked, retried and parked again has two,
-- and a decision made for the first can never change the second.
--
-- The parking row is also the watcher's outbox: `todo` says what `tsq worker` still has to do
-- about it ('start' its workflow, 'tell' its workflow the command left), written in the same
-- transaction as the status change, so nothing is missed when a notification is.
CREATE TABLE IF NOT EXISTS tsq.parking (
    parking_id     BIGSERIAL PRIMARY KEY,
    domain         TEXT NOT NULL,
    command_id     UUID NOT NULL,
    parked_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- Open when tsq migrate added parkings: its workflow may be one of an earlier tsq.
    backfilled     BOOLEAN NOT NULL DEFAULT false,
    left_at        TIMESTAMPTZ,
    -- The status it left to; NULL with left_at set when the row was deleted.
    left_status    TEXT,
    -- Who moved it out: 'workflow' (its own workflow's decision), 'bulk:<id>', NULL (outside).
    left_by        TEXT,
    todo           TEXT CHECK (todo IN ('start', 'tell')),
    -- Bumped whenever `todo` is set, so the watcher clears only the work it did.
    todo_seq       BIGINT NOT NULL DEFAULT 1,
    claimed_until  TIMESTAMPTZ,
    attempts       INT NOT NULL DEFAULT 0,
    -- Why the watcher could not do `todo` (yet); 'skipped: ...' when it never can.
    problem        TEXT,
    -- What the command was parked with, for the notifier's digests and the groups.
    error_code     TEXT,
    command_type   TEXT,
    -- Counted in a notification of arrivals already.
    notified       BOOLEAN NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX IF NOT EXISTS tsq_parking_open ON tsq.parking (domain, command_id)
    WHERE left_at IS NULL;
CREATE INDEX IF NOT EXISTS tsq_parking_todo ON tsq.parking (parking_id) WHERE todo IS NOT NULL;
CREATE INDEX IF NOT EXISTS tsq_parking_command ON tsq.parking (domain, command_id, parking_id);
CREATE INDEX IF NOT EXISTS tsq_parking_unnotified ON tsq.parking (parking_id) WHERE NOT notified;

-- Work done by one worker at a time, every so often (the sweep): who took it last, and when.
CREATE TABLE IF NOT EXISTS tsq.lease (
    name      TEXT PRIMARY KEY,
    holder    TEXT NOT NULL,
    taken_at  TIMESTAMPTZ NOT NULL
);

-- The trigger runs as the table owner's function, whoever updates the command: the bus's role
-- needs no rights on the tsq schema. It only fires on a move into or out of the
-- troubleshooting queue (the WHEN clauses), so the bus's other updates do not call it at all.
CREATE OR REPLACE FUNCTION tsq.track_parking() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_by TEXT := nullif(current_setting('tsq.decided_by', true), '');
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'IN_TROUBLESHOOTING_QUEUE' THEN
        UPDATE tsq.parking
        SET left_at = clock_timestamp(),
            left_status = CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE NEW.status END,
            left_by = v_by,
            -- Its own workflow knows already; any other move out is told to the workflow.
            todo = CASE WHEN v_by = 'workflow' THEN NULL ELSE 'tell' END,
            todo_seq = todo_seq + 1,
            claimed_until = NULL,
            attempts = 0,
            problem = NULL
        WHERE domain = OLD.domain AND command_id = OLD.command_id AND left_at IS NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status = 'IN_TROUBLESHOOTING_QUEUE' THEN
        INSERT INTO tsq.parking (domain, command_id, todo, error_code, command_type)
        VALUES (NEW.domain, NEW.command_id, 'start', NEW.last_error_code, NEW.command_type)
        ON CONFLICT (domain, command_id) WHERE left_at IS NULL DO NOTHING;
    END IF;
    PERFORM pg_notify('tsq_parking', '');
    RETURN NULL;
END;
$fn$;

DO $migration$
BEGIN
IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'tsq_parking_insert'
               AND tgrelid = 'commandbus.command'::regclass) THEN
    CREATE TRIGGER tsq_parking_insert AFTER INSERT ON commandbus.command
        FOR EACH ROW WHEN (NEW.status = 'IN_TROUBLESHOOTING_QUEUE')
        EXECUTE FUNCTION tsq.track_parking();
    CREATE TRIGGER tsq_parking_update AFTER UPDATE OF status ON commandbus.command
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
            AND 'IN_TROUBLESHOOTING_QUEUE' IN (OLD.status, NEW.status))
        EXECUTE FUNCTION tsq.track_parking();
    CREATE TRIGGER tsq_parking_delete AFTER DELETE ON commandbus.command
        FOR EACH ROW WHEN (OLD.status = 'IN_TROUBLESHOOTING_QUEUE')
        EXECUTE FUNCTION tsq.track_parking();
    -- Commands parked before tsq watched: a parking each, and a workflow check by the watcher.
    -- CREATE TRIGGER holds off the bus's writers until this commits, so none is missed.
    INSERT INTO tsq.parking (domain, command_id, parked_at, backfilled, todo, error_code,
        command_type, notified)
    SELECT domain, command_id, updated_at, true, 'start', last_error_code, command_type, true
    FROM commandbus.command
    WHERE status = 'IN_TROUBLESHOOTING_QUEUE'
    ON CONFLICT (domain, command_id) WHERE left_at IS NULL DO NOTHING;
END IF;
END
$migration$;

-- A PGMQ queue by name, whatever the letter case: PGMQ lower-cases its table names but not the
-- name in pgmq.meta, so `Payments__Replies` and `payments__replies` would be two queues sharing
-- one table. An existing queue is used under the name it was created with; NULL if none.
CREATE OR REPLACE FUNCTION tsq.queue_named(p_queue TEXT) RETURNS TEXT
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT queue_name FROM pgmq.meta WHERE lower(queue_name) = lower(p_queue)
    ORDER BY queue_name = p_queue DESC LIMIT 1
$fn$;

-- Send to a PGMQ queue in one call: find it (see tsq.queue_named) or create it under the name
-- given, send, and wake the reference command bus's consumers, which wait on the queue's
-- notification channel. As its owner, so the worker role needs no right to create tables.
CREATE OR REPLACE FUNCTION tsq.send(p_queue TEXT, p_message JSONB)
RETURNS BIGINT LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_queue TEXT;
    v_msg_id BIGINT;
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[A-Za-z_][A-Za-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'invalid PGMQ queue name: %', p_queue
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_queue := tsq.queue_named(p_queue);
    IF v_queue IS NULL THEN
        PERFORM pgmq.create(p_queue);
        v_queue := p_queue;
    END IF;
    SELECT * INTO v_msg_id FROM pgmq.send(v_queue, p_message);
    PERFORM pg_notify('pgmq_notify_' || v_queue, '');
    RETURN v_msg_id;
END;
$fn$;

-- The command's message moves to its queue's archive (kept for a later retry), as the bus's
-- own worker does when it parks a command.
CREATE OR REPLACE FUNCTION tsq.archive(p_queue TEXT, p_msg_id BIGINT) RETURNS BOOLEAN
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_queue TEXT := tsq.queue_named(p_queue);
BEGIN
    IF v_queue IS NULL OR p_msg_id IS NULL THEN
        RETURN false;
    END IF;
    RETURN pgmq.archive(v_queue, p_msg_id);
END;
$fn$;

-- The archive tables belong to the schema owner: read them as the owner.
ALTER FUNCTION tsq.archived_message(TEXT, BIGINT, UUID)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The original message of a command, for a retry: from its queue's PGMQ archive, else from
-- commandbus.payload_archive. NULL when neither has it.
CREATE OR REPLACE FUNCTION tsq.original_message(p_domain TEXT, p_command_id UUID)
RETURNS TABLE (message JSONB, source TEXT)
LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(a.message, p.payload_json),
        CASE WHEN a.message IS NOT NULL THEN 'pgmq.a_' || c.queue_name
             WHEN p.payload_json IS NOT NULL THEN 'commandbus.payload_archive' END
    FROM commandbus.command c
    CROSS JOIN LATERAL (SELECT tsq.archived_message(c.queue_name, c.msg_id, c.command_id)
                        AS message) a
    LEFT JOIN commandbus.payload_archive p USING (domain, command_id)
    WHERE c.domain = p_domain AND c.command_id = p_command_id
$fn$;

-- The reply to the sender, readable by spec 7.2 consumers (`data`, `error`) and by the
-- reference library's (`result`, `error_code`, `error_message`, and `reason` for a cancel).
CREATE OR REPLACE FUNCTION tsq.reply_body(
    p_command commandbus.command, p_outcome TEXT, p_reason TEXT, p_data JSONB
) RETURNS JSONB LANGUAGE sql STABLE AS $fn$
    SELECT jsonb_build_object(
        'command_id', p_command.command_id,
        'correlation_id', p_command.correlation_id,
        'domain', p_command.domain,
        'type', p_command.command_type || 'Response',
        'command_type', p_command.command_type,
        'outcome', p_outcome,
        'completed_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
        'data', p_data,
        'result', p_data,
        'error', CASE WHEN p_reason IS NOT NULL THEN jsonb_build_object(
            'code', 'OPERATOR_CANCEL', 'message', p_reason, 'class', 'OperatorCancel') END,
        'error_code', CASE WHEN p_reason IS NOT NULL THEN 'OPERATOR_CANCEL' END,
        'error_message', p_reason
    ) || CASE WHEN p_reason IS NOT NULL THEN jsonb_build_object('reason', p_reason)
              ELSE '{}'::jsonb END
$fn$;

-- Whether two operator names are one person's: trimmed, case-insensitively.
CREATE OR REPLACE FUNCTION tsq.same_operator(a TEXT, b TEXT) RETURNS BOOLEAN
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT lower(btrim(a, E' \t\r\n')) = lower(btrim(b, E' \t\r\n'))
$fn$;

-- Claims: an operator on a parked command. Its workflow writes them (with its own count of its
-- events, `seq`, so a late write never undoes a later one); tsq.decide refuses another
-- operator's decision while one lasts, unless forced.
CREATE TABLE IF NOT EXISTS tsq.claim (
    parking_id  BIGINT PRIMARY KEY REFERENCES tsq.parking,
    domain      TEXT NOT NULL,
    command_id  UUID NOT NULL,
    claimed_by  TEXT NOT NULL,
    until       TIMESTAMPTZ NOT NULL,
    seq         INT NOT NULL
);

-- RFC 7396 JSON merge patch: objects merge key by key, null removes a key, anything else
-- replaces the value.
CREATE OR REPLACE FUNCTION tsq.merge_patch(p_target JSONB, p_patch JSONB) RETURNS JSONB
LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    v_result JSONB;
    v_key TEXT;
    v_value JSONB;
BEGIN
    IF jsonb_typeof(p_patch) IS DISTINCT FROM 'object' THEN
        RETURN p_patch;
    END IF;
    v_result := CASE WHEN jsonb_typeof(p_target) = 'object' THEN p_target ELSE '{}' END;
    FOR v_key, v_value IN SELECT key, value FROM jsonb_each(p_patch) LOOP
        IF jsonb_typeof(v_value) = 'null' THEN
            v_result := v_result - v_key;
        ELSE
            v_result := v_result
                || jsonb_build_object(v_key, tsq.merge_patch(v_result -> v_key, v_value));
        END IF;
    END LOOP;
    RETURN v_result;
END;
$fn$;

CREATE OR REPLACE FUNCTION tsq.sha256(p JSONB) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $fn$
    SELECT encode(sha256(convert_to(p::text, 'UTF8')), 'hex')
$fn$;

-- A refusal of tsq.decide: raised with its SQLSTATE (the transaction rolls back), or, when soft
-- (a preview, a bulk operation's item), returned: every refusal comes before the first write,
-- so there is nothing to undo, and no savepoint is needed.
CREATE OR REPLACE FUNCTION tsq.refuse(p_soft BOOLEAN, p_state TEXT, p_message TEXT)
RETURNS JSONB LANGUAGE plpgsql AS $fn$
BEGIN
    IF p_soft THEN
        RETURN jsonb_build_object('refused', jsonb_build_object(
            'sqlstate', p_state, 'message', p_message));
    END IF;
    RAISE EXCEPTION '%', p_message USING ERRCODE = p_state;
END;
$fn$;

-- One decision, as one transaction (the caller's): the guarded status change, the reply or the
-- message re-sent, the audit row, the batch counters and the idempotency record. `p` is the
-- decision: effect_key, domain, command_id, parking_id (NULL: a workflow of tsq 0.1, guarded by
-- status only), decision, status_after, audit_event, reply_outcome, batch_update, operator,
-- reason, result_data, via, request_id, workflow_id, decided_by, patch (a retry's merge patch
-- of the original message), force (over another operator's claim), approved_by and
-- approval_comment (a proposal approved), bulk_id (a bulk operation's), soft. Returns the outcome, which is recorded under
-- effect_key: run again, it returns the same outcome and changes nothing. Refusals that
-- retrying cannot fix raise SQLSTATE TQ001 (bad input), TQ002 (no original message to re-send),
-- TQ003 (claimed by another operator) or TQ004 (needs approval), and roll everything back
-- (with `soft` or `preview`, see tsq.preview, it returns them instead).
CREATE OR REPLACE FUNCTION tsq.decide(p JSONB) RETURNS JSONB
LANGUAGE plpgsql AS $fn$
DECLARE
    v_key TEXT := p->>'effect_key';
    v_domain TEXT := p->>'domain';
    v_cid UUID := (p->>'command_id')::uuid;
    v_parking BIGINT := (p->>'parking_id')::bigint;
    v_kind TEXT := p->>'decision';
    v_reason TEXT := p->>'reason';
    v_data JSONB := CASE WHEN jsonb_typeof(p->'result_data') = 'object' THEN p->'result_data' END;
    v_recorded JSONB;
    v_cmd commandbus.command%ROWTYPE;
    v_open BOOLEAN;
    v_queue TEXT;
    v_msg_id BIGINT;
    v_message JSONB;
    v_source TEXT;
    v_details JSONB;
    v_outcome JSONB;
    v_audit_id BIGINT;
    v_detail TEXT;
    v_claim tsq.claim%ROWTYPE;
    v_patched JSONB;
    v_changed TEXT;
    v_by TEXT := p->>'approved_by';
    v_links JSONB;
    -- Refusals returned rather than raised: a preview's, a bulk operation's.
    v_soft BOOLEAN := coalesce((p->>'preview')::boolean OR (p->>'soft')::boolean, false);
BEGIN
    PERFORM set_config('lock_timeout', coalesce(p->>'lock_timeout', '5s'), true);
    SELECT result INTO v_recorded FROM tsq.effect WHERE effect_key = v_key;
    IF FOUND THEN
        RETURN v_recorded;
    END IF;
    -- The row lock first, as the bus takes it: then no other writer can move the command (or
    -- its parking) until this commits, and the statements below see what is committed now.
    SELECT * INTO v_cmd FROM commandbus.command
    WHERE domain = v_domain AND command_id = v_cid FOR UPDATE;
    IF NOT FOUND THEN
        v_detail := format('command %s no longer exists in domain %s; nothing done', v_cid, v_domain);
    ELSE
        -- A twin of this very attempt (a retry racing the first) may have committed meanwhile.
        SELECT result INTO v_recorded FROM tsq.effect WHERE effect_key = v_key;
        IF FOUND THEN
            RETURN v_recorded;
        END IF;
        v_open := v_cmd.status = 'IN_TROUBLESHOOTING_QUEUE' AND (v_parking IS NULL OR EXISTS (
            SELECT 1 FROM tsq.parking WHERE parking_id = v_parking AND domain = v_domain
            AND command_id = v_cid AND left_at IS NULL));
        IF NOT v_open THEN
            v_detail := CASE WHEN v_cmd.status = 'IN_TROUBLESHOOTING_QUEUE' THEN format(
                'command %s was parked again since this decision''s parking %s: the decision '
                'applies to that parking only; nothing was changed', v_cid, v_parking)
            ELSE format('command %s is %s, no longer IN_TROUBLESHOOTING_QUEUE: it was decided '
                'outside tsq; nothing was changed', v_cid, v_cmd.status) END;
        END IF;
    END IF;
    IF v_detail IS NOT NULL THEN
        v_outcome := jsonb_build_object(
            'decision', v_kind, 'carried_out', false,
            'status', CASE WHEN v_cmd.command_id IS NOT NULL THEN v_cmd.status END,
            'operator', p->>'operator', 'reason', v_reason, 'detail', v_detail,
            'request_id', p->>'request_id', 'domain', v_domain, 'command_id', v_cid,
            'parking_id', v_parking);
        INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
        VALUES (v_key, v_domain, v_cid, v_kind, v_outcome);
        RETURN v_outcome;
    END IF;

    -- Every refusal is checked before anything is written: a soft refusal (a preview, a bulk
    -- operation) returns with nothing to undo.
    -- Four eyes: an operator's own decision of a kind a matching policy asks approval for is
    -- refused (its workflow makes it a proposal; it had not read that policy yet).
    IF v_by IS NULL AND p->>'via' IN ('signal', 'update', 'bulk') AND coalesce(
        tsq.command_policy(v_domain, v_cmd.command_type, v_cmd.last_error_code)
            -> 'require_approval' ? v_kind, false) THEN
        RETURN tsq.refuse(v_soft, 'TQ004', format('a %s of command %s needs another '
            'operator''s approval (a policy of domain %s asks for it): send the decision again '
            'and it becomes a proposal', v_kind, v_cid, v_domain));
    END IF;
    -- Another operator's claim holds the decision back, unless forced (audited below).
    SELECT * INTO v_claim FROM tsq.claim WHERE parking_id = v_parking AND until > now()
        AND NOT coalesce(tsq.same_operator(claimed_by, p->>'operator')
                         OR tsq.same_operator(claimed_by, v_by), false);
    IF FOUND AND NOT coalesce((p->>'force')::boolean, false) THEN
        RETURN tsq.refuse(v_soft, 'TQ003', format('command %s is claimed by %s until %s: '
            'ask them, wait for the claim to end, or decide with force (audited)', v_cid,
            v_claim.claimed_by,
            to_char(v_claim.until AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"Z"')));
    END IF;
    IF v_kind = 'retry' THEN
        SELECT m.message, m.source INTO v_message, v_source
        FROM tsq.original_message(v_domain, v_cid) m;
        v_queue := coalesce(nullif(v_cmd.queue_name, ''), v_domain || '__commands');
        IF v_message IS NULL THEN
            RETURN tsq.refuse(v_soft, 'TQ002', format('cannot retry command %s: its original '
                'message is neither in pgmq.a_%s (msg_id %s) nor in commandbus.payload_archive; '
                'nothing was changed', v_cid, v_queue, coalesce(v_cmd.msg_id::text, 'none')));
        END IF;
        IF v_queue !~ '^[A-Za-z_][A-Za-z0-9_]{0,46}$' THEN
            RETURN tsq.refuse(v_soft, 'TQ001', format('cannot retry command %s: %s is not a '
                'valid PGMQ queue name (letters, digits and _, starting with a letter or _, at '
                'most 47 characters)', v_cid, quote_literal(v_queue)));
        END IF;
        IF jsonb_typeof(p->'patch') = 'object' THEN
            -- Edit and retry: only the edited message is sent; the original stays archived.
            v_patched := tsq.merge_patch(v_message, p->'patch');
            SELECT string_agg(k, ', ') INTO v_changed
            FROM unnest(ARRAY['command_id', 'domain', 'type', 'command_type', 'correlation_id']) k
            WHERE v_message -> k IS DISTINCT FROM v_patched -> k;
            IF v_changed IS NOT NULL OR jsonb_typeof(v_patched) <> 'object' THEN
                RETURN tsq.refuse(v_soft, 'TQ001', format('cannot retry command %s with this '
                    'patch: it changes %s; an edited message is still the same command', v_cid,
                    coalesce(v_changed, 'the whole message')));
            END IF;
        END IF;
    ELSE
        v_queue := nullif(v_cmd.reply_queue, '');
        IF v_queue !~ '^[A-Za-z_][A-Za-z0-9_]{0,46}$' THEN
            RETURN tsq.refuse(v_soft, 'TQ001', format('cannot send the reply of command %s: '
                '%s is not a valid PGMQ queue name (letters, digits and _, starting with a '
                'letter or _, at most 47 characters)', v_cid, quote_literal(v_queue)));
        END IF;
    END IF;

    v_links := jsonb_strip_nulls(jsonb_build_object(
        'workflow_id', p->>'workflow_id', 'via', p->>'via', 'parking_id', v_parking,
        'bulk_id', p->>'bulk_id'));
    IF v_claim.parking_id IS NOT NULL THEN
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        VALUES (v_domain, v_cid, 'TSQ_CLAIM_FORCED', jsonb_build_object(
            'operator', p->>'operator', 'decision', v_kind, 'claimed_by', v_claim.claimed_by,
            'claimed_until', v_claim.until) || v_links);
    END IF;
    IF v_by IS NOT NULL THEN
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        VALUES (v_domain, v_cid, 'TSQ_APPROVED', jsonb_strip_nulls(jsonb_build_object(
            'operator', v_by, 'proposed_by', p->>'operator', 'decision', v_kind,
            'comment', p->>'approval_comment')) || v_links);
    END IF;
    DELETE FROM tsq.claim WHERE parking_id = v_parking;

    PERFORM set_config('tsq.decided_by', coalesce(p->>'decided_by', 'workflow'), true);
    IF v_kind = 'retry' THEN
        v_msg_id := tsq.send(v_queue, coalesce(v_patched, v_message));
        UPDATE commandbus.command
        SET status = p->>'status_after', updated_at = now(), attempts = 0, msg_id = v_msg_id,
            last_error_type = NULL, last_error_code = NULL, last_error_msg = NULL
        WHERE domain = v_domain AND command_id = v_cid;
        v_details := jsonb_build_object('operator', p->>'operator', 'new_msg_id', v_msg_id,
            'old_msg_id', v_cmd.msg_id, 'payload_from', v_source);
        IF v_patched IS NOT NULL THEN
            v_details := v_details || jsonb_build_object('patch', p->'patch',
                'message_sha256_before', tsq.sha256(v_message),
                'message_sha256_after', tsq.sha256(v_patched));
        END IF;
        v_outcome := jsonb_build_object('new_msg_id', v_msg_id,
            'detail', format('retried%s; message %s sent to %s',
                CASE WHEN v_patched IS NOT NULL THEN ' with the edited message' ELSE '' END,
                v_msg_id, v_queue));
    ELSE
        IF v_queue IS NOT NULL THEN
            v_msg_id := tsq.send(v_queue, tsq.reply_body(v_cmd, p->>'reply_outcome',
                CASE WHEN v_kind = 'cancel' THEN v_reason END, v_data));
        END IF;
        UPDATE commandbus.command SET status = p->>'status_after', updated_at = now()
        WHERE domain = v_domain AND command_id = v_cid;
        v_details := jsonb_build_object('operator', p->>'operator');
        IF v_kind = 'cancel' THEN
            v_details := v_details || jsonb_build_object('reason', v_reason);
        ELSE
            v_details := v_details || jsonb_build_object(
                'has_result_data', v_data IS NOT NULL, 'result_data', v_data);
        END IF;
        v_details := v_details || jsonb_build_object('reply_to', v_queue, 'reply_msg_id', v_msg_id);
        IF v_queue IS NULL THEN
            v_details := v_details || jsonb_build_object(
                'note', 'the command has no reply queue: no reply was sent');
        END IF;
        v_outcome := jsonb_build_object('reply_queue', v_queue, 'reply_msg_id', v_msg_id,
            'result_data', CASE WHEN v_kind = 'complete' THEN v_data END,
            'detail', CASE WHEN v_queue IS NULL
                THEN format('%s; no reply queue, no reply sent', p->>'past')
                ELSE format('%s; reply %s sent to %s', p->>'past', v_msg_id, v_queue) END);
    END IF;
    v_details := v_details || v_links
        || jsonb_strip_nulls(jsonb_build_object('approved_by', v_by));
    INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
    VALUES (v_domain, v_cid, p->>'audit_event', v_details)
    RETURNING audit_id INTO v_audit_id;
    v_outcome := v_outcome || jsonb_build_object(
        'decision', v_kind, 'carried_out', true, 'status', p->>'status_after',
        'operator', p->>'operator', 'reason', v_reason, 'audit_id', v_audit_id,
        'request_id', p->>'request_id', 'domain', v_domain, 'command_id', v_cid,
        'parking_id', v_parking, 'approved_by', v_by, 'bulk_id', p->>'bulk_id');
    INSERT INTO tsq.effect (effect_key, domain, command_id, kind, result)
    VALUES (v_key, v_domain, v_cid, v_kind, v_outcome);
    -- Last: the batch row stays locked only until the commit, while other decisions of the
    -- batch wait for it. The command bus's own counter functions (or tsq's where it had none).
    IF v_cmd.batch_id IS NOT NULL THEN
        CASE p->>'batch_update'
            WHEN 'tsq_cancel' THEN PERFORM commandbus.sp_tsq_cancel(v_domain, v_cmd.batch_id);
            WHEN 'tsq_complete' THEN PERFORM commandbus.sp_tsq_complete(v_domain, v_cmd.batch_id);
            WHEN 'tsq_retry' THEN PERFORM commandbus.sp_tsq_retry(v_domain, v_cmd.batch_id);
        END CASE;
    END IF;
    RETURN v_outcome;
END;
$fn$;

-- A message in a PGMQ queue by id (a preview reads back what a decision would send).
CREATE OR REPLACE FUNCTION tsq.queued_message(p_queue TEXT, p_msg_id BIGINT) RETURNS JSONB
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_queue TEXT := tsq.queue_named(p_queue);
    v_message JSONB;
BEGIN
    IF v_queue IS NULL OR p_msg_id IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT message FROM pgmq.%I WHERE msg_id = $1',
        pgmq.format_table_name(v_queue, 'q')) INTO v_message USING p_msg_id;
    RETURN v_message;
END;
$fn$;

-- What tsq.decide(p) would do, read back inside the caller's transaction, which then rolls
-- back (`tsq retry ... --dry-run`): the status before and after, the reply or the message
-- re-sent with its queue, the audit rows, the batch before and after. Nothing it wrote
-- survives the rollback; NOTIFY is only delivered on commit.
CREATE OR REPLACE FUNCTION tsq.preview(p JSONB) RETURNS JSONB
LANGUAGE plpgsql AS $fn$
DECLARE
    v_domain TEXT := p->>'domain';
    v_cid UUID := (p->>'command_id')::uuid;
    v_before commandbus.command%ROWTYPE;
    v_after commandbus.command%ROWTYPE;
    v_batch_before commandbus.batch%ROWTYPE;
    v_batch_after commandbus.batch%ROWTYPE;
    v_last_audit BIGINT;
    v_outcome JSONB;
    v_queue TEXT;
BEGIN
    SELECT * INTO v_before FROM commandbus.command WHERE domain = v_domain AND command_id = v_cid;
    SELECT * INTO v_batch_before FROM commandbus.batch
    WHERE domain = v_domain AND batch_id = v_before.batch_id;
    SELECT coalesce(max(audit_id), 0) INTO v_last_audit FROM commandbus.audit
    WHERE command_id IN (v_cid, v_before.batch_id);
    v_outcome := tsq.decide(p || '{"preview": true}');
    IF v_outcome ? 'refused' THEN
        RETURN v_outcome;
    END IF;
    IF NOT (v_outcome->>'carried_out')::boolean THEN
        RETURN jsonb_build_object('outcome', v_outcome, 'status_before', v_before.status);
    END IF;
    SELECT * INTO v_after FROM commandbus.command WHERE domain = v_domain AND command_id = v_cid;
    SELECT * INTO v_batch_after FROM commandbus.batch
    WHERE domain = v_domain AND batch_id = v_before.batch_id;
    v_queue := coalesce(v_outcome->>'reply_queue',
        coalesce(nullif(v_before.queue_name, ''), v_domain || '__commands'));
    RETURN jsonb_build_object(
        'outcome', v_outcome,
        'status_before', v_before.status,
        'status_after', v_after.status,
        'reply', CASE WHEN v_outcome->>'reply_msg_id' IS NOT NULL THEN jsonb_build_object(
            'queue', v_queue,
            'body', tsq.queued_message(v_queue, (v_outcome->>'reply_msg_id')::bigint)) END,
        'message', CASE WHEN v_outcome->>'new_msg_id' IS NOT NULL THEN jsonb_build_object(
            'queue', v_queue,
            'body', tsq.queued_message(v_queue, (v_outcome->>'new_msg_id')::bigint)) END,
        'audit', (SELECT jsonb_agg(jsonb_build_object('event_type', event_type,
                'command_id', command_id, 'details', details_json) ORDER BY audit_id)
            FROM commandbus.audit
            WHERE command_id IN (v_cid, v_before.batch_id) AND audit_id > v_last_audit),
        'batch', CASE WHEN v_batch_before.batch_id IS NOT NULL THEN jsonb_build_object(
            'batch_id', v_batch_before.batch_id,
            'before', to_jsonb(v_batch_before),
            'after', to_jsonb(v_batch_after),
            'closes', v_batch_before.completed_at IS NULL
                AND v_batch_after.completed_at IS NOT NULL) END);
END;
$fn$;

-- Notifications to operators (TSQ_NOTIFY_URL): a digest per domain and error code at most
-- once per window, kept until delivered. The key travels with each delivery, so a receiver
-- can drop a redelivery.
CREATE TABLE IF NOT EXISTS tsq.notice_group (
    kind            TEXT NOT NULL,
    domain          TEXT NOT NULL,
    error_code      TEXT NOT NULL,
    pending         INT NOT NULL DEFAULT 0,
    last_sent_at    TIMESTAMPTZ,
    PRIMARY KEY (kind, domain, error_code)
);
CREATE TABLE IF NOT EXISTS tsq.notice (
    notice_id        BIGSERIAL PRIMARY KEY,
    idempotency_key  TEXT NOT NULL UNIQUE,
    body             JSONB NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    sent_at          TIMESTAMPTZ,
    attempts         INT NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    last_error       TEXT
);
CREATE INDEX IF NOT EXISTS tsq_notice_unsent ON tsq.notice (next_attempt_at) WHERE sent_at IS NULL;

-- What the worker role (the worker, the SDK, the CLI) may do, and no more: it reads and moves
-- commands and batches, adds audit rows but never changes or removes one, and keeps tsq's own
-- records. It owns nothing, so it cannot switch the audit table's append-only trigger off.
CREATE OR REPLACE FUNCTION tsq.grant_worker(p_role TEXT) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    v_statement TEXT;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role % does not exist: create it first (CREATE ROLE % LOGIN PASSWORD ...)',
            quote_ident(p_role), quote_ident(p_role) USING ERRCODE = 'undefined_object';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role AND rolsuper) THEN
        RAISE EXCEPTION 'role % is a superuser: a superuser can rewrite the audit trail; give the '
            'worker a role of its own', quote_ident(p_role) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_statement IN ARRAY ARRAY[
        'GRANT USAGE ON SCHEMA commandbus, tsq, pgmq TO %I',
        'GRANT SELECT, UPDATE ON commandbus.command, commandbus.batch TO %I',
        'GRANT SELECT, INSERT ON commandbus.audit TO %I',
        'GRANT USAGE ON SEQUENCE ' || pg_get_serial_sequence('commandbus.audit', 'audit_id')
            || ' TO %I',
        'GRANT SELECT ON commandbus.payload_archive, pgmq.meta TO %I',
        -- tsq's own tables, whatever later versions add; records it never rewrites below.
        'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA tsq TO %I',
        'GRANT USAGE ON ALL SEQUENCES IN SCHEMA tsq TO %I',
        'REVOKE UPDATE, DELETE ON tsq.effect, tsq.migration FROM %I',
        'REVOKE INSERT ON tsq.migration FROM %I'
    ] LOOP
        EXECUTE format(v_statement, p_role);
    END LOOP;
END;
$fn$;
