#!/usr/bin/env bash
# One command to try edgeproxy: installs it into .venv, builds routing.db from
# conf/schema.sql + conf/routing-sample.sql, starts four sample backends on
# 127.0.0.1:9101-9104 and runs the proxy in the foreground on
#   127.0.0.1:8080  plain TCP (clients are located by their socket address)
#   127.0.0.1:8081  requires a PROXY v1/v2 header (pretend to be anywhere)
# Ctrl-C stops everything.  Extra arguments go to `twistd edgeproxy`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
echo "==> installing edgeproxy into .venv (pip install .)"
# A normal install, not -e: a PEP 660 editable install hides twisted/plugins.
.venv/bin/python -m pip install --quiet --disable-pip-version-check .
.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

echo "==> building routing.db from conf/schema.sql + conf/routing-sample.sql"
.venv/bin/python - <<'PY'
import sqlite3

db = sqlite3.connect("routing.db")
with open("conf/schema.sql", encoding="utf-8") as f:
    db.executescript(f.read())
with open("conf/routing-sample.sql", encoding="utf-8") as f:
    db.executescript(f.read())
db.commit()
for row in db.execute("SELECT id, app, region, country, wg_ip, port, weight FROM backends"):
    print("    backend %-6s app=%s region=%s country=%s at %s:%s weight=%s" % row)
db.close()
PY

echo "==> starting the demo backends (one process each; pids in .venv/demo-ID.pid)"
pids=""
for id in gru-1 cdg-1 nrt-1 iad-1; do
    .venv/bin/python -m edgeproxy.demo --only "$id" &
    echo $! >".venv/demo-$id.pid"
    pids="$pids $!"
done
cleanup() {
    # shellcheck disable=SC2086  # a list of pids
    kill $pids 2>/dev/null || true
    wait 2>/dev/null || true
    rm -f .venv/demo-*.pid
}
trap cleanup EXIT

echo "==> starting edgeproxy (Ctrl-C to stop)"
# --max-connections 100: plenty for trying it by hand, and its 264 file
# descriptors fit any usual limit, where the default 10000 needs a hard limit
# of 20064 and warns below it (as it should in production).
.venv/bin/twistd -n --pidfile= --reactor=edgeepoll edgeproxy \
    --db routing.db --region sa --db-reload 2 --max-connections 100 \
    --listen tcp:8080:interface=127.0.0.1 \
    --listen haproxy:tcp:8081:interface=127.0.0.1 \
    "$@"
