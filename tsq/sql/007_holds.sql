-- Retries scheduled for later, as the database knows claims and proposals: written by the
-- workflow with the audit row that scheduled (or unscheduled) one, so that `tsq list` and
-- `tsq show` can say what waits for its time while Temporal is away. A row belongs to its
-- parking: once the command leaves the queue, readers (which join open parkings) ignore it.
CREATE TABLE IF NOT EXISTS tsq.scheduled_retry (
    parking_id    BIGINT PRIMARY KEY REFERENCES tsq.parking,
    domain        TEXT NOT NULL,
    command_id    UUID NOT NULL,
    at            TIMESTAMPTZ NOT NULL,
    scheduled_by  TEXT,
    ended         BOOLEAN NOT NULL DEFAULT false,
    seq           INT NOT NULL
);
