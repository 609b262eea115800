#!/usr/bin/env bash
# Smoke test of the S3 test tooling: starts a throwaway Ceph cluster with
# RGW (tests/s3/ceph-cluster.sh) in a fresh temp dir, runs the S3 probes of
# tests/s3/probe.py asserting the status codes this RGW gives, stops the
# cluster and checks that no daemon is left. Prints the start-to-ready time,
# the daemons' RSS, and the total time.
#
#   tests/s3/smoke.sh [--rgw-cycle]
#
# --rgw-cycle: also stop RGW in the middle (ceph-cluster.sh stop-rgw),
# check that a request then fails at once with "connection refused", start
# it again (start-rgw) and check that the objects written before are there.
#
# Needs root; installs the packages itself (tests/s3/setup-ceph.sh, a no-op
# when they are there). Exits non-zero on any failure; the temp dir (logs)
# is kept then, and removed on success.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cluster=$here/ceph-cluster.sh
probe=$here/probe.py

rgw_cycle=no
case ${1:-} in
"") ;;
--rgw-cycle) rgw_cycle=yes ;;
*) echo "usage: $0 [--rgw-cycle]" >&2; exit 2 ;;
esac

pass=0
fail=0
ok()  { pass=$((pass + 1)); echo "ok   - $1"; }
bad() { fail=$((fail + 1)); echo "FAIL - $1"; }

# Milliseconds since the epoch, for timings.
now_ms() { date +%s%3N; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; }

# rss_report LABEL: each daemon's VmRSS and their sum, in MiB.
rss_report() {
    local total=0 name pid kb
    local parts=()
    for name in MON_PID OSD_PID RGW_PID; do
        pid=${!name}
        kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + kb))
        parts+=("${name%_PID} $((kb / 1024))")
    done
    echo "RSS $1: $((total / 1024)) MiB (${parts[*]} MiB)"
}

t_all=$(now_ms)
"$here/setup-ceph.sh"

dir=$(mktemp -d /tmp/ceph-smoke.XXXXXX)
finished=no
cleanup() {
    local rc=$?
    # Whatever happened, no daemon survives this script.
    "$cluster" stop "$dir" || true
    if [ "$finished" = yes ] && [ "$fail" -eq 0 ]; then
        rm -rf "$dir"
    else
        echo "smoke.sh: cluster dir kept for its logs: $dir" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT

t0=$(now_ms)
if "$cluster" start "$dir"; then
    ready_ms=$(( $(now_ms) - t0 ))
    ok "cluster started and RGW ready in $(secs "$ready_ms") s"
else
    bad "cluster start"
    echo "$pass passed, $fail failed"
    exit 1
fi

set -a
# shellcheck disable=SC1091
. "$dir/env"
set +a
echo "S3_ENDPOINT=$S3_ENDPOINT (MON_PID=$MON_PID OSD_PID=$OSD_PID RGW_PID=$RGW_PID)"
rss_report "once ready"
all_pids=("$MON_PID" "$OSD_PID" "$RGW_PID")

if "$probe" checks; then
    ok "S3 probes give the expected status codes"
else
    bad "S3 probes give the expected status codes"
fi

if [ "$rgw_cycle" = yes ]; then
    "$probe" put cycle/before-stop "written before stop-rgw"
    t1=$(now_ms)
    "$cluster" stop-rgw "$dir"
    if pgrep -f -- "radosgw -c $dir/ceph.conf" >/dev/null; then
        bad "stop-rgw left radosgw running"
    else
        ok "stop-rgw stopped radosgw in $(secs $(( $(now_ms) - t1 ))) s"
    fi
    if "$probe" refused; then
        ok "request while RGW is stopped fails at once (connection refused)"
    else
        bad "request while RGW is stopped fails at once (connection refused)"
    fi
    t1=$(now_ms)
    if "$cluster" start-rgw "$dir"; then
        ok "start-rgw: RGW answers again after $(secs $(( $(now_ms) - t1 ))) s"
    else
        bad "start-rgw"
    fi
    # shellcheck disable=SC1091
    . "$dir/env"   # the new RGW_PID
    all_pids+=("$RGW_PID")
    if "$probe" get cycle/before-stop "written before stop-rgw"; then
        ok "object written before stop-rgw is still there"
    else
        bad "object written before stop-rgw is still there"
    fi
    if "$probe" checks >/dev/null; then
        ok "S3 probes pass again after start-rgw"
    else
        bad "S3 probes pass again after start-rgw"
    fi
fi

rss_report "after the probes"

t2=$(now_ms)
"$cluster" stop "$dir"
stop_ms=$(( $(now_ms) - t2 ))
# Only this cluster's daemons count: other clusters may run beside us.
left=$(pgrep -a -f -- "-c $dir/ceph.conf" || true)
for pid in "${all_pids[@]}"; do
    if [ -e "/proc/$pid" ]; then
        left+=" $pid($(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null))"
    fi
done
if [ -n "$left" ]; then
    bad "stop left processes behind: $left"
else
    ok "stop took $(secs "$stop_ms") s and left no daemon"
fi
echo "pgrep -a ceph; pgrep -a radosgw after stop: $( (pgrep -a ceph; pgrep -a radosgw) | tr '\n' ';')"
finished=yes

echo "total time: $(secs $(( $(now_ms) - t_all ))) s (ready $(secs "$ready_ms") s, stop $(secs "$stop_ms") s)"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
