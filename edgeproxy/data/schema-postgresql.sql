-- edgeproxy routing table on PostgreSQL (SPEC sections 1 and 10).
--
-- The same `backends` and `pops` tables as the SQLite schema (schema.sql),
-- with the same rules: every column but `country`, `proxy_protocol`,
-- `draining`, `health_check`, `heartbeat_at` and `sni` must be there (a
-- table without one is refused as a whole: fatal at startup, the last good
-- table kept on reload); a row with an invalid value is skipped and logged
-- with its id, the other rows still load.  Keep the column types: an
-- integer column of another type (BOOLEAN, NUMERIC, TEXT) makes its rows
-- invalid rather than guessed at.
--
-- edgeproxy runs this file itself at startup when the database has no
-- `backends` table (and says so); a database that has one is never
-- altered at startup.  Apply it by hand with
--     psql "postgresql://..." -f schema-postgresql.sql
-- to add the notification trigger to tables created another way: the file
-- can be run again safely (IF NOT EXISTS, CREATE OR REPLACE).
--
-- Change notification: the trigger below sends a NOTIFY on the channel
-- `edgeproxy_routing` (payload: the table name) after every INSERT, UPDATE,
-- DELETE or TRUNCATE of either table, and each POP listening reloads at
-- once.  An UPDATE that changes only `heartbeat_at` notifies nobody:
-- heartbeat times are not routing content, and every POP sees them at its
-- periodic reload (--db-reload), which also covers notifications lost to a
-- dropped connection or a read replica (NOTIFY is not delivered there).

CREATE TABLE IF NOT EXISTS backends (
    id             TEXT PRIMARY KEY NOT NULL,
    app            TEXT,
    region         TEXT NOT NULL,
    country        TEXT,
    wg_ip          TEXT NOT NULL,
    port           INTEGER NOT NULL,
    healthy        INTEGER NOT NULL DEFAULT 1,
    weight         INTEGER NOT NULL DEFAULT 1,
    soft_limit     INTEGER NOT NULL DEFAULT 100,
    hard_limit     INTEGER NOT NULL DEFAULT 0,
    deleted        INTEGER DEFAULT 0,
    proxy_protocol INTEGER NOT NULL DEFAULT 0,
    health_check   TEXT,
    heartbeat_at   DOUBLE PRECISION,
    sni            TEXT
);

CREATE TABLE IF NOT EXISTS pops (
    id       TEXT PRIMARY KEY NOT NULL,
    region   TEXT NOT NULL,
    address  TEXT NOT NULL
);

CREATE OR REPLACE FUNCTION edgeproxy_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_LEVEL = 'ROW' AND TG_TABLE_NAME = 'backends'
       AND (to_jsonb(OLD) - 'heartbeat_at') = (to_jsonb(NEW) - 'heartbeat_at') THEN
        RETURN NULL;
    END IF;
    -- Identical notifications of one transaction reach listeners once.
    PERFORM pg_notify('edgeproxy_routing', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS edgeproxy_backends_notify ON backends;
CREATE TRIGGER edgeproxy_backends_notify
    AFTER INSERT OR UPDATE OR DELETE ON backends
    FOR EACH ROW EXECUTE FUNCTION edgeproxy_notify();

DROP TRIGGER IF EXISTS edgeproxy_backends_truncate ON backends;
CREATE TRIGGER edgeproxy_backends_truncate
    AFTER TRUNCATE ON backends
    FOR EACH STATEMENT EXECUTE FUNCTION edgeproxy_notify();

DROP TRIGGER IF EXISTS edgeproxy_pops_notify ON pops;
CREATE TRIGGER edgeproxy_pops_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pops
    FOR EACH STATEMENT EXECUTE FUNCTION edgeproxy_notify();
