#!/usr/bin/env bash
# commands-test.sh: run the LVM layer's tests (sparsebak-dom0 src/source/lvm/vm_tests.rs)
# against real lvm2, device-mapper and thin_delta inside a throwaway VM.
#
#   tests/lvm/commands-test.sh            # from anywhere in the repository
#
# Needs what tests/vm/setup-vm installs (run that once, as root). Builds the
# sparsebak-dom0 unit-test binary on the host (the VM is slow TCG emulation),
# then boots one VM with a blank 2 GiB disk, where tests/lvm/in-vm.sh creates a
# volume group with two thin pools and runs the test. About 2 minutes on a
# 2-CPU host: ~10 s boot, then each lvm command takes seconds under emulation.
#
# SPARSEBAK_LVM_TEST_BIN=path uses an already built test binary instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bin=${SPARSEBAK_LVM_TEST_BIN:-}
if [ -z "$bin" ]; then
  # The unit-test harness of the `sparsebak` binary target.
  bin=$(cargo test -p sparsebak-dom0 --bin sparsebak --no-run --message-format=json \
        | grep '"test":true' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | head -n1)
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then echo "commands-test: no test binary (build failed?)" >&2; exit 1; fi
echo "commands-test: running $bin in a VM" >&2
start=$(date +%s)
rc=0
tests/vm/run-in-vm --disk 2G --timeout 600 -- bash tests/lvm/in-vm.sh "$bin" || rc=$?
echo "commands-test: exit $rc after $(( $(date +%s) - start )) s" >&2
exit $rc
