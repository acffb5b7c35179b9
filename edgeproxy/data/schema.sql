-- edgeproxy routing table (SPEC section 1).
--
-- edgeproxy reads this table read-only and reloads it periodically; edit it
-- with any SQLite client.  A database created with the original schema
-- (without `country`, `proxy_protocol`, `health_check`, `heartbeat_at` and
-- `sni`) still loads: those columns are then treated as NULL, 0, NULL, NULL
-- and NULL.
-- (The registration API adds a missing `heartbeat_at` column when it first
-- writes, and any of the other three that a registration needs.)  Every
-- other column must be there: a table without one of them is refused as a
-- whole (at startup a fatal error, on reload the last good table stays).
-- Rows with an invalid value (NULL or empty id, port outside 1-65535,
-- negative weight or limits, a non-integer where an integer is required,
-- healthy/deleted other than 0/1, proxy_protocol other than 0/1/2, missing
-- region, wg_ip that is not a bare address or host name, health_check other
-- than tcp/off/http:/path, heartbeat_at that is not a time, sni that is not
-- a list of names or that has no app) are skipped and
-- logged with their id; the other rows still load.
--
--   wg_ip           an IPv4 address, an IPv6 address without brackets, or a
--                   host name; no port (that is the port column), no scheme
--   weight          higher gets more traffic; 0 (or NULL) counts as 1
--   soft_limit      comfortable number of connections; 0 (or NULL) counts as 1
--   hard_limit      absolute maximum of connections; 0 (or NULL) = unlimited
--   deleted         soft delete: NULL or 0 active, 1 deleted
--   proxy_protocol  0 off, 1 send a PROXY v1 header, 2 send PROXY v2
--   health_check    this backend's active check: tcp (a TCP connect),
--                   http:/path (GET; 2xx/3xx is up), off (never checked);
--                   NULL = the proxy's default (--health-check, tcp)
--   heartbeat_at    rows registered through the API (POST /api/v1/register):
--                   the last heartbeat, epoch seconds; such a row takes no
--                   new clients once it is older than --heartbeat-ttl.
--                   NULL for rows written by hand, which never expire (and
--                   which the API never changes or deletes)
--   sni             TLS server names routed to this row's app by sni:
--                   listeners (SNI passthrough): comma-separated host names
--                   and *.example.com wildcards (one label, as in
--                   certificates); case-insensitive; NULL = none.  Two apps
--                   claiming one name: the first app in name order wins

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
    heartbeat_at   REAL,
    sni            TEXT
);

-- The POPs of the deployment, for the internal DNS (--dns): the name
-- <region>.pops.<domain> answers the addresses of the POPs of that region.
-- Optional: a database without this table has no POPs.  Rows with a NULL or
-- empty id or region, or an address that is not an IPv4 or IPv6 address
-- (no host name, no port, no brackets), are skipped and logged with their id.
--
--   address  the POP's IPv4 or IPv6 address (an A or AAAA record)

CREATE TABLE IF NOT EXISTS pops (
    id       TEXT PRIMARY KEY NOT NULL,
    region   TEXT NOT NULL,
    address  TEXT NOT NULL
);
