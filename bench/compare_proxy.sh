#!/usr/bin/env bash
# The proxy hop side by side, in one run on one machine: Kamailio's stateless forward (the shared
# harness's proxy mode, one TCP worker) and sipwire's `proxy` router (one I/O thread, one worker),
# each between sipp (OPTIONS at RATE/s over one TCP connection) and the harness's sipp UAS (one TCP
# connection from the proxy): one connection per leg. The same run_load.sh measures both (latency
# percentiles from sipp's own RTT trace, CPU of each process tree); prints both summary lines.
#
#   bench/compare_proxy.sh                 # 30000 OPTIONS at 500/s through each proxy (~2.5 minutes)
#   CALLS=5000 bench/compare_proxy.sh
#
# Env: SHARED_BENCH (default ../shared/bench next to the repository), WORK (results), CALLS, RATE.
# sipwire runs with --open-registrar: the harness's requests come from no served domain, and this
# measures the forwarding hop, not digest authentication. Everything is started and stopped by PID.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED_BENCH:-$HERE/../../shared/bench}
PYTHON=${PYTHON:-$HERE/../.venv/bin/python}  # has sipwire installed
WORK=${WORK:-/tmp/sipwire-proxy-compare-$(date +%Y%m%d-%H%M%S)}
CALLS=${CALLS:-30000}
RATE=${RATE:-500}
export ANCHOR_WORK=$WORK/anchor
mkdir -p "$WORK"
SW_PID=""
cleanup() {
  [[ -n $SW_PID ]] && kill -TERM "$SW_PID" 2>/dev/null && wait "$SW_PID" 2>/dev/null
  "$SHARED/kamailio/kamctl.sh" stop >/dev/null 2>&1 || true
  "$SHARED/tools/uas.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
echo "== $(date -Is) $(uname -srm), $(nproc) CPUs, $(python3 --version), $(sipp -v 2>&1 | grep -o 'v[0-9.]*' | head -1) =="
UAS_PID=$("$SHARED/tools/uas.sh" start 5070)

KAM_PID=$(TCP_CHILDREN=1 "$SHARED/kamailio/kamctl.sh" start proxy)
"$SHARED/run_load.sh" --target 127.0.0.1:5060 --transport tcp --conn t1 --rate "$RATE" --calls "$CALLS" \
  --server-pid "$KAM_PID" --uas-pid "$UAS_PID" --label kamailio-proxy-tcp-t1 --results "$WORK/kamailio" >/dev/null
"$SHARED/kamailio/kamctl.sh" stop >/dev/null

"$PYTHON" -m sipwire.cli transport --router proxy --open-registrar --upstream "sip:127.0.0.1:5070;transport=tcp" \
  --tcp 127.0.0.1:5060 --tls "" --threads 1 --workers 1 --instance proxybench --state-dir "$WORK/state" \
  --log-level warning >"$WORK/sipwire.log" 2>&1 &
SW_PID=$!
for _ in $(seq 100); do ss -ltnH 'sport = :5060' | grep -q 5060 && break; sleep 0.1; done
"$SHARED/run_load.sh" --target 127.0.0.1:5060 --transport tcp --conn t1 --rate "$RATE" --calls "$CALLS" \
  --server-pid "$SW_PID" --uas-pid "$UAS_PID" --label sipwire-proxy-tcp-t1 --results "$WORK/sipwire" >/dev/null
echo "results in $WORK"
for part in kamailio sipwire; do echo "-- $part"; cat "$WORK/$part/summary.txt"; done
