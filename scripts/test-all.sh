#!/usr/bin/env bash
# test-all.sh: install what the tests need (Debian packages, as root) and run
# every test: formatting and lints, unit and integration tests (the real
# binaries over real pipes, archives on tmpfs), the qrexec wrapper and policy
# checks, the S3 archive tests against a real Ceph cluster, and the LVM
# thin tests against real lvm2/device-mapper/thin_delta inside a throwaway
# VM (tests/vm/run-in-vm).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

echo "== installing test dependencies"
# qemu, a kernel, busybox, lvm2, thin-provisioning-tools (thin_delta and
# thin_restore are also used by host-side unit tests), cpio. The packaging
# test installs openssh and rpm itself (tests/packaging.sh).
bash tests/vm/setup-vm
need=()
command -v fallocate >/dev/null || need+=(util-linux)
command -v setpriv >/dev/null || need+=(util-linux)
command -v zstd >/dev/null || need+=(zstd)
command -v tar >/dev/null || need+=(tar)
command -v python3 >/dev/null || need+=(python3)
# Real Btrfs and XFS on loop devices: the reflink crate's tests and the
# reflink change-tracking tests (xfs_io copies ranges in by reflink).
command -v mkfs.btrfs >/dev/null || need+=(btrfs-progs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v xfs_io >/dev/null || need+=(xfsprogs)
# Real NBD clients for `sparsebak export`.
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
# A real object store for the S3 archive tests (sparsebak-dom0/tests/s3.rs
# starts a single-node Ceph cluster with RGW from these packages).
bash tests/s3/setup-ceph.sh
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# Everything the tests make (images, loop filesystems, archives, the Ceph
# cluster, the LVM VM's disks) goes to a tmpfs of its own: a CI machine's
# disk may have little free space, and RAM (24 GiB) does not run out at the
# tests' few GiB. Debug info is line tables only and builds are not
# incremental (Cargo.toml, below), which keeps target/ small as well.
echo "== disk and memory before the tests"
df -h "$root" /tmp | sed 's/^/   /'
free -m | sed 's/^/   /'
scratch=$(mktemp -d /tmp/sparsebak-tests.XXXXXX)
cleanup() {
  # The S3 tests' Ceph cluster is stopped by a watchdog once their test
  # binary exits; a run that ends right after a failed test would unmount
  # the cluster's folder before the watchdog gets to it, and leave its
  # daemons running. Stop it here first (stopping twice is harmless).
  for d in "$scratch"/sparsebak-ceph.* /var/tmp/sparsebak-ceph.*; do
    if [ -d "$d/pids" ]; then bash "$root/tests/s3/ceph-cluster.sh" stop "$d" >/dev/null 2>&1 || true; fi
  done
  # Tests unmount what they mount and stop what they start; a lazy
  # recursive unmount also takes whatever a failed test left behind (its
  # memory is freed once nothing holds files there any more).
  if mountpoint -q "$scratch"; then umount -R -l "$scratch" 2>/dev/null || true; fi
  rmdir "$scratch" 2>/dev/null || true
}
trap cleanup EXIT
mount -t tmpfs -o size=16g,mode=1777 tmpfs "$scratch"
export TMPDIR=$scratch
export CARGO_INCREMENTAL=0

echo "== cargo fmt --check, clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo build + cargo test (as root: tests mount tmpfs)"
cargo build --workspace
cargo test --workspace

echo "== ssh destination (real sshd on 127.0.0.1) and RPM packaging"
bash tests/packaging.sh

echo "== qrexec wrapper and policy"
bash tests/qubes-rpc/wrapper-test.sh
bash tests/qubes-rpc/policy-test.sh

echo "== LVM thin tests in a VM"
bash tests/lvm/commands-test.sh
bash tests/lvm/cycle-test.sh
