#!/usr/bin/env bash
# Side by side, in one run on one machine: the Kamailio reference (the team's shared harness,
# one TCP worker) and sipwire, measured by the same tool (sipbench.py) with the same RSA-2048
# certificate. Prints sipbench's tables for each part and keeps JSON results in $WORK.
#
#   bench/compare_kamailio.sh                # full set (~25 minutes)
#   CALLS=5000 CALLS_TLS_TN=3000 bench/compare_kamailio.sh   # shorter
#
# Env: SHARED_BENCH (default ../shared/bench next to the repository), WORK (results),
#      CALLS (fixed runs, default 30000), CALLS_TLS_TN (default 30000), SW_THREADS/SW_WORKERS
#      (sipwire pool for the comparison, default 1/1: one process doing SIP work, like Kamailio's
#      single worker), SKIP_KAMAILIO=1 to measure sipwire only.
# Needs root for the tcp_max_tw_buckets setting of the tn runs (sipbench restores it).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED_BENCH:-$HERE/../../shared/bench}
WORK=${WORK:-/tmp/sipwire-compare-$(date +%Y%m%d-%H%M%S)}
CALLS=${CALLS:-30000}
CALLS_TLS_TN=${CALLS_TLS_TN:-30000}
SW_THREADS=${SW_THREADS:-1}
SW_WORKERS=${SW_WORKERS:-1}
mkdir -p "$WORK"
STEP=0
bench() {  # sipbench with a work dir of its own per call (run folders would collide otherwise)
  STEP=$((STEP + 1))
  python3 "$HERE/sipbench.py" --work-dir "$WORK/runs/$(printf %02d $STEP)" "$@"
}
echo "== $(date -Is) $(uname -srm), $(nproc) CPUs, $(python3 --version), $(sipp -v 2>&1 | grep -o 'v[0-9.]*' | head -1) =="
echo "== results in $WORK =="

python3 "$HERE/sipbench.py" --work-dir "$WORK" --cert-type rsa >/dev/null
CERT=$WORK/certs/server-rsa.crt
KEY=$WORK/certs/server-rsa.key

run_set() {  # label, TCP target arguments, TLS target arguments (each one word-split string)
  local label=$1 tcp_args=$2 tls_args=$3
  # shellcheck disable=SC2086
  set -- $tcp_args
  echo; echo "######## $label: fixed runs at 500/s (TCP) ########"
  bench "$@" --conn t1,tn --rate 500 --calls "$CALLS" --set-tw-buckets --json "$WORK/$label-tcp-fixed.json"
  echo; echo "######## $label: TCP ramps ########"
  bench "$@" --ramp --ramp-conn t1 --rates 8000,12000,16000,20000,24000 --set-tw-buckets \
    --json "$WORK/$label-tcp-ramp-t1.json"
  bench "$@" --ramp --ramp-conn tn --rates 2000,4000,5000,6000,7000 --set-tw-buckets \
    --json "$WORK/$label-tcp-ramp-tn.json"
  echo; echo "######## $label: TLS ########"
  # shellcheck disable=SC2086
  set -- $tls_args
  bench "$@" --transport tls --conn t1 --rate 500 --calls "$CALLS" --json "$WORK/$label-tls-t1.json"
  bench "$@" --transport tls --conn tn --rate 300 --calls "$CALLS_TLS_TN" --set-tw-buckets \
    --json "$WORK/$label-tls-tn.json"
  bench "$@" --transport tls --ramp --ramp-conn tn --rates 300,600,800,1000,1200 --granularity 50 \
    --set-tw-buckets --json "$WORK/$label-tls-ramp-tn.json"
}

if [[ -z ${SKIP_KAMAILIO:-} ]]; then
  [[ -x $SHARED/kamailio/kamctl.sh ]] || { echo "no Kamailio harness at $SHARED" >&2; exit 1; }
  mkdir -p "$WORK/kam/certs"
  cp "$CERT" "$WORK/kam/certs/server.crt"
  cp "$KEY" "$WORK/kam/certs/server.key"
  KAM_PID=$(ANCHOR_WORK=$WORK/kam TCP_CHILDREN=1 "$SHARED/kamailio/kamctl.sh" start options)
  trap 'ANCHOR_WORK=$WORK/kam "$SHARED/kamailio/kamctl.sh" stop' EXIT
  echo "Kamailio pid $KAM_PID (tcp_children=1)"
  run_set kamailio "--target 127.0.0.1:5060 --server-pid $KAM_PID" "--target 127.0.0.1:5061 --server-pid $KAM_PID"
  ANCHOR_WORK=$WORK/kam "$SHARED/kamailio/kamctl.sh" stop
  trap - EXIT
fi

SIPWIRE_ARGS="--start-sipwire --threads $SW_THREADS --workers $SW_WORKERS --cert $CERT --key $KEY"
run_set sipwire "$SIPWIRE_ARGS" "$SIPWIRE_ARGS"

echo; echo "######## sipwire: I/O threads 1, 2, 4 ########"
bench --start-sipwire --workers 2 --threads-sweep 1,2,4 --conn t1 --rate 16000 --calls 160000 \
  --json "$WORK/sipwire-sweep-tcp-t1.json"
bench --start-sipwire --workers 2 --threads-sweep 1,2,4 --cert "$CERT" --key "$KEY" --transport tls \
  --conn tn --rate 400 --calls 8000 --set-tw-buckets --json "$WORK/sipwire-sweep-tls-tn.json"

echo; echo "######## sipwire: ECDSA P-256 (its generated default) and session resumption ########"
bench --start-sipwire --threads "$SW_THREADS" --workers "$SW_WORKERS" --transport tls --conn tn --rate 300 \
  --calls 9000 --set-tw-buckets --json "$WORK/sipwire-tls-tn-ecdsa.json"
bench --start-sipwire --threads "$SW_THREADS" --workers "$SW_WORKERS" --transport tls --tls-resume \
  --conn tn --rate 300 --calls 9000 --set-tw-buckets --json "$WORK/sipwire-tls-tn-ecdsa-resume.json"

echo; echo "######## sipwire: 10,000 idle TCP connections ########"
bench --start-sipwire --threads "$SW_THREADS" --workers "$SW_WORKERS" --idle-connections 10000 \
  --json "$WORK/sipwire-idle.json"
echo "== done $(date -Is) =="
