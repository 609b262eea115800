#!/usr/bin/env bash
# in-vm.sh TEST_BIN: runs inside tests/vm/run-in-vm (as root, blank /dev/vda).
# Creates VG sb-test with thin pools pool-0 (64 KiB blocks) and pool-1m
# (1 MiB blocks): the hyphens exercise device-mapper name escaping. Then runs
# the LVM test of the given unit-test binary with the names in its env.
set -euo pipefail
bin=$1
export LVM_SUPPRESS_FD_WARNINGS=1
pvcreate -q /dev/vda >/dev/null
vgcreate -q sb-test /dev/vda >/dev/null
lvcreate -q -T -L 256M --chunksize 64k -Zn sb-test/pool-0 >/dev/null
lvcreate -q -T -L 256M --chunksize 1m -Zn sb-test/pool-1m >/dev/null
export SPARSEBAK_LVM_TEST_VG=sb-test SPARSEBAK_LVM_TEST_POOL=pool-0 SPARSEBAK_LVM_TEST_POOL_BIG=pool-1m
# The test is #[ignore]d in a plain `cargo test` (it changes LVM state), so
# it runs here with --ignored. If it moves, libtest would run nothing and
# pass, so the output must say that exactly one test passed.
test_name=source::lvm::vm_tests::thin_pool_in_vm
out=$(mktemp)
"$bin" --ignored --exact "$test_name" --nocapture --test-threads=1 | tee "$out"
if ! grep -q "test result: ok. 1 passed" "$out"; then
  echo "in-vm: $test_name did not run (renamed or moved?)" >&2
  exit 1
fi
echo "--- state after the test"
lvs -a sb-test
dmsetup status sb--test-pool--0-tpool sb--test-pool--1m-tpool
