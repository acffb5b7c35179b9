-- Sample routing table for the demo (conf/demo.sh, python -m edgeproxy.demo).
--
-- Four backends on loopback that pretend to live in Brazil, France, Japan
-- and the USA.  Each asks for a PROXY v1 header (proxy_protocol = 1) so that
-- it can tell you which client address the proxy saw.
--
-- Load it after the schema:
--   python3 -c "import sqlite3; c = sqlite3.connect('routing.db');
--               c.executescript(open('conf/schema.sql').read());
--               c.executescript(open('conf/routing-sample.sql').read()); c.commit()"
--
-- Then play with it while the proxy runs (it re-reads the table every
-- --db-reload seconds), e.g. take the French backend out of rotation:
--   UPDATE backends SET healthy = 0 WHERE id = 'cdg-1';

DELETE FROM backends WHERE id IN ('gru-1', 'cdg-1', 'nrt-1', 'iad-1');

INSERT INTO backends
    (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted, proxy_protocol)
VALUES
    ('gru-1', 'demo', 'sa', 'BR', '127.0.0.1', 9101, 1, 2, 100, 1000, 0, 1),
    ('cdg-1', 'demo', 'eu', 'FR', '127.0.0.1', 9102, 1, 1, 100, 1000, 0, 1),
    ('nrt-1', 'demo', 'ap', 'JP', '127.0.0.1', 9103, 1, 1, 100, 1000, 0, 1),
    ('iad-1', 'demo', 'us', 'US', '127.0.0.1', 9104, 1, 1, 100, 1000, 0, 1);

-- The POPs of the pretend deployment, for the internal DNS (--dns): e.g.
-- dig @127.0.0.1 -p 5353 sa.pops.edge.internal answers 192.0.2.10.  The
-- addresses are documentation addresses (RFC 5737, RFC 3849).

DELETE FROM pops WHERE id IN ('gru', 'gru-v6', 'cdg', 'nrt', 'iad');

INSERT INTO pops (id, region, address)
VALUES
    ('gru', 'sa', '192.0.2.10'),
    ('gru-v6', 'sa', '2001:db8::10'),
    ('cdg', 'eu', '192.0.2.20'),
    ('nrt', 'ap', '192.0.2.30'),
    ('iad', 'us', '192.0.2.40');
