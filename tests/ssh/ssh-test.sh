#!/bin/sh
# destvm = ssh://user@host:port against a real OpenSSH server.
#
# Starts /usr/sbin/sshd on 127.0.0.1 (a free high port) with a throwaway
# host key and client key in a temp dir, puts the built `sparsebak-vm` on
# the PATH of ssh sessions (sshd `SetEnv PATH=...`, so nothing is installed
# system-wide), and runs real backup cycles through `sparsebak`, which
# spawns the real `ssh` with the argument vector of sparsebak-dom0/src/remote/transport.rs. The
# archive is a tmpfs mounted for the test.
#
# The client side reads the throwaway keys through a per-test `ssh` first on
# PATH that only adds `-F CONFIG`: OpenSSH takes ~/.ssh from the password
# database, not $HOME, so this is how a test keeps off root's real ~/.ssh.
# Everything else in the argv is sparsebak's own.
#
# Needs root (sshd, mount), openssh-server and openssh-client
# (tests/ssh/install-deps.sh), and built binaries:
#   cargo build --workspace && tests/ssh/ssh-test.sh [BINDIR]
# BINDIR defaults to target/debug. Prints "N passed, M failed"; exits
# non-zero on any failure. Leaves nothing behind (sshd killed, tmpfs
# unmounted, temp dir removed, /run/sshd removed if this test created it).

set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bindir=$(cd "${1:-$root/target/debug}" && pwd) || exit 1
pass=0
fail=0
ok()  { pass=$((pass + 1)); echo "ok   - $1"; }
bad() { fail=$((fail + 1)); echo "FAIL - $1"; }
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit $?; }

for f in "$bindir/sparsebak" "$bindir/sparsebak-vm"; do
    [ -x "$f" ] || { bad "built binary $f exists (run cargo build --workspace)"; finish; }
done
if [ "$(id -u)" -ne 0 ]; then bad "running as root"; finish; fi
sshd=/usr/sbin/sshd
real_ssh=$(command -v ssh) || real_ssh=
if [ ! -x "$sshd" ] || [ -z "$real_ssh" ] || ! command -v ssh-keygen >/dev/null; then
    bad "sshd, ssh and ssh-keygen installed (tests/ssh/install-deps.sh)"
    finish
fi

tmp=$(mktemp -d /tmp/sparsebak-ssh.XXXXXX)
made_privsep=no
# shellcheck disable=SC2317 # called through the EXIT trap
cleanup() {
    if [ -f "$tmp/sshd.pid" ]; then
        kill "$(cat "$tmp/sshd.pid")" 2>/dev/null
    fi
    mountpoint -q "$tmp/mnt" 2>/dev/null && umount "$tmp/mnt"
    [ "$made_privsep" = yes ] && rmdir /run/sshd 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

mkdir -p "$tmp/remote-bin" "$tmp/local-bin" "$tmp/images" "$tmp/meta" "$tmp/mnt" "$tmp/out"
ln -s "$bindir/sparsebak-vm" "$tmp/remote-bin/sparsebak-vm"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/host_key" -C sparsebak-test-host
ssh-keygen -q -t ed25519 -N '' -f "$tmp/id" -C sparsebak-test-client
cp "$tmp/id.pub" "$tmp/authorized_keys"
if [ ! -d /run/sshd ]; then
    mkdir -m 0755 /run/sshd && made_privsep=yes
fi

# sshd with its own everything: nothing from /etc/ssh is read.
start_sshd() { # PORT
    cat >"$tmp/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $1
HostKey $tmp/host_key
PidFile $tmp/sshd.pid
AuthorizedKeysFile $tmp/authorized_keys
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AllowUsers root
SetEnv PATH=$tmp/remote-bin:/usr/bin:/bin
LogLevel ERROR
EOF
    rm -f "$tmp/sshd.pid"
    "$sshd" -f "$tmp/sshd_config" -E "$tmp/sshd.log" || return 1
    i=0
    while [ ! -s "$tmp/sshd.pid" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    [ -s "$tmp/sshd.pid" ]
}
port=
for try in 1 2 3 4 5 6 7 8 9 10; do
    p=$((20000 + ($$ * 7 + try * 977) % 40000))
    if start_sshd "$p"; then port=$p; break; fi
done
if [ -z "$port" ]; then
    bad "sshd started on 127.0.0.1 ($(cat "$tmp/sshd.log" 2>/dev/null))"
    finish
fi
ok "sshd started on 127.0.0.1:$port"

printf '[127.0.0.1]:%s %s\n' "$port" "$(cut -d' ' -f1,2 "$tmp/host_key.pub")" >"$tmp/known_hosts"
cat >"$tmp/ssh_config" <<EOF
IdentityFile $tmp/id
IdentitiesOnly yes
UserKnownHostsFile $tmp/known_hosts
GlobalKnownHostsFile /dev/null
StrictHostKeyChecking yes
ConnectTimeout 10
LogLevel ERROR
EOF
cat >"$tmp/local-bin/ssh" <<EOF
#!/bin/sh
exec "$real_ssh" -F "$tmp/ssh_config" "\$@"
EOF
chmod 755 "$tmp/local-bin/ssh"
PATH="$tmp/local-bin:$PATH"
export PATH

write_config() { # DESTVM MOUNTPOINT
    cat >"$tmp/meta/sparsebak.ini" <<EOF
[var]
localdir = $tmp/images
destvm = $1
destmountpoint = $2
destdir = backups

[volumes]
disk.img = enable
EOF
}
echo "ssh test passphrase" >"$tmp/passphrase"
sb() { "$bindir/sparsebak" --config "$tmp/meta/sparsebak.ini" --passphrase-file "$tmp/passphrase" "$@" >"$tmp/stdout" 2>"$tmp/stderr"; }
show() { tr '\n' ' ' <"$tmp/stderr"; }

mount -t tmpfs -o size=64m tmpfs "$tmp/mnt" || { bad "mount tmpfs"; finish; }
img=$tmp/images/disk.img
head -c 3145728 /dev/urandom >"$img"
truncate -s 8M "$img"
printf 'tail' | dd of="$img" bs=1 seek=$((7 * 1048576)) conv=notrunc 2>/dev/null
cp "$img" "$tmp/v1"

# 0. The ssh session finds the receiver through sshd's SetEnv PATH.
if ssh -p "$port" root@127.0.0.1 sparsebak-vm version >"$tmp/stdout" 2>"$tmp/stderr" \
    && grep -q '^sparsebak-vm ' "$tmp/stdout"; then
    ok "ssh root@127.0.0.1 -p $port runs sparsebak-vm from the session PATH"
else
    bad "ssh runs sparsebak-vm ($(show))"
fi

write_config "ssh://root@127.0.0.1:$port" "$tmp/mnt"
archive=$tmp/mnt/backups/local%images/disk.img

# 1. Full send over ssh lands in the archive that sshd's side wrote.
if sb send; then ok "send over ssh"; else bad "send over ssh ($(show))"; fi
n=$(find "$archive" -maxdepth 1 -name 'S_*' ! -name '*-tmp' 2>/dev/null | wc -l)
if [ "$n" -eq 1 ]; then ok "archive holds 1 committed session"; else bad "archive holds 1 session (has $n)"; fi

# 2. An incremental send: one chunk changes.
printf 'changed' | dd of="$img" bs=1 seek=1000000 conv=notrunc 2>/dev/null
cp "$img" "$tmp/v2"
if sb send; then ok "incremental send over ssh"; else bad "incremental send over ssh ($(show))"; fi
if sb list disk.img && [ "$(wc -l <"$tmp/stdout")" -eq 2 ]; then
    ok "list over ssh shows 2 sessions"
else
    bad "list over ssh shows 2 sessions ($(cat "$tmp/stdout") $(show))"
fi
first=$(head -n 1 "$tmp/stdout" | cut -d' ' -f1)

# 3. Receive both sessions bit-identical, and verify.
if sb receive disk.img -u --save-to "$tmp/out/latest" && cmp -s "$tmp/out/latest" "$tmp/v2"; then
    ok "receive latest over ssh is bit-identical"
else
    bad "receive latest over ssh is bit-identical ($(show))"
fi
if sb receive disk.img -u --session "$first" --save-to "$tmp/out/first" && cmp -s "$tmp/out/first" "$tmp/v1"; then
    ok "receive first session ($first) over ssh is bit-identical"
else
    bad "receive first session over ssh is bit-identical ($(show))"
fi
if sb verify; then ok "verify over ssh"; else bad "verify over ssh ($(show))"; fi

# 4. verify really reads the remote archive: a damaged chunk fails it.
chunk=$(find "$archive" -type f -name 'x*' | sort | head -n 1)
if [ -n "$chunk" ]; then
    cp "$chunk" "$tmp/chunk.good"
    printf 'garbage' >"$chunk"
    if sb verify; then
        bad "verify over ssh fails on a damaged chunk"
    elif grep -q "$(basename "$chunk")" "$tmp/stderr"; then
        ok "verify over ssh fails on a damaged chunk and names it"
    else
        bad "verify names the damaged chunk $(basename "$chunk") ($(show))"
    fi
    cp "$tmp/chunk.good" "$chunk"
else
    bad "archive has chunk files"
fi

# 5. The receiver's stderr reaches the user through ssh: an unmounted
#    destination is refused remotely, and the reason shows locally.
mkdir "$tmp/unmounted"
write_config "ssh://root@127.0.0.1:$port" "$tmp/unmounted"
if sb send; then
    bad "send to an unmounted destination fails"
elif grep -q "not a mount point" "$tmp/stderr"; then
    ok "send to an unmounted destination fails with the receiver's reason"
else
    bad "receiver's reason shown ($(show))"
fi

# 6. A wrong port is a clear failure, not a hang.
# (`list` reads dom0's metadata only; `verify` connects.)
write_config "ssh://root@127.0.0.1:1" "$tmp/mnt"
if sb verify; then
    bad "wrong ssh port fails"
elif grep -q "port 1: Connection refused" "$tmp/stderr"; then
    ok "wrong ssh port fails with ssh's message"
else
    bad "wrong ssh port fails with ssh's message ($(show))"
fi

# 7. Without the :port, ssh's default port (22, no server here) is used:
#    the port really comes from the config, not from a leftover default.
write_config "ssh://root@127.0.0.1" "$tmp/mnt"
if sb verify; then
    bad "ssh://root@127.0.0.1 without port goes to port 22, not the test sshd"
elif grep -q "port 22: Connection refused" "$tmp/stderr"; then
    ok "ssh://root@127.0.0.1 without port goes to port 22, not the test sshd"
else
    bad "ssh://root@127.0.0.1 without port goes to port 22 ($(show))"
fi

# 8. The archive is intact again after step 4: the session verifies.
write_config "ssh://root@127.0.0.1:$port" "$tmp/mnt"
if sb verify; then ok "verify over ssh after repair"; else bad "verify over ssh after repair ($(show))"; fi

finish
