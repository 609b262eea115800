#!/usr/bin/env bash
# demo.sh: build sparsebak and run a real backup cycle on a generated sample
# image, with a local archive (no LVM or Qubes needed). Run as root: the
# archive goes on a tmpfs mounted for the demo (the receiver refuses to write
# anywhere that is not a mount point). Everything is removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --workspace
bin=$root/target/release/sparsebak

work=$(mktemp -d /tmp/sparsebak-demo.XXXXXX)
cleanup() { umount "$work/archive" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/images" "$work/meta" "$work/archive"
mount -t tmpfs -o size=512m tmpfs "$work/archive"

img=$work/images/sample.img
echo "== generating a 96 MiB sample image (random, text, zeros, a hole)"
head -c $((32 << 20)) /dev/urandom > "$img"
seq 1 2000000 >> "$img"
head -c $((16 << 20)) /dev/zero >> "$img"
truncate -s 96M "$img"
marker="SPARSEBAK-DEMO-MARKER-$$-$RANDOM"   # survives plain zstd literally
echo "$marker" | dd of="$img" bs=1M seek=40 conv=notrunc status=none

cat > "$work/meta/sparsebak.ini" <<INI
[var]
localdir = $work/images
destvm = none
destmountpoint = $work/archive
destdir = backups

[volumes]
sample.img = enable
INI
# The archive is encrypted (the default); the passphrase protects the copy
# of the data key kept in the archive. A real setup keeps it somewhere safe.
printf 'demo passphrase, not a secret\n' > "$work/passphrase"
sb() { echo "+ sparsebak $*"; "$bin" --config "$work/meta/sparsebak.ini" --passphrase-file "$work/passphrase" "$@"; }

echo "== first send: the whole volume"
sb send
cp --sparse=always "$img" "$work/first.img"
echo "== change 1 MiB, grow the volume, send again: only the changes go"
dd if=/dev/urandom of="$img" bs=64K count=16 seek=100 conv=notrunc status=none
truncate -s 128M "$img"
echo "new tail" | dd of="$img" bs=1M seek=120 conv=notrunc status=none
sb send
sb list sample.img
first=$("$bin" --config "$work/meta/sparsebak.ini" list sample.img | head -n1 | cut -d" " -f1)
echo "== nothing readable in the archive: the marker string written into the image is not there"
if grep -rqa "$marker" "$work/archive/backups"; then echo "marker found in the archive" >&2; exit 1; fi
echo "== verify, then restore both sessions and compare"
sb verify
sb receive sample.img -u --save-to "$work/restored-latest.img"
sb receive sample.img -u --session "$first" --save-to "$work/restored-first.img"
cmp "$img" "$work/restored-latest.img"
cmp "$work/first.img" "$work/restored-first.img"
echo "== archive on the receiver side:"
find "$work/archive/backups" -maxdepth 3 | sed "s|$work/||"
du -sh "$work/archive/backups"
echo "demo OK: both sessions restored bit-identical"
