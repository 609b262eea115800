#!/usr/bin/env bash
# A throwaway single-node Ceph cluster with an S3 gateway, for tests.
#
#   tests/s3/ceph-cluster.sh start DIR      create + start; writes DIR/env
#   tests/s3/ceph-cluster.sh stop DIR       kill every daemon recorded in DIR
#   tests/s3/ceph-cluster.sh stop-rgw DIR   kill only radosgw
#   tests/s3/ceph-cluster.sh start-rgw DIR  start radosgw again (same port)
#
# Needs root and tests/s3/setup-ceph.sh (Ceph 16.2.15 "pacific" from
# Debian bookworm). DIR must not exist yet or be empty; every file of the
# cluster lives under it (ceph.conf, mon store, OSD data, logs, admin
# sockets, pids); nothing in /etc/ceph, /var/lib/ceph, /var/log/ceph or
# /var/run/ceph is used (every command gets `-c DIR/ceph.conf`). Remove DIR
# yourself after `stop`. BlueStore opens its block file with O_DIRECT: ext4
# and xfs are fine, tmpfs only on recent kernels (it works on 6.18).
#
# After `start`, DIR/env holds shell assignments (`set -a; . DIR/env`):
#   S3_ENDPOINT=http://127.0.0.1:PORT  S3_ACCESS_KEY  S3_SECRET_KEY
#   S3_BUCKET (already created)  S3_REGION  CEPH_CONF  MON_PID OSD_PID RGW_PID
# `start` fails (non-zero, message + log tails on stderr) if RGW does not
# answer within $CEPH_START_TIMEOUT s (default 120); run `stop DIR` then too.
#
# Layout: one monitor (msgr v2 only, on a free port), one OSD on a sparse
# 10 GiB file-backed BlueStore (DIR/osd/block), one radosgw (beast) on a
# free 127.0.0.1 port. auth none; pools of size 1. No ceph-mgr: RGW does not
# need one (the price: `ceph -s` shows "mgr: no daemons active" and mgr
# commands such as `ceph pg stat` hang; this script waits on RGW answering
# instead). Daemons run with -f, backgrounded by this script; their PIDs are
# in DIR/pids/*.pid, and `stop` only signals a PID whose command line still
# has `-c DIR/ceph.conf` (no stray kill after PID reuse).
# Measured on 2 cores: ready ~10 s after `start`, `stop` ~6 s, daemons' RSS
# ~140 MiB (mon 35, osd 55, rgw 47); stop-rgw ~1.5 s, start-rgw ~0.6 s.
#
# S3 behaviour of this RGW (16.2.15), observed with tests/s3/probe.py
# (Debian's boto3 1.26, SigV4, path-style http://127.0.0.1:PORT/BUCKET/KEY):
#   PUT with `If-None-Match: *`, key absent         200 (created)
#   PUT with `If-None-Match: *`, key exists         412 PreconditionFailed,
#                                                   the object is unchanged
#   multipart upload with `If-None-Match: *` on
#     Create and Complete, key exists               200, object OVERWRITTEN:
#                                                   create-only works for
#                                                   single PUTs only
#   path-style GET /BUCKET/KEY                      200
#   ListObjectsV2 with a prefix                     200, only keys under it
#   DeleteObject of a missing key                   204
#   GetObject with Range: bytes=2-5                 206, Content-Range
#                                                   bytes 2-5/10
#   CopyObject (server-side copy)                   200
#   wrong secret key                                403 SignatureDoesNotMatch
#   Get/PutObject in a missing bucket               404 NoSuchBucket
#   GetObject of a missing key                      404 NoSuchKey
#   any region in the SigV4 scope (default,
#     us-east-1, ...)                               accepted (200)
#   RGW stopped (stop-rgw)                          connection refused at once
# Raw curl needs `--aws-sigv4 "aws:amz:REGION:s3"` AND an explicit
# `x-amz-content-sha256` header (curl 7.88 does not send it; RGW then
# answers 403 SignatureDoesNotMatch), see s3_curl below.
set -euo pipefail

# Fixed test credentials and bucket.
ACCESS_KEY=sparsebaktest
SECRET_KEY=sparsebaktestsecret
BUCKET=sparsebak-test
REGION=default
START_TIMEOUT=${CEPH_START_TIMEOUT:-120}   # seconds, for the whole `start`

die() { echo "ceph-cluster.sh: $*" >&2; exit 1; }

usage() {
    echo "usage: $0 start|stop|start-rgw|stop-rgw DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
cmd=$1
dir=$2

# A free TCP port on 127.0.0.1 (the kernel picks one; tiny race until the
# daemon binds it, fine for tests).
free_port() {
    /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# `ceph` CLI with our config and a bound on how long it may hang.
ceph_cli() { timeout 30 ceph -c "$conf" --connect-timeout 20 "$@"; }

log_tail() {   # log_tail FILE...: the last lines of each that exists
    local f
    for f in "$@"; do
        [ -s "$f" ] || continue
        echo "---- tail of $f" >&2
        tail -n 30 "$f" >&2
    done
}

deadline=$((SECONDS + START_TIMEOUT))
# fail_start MSG LOG...: clear message + log tails, exit non-zero. The
# daemons already started stay up: the caller runs `stop DIR` (which works
# on a half-started cluster) and may read DIR/log first.
fail_start() {
    local msg=$1; shift
    echo "ceph-cluster.sh start: $msg" >&2
    log_tail "$@"
    exit 1
}

# Alive = exists and is not a zombie (the daemons are orphans once `start`
# exits; where nobody reaps orphans, a killed daemon stays a zombie).
pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null &&
        ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# Is PID one of our daemons (still the same process, not a reused PID)?
# Our daemons all have "-c DIR/ceph.conf" on their command line.
our_pid() {
    local pid=$1
    pid_alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-c $conf "
}

# run_daemon NAME CMD...: start CMD in the foreground mode (-f), in the
# background, stdin/stdout/stderr detached from the caller (a test harness
# reading our output through a pipe must see EOF when we exit), and record
# its PID in DIR/pids/NAME.pid.
run_daemon() {
    local name=$1; shift
    "$@" </dev/null >>"$dir/log/$name.out" 2>&1 &
    echo $! >"$dir/pids/$name.pid"
}

start_rgw() {
    run_daemon rgw radosgw -c "$conf" -n client.rgw -f
}

# wait_rgw: until RGW answers an (anonymous) S3 ListBuckets with 200.
wait_rgw() {
    local code rgw_pid
    rgw_pid=$(cat "$dir/pids/rgw.pid")
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$endpoint/" || true)
        [ "$code" = 200 ] && return 0
        pid_alive "$rgw_pid" ||
            fail_start "radosgw (pid $rgw_pid) exited before answering" \
                "$dir/log/rgw.out" "$dir/log/client.rgw.log"
        [ $SECONDS -lt $deadline ] ||
            fail_start "radosgw did not answer S3 on $endpoint within ${START_TIMEOUT}s (last HTTP code: $code)" \
                "$dir/log/client.rgw.log" "$dir/log/osd.0.log" "$dir/log/mon.a.log"
        sleep 0.5
    done
}

write_conf() {
    local fsid=$1 mon_port=$2 rgw_port=$3
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$mon_port
public_addr = 127.0.0.1
# msgr v2 only: one port for the monitor.
ms_bind_msgr1 = false

auth_cluster_required = none
auth_service_required = none
auth_client_required = none
# With auth none the "secure" connection mode cannot be negotiated; clients
# must offer crc first. Without these two lines radosgw never answers: its
# log repeats "send_auth_request get_initial_auth_request returned -13"
# (it waits 300 s for the monitor's config).
ms_mon_client_mode = crc secure
ms_client_mode = crc secure

# Everything under DIR.
run_dir = $dir/run
crash_dir = $dir/crash
log_file = $dir/log/\$name.log
mon_cluster_log_file = $dir/log/cluster.log
# No keyring is needed with auth none (none is created); this only keeps
# the tools from looking in /etc/ceph.
keyring = $dir/keyring
mon_data = $dir/mon/\$name
# BlueStore keeps only a few small files in osd_data (and a "block" symlink
# to the block file, so the two paths must differ).
osd_data = $dir/osd/data
rgw_data = $dir/rgw

# One OSD: size-1 pools, CRUSH spreads replicas over OSDs (type 0) not
# hosts, few PGs (RGW makes ~7 pools; the limit is 250 PGs per OSD).
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_delete = true
# Keep the health output quiet for a throwaway cluster.
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
# The monitor warns below 30 % free disk and shuts itself down below 5 %;
# the host's disk is not ours to judge.
mon_data_avail_warn = 1
mon_data_avail_crit = 0

[mon]
# The monitor batches map changes for up to 1 s by default; RGW's start is a
# chain of ~10 such changes (pool creations), so 0.1 s halves the start time.
paxos_propose_interval = 0.1
mon_memory_target = 134217728
rocksdb_cache_size = 33554432

[osd]
osd_objectstore = bluestore
bluestore_block_path = $dir/osd/block
bluestore_block_create = true
# Sparse file: only what is written takes disk space.
bluestore_block_size = 10737418240
# Small memory: a fixed 32 MiB BlueStore cache instead of autotuning
# towards osd_memory_target. That target is set to its minimum, 896 MiB
# (a smaller value is silently replaced by the 4 GiB default).
bluestore_cache_autotune = false
bluestore_cache_size = 33554432
osd_memory_target = 939524096
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2

[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:$rgw_port
rgw_thread_pool_size = 32
EOF
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    command -v ceph-mon >/dev/null || die "ceph not installed (run tests/s3/setup-ceph.sh)"
    if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
        die "$dir is not empty; use a fresh directory"
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    conf=$dir/ceph.conf
    mkdir -p "$dir"/{run,crash,log,mon,osd/data,rgw,pids}

    local fsid mon_port rgw_port osd_uuid osd_id
    fsid=$(uuidgen)
    mon_port=$(free_port)
    rgw_port=$(free_port)
    while [ "$rgw_port" = "$mon_port" ]; do rgw_port=$(free_port); done
    endpoint=http://127.0.0.1:$rgw_port
    write_conf "$fsid" "$mon_port" "$rgw_port"
    echo "$rgw_port" >"$dir/rgw.port"

    # Monitor.
    monmaptool --create --clobber --fsid "$fsid" \
        --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" \
        >>"$dir/log/mkfs.out" 2>&1 ||
        fail_start "ceph-mon --mkfs failed" "$dir/log/mkfs.out" "$dir/log/mon.a.log"
    run_daemon mon.a ceph-mon -c "$conf" -i a -f
    until ceph_cli mon stat >/dev/null 2>&1; do
        pid_alive "$(cat "$dir/pids/mon.a.pid")" ||
            fail_start "ceph-mon exited" "$dir/log/mon.a.out" "$dir/log/mon.a.log"
        [ $SECONDS -lt $deadline ] ||
            fail_start "monitor not reachable within ${START_TIMEOUT}s" "$dir/log/mon.a.log"
        sleep 0.5
    done

    # OSD: register it with the monitor, format the BlueStore, start it.
    osd_uuid=$(uuidgen)
    osd_id=$(ceph_cli osd new "$osd_uuid" 2>>"$dir/log/mkfs.out") ||
        fail_start "ceph osd new failed" "$dir/log/mkfs.out"
    [ "$osd_id" = 0 ] || fail_start "expected osd id 0, got '$osd_id'"
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" \
        >>"$dir/log/mkfs.out" 2>&1 ||
        fail_start "ceph-osd --mkfs failed" "$dir/log/mkfs.out" "$dir/log/osd.0.log"
    run_daemon osd.0 ceph-osd -c "$conf" -i 0 -f

    # RGW: starts creating its pools once the OSD is up and answers S3 when
    # they are usable.
    start_rgw
    wait_rgw

    # S3 user and bucket.
    timeout 60 radosgw-admin -c "$conf" user create --uid=sparsebak \
        --display-name="sparsebak tests" \
        --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" \
        >>"$dir/log/admin.out" 2>&1 ||
        fail_start "radosgw-admin user create failed" "$dir/log/admin.out"
    local code
    code=$(s3_curl -o "$dir/log/mkbucket.out" -w '%{http_code}' -X PUT "$endpoint/$BUCKET") || true
    [ "$code" = 200 ] ||
        fail_start "creating bucket $BUCKET: HTTP $code" "$dir/log/mkbucket.out" "$dir/log/client.rgw.log"
    # RGW creates its data pool on the first object write; do that
    # here so a test's first PUT is not the slow one.
    code=$(s3_curl -o "$dir/log/mkbucket.out" -w '%{http_code}' -X PUT -H 'Content-Length: 0' \
        "$endpoint/$BUCKET/.ceph-cluster-warmup") || true
    [ "$code" = 200 ] ||
        fail_start "warm-up PUT: HTTP $code" "$dir/log/mkbucket.out" "$dir/log/client.rgw.log"
    code=$(s3_curl -o "$dir/log/mkbucket.out" -w '%{http_code}' -X DELETE \
        "$endpoint/$BUCKET/.ceph-cluster-warmup") || true
    [ "$code" = 204 ] ||
        fail_start "warm-up DELETE: HTTP $code" "$dir/log/mkbucket.out" "$dir/log/client.rgw.log"

    write_env
}

# curl with SigV4 signing (curl >= 7.75). The empty-payload hash header is
# set explicitly: S3 wants x-amz-content-sha256 and older curl omits it.
s3_curl() {
    curl -sS --max-time 30 \
        --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
        -H 'x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855' \
        "$@"
}

write_env() {
    local tmp=$dir/env.tmp
    {
        echo "S3_ENDPOINT=$endpoint"
        echo "S3_ACCESS_KEY=$ACCESS_KEY"
        echo "S3_SECRET_KEY=$SECRET_KEY"
        echo "S3_BUCKET=$BUCKET"
        echo "S3_REGION=$REGION"
        echo "CEPH_CONF=$conf"
        echo "MON_PID=$(cat "$dir/pids/mon.a.pid")"
        echo "OSD_PID=$(cat "$dir/pids/osd.0.pid")"
        echo "RGW_PID=$(cat "$dir/pids/rgw.pid")"
    } >"$tmp"
    mv "$tmp" "$dir/env"
}

# any_alive PID...: is any of them still running (zombies count as dead)?
any_alive() {
    local pid
    for pid in "$@"; do
        if pid_alive "$pid"; then return 0; fi
    done
    return 1
}

stopped=()   # PIDs signalled by stop_daemons, for wait_reaped

# stop_daemons NAME...: TERM each recorded daemon, wait up to 20 s for all
# of them to exit, KILL what is left. Missing pid files and dead PIDs are
# fine (start may have failed halfway).
stop_daemons() {
    local name pid pids=() i
    for name in "$@"; do
        [ -f "$dir/pids/$name.pid" ] || continue
        pid=$(cat "$dir/pids/$name.pid")
        if our_pid "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$dir/pids/$name.pid"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    stopped+=("${pids[@]}")
    for ((i = 0; i < 200; i++)); do   # 200 x 0.1 s
        any_alive "${pids[@]}" || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if pid_alive "$pid"; then
            echo "ceph-cluster.sh: pid $pid ignored TERM for 20 s, sending KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 50; i++)); do
        any_alive "${pids[@]}" || return 0
        sleep 0.1
    done
    echo "ceph-cluster.sh: pids ${pids[*]} survive KILL" >&2
    return 1
}

# wait_reaped: the daemons are orphans once `start` has exited, so it is
# init (or a subreaper) that reaps them, and some reap lazily (here: one to
# a few seconds). Wait up to 10 s for the zombies to go, so that `pgrep -a
# ceph` right after `stop` shows nothing of ours; never fails.
wait_reaped() {
    local pid i zombies
    for ((i = 0; i < 100; i++)); do
        zombies=no
        for pid in "${stopped[@]}"; do
            if grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then
                zombies=yes
            fi
        done
        [ $zombies = no ] && return 0
        sleep 0.1
    done
}

existing_dir() {
    [ -d "$dir" ] || die "$dir: no such directory"
    dir=$(cd "$dir" && pwd)
    conf=$dir/ceph.conf
}

case $cmd in
start)
    cmd_start
    ;;
stop)
    existing_dir
    # One at a time, clients first: an OSD stopped together with the
    # monitor waits 5 s for the monitor to acknowledge its shutdown.
    rc=0
    stop_daemons rgw || rc=1
    stop_daemons osd.0 || rc=1
    stop_daemons mon.a || rc=1
    [ ${#stopped[@]} -eq 0 ] || wait_reaped
    exit $rc
    ;;
stop-rgw)
    existing_dir
    stop_daemons rgw
    [ ${#stopped[@]} -eq 0 ] || wait_reaped
    ;;
start-rgw)
    existing_dir
    if [ ! -f "$conf" ] || [ ! -f "$dir/rgw.port" ]; then die "$dir has no cluster"; fi
    if [ -f "$dir/pids/rgw.pid" ] && our_pid "$(cat "$dir/pids/rgw.pid")"; then
        die "radosgw already running (pid $(cat "$dir/pids/rgw.pid"))"
    fi
    endpoint=http://127.0.0.1:$(cat "$dir/rgw.port")
    start_rgw
    wait_rgw
    # New RGW_PID in DIR/env.
    if [ -f "$dir/env" ]; then
        sed -i "s/^RGW_PID=.*/RGW_PID=$(cat "$dir/pids/rgw.pid")/" "$dir/env"
    fi
    ;;
*)
    usage
    ;;
esac
