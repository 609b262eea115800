#!/usr/bin/env bash
# cycle-in-vm.sh BIN_DIR: runs inside tests/vm/run-in-vm (root, blank /dev/vda).
# No process substitution here: the guest has no /dev/fd.
set -euo pipefail
bin=$1/sparsebak
export LVM_SUPPRESS_FD_WARNINGS=1
passed=0 failed=0
check() { # check DESCRIPTION COMMAND...
  if "${@:2}"; then passed=$((passed + 1)); echo "ok: $1"
  else failed=$((failed + 1)); echo "FAILED: $1"; fi
}
eq() { [ "$1" = "$2" ] || { echo "  expected '$2', got '$1'"; return 1; }; }

pvcreate -q /dev/vda >/dev/null
vgcreate -q sbt /dev/vda >/dev/null
lvcreate -q -T -L 512M --chunksize 64k -Zn sbt/pool0 >/dev/null
lvcreate -q -V 64M -T sbt/pool0 -n vol-a >/dev/null
dev=/dev/sbt/vol-a
work=$(mktemp -d)
mkdir -p "$work/meta" "$work/archive" "$work/out"
mount -t tmpfs -o size=256m tmpfs "$work/archive"
cfg=$work/meta/sparsebak.ini
write_config() {
  printf '[var]\nvgname = sbt\npoolname = %s\ndestvm = none\ndestmountpoint = %s\ndestdir = b\n\n[volumes]\nvol-a = enable\n' \
    "$1" "$work/archive" > "$cfg"
}
write_config pool0
echo "lvm cycle passphrase" > "$work/passphrase"
sb() { "$bin" --config "$cfg" --passphrase-file "$work/passphrase" "$@"; }
stored() { sb list vol-a | tail -n1 | tr ' ' '\n' | sed -n 's/^chunks=//p'; }
nsessions() { sb list vol-a | wc -l; }
rand() { dd if=/dev/urandom of="$dev" bs=4096 count="$2" seek="$(( $1 / 4096 ))" conv=notrunc status=none; }
no_leftovers() {
  ! lvs --noheadings -o lv_name sbt | grep -q '\.tock' &&
  [ "$(dmsetup status sbt-pool0-tpool | awk '{print $7}')" = "-" ]
}
C=$((128 * 1024))
hashes=()
snap_hash() { sync; hashes+=("$(sha256sum < "$dev" | cut -d' ' -f1) $(blockdev --getsize64 "$dev")"); }

echo "== 1: first send stores every non-zero chunk"
rand 0 1024                       # 4 MiB random: 32 chunks
seq 1 200000 | head -c 1048576 | dd of="$dev" bs=1M seek=10 conv=notrunc status=none || true  # 8 chunks
sb send
check "first send stores 40 chunks" eq "$(stored)" 40
check "tick exists after the first send" lvs sbt/vol-a.tick
snap_hash

echo "== 2: write, monitor, write, send"
rand $((2 * C)) 1; rand $((50 * C)) 1; rand $((100 * C + 8192)) 1
sb monitor
check "monitor leaves no tock or metadata snapshot" no_leftovers
rand $((200 * C)) 1; rand $((300 * C)) 2
sb send
check "incremental send stores the 5 changed chunks" eq "$(stored)" 5
snap_hash

echo "== 3: discard 1 MiB of random data"
blkdiscard -o 0 -l 1048576 "$dev"
sb send
check "discard stores no chunk" eq "$(stored)" 0
latest_manifest() { local d="$work/meta/sbt%pool0/vol-a"; echo "$d/$(ls "$d" | tail -n1)/manifest"; }
check "discard records 8 zero chunks" eq "$(grep -c '^0 0 x' "$(latest_manifest)")" 8
snap_hash

echo "== 4: grow the volume, write in the new tail"
lvextend -q -L 96M sbt/vol-a >/dev/null
rand $((80 * 1024 * 1024)) 256   # 1 MiB: 8 chunks
sb send
check "growth stores the 8 written tail chunks" eq "$(stored)" 8
snap_hash
check "no tock or metadata snapshot left" no_leftovers

echo "== 5: a killed run: stale tock and a reserved metadata snapshot"
lvcreate -q -s -pr -kn -ay -n vol-a.tock sbt/vol-a >/dev/null
dmsetup message sbt-pool0-tpool 0 reserve_metadata_snap
rand $((400 * C)) 1
sb monitor
check "monitor recovers: no tock, no reserved snapshot" no_leftovers
sb send
check "send after recovery stores the 1 changed chunk" eq "$(stored)" 1
snap_hash

echo "== 6: a lost delta map falls back to a full comparison"
rm "$work/meta/sbt%pool0/vol-a.deltamap"
rand $((5 * C)) 1; rand $((6 * C)) 1
sb send 2> "$work/send6.err"; cat "$work/send6.err"
check "send warns about the unusable history" grep -q "comparing the whole volume" "$work/send6.err"
check "full comparison stores just the 2 changed chunks" eq "$(stored)" 2
snap_hash

echo "== 7: resync finds where tick differs from the archive"
lvchange -q -prw sbt/vol-a.tick >/dev/null
dd if=/dev/urandom of=/dev/sbt/vol-a.tick bs=4096 count=1 seek=$((7 * C / 4096)) conv=notrunc status=none
sb resync vol-a 2> "$work/resync.err"; cat "$work/resync.err"
check "resync reports 1 differing chunk" grep -q "vol-a: 1 chunks differ" "$work/resync.err"
rand $((9 * C)) 1
sb send
check "send after resync stores the 1 changed chunk (the resynced one equals the archive)" eq "$(stored)" 1
snap_hash

echo "== restore every session and compare"
sb list vol-a | cut -d' ' -f1 > "$work/sessions"
mapfile -t sessions < "$work/sessions"
check "one session per send" eq "${#sessions[@]}" "${#hashes[@]}"
for i in "${!sessions[@]}"; do
  out=$work/out/r$i.img
  sb receive vol-a -u --session "${sessions[$i]}" --save-to "$out"
  got="$(sha256sum < "$out" | cut -d' ' -f1) $(stat -c %s "$out")"
  check "session ${sessions[$i]} restores bit-identical" eq "$got" "${hashes[$i]}"
  rm -f "$out"
done
sb verify
check "nothing left behind at the end" no_leftovers

echo "== errors"
write_config nopool
if sb send 2> "$work/err"; then failed=$((failed + 1)); echo "FAILED: send with a missing pool succeeded"; fi
check "missing pool is named" grep -q "thin pool sbt/nopool not found" "$work/err"
write_config pool0
# Hold the lock until told to let go (no timing assumptions: the guest is slow).
held=$work/lock-held
flock "$work/meta/.sparsebak.lock" sh -c "touch '$held'; while [ -e '$held' ]; do sleep 0.2; done" &
while [ ! -e "$held" ]; do sleep 0.2; done
if sb monitor 2> "$work/err"; then failed=$((failed + 1)); echo "FAILED: monitor ran despite the lock"; fi
check "lock holder is reported" grep -q "another sparsebak is running" "$work/err"
rm -f "$held"
wait

echo "== 8: a first send reads only what the thin volume holds"
# 4 GiB virtual, 64 MiB written in 8 places: the first send must read the
# mapped 64 MiB (plus LVM and pool metadata), not the virtual size.
lvcreate -q -V 4G -T sbt/pool0 -n vol-b >/dev/null 2>&1
devb=/dev/sbt/vol-b
for i in 0 1 2 3 4 5 6 7; do
  dd if=/dev/urandom of="$devb" bs=1M count=8 seek=$((i * 512)) conv=notrunc status=none
done
echo "vol-b = enable" >> "$cfg"
sync; echo 3 > /proc/sys/vm/drop_caches
# The volume's data is out of the page cache; the programs themselves are
# read back in first (the debug binaries alone are 75 MiB), so that what is
# measured is the volume plus LVM and pool metadata.
cat "$bin" "$(dirname "$bin")/sparsebak-vm" >/dev/null
lvs sbt >/dev/null; thin_dump --version >/dev/null
# /proc/PID/io of the shell includes what its reaped children read:
# sparsebak, and lvm and thin_dump under it.
bash -c '"$0" --config "$1" --passphrase-file "$2" send vol-b 2> "$3"; cat /proc/$$/io' \
  "$bin" "$cfg" "$work/passphrase" "$work/send8.err" > "$work/io8"
cat "$work/send8.err"
read_bytes=$(sed -n 's/^read_bytes: //p' "$work/io8")
echo "first send of vol-b read $read_bytes bytes"
# LVM reads its metadata area with O_DIRECT on every command (no cache):
# about 1 MiB for each of the lvm commands a send runs; measured 7.6 MiB.
check "first send reads at most 64 MiB + 16 MiB of LVM and pool metadata ($read_bytes bytes)" \
  test "$read_bytes" -le $(( 80 * 1024 * 1024 ))
check "first send says how much is mapped" grep -q "first send: 67108864 of 4294967296 bytes are mapped" "$work/send8.err"
sb receive vol-b -u --save-to "$work/out/b.img"
check "vol-b restores bit-identical (unmapped space reads as zeros)" cmp "$devb" "$work/out/b.img"
rm -f "$work/out/b.img"
sb delete vol-b -u
check "no tock or metadata snapshot left after vol-b" no_leftovers

echo "== delete removes archive, metadata and snapshots"
sb delete vol-a -u
check "delete removes vol-a.tick" eq "$(lvs --noheadings -o lv_name sbt | grep -c 'vol-a\.t')" 0
check "delete keeps the volume itself" lvs sbt/vol-a
check "delete removes dom0 metadata and the delta map" eq "$(ls "$work/meta/sbt%pool0" | grep -c vol-a)" 0
check "delete removes the archive's volume folder" eq "$(ls "$work/archive/b/sbt%pool0" | grep -c vol-a)" 0

umount "$work/archive"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
