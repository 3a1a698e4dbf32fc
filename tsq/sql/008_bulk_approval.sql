-- A bulk decision under four eyes: when a policy asks approval for the decision of any command
-- selected, the operation as a whole is a proposal (status 'proposed') that another operator
-- approves once, or rejects, before it expires; approved, each item is decided as approved by
-- that operator (its TSQ_APPROVED row in the item's own transaction).
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS operator_key TEXT;
-- Items of the selection a policy asks approval for, when it was frozen.
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS needing_approval INT NOT NULL DEFAULT 0;
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS approval_expires_at TIMESTAMPTZ;
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS approved_by TEXT;
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS approved_by_key TEXT;
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS approved_at TIMESTAMPTZ;
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS approval_comment TEXT;
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS rejected_by TEXT;
ALTER TABLE tsq.bulk ADD COLUMN IF NOT EXISTS rejection_reason TEXT;
ALTER TABLE tsq.bulk DROP CONSTRAINT IF EXISTS bulk_status_check;
ALTER TABLE tsq.bulk ADD CONSTRAINT bulk_status_check
    CHECK (status IN ('proposed', 'running', 'stopped', 'finished', 'rejected', 'expired'));

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
            -- An operation under four eyes decides each item as approved by its approver.
            v_result := tsq.decide(v_bulk.request || jsonb_strip_nulls(jsonb_build_object(
                'approved_by', v_bulk.approved_by, 'approved_by_key', v_bulk.approved_by_key,
                'approval_comment', v_bulk.approval_comment)) || jsonb_build_object(
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

-- The end of a bulk operation: stopped if a stop was asked for (a proposal too), else finished.
CREATE OR REPLACE FUNCTION tsq.bulk_finish(p_bulk UUID) RETURNS tsq.bulk
LANGUAGE sql AS $fn$
    UPDATE tsq.bulk SET
        status = CASE WHEN status NOT IN ('running', 'proposed') THEN status
                      WHEN stop_requested_at IS NOT NULL THEN 'stopped' ELSE 'finished' END,
        finished_at = coalesce(finished_at, clock_timestamp())
    WHERE bulk_id = p_bulk
    RETURNING *
$fn$;
