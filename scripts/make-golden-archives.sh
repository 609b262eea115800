#!/usr/bin/env bash
# make-golden-archives.sh: builds today's sparsebak binaries and creates, with
# them, the golden archives under fixtures/golden/ that
# sparsebak-dom0/tests/golden.rs restores and verifies on every test run.
#
# The fixtures pin the on-disk format as it is when they are made. They are
# generated ONCE and checked in; this script stays for reference (it documents
# exactly what every session holds) and for deliberately adding a new
# generation next to the old ones. Never regenerate the existing fixtures to
# make a failing golden test pass: a format change must keep them readable, or
# bump a format version and migrate (see fixtures/golden/README.md).
#
# Usage (as root: the archive goes on a tmpfs mounted here, because the
# receiver refuses a destination that is not a mount point):
#
#   bash scripts/make-golden-archives.sh [OUTDIR]     # default fixtures/golden
#
# OUTDIR must not hold `encrypted` or `plain` yet (the script refuses to
# overwrite them). PROFILE=release builds and uses release binaries (default:
# debug, what `cargo test` uses). Needs cargo, python3, sha256sum, mount.
#
# Made in OUTDIR, for each of `encrypted` (encryption = on, the default; the
# passphrase is in encrypted/passphrase) and `plain` (encryption = off):
#
#   archive/   the archive as it sits under the destination mount point:
#              archive/backups/local%images/... (destdir = backups; localdir's
#              last component is `images`, hence the pool folder local%images)
#   meta/      dom0's metadata folder (META/local%images/...) without the
#              lock file and without the config (the test writes its own:
#              localdir = .../images, destvm = none, chunksize = 64K)
#   expected.txt  `VOLUME SESSION SIZE SHA256` of the image as it was at every
#              session still in the archive, in list order
#   MADE-BY.txt   commit, `sparsebak version`, date
#
# Volumes (image files under localdir, chunk size 64 KiB = 65536; offsets in
# KiB; "rand(S,N)" = N KiB of python3 random.Random(S).randbytes, "text(S,N)"
# = N KiB of "S\nS+1\n..." lines, "zeros" = zero bytes written, "hole" = never
# written) and what each session held:
#
#   disk.img
#   S1 folders  size 320K+1234 (6 chunks, the last one partial):
#               c0: rand(1,2) @0, text(1,4) @2 | c1: text(1000,4) @64
#               c2: zeros @128..192 | c3: hole | c4: rand(2,2) @256, rest hole
#               c5: text(5000,1234 bytes) @320
#   S2 folders  rand(3,2) @70 (c1); text(2000,4) @130 (c2 gets data)
#               -> PRUNED: merged into S3 (its chunk files move into a tar
#               session, which then holds both)
#   S3 tar      text(3000,4) @20 (c0); zeros over c4 (256..320: a zero entry,
#               since S1 stored data there)
#   S4 tar      rand(4,2) @100 (c1); text(4000,4) @200 (c3)
#               -> PRUNED: merged into S5 (its chunks extracted from the tar)
#   S5 folders  GROWN to 512K+100 (9 chunks, c6 a hole): text(6000,2) @380
#               (c5), rand(5,2) @448 (c7), text(8000,100 bytes) @512 (c8,
#               partial); rand(6,2) @4 (c0)
#   S6 tar      SHRUNK to 448K+17 (c7 cut to 17 bytes, c8 gone);
#               rand(7,2) @136 (c2)
#   Remaining: S1 S3 S5 S6.
#
#   vol2.img
#   S1 tar      (a first, full session stored as tar) size 100K:
#               text(7000,4) @0, rand(8,2) @64, rest hole
#
# Session names are the UTC date-times of the sends (consecutive seconds when
# sends come faster), so they differ between generations; expected.txt
# records them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/fixtures/golden}
profile=${PROFILE:-debug}
mkdir -p "$out"
out=$(cd "$out" && pwd)
for kind in encrypted plain; do
    if [ -e "$out/$kind" ]; then
        echo "$out/$kind exists: golden archives are made once; remove it yourself only if you mean to (see README)" >&2
        exit 1
    fi
done

cd "$root"
if [ "$profile" = release ]; then
    cargo build --release -p sparsebak-dom0 -p sparsebak-vm
else
    cargo build -p sparsebak-dom0 -p sparsebak-vm
fi
bin=$root/target/$profile/sparsebak
[ -x "$bin" ] && [ -x "$root/target/$profile/sparsebak-vm" ]

work=$(mktemp -d /tmp/sparsebak-golden.XXXXXX)
cleanup() {
    umount "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

K=1024
# edit IMAGE OP...: OP = rand:SEED:OFF:LEN | text:START:OFF:LEN | zeros:OFF:LEN
# | size:LEN (truncate/extend); offsets and lengths in bytes.
edit() {
    python3 - "$@" <<'PY'
import os, random, sys
path, ops = sys.argv[1], sys.argv[2:]
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
def text(start, n):
    out, i = bytearray(), start
    while len(out) < n:
        out += b"%d\n" % i
        i += 1
    return bytes(out[:n])
for op in ops:
    kind, *a = op.split(":")
    a = [int(x) for x in a]
    if kind == "rand":
        seed, off, n = a
        os.pwrite(fd, random.Random(seed).randbytes(n), off)
    elif kind == "text":
        start, off, n = a
        os.pwrite(fd, text(start, n), off)
    elif kind == "zeros":
        off, n = a
        os.pwrite(fd, bytes(n), off)
    elif kind == "size":
        os.ftruncate(fd, a[0])
    else:
        sys.exit("unknown op " + op)
os.close(fd)
PY
}

# make KIND EXTRA_VAR: one archive generation into $out/KIND.
make() {
    local kind=$1 extra=$2
    local env=$work/$kind
    mkdir -p "$env/images" "$env/meta" "$env/mnt" "$env/copies"
    mount -t tmpfs -o size=64m tmpfs "$env/mnt"
    cat >"$env/meta/sparsebak.ini" <<INI
[var]
localdir = $env/images
destvm = none
destmountpoint = $env/mnt
destdir = backups
chunksize = 64K
$extra
[volumes]
disk.img = enable
vol2.img = enable
INI
    printf 'golden archive passphrase, not a secret\n' >"$env/passphrase"
    sb() { "$bin" --config "$env/meta/sparsebak.ini" --passphrase-file "$env/passphrase" -q "$@"; }
    local img=$env/images/disk.img img2=$env/images/vol2.img
    local sessions=()
    # send VOL [--tarfile]: sends and keeps a copy of the image under the new
    # session's name.
    send() {
        local vol=$1
        shift
        sb send "$vol" "$@"
        local s
        s=$(sb list "$vol" | tail -n1 | cut -d' ' -f1)
        cp --sparse=always "$env/images/$vol" "$env/copies/$vol@$s"
        sessions+=("$s")
    }

    edit "$img" size:$((320 * K + 1234)) rand:1:0:$((2 * K)) text:1:$((2 * K)):$((4 * K)) \
        text:1000:$((64 * K)):$((4 * K)) zeros:$((128 * K)):$((64 * K)) rand:2:$((256 * K)):$((2 * K)) \
        text:5000:$((320 * K)):1234
    send disk.img # S1 folders
    edit "$img" rand:3:$((70 * K)):$((2 * K)) text:2000:$((130 * K)):$((4 * K))
    send disk.img # S2 folders, pruned below
    edit "$img" text:3000:$((20 * K)):$((4 * K)) zeros:$((256 * K)):$((64 * K))
    send disk.img --tarfile # S3 tar
    edit "$img" rand:4:$((100 * K)):$((2 * K)) text:4000:$((200 * K)):$((4 * K))
    send disk.img --tarfile # S4 tar, pruned below
    edit "$img" size:$((512 * K + 100)) text:6000:$((380 * K)):$((2 * K)) rand:5:$((448 * K)):$((2 * K)) \
        text:8000:$((512 * K)):100 rand:6:$((4 * K)):$((2 * K))
    send disk.img # S5 folders, grown
    edit "$img" size:$((448 * K + 17)) rand:7:$((136 * K)):$((2 * K))
    send disk.img --tarfile # S6 tar, shrunk
    edit "$img2" size:$((100 * K)) text:7000:0:$((4 * K)) rand:8:$((64 * K)):$((2 * K))
    send vol2.img --tarfile # vol2 S1 tar

    sb prune disk.img --session="${sessions[1]}"
    sb prune disk.img --session="${sessions[3]}"
    local want="${sessions[0]} ${sessions[2]} ${sessions[4]} ${sessions[5]}"
    local got
    got=$(sb list disk.img | cut -d' ' -f1 | xargs)
    [ "$got" = "$want" ] || {
        echo "after prune: sessions $got, expected $want" >&2
        exit 1
    }
    sb verify disk.img vol2.img
    # Every remaining session restores bit-identical before it is recorded.
    local dest=$out/$kind
    mkdir -p "$dest"
    : >"$dest/expected.txt.new"
    for vol in disk.img vol2.img; do
        for s in $(sb list "$vol" | cut -d' ' -f1); do
            sb receive "$vol" -u --session "$s" --save-to "$env/restored"
            cmp "$env/restored" "$env/copies/$vol@$s"
            sb verify "$vol" --session "$s"
            echo "$vol $s $(stat -c %s "$env/restored") $(sha256sum <"$env/restored" | cut -d' ' -f1)" \
                >>"$dest/expected.txt.new"
        done
    done

    mkdir -p "$dest/archive" "$dest/meta"
    cp -a "$env/mnt/." "$dest/archive/"
    cp -a "$env/meta/." "$dest/meta/"
    rm -f "$dest/meta/sparsebak.ini" "$dest/meta/.sparsebak.lock"
    mv "$dest/expected.txt.new" "$dest/expected.txt"
    if [ "$kind" = encrypted ]; then
        cp "$env/passphrase" "$dest/passphrase"
    fi
    {
        echo "made by scripts/make-golden-archives.sh ($profile binaries)"
        echo "commit $(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD -- . ':!fixtures' || echo ' (with uncommitted changes)')"
        echo "$("$bin" version)"
        echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$dest/MADE-BY.txt"
    umount "$env/mnt"
}

make encrypted ""
make plain "encryption = off"
find "$out" -type d -empty | while read -r d; do echo "warning: empty folder $d (git will not keep it)" >&2; done
du -sh "$out"
du -sh --apparent-size "$out"
echo "golden archives made in $out"
