#!/usr/bin/env bash
# REGISTER with digest authentication over a new TCP connection each (sipp -t tn), side by side in one
# run: Kamailio 5.6 (auth_db on SQLite, registrar, usrloc in memory: bench/kamailio/registrar.cfg, one
# TCP worker) and sipwire's proxy router (its users and bindings in SQLite; one I/O thread, one worker).
# Each REGISTER exchange is REGISTER -> 401 -> REGISTER with credentials -> 200 on one new connection.
# Prints sipp's verdict and each server's CPU seconds (utime+stime of its process tree from /proc).
#
#   bench/compare_register.sh                  # 5000 registrations at 100/s through each (~2 minutes)
#   CALLS=2000 RATE=200 bench/compare_register.sh
#
# Needs kamailio and kamailio-sqlite-modules (Debian), sipp. Everything is started and stopped by PID.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}  # has sipwire installed
WORK=${WORK:-/tmp/sipwire-register-compare-$(date +%Y%m%d-%H%M%S)}
CALLS=${CALLS:-5000}
RATE=${RATE:-100}
PORT=${PORT:-5062}
mkdir -p "$WORK"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

tree_cpu() {  # CPU seconds (user+system) of a process and its descendants
  python3 - "$1" <<'PY'
import os, sys
tick = os.sysconf("SC_CLK_TCK"); root = int(sys.argv[1]); children = {}; cpu = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    children.setdefault(int(fields[1]), []).append(int(pid)); cpu[int(pid)] = int(fields[11]) + int(fields[12])
total, todo = 0, [root]
while todo:
    pid = todo.pop(); total += cpu.get(pid, 0); todo += children.get(pid, [])
print(f"{total / tick:.2f}")
PY
}

wait_port() { for _ in $(seq 100); do ss -ltnH "sport = :$PORT" | grep -q "$PORT" && return 0; sleep 0.1; done; return 1; }

run_sipp() {  # label, server pid
  local dir=$WORK/$1; mkdir -p "$dir"; local before; before=$(tree_cpu "$2")
  local start; start=$(date +%s.%N)
  (cd "$dir" && sipp "127.0.0.1:$PORT" -sf "$REPO/tests/scenarios/register_digest.xml" -t tn -i 127.0.0.1 \
     -m "$CALLS" -r "$RATE" -au alice -ap alice-secret -auth_uri sip.test -timeout 600s -timeout_error -recv_timeout 5000 \
     -max_socket 1000 -nostdin -trace_stat -stf stats.csv -fd 1 -trace_rtt -rtt_freq 1 >sipp.log 2>&1) || true
  local end; end=$(date +%s.%N); local after; after=$(tree_cpu "$2")
  python3 - "$dir/stats.csv" "$1" "$before" "$after" "$start" "$end" "$CALLS" <<'PY'
import csv, sys
path, label, before, after, start, end, calls = sys.argv[1:]
rows = [r for r in csv.reader(open(path), delimiter=";") if r]
last = dict(zip(rows[0], rows[-1]))
cpu = float(after) - float(before)
print(f"{label}: {last['SuccessfulCall(C)']} registered, {last['FailedCall(C)']} failed in "
      f"{float(end) - float(start):.1f} s; server CPU {cpu:.2f} s = {1000 * cpu / int(calls):.2f} ms per registration")
PY
}

echo "== $(date -Is) $(uname -srm), $(nproc) CPUs, $(python3 --version), $(kamailio -v | head -1) =="
# Kamailio: a subscriber table with alice's password (auth_db computes HA1 itself: calculate_ha1).
python3 - "$WORK/kamailio.sqlite" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.executescript("""
CREATE TABLE IF NOT EXISTS version (table_name TEXT PRIMARY KEY, table_version INTEGER);
INSERT OR REPLACE INTO version VALUES ('subscriber', 7);
CREATE TABLE IF NOT EXISTS subscriber (id INTEGER PRIMARY KEY, username TEXT, domain TEXT, password TEXT,
  ha1 TEXT, ha1b TEXT);
DELETE FROM subscriber;
INSERT INTO subscriber (username, domain, password, ha1, ha1b) VALUES ('alice', 'sip.test', 'alice-secret', '', '');
""")
db.commit()
PY
kamailio -DD -f "$HERE/kamailio/registrar.cfg" -A "DB_URL=\"sqlite:///$WORK/kamailio.sqlite\"" \
  -A "LISTEN=tcp:127.0.0.1:$PORT" -m 128 -M 16 -w "$WORK" >"$WORK/kamailio.log" 2>&1 &
KAM=$!; PIDS+=("$KAM")
wait_port || { cat "$WORK/kamailio.log"; exit 1; }
run_sipp kamailio "$KAM"
kill -TERM "$KAM"; wait "$KAM" 2>/dev/null || true
for _ in $(seq 50); do ss -ltnH "sport = :$PORT" | grep -q "$PORT" || break; sleep 0.1; done

# sipwire: the same user, MD5 offered (sipp 3.6 knows no SHA-256).
STATE=$WORK/state
echo alice-secret | "$PYTHON" -m sipwire.cli users --instance regbench --state-dir "$STATE" add alice@sip.test >/dev/null
SIPWIRE_DIGEST_ALGORITHMS=MD5 "$PYTHON" -m sipwire.cli transport --router proxy --tcp "127.0.0.1:$PORT" --tls "" \
  --threads 1 --workers 1 --instance regbench --state-dir "$STATE" --log-level warning >"$WORK/sipwire.log" 2>&1 &
SW=$!; PIDS+=("$SW")
wait_port || { cat "$WORK/sipwire.log"; exit 1; }
run_sipp sipwire "$SW"
echo "results in $WORK"
