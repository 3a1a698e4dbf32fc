-- The rules of a command's life (workflows/rules.py), as far as the database holds them: names
-- compared by the key tsq computes, a proposal waiting holds every other decision back (a bulk
-- operation's item included), no decision that needs approval without one whoever makes it,
-- edits of the command's data only, and no duration past ten years.

ALTER TABLE tsq.claim ADD COLUMN IF NOT EXISTS claimed_by_key TEXT;
UPDATE tsq.claim SET claimed_by_key = lower(btrim(claimed_by)) WHERE claimed_by_key IS NULL;

-- Proposals: a decision waiting for a second operator's approval. Its workflow writes it (with
-- its count of its events, `seq`, so a late write never undoes a later one) and ends it when
-- it is rejected, expires or is voided; its approved decision ends it in its own transaction.
CREATE TABLE IF NOT EXISTS tsq.proposal (
    parking_id   BIGINT PRIMARY KEY REFERENCES tsq.parking,
    domain       TEXT NOT NULL,
    command_id   UUID NOT NULL,
    decision     TEXT NOT NULL,
    proposed_by  TEXT NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    ended        BOOLEAN NOT NULL DEFAULT false,
    seq          INT NOT NULL
);

-- Time never moves further than ten years ahead: a policy's durations neither (rows written
-- before are left as they are; the workflow treats a date past what it can hold as never).
ALTER TABLE tsq.policy ADD CONSTRAINT tsq_policy_at_most_ten_years CHECK (
    escalate_after <= interval '3653 days' AND expire_after <= interval '3653 days'
    AND approval_expires_after <= interval '3653 days') NOT VALID;

-- Names are compared by the key tsq computes (tsq.decide's operator_key).
DROP FUNCTION IF EXISTS tsq.same_operator(TEXT, TEXT);

-- One decision, as one transaction (the caller's): the guarded status change, the reply or the
-- message re-sent, the audit row, the batch counters and the idempotency record. `p` is the
-- decision: effect_key, domain, command_id, parking_id (NULL: a workflow of tsq 0.1, guarded by
-- status only), decision, status_after, audit_event, reply_outcome, batch_update, operator,
-- reason, result_data, via, request_id, workflow_id, decided_by, patch (a retry's merge patch
-- of the original message), force (over another operator's claim), approved_by and
-- approval_comment (a proposal approved; approval_audited when its audit row was written when
-- it was approved), operator_key and approved_by_key (the names as tsq compares them, see
-- `operator_key` in tsq/contract.py), bulk_id (a bulk operation's), soft. Returns the outcome,
-- which is recorded under
-- effect_key: run again, it returns the same outcome and changes nothing. Refusals that
-- retrying cannot fix raise SQLSTATE TQ001 (bad input), TQ002 (no original message to re-send),
-- TQ003 (claimed by another operator), TQ004 (needs approval) or TQ005 (a proposal waits for
-- approval), and roll everything back
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
    v_proposal tsq.proposal%ROWTYPE;
    v_patched JSONB;
    v_changed TEXT;
    v_by TEXT := p->>'approved_by';
    -- Names as tsq compares them; a request written before the keys is compared trimmed and
    -- case-insensitively, as it was then.
    v_operator_key TEXT := coalesce(p->>'operator_key', lower(btrim(p->>'operator')));
    v_by_key TEXT := coalesce(p->>'approved_by_key', lower(btrim(p->>'approved_by')));
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
    -- While a proposal waits, only its approval decides the parking: a bulk operation's item is
    -- refused as a claim refuses it (its workflow refuses the others before they get here).
    SELECT * INTO v_proposal FROM tsq.proposal WHERE parking_id = v_parking AND NOT ended;
    IF FOUND AND p->>'via' IS DISTINCT FROM 'approval' THEN
        RETURN tsq.refuse(v_soft, 'TQ005', format('command %s has a %s proposed by %s awaiting '
            'another operator''s approval: approve or reject it first', v_cid,
            v_proposal.decision, v_proposal.proposed_by));
    END IF;
    -- Four eyes: no decision of a kind a matching policy asks approval for without an approval,
    -- whoever made it (an operator, a bulk operation, the policy's expiry, a scheduled retry):
    -- its workflow makes it a proposal; it had not read that policy yet.
    IF v_by IS NULL AND p->>'via' IS DISTINCT FROM 'approval' AND coalesce(
        tsq.command_policy(v_domain, v_cmd.command_type, v_cmd.last_error_code)
            -> 'require_approval' ? v_kind, false) THEN
        RETURN tsq.refuse(v_soft, 'TQ004', format('a %s of command %s needs another '
            'operator''s approval (a policy of domain %s asks for it): send the decision again '
            'and it becomes a proposal', v_kind, v_cid, v_domain));
    END IF;
    -- Another operator's claim holds the decision back, unless forced (audited below).
    SELECT * INTO v_claim FROM tsq.claim WHERE parking_id = v_parking AND until > now()
        AND claimed_by_key IS DISTINCT FROM v_operator_key
        AND claimed_by_key IS DISTINCT FROM v_by_key;
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
        IF p ? 'patch' AND jsonb_typeof(p->'patch') <> 'null' THEN
            -- Edit and retry, of the command's data only: the rest of the message says which
            -- command it is and where its reply goes. Only the edited message is sent; the
            -- original stays archived.
            v_patched := tsq.merge_patch(v_message, p->'patch');
            SELECT string_agg(k, ', ' ORDER BY k) INTO v_changed
            FROM (SELECT jsonb_object_keys(v_message) UNION
                  SELECT jsonb_object_keys(v_patched) WHERE jsonb_typeof(v_patched) = 'object') keys(k)
            WHERE k <> 'data' AND v_message -> k IS DISTINCT FROM v_patched -> k;
            IF v_changed IS NOT NULL OR jsonb_typeof(v_patched) IS DISTINCT FROM 'object'
                    OR jsonb_typeof(v_patched -> 'data') IS DISTINCT FROM 'object' THEN
                RETURN tsq.refuse(v_soft, 'TQ001', format('cannot retry command %s with this '
                    'patch: an edit changes the command''s data only (an object), and this one '
                    'changes %s', v_cid, coalesce(v_changed, 'what the data is')));
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
    IF v_by IS NOT NULL AND NOT coalesce((p->>'approval_audited')::boolean, false) THEN
        INSERT INTO commandbus.audit (domain, command_id, event_type, details_json)
        VALUES (v_domain, v_cid, 'TSQ_APPROVED', jsonb_strip_nulls(jsonb_build_object(
            'operator', v_by, 'proposed_by', p->>'operator', 'decision', v_kind,
            'comment', p->>'approval_comment')) || v_links);
    END IF;
    DELETE FROM tsq.claim WHERE parking_id = v_parking;
    UPDATE tsq.proposal SET ended = true WHERE parking_id = v_parking AND NOT ended;

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

-- Decide up to p_limit items of a bulk operation, in one transaction (the caller's). Items
-- whose command row another transaction holds (the bus, the command's own workflow deciding
-- it right now) are left for a later chunk, as are items another chunk holds. Run again after
-- a crash, a chunk finds the items it committed decided, and the effects recorded under their
-- keys. Returns {"done": items decided now, "remaining": items not decided yet, "stopped":
-- a stop was asked for (nothing decided then), "counts": the operation's counts}.
CREATE OR REPLACE FUNCTION tsq.bulk_chunk(p_bulk UUID, p_limit INT) RETURNS JSONB
LANGUAGE plpgsql AS $fn$
DECLARE
    v_bulk tsq.bulk%ROWTYPE;
    v_item RECORD;
    v_wid TEXT;
    v_result JSONB;
    v_kind TEXT;
    v_detail TEXT;
    v_counts JSONB := '{}';
    v_done INT := 0;
BEGIN
    -- Locked until the commit: a stop (tsq.bulk_stop) waits for the chunk that runs, and once
    -- it has committed no chunk decides anything more.
    SELECT * INTO v_bulk FROM tsq.bulk WHERE bulk_id = p_bulk FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no bulk operation %', p_bulk USING ERRCODE = 'TQ001';
    END IF;
    IF v_bulk.stop_requested_at IS NULL AND v_bulk.status = 'running' THEN
        FOR v_item IN
            SELECT * FROM tsq.bulk_item WHERE bulk_id = p_bulk AND result IS NULL
            ORDER BY seq LIMIT p_limit FOR UPDATE SKIP LOCKED
        LOOP
            PERFORM 1 FROM commandbus.command
            WHERE domain = v_bulk.domain AND command_id = v_item.command_id
            FOR UPDATE SKIP LOCKED;
            IF NOT FOUND AND EXISTS (SELECT 1 FROM commandbus.command
                    WHERE domain = v_bulk.domain AND command_id = v_item.command_id) THEN
                CONTINUE;  -- held by another transaction: a later chunk
            END IF;
            v_wid := format('tsq:%s:%s', v_bulk.domain, v_item.command_id);
            v_result := tsq.decide(v_bulk.request || jsonb_build_object(
                'effect_key', format('%s/parking/%s/decision', v_wid, v_item.parking_id),
                'workflow_id', v_wid,
                'domain', v_bulk.domain,
                'command_id', v_item.command_id,
                'parking_id', v_item.parking_id,
                'soft', true));
            IF v_result ? 'refused' THEN
                v_kind := CASE v_result->'refused'->>'sqlstate'
                    WHEN 'TQ002' THEN 'payload_not_found'
                    WHEN 'TQ003' THEN 'claimed'
                    WHEN 'TQ004' THEN 'needs_approval'
                    WHEN 'TQ005' THEN 'proposal_pending'
                    ELSE 'invalid' END;
                v_detail := v_result->'refused'->>'message';
            ELSIF (v_result->>'carried_out')::boolean
                    AND v_result->>'bulk_id' IS NOT DISTINCT FROM p_bulk::text THEN
                v_kind := 'carried_out';
                v_detail := v_result->>'detail';
            ELSIF (v_result->>'carried_out')::boolean THEN
                v_kind := 'already_decided';
                v_detail := tsq.decided_by(v_result);
            ELSIF v_result->>'status' IS NULL THEN
                v_kind := 'not_found';
                v_detail := v_result->>'detail';
            ELSE
                v_kind := 'not_in_troubleshooting_queue';
                v_detail := v_result->>'detail';
            END IF;
            UPDATE tsq.bulk_item SET result = v_kind, detail = v_detail,
                decided_at = clock_timestamp()
            WHERE bulk_id = p_bulk AND seq = v_item.seq;
            v_counts := tsq.add_counts(v_counts, jsonb_build_object(v_kind, 1));
            v_done := v_done + 1;
        END LOOP;
        IF v_done > 0 THEN
            UPDATE tsq.bulk SET counts = tsq.add_counts(counts, v_counts),
                last_effect_at = CASE WHEN v_counts ? 'carried_out' THEN clock_timestamp()
                                      ELSE last_effect_at END
            WHERE bulk_id = p_bulk
            RETURNING counts INTO v_counts;
        ELSE
            v_counts := v_bulk.counts;
        END IF;
    ELSE
        v_counts := v_bulk.counts;
    END IF;
    RETURN jsonb_build_object(
        'done', v_done,
        'remaining', (SELECT count(*) FROM tsq.bulk_item WHERE bulk_id = p_bulk AND result IS NULL),
        'stopped', v_bulk.stop_requested_at IS NOT NULL OR v_bulk.status = 'stopped',
        'counts', v_counts);
END;
$fn$;
