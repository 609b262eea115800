#!/usr/bin/env bash
# Installs what tests/s3/ceph-cluster.sh needs (Debian bookworm, as root):
# Ceph's monitor, OSD and S3 gateway (radosgw) daemons plus the `ceph` /
# `radosgw-admin` command-line tools. Nothing is started or enabled: the
# test cluster is created by ceph-cluster.sh under a throwaway directory.
#
# Also installs python3-boto3 (Debian's package, used by tests/s3/probe.py
# for the signed S3 probe requests).
#
# Idempotent: returns at once when everything is already there.
# Usage (as root): tests/s3/setup-ceph.sh
set -euo pipefail

have_all() {
    local b
    for b in /usr/bin/ceph-mon /usr/bin/ceph-osd /usr/bin/radosgw \
             /usr/bin/ceph /usr/bin/radosgw-admin /usr/bin/ceph-authtool \
             /usr/bin/monmaptool; do
        [ -x "$b" ] || return 1
    done
    # probe.py runs on Debian's python (/usr/bin/python3), not a python3
    # that may come first on PATH.
    /usr/bin/python3 -c 'import boto3' 2>/dev/null
}

if have_all; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-ceph.sh: must run as root (apt-get install)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq

# The packages' postinst would try to start/enable system ceph services
# (ceph.target etc.). A policy-rc.d that exits 101 forbids that; keep an
# existing one (Docker images ship one), otherwise add one for the install.
policy=/usr/sbin/policy-rc.d
made_policy=no
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=yes
fi
cleanup() { if [ "$made_policy" = yes ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

pkgs=(ceph-common ceph-mon ceph-osd radosgw python3-boto3)
if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; then
    echo "setup-ceph.sh: install without recommends failed; retrying with recommends" >&2
    apt-get install -y -qq "${pkgs[@]}"
fi

if ! have_all; then
    echo "setup-ceph.sh: packages installed but a needed binary is missing" >&2
    exit 1
fi
