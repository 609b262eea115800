#!/bin/sh
# Builds the RPMs with rpm/build and checks what they hold: the exact file
# lists (rpm -qlp), each file's mode and owner, %config flags, requirements
# (rpm -qp --requires), scriptlets (the timer is never enabled by the
# package), and the payload itself: the binaries run, the policy and qrexec
# wrapper are the repository's, the man pages and systemd units are sane.
#
# Usage: tests/rpm/rpm-test.sh [RPM_DIR]
#   RPM_DIR: test RPMs already built there instead of running rpm/build.
# Needs rpm, rpm2cpio, cpio (tests/rpm/install-deps.sh) and cargo.
# Prints "N passed, M failed" and exits non-zero on any failure.

set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
pass=0
fail=0
ok()  { pass=$((pass + 1)); echo "ok   - $1"; }
bad() { fail=$((fail + 1)); echo "FAIL - $1"; }
check() { # NAME COMMAND... : ok when COMMAND succeeds
    name=$1; shift
    if "$@"; then ok "$name"; else bad "$name"; fi
}
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit $?; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM

if [ -n "${1-}" ]; then
    dir=$(cd "$1" && pwd) || exit 1
else
    if "$root/rpm/build" >"$tmp/build.log" 2>&1; then
        ok "rpm/build succeeds"
    else
        bad "rpm/build succeeds: $(tail -n 20 "$tmp/build.log")"
        finish
    fi
    dir=$root/target/rpm
fi

pkgid=$(cd "$root" && cargo pkgid -p sparsebak-dom0)
version=${pkgid##*[#@]}
arch=$(rpm --eval '%{_arch}')
dom0=$dir/sparsebak-dom0-$version-1.$arch.rpm
vm=$dir/sparsebak-vm-$version-1.$arch.rpm
for r in "$dom0" "$vm"; do
    [ -f "$r" ] || { bad "$(basename "$r") built"; finish; }
done
n=$(find "$dir" -maxdepth 1 -name '*.rpm' | wc -l)
check "exactly 2 RPMs in $(basename "$dir")/ (has $n)" [ "$n" -eq 2 ]

# MODE OWNER:GROUP FLAGS PATH, one line per file, sorted; the license
# folder's name differs between distributions (NAME or NAME-VERSION).
listing() { # RPM
    rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$1" |
        sed -e 's|^\([^ ]* [^ ]*\)  |\1 - |' \
            -e "s|/usr/share/licenses/\([a-z0-9-]*\)-$version|/usr/share/licenses/\1|" | sort
}
same() { # NAME EXPECTED_FILE ACTUAL_FILE
    if cmp -s "$2" "$3"; then ok "$1"; else bad "$1:$(diff "$2" "$3" | sed 's/^/    /')"; fi
}

sort >"$tmp/want-dom0" <<'EOF'
-rw-r--r-- root:root cn /etc/qubes/policy.d/50-sparsebak.policy
-rwxr-xr-x root:root - /usr/bin/sparsebak
-rw-r--r-- root:root - /usr/lib/systemd/system/sparsebak-monitor.service
-rw-r--r-- root:root - /usr/lib/systemd/system/sparsebak-monitor.timer
-rw-r--r-- root:root - /usr/share/bash-completion/completions/sparsebak
-rw-r--r-- root:root - /usr/share/fish/vendor_completions.d/sparsebak.fish
drwxr-xr-x root:root - /usr/share/licenses/sparsebak-dom0
-rw-r--r-- root:root l /usr/share/licenses/sparsebak-dom0/LICENSE
-rw-r--r-- root:root d /usr/share/man/man1/sparsebak.1.gz
drwxr-xr-x root:root - /usr/share/sparsebak
-rw-r--r-- root:root - /usr/share/sparsebak/sparsebak.ini.example
-rw-r--r-- root:root - /usr/share/zsh/site-functions/_sparsebak
EOF
sort >"$tmp/want-vm" <<'EOF'
-rwxr-xr-x root:root - /etc/qubes-rpc/qubes.SparsebakStore
-rwxr-xr-x root:root - /usr/bin/sparsebak-vm
drwxr-xr-x root:root - /usr/share/licenses/sparsebak-vm
-rw-r--r-- root:root l /usr/share/licenses/sparsebak-vm/LICENSE
-rw-r--r-- root:root d /usr/share/man/man1/sparsebak-vm.1.gz
EOF
listing "$dom0" >"$tmp/got-dom0"
listing "$vm" >"$tmp/got-vm"
same "dom0 RPM: file list, modes, owners, %config/%doc/%license flags" "$tmp/want-dom0" "$tmp/got-dom0"
same "vm RPM: file list, modes, owners, %doc/%license flags" "$tmp/want-vm" "$tmp/got-vm"
# rpm -qlp agrees with the listing above (paths only).
rpm -qlp "$dom0" | sed "s|-$version/|/|; s|-$version\$||" | sort >"$tmp/ql-dom0"
cut -d' ' -f4 "$tmp/want-dom0" | sort >"$tmp/want-paths"
same "rpm -qlp sparsebak-dom0 lists the same paths" "$tmp/want-paths" "$tmp/ql-dom0"

# Requirements.
rpm -qp --requires "$dom0" >"$tmp/req-dom0"
rpm -qp --requires "$vm" >"$tmp/req-vm"
check "dom0 requires lvm2" grep -qx 'lvm2' "$tmp/req-dom0"
check "dom0 requires thin_delta's package (Debian or Fedora name)" \
    grep -qx '(thin-provisioning-tools or device-mapper-persistent-data)' "$tmp/req-dom0"
check "vm requires neither lvm2 nor thin tools" sh -c "! grep -Eq 'lvm2|thin-provisioning|device-mapper' '$tmp/req-vm'"
check "vm requires a shell for its qrexec wrapper" grep -qx '/bin/sh' "$tmp/req-vm"
for r in "$dom0" "$vm"; do
    check "$(basename "$r"): version $version, license GPL-3.0-or-later" \
        [ "$(rpm -qp --qf '%{VERSION} %{LICENSE}' "$r")" = "$version GPL-3.0-or-later" ]
done

# Scriptlets: the timer ships disabled and is stopped on erase.
rpm -qp --scripts "$dom0" >"$tmp/scripts"
check "dom0 scriptlets never enable or start the timer" sh -c "! grep -Eq 'systemctl( [-a-z]+)* (enable|start|preset)' '$tmp/scripts'"
check "dom0 preun disables the timer on erase" grep -q 'disable --now sparsebak-monitor.timer' "$tmp/scripts"
check "vm RPM has no scriptlets" [ -z "$(rpm -qp --scripts "$vm")" ]

# The payload.
for r in "$dom0" "$vm"; do
    (cd "$tmp" && mkdir -p root && cd root && rpm2cpio "$r" | cpio -idm --quiet) || bad "unpack $(basename "$r")"
done
R=$tmp/root
check "packaged sparsebak runs: version $version" sh -c "'$R/usr/bin/sparsebak' version | grep -q '^sparsebak $version '"
check "packaged sparsebak-vm runs: version $version" sh -c "'$R/usr/bin/sparsebak-vm' version | grep -q '^sparsebak-vm $version '"
check "binaries are stripped" sh -c "! file '$R/usr/bin/sparsebak' '$R/usr/bin/sparsebak-vm' | grep -q 'not stripped'"
check "policy is the repository's" cmp -s "$R/etc/qubes/policy.d/50-sparsebak.policy" "$root/policy/50-sparsebak.policy"
check "qrexec wrapper is the repository's" cmp -s "$R/etc/qubes-rpc/qubes.SparsebakStore" "$root/qubes-rpc/qubes.SparsebakStore"
check "example config is the repository's" cmp -s "$R/usr/share/sparsebak/sparsebak.ini.example" "$root/examples/sparsebak.ini"
for m in sparsebak sparsebak-vm; do
    check "man page $m.1.gz: gzip with .TH $m 1" sh -c "gzip -dc '$R/usr/share/man/man1/$m.1.gz' | grep -q '^\.TH $m 1'"
done
check "bash completion parses" bash -n "$R/usr/share/bash-completion/completions/sparsebak"
check "timer: every 20 minutes, wanted by timers.target" sh -c \
    "grep -qx 'OnUnitActiveSec=20min' '$R/usr/lib/systemd/system/sparsebak-monitor.timer' && grep -qx 'WantedBy=timers.target' '$R/usr/lib/systemd/system/sparsebak-monitor.timer'"
check "service runs /usr/bin/sparsebak monitor once" sh -c \
    "grep -qx 'ExecStart=/usr/bin/sparsebak monitor' '$R/usr/lib/systemd/system/sparsebak-monitor.service' && grep -qx 'Type=oneshot' '$R/usr/lib/systemd/system/sparsebak-monitor.service'"
# systemd-analyze verify: silent and 0 for good units (it only warns on
# bad values). The service's ExecStart points at the unpacked binary here,
# as /usr/bin/sparsebak is not installed on the build host.
if command -v systemd-analyze >/dev/null; then
    mkdir "$tmp/units"
    sed "s|/usr/bin/sparsebak|$R/usr/bin/sparsebak|" "$R/usr/lib/systemd/system/sparsebak-monitor.service" \
        >"$tmp/units/sparsebak-monitor.service"
    cp "$R/usr/lib/systemd/system/sparsebak-monitor.timer" "$tmp/units/"
    if systemd-analyze verify --man=no "$tmp/units/sparsebak-monitor.timer" "$tmp/units/sparsebak-monitor.service" \
        >"$tmp/sa" 2>&1 && [ ! -s "$tmp/sa" ]; then
        ok "systemd-analyze verify accepts the units"
    else
        bad "systemd-analyze verify accepts the units: $(cat "$tmp/sa")"
    fi
fi

finish
