-- Bulk operations: one decision for many commands, carried out in chunks at database speed.
--
-- The selection is frozen when the operation starts: one `tsq.bulk_item` per command, in the
-- order they are decided, with the parking each was selected in. Its workflow
-- (`tsq-bulk:<id>`) only calls tsq.bulk_chunk until nothing is left, so its history does not
-- grow with the selection. Each item is decided by tsq.decide under its command's own effect
-- key (the one its troubleshooting workflow would use): whoever decides a parking first, the
-- bulk operation, the command's workflow or another bulk operation, is the only one who does,
-- and the others find the recorded outcome.
CREATE TABLE IF NOT EXISTS tsq.bulk (
    bulk_id            UUID PRIMARY KEY,
    domain             TEXT NOT NULL,
    decision           TEXT NOT NULL CHECK (decision IN ('cancel', 'retry', 'complete')),
    operator           TEXT NOT NULL,
    -- tsq.decide's input without the command: what every item is decided with.
    request            JSONB NOT NULL,
    -- How the commands were selected, as the operator gave it (filters, stdin, all).
    selection          TEXT NOT NULL,
    total              INT NOT NULL,
    -- Decisions per second at most; NULL: as fast as the database takes them.
    rate               DOUBLE PRECISION CHECK (rate > 0),
    -- Items per result ('carried_out', 'already_decided', ...).
    counts             JSONB NOT NULL DEFAULT '{}',
    status             TEXT NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'stopped', 'finished')),
    created_at         TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    stop_requested_by  TEXT,
    stop_requested_at  TIMESTAMPTZ,
    last_effect_at     TIMESTAMPTZ,
    finished_at        TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS tsq_bulk_domain ON tsq.bulk (domain, created_at);

CREATE TABLE IF NOT EXISTS tsq.bulk_item (
    bulk_id     UUID NOT NULL REFERENCES tsq.bulk ON DELETE CASCADE,
    seq         INT NOT NULL,
    command_id  UUID NOT NULL,
    parking_id  BIGINT,
    -- NULL until decided; then what happened (see tsq.bulk_chunk).
    result      TEXT,
    detail      TEXT,
    decided_at  TIMESTAMPTZ,
    PRIMARY KEY (bulk_id, seq)
);
CREATE INDEX IF NOT EXISTS tsq_bulk_item_todo ON tsq.bulk_item (bulk_id, seq) WHERE result IS NULL;

-- Two count objects added key by key.
CREATE OR REPLACE FUNCTION tsq.add_counts(a JSONB, b JSONB) RETURNS JSONB
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT coalesce(jsonb_object_agg(key, total), '{}') FROM (
        SELECT key, sum(value::int) AS total
        FROM (SELECT * FROM jsonb_each_text(a) UNION ALL SELECT * FROM jsonb_each_text(b)) t
        GROUP BY key) s
$fn$;

-- The decision tsq recorded for a command's latest parking that had one carried out, or NULL:
-- who decided a command that is no longer in the queue.
CREATE OR REPLACE FUNCTION tsq.last_decision(p_domain TEXT, p_command UUID) RETURNS JSONB
LANGUAGE sql STABLE AS $fn$
    SELECT e.result FROM tsq.parking p
    JOIN tsq.effect e ON e.effect_key = format('tsq:%s:%s/parking/%s/decision',
        p.domain, p.command_id, p.parking_id)
    WHERE p.domain = p_domain AND p.command_id = p_command
        AND (e.result->>'carried_out')::boolean
    ORDER BY p.parking_id DESC LIMIT 1
$fn$;

-- What a bulk item another decision beat says: 'already decided: cancel by ann', and the
-- bulk operation's id when the winner was one. `p_result` is the winner's recorded outcome.
CREATE OR REPLACE FUNCTION tsq.decided_by(p_result JSONB) RETURNS TEXT
LANGUAGE sql STABLE AS $fn$
    SELECT format('already decided: %s by %s%s', p_result->>'decision',
        coalesce(p_result->>'operator', 'an unnamed operator'),
        CASE WHEN p_result->>'bulk_id' IS NOT NULL
            THEN format(' in bulk operation %s', p_result->>'bulk_id') ELSE '' END)
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

-- Ask a bulk operation to stop: no chunk decides anything once this commits (it waits for the
-- chunk that runs now). What was committed stays. Returns the operation; NULL if none.
CREATE OR REPLACE FUNCTION tsq.bulk_stop(p_bulk UUID, p_operator TEXT) RETURNS tsq.bulk
LANGUAGE sql AS $fn$
    UPDATE tsq.bulk SET stop_requested_by = coalesce(stop_requested_by, p_operator),
        stop_requested_at = coalesce(stop_requested_at, clock_timestamp())
    WHERE bulk_id = p_bulk
    RETURNING *
$fn$;

-- The end of a bulk operation: stopped if a stop was asked for, else finished (nothing left).
CREATE OR REPLACE FUNCTION tsq.bulk_finish(p_bulk UUID) RETURNS tsq.bulk
LANGUAGE sql AS $fn$
    UPDATE tsq.bulk SET
        status = CASE WHEN status <> 'running' THEN status
                      WHEN stop_requested_at IS NOT NULL THEN 'stopped' ELSE 'finished' END,
        finished_at = coalesce(finished_at, clock_timestamp())
    WHERE bulk_id = p_bulk
    RETURNING *
$fn$;

-- The next item a chunk would decide, failed with `p_problem`: a chunk of one that the
-- database refused for a reason retrying cannot fix (data it will not store). The others go on.
CREATE OR REPLACE FUNCTION tsq.bulk_fail_next(p_bulk UUID, p_problem TEXT) RETURNS JSONB
LANGUAGE plpgsql AS $fn$
DECLARE
    v_domain TEXT;
    v_item RECORD;
BEGIN
    SELECT domain INTO v_domain FROM tsq.bulk WHERE bulk_id = p_bulk FOR NO KEY UPDATE;
    FOR v_item IN
        SELECT * FROM tsq.bulk_item WHERE bulk_id = p_bulk AND result IS NULL
        ORDER BY seq FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM 1 FROM commandbus.command
        WHERE domain = v_domain AND command_id = v_item.command_id FOR UPDATE SKIP LOCKED;
        IF NOT FOUND AND EXISTS (SELECT 1 FROM commandbus.command
                WHERE domain = v_domain AND command_id = v_item.command_id) THEN
            CONTINUE;
        END IF;
        UPDATE tsq.bulk_item SET result = 'error', detail = p_problem,
            decided_at = clock_timestamp()
        WHERE bulk_id = p_bulk AND seq = v_item.seq;
        UPDATE tsq.bulk SET counts = tsq.add_counts(counts, '{"error": 1}')
        WHERE bulk_id = p_bulk;
        EXIT;
    END LOOP;
    RETURN tsq.bulk_chunk(p_bulk, 0);
END;
$fn$;
