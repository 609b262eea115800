#!/usr/bin/env bash
# cycle-test.sh: the whole LVM thin cycle with the real binaries, in a VM
# with real lvm2, device-mapper and thin_delta (tests/vm/run-in-vm):
# send, write, monitor, write, send, discard, send, grow, send; every session
# restored and compared; stored-chunk counts checked; recovery from a stale
# tock, a reserved metadata snapshot, a lost delta map; resync; a missing
# pool; the lock. See tests/lvm/cycle-in-vm.sh for the steps.
#
#   tests/lvm/cycle-test.sh        # from anywhere in the repository (as root)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --workspace --quiet
start=$(date +%s)
rc=0
tests/vm/run-in-vm --disk 1G --timeout 1800 -- bash tests/lvm/cycle-in-vm.sh "$root/target/debug" || rc=$?
echo "cycle-test: exit $rc after $(( $(date +%s) - start )) s" >&2
exit $rc
