-- Policies: what happens to a parked command that nobody decides, and which decisions need a
-- second operator. For a domain, optionally narrowed by command type and/or error code (the
-- most specific match gives the deadlines): escalate after a while, expire after a while with
-- a decision (cancel with a reason, or complete with result data). Approvals add up: every
-- matching policy's `require_approval` applies. Every change is audited as TSQ_POLICY_CHANGED
-- under the policy's own id.
CREATE TABLE IF NOT EXISTS tsq.policy (
    policy_id           UUID NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    domain              TEXT NOT NULL,
    name                TEXT NOT NULL,
    command_type        TEXT,
    error_code          TEXT,
    escalate_after      INTERVAL CHECK (escalate_after > interval '0'),
    expire_after        INTERVAL CHECK (expire_after > interval '0'),
    expire_decision     TEXT CHECK (expire_decision IN ('cancel', 'complete')),
    expire_reason       TEXT,
    expire_result_data  JSONB,
    require_approval    TEXT[] NOT NULL DEFAULT '{}'
        CHECK (require_approval <@ ARRAY['cancel', 'retry', 'complete']),
    approval_expires_after INTERVAL CHECK (approval_expires_after > interval '0'),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    updated_by          TEXT,
    PRIMARY KEY (domain, name),
    CHECK ((expire_after IS NULL) = (expire_decision IS NULL)),
    CHECK (expire_decision IS DISTINCT FROM 'cancel' OR expire_reason IS NOT NULL)
);
-- One policy per exact match: the most specific one is never a tie.
CREATE UNIQUE INDEX IF NOT EXISTS tsq_policy_match
    ON tsq.policy (domain, coalesce(command_type, ''), coalesce(error_code, ''));

-- Policy changes the watcher has still to tell the waiting workflows of their domain about.
CREATE TABLE IF NOT EXISTS tsq.policy_change (
    change_id      BIGSERIAL PRIMARY KEY,
    domain         TEXT NOT NULL,
    changed_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    claimed_until  TIMESTAMPTZ
);

-- The policy of a command as it was parked (its type and error code): the most specific match.
-- A type beats an error code when each narrows one policy.
CREATE OR REPLACE FUNCTION tsq.policy_for(p_domain TEXT, p_type TEXT, p_code TEXT)
RETURNS tsq.policy LANGUAGE sql STABLE AS $fn$
    SELECT * FROM tsq.policy
    WHERE domain = p_domain
      AND (command_type IS NULL OR command_type = p_type)
      AND (error_code IS NULL OR error_code = p_code)
    ORDER BY (command_type IS NOT NULL) AND (error_code IS NOT NULL) DESC,
        command_type IS NOT NULL DESC, error_code IS NOT NULL DESC
    LIMIT 1
$fn$;

-- A policy as the workflow follows it (durations in seconds); NULL for no policy.
CREATE OR REPLACE FUNCTION tsq.policy_view(p tsq.policy) RETURNS JSONB
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE WHEN p.name IS NOT NULL THEN jsonb_strip_nulls(jsonb_build_object(
        'name', p.name,
        'escalate_after', extract(epoch FROM p.escalate_after),
        'expire_after', extract(epoch FROM p.expire_after),
        'expire_decision', p.expire_decision,
        'expire_reason', p.expire_reason,
        'expire_result_data', p.expire_result_data)) END
$fn$;

-- The policy a command follows, as its workflow takes it (see tsq.policy_view): the deadlines
-- of the most specific match, and the approvals of every match (the shortest expiry of those).
CREATE OR REPLACE FUNCTION tsq.command_policy(p_domain TEXT, p_type TEXT, p_code TEXT)
RETURNS JSONB LANGUAGE sql STABLE AS $fn$
    WITH approval AS (
        SELECT coalesce(array_agg(DISTINCT kind ORDER BY kind), '{}') AS kinds,
            extract(epoch FROM min(p.approval_expires_after)) AS expires
        FROM tsq.policy p CROSS JOIN LATERAL unnest(p.require_approval) AS kind
        WHERE p.domain = p_domain
          AND (p.command_type IS NULL OR p.command_type = p_type)
          AND (p.error_code IS NULL OR p.error_code = p_code)
    )
    SELECT tsq.policy_view(tsq.policy_for(p_domain, p_type, p_code))
        || jsonb_build_object('require_approval', to_jsonb(a.kinds))
        || jsonb_strip_nulls(jsonb_build_object('approval_expires_after', a.expires))
    FROM approval a
$fn$;
