#!/bin/sh
# Tests for qubes-rpc/qubes.SparsebakStore, the VM-side qrexec wrapper.
#
# Runs the wrapper (under every POSIX shell found: dash, bash, busybox sh)
# with a fake `sparsebak-vm` first on PATH. The fake records its argv and
# exits with status 3, so we can check that the wrapper execs exactly
# `sparsebak-vm serve`, propagates the exit status, and refuses every
# service argument without ever starting the receiver.
#
# Usage: tests/qubes-rpc/wrapper-test.sh     (from anywhere; no root needed)
# Prints "N passed, M failed" and exits non-zero on any failure.

set -u
here=$(cd "$(dirname "$0")" && pwd)
wrapper=$(cd "$here/../.." && pwd)/qubes-rpc/qubes.SparsebakStore
pass=0
fail=0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
mkdir "$tmp/bin" "$tmp/empty"
cat >"$tmp/bin/sparsebak-vm" <<FAKE
#!/bin/sh
# fake receiver: record argc and argv, one per line, then exit 3
{ echo "argc=\$#"; for a in "\$@"; do printf 'arg=%s\n' "\$a"; done; } >"$tmp/argv"
exit 3
FAKE
chmod 755 "$tmp/bin/sparsebak-vm"

ok()  { pass=$((pass + 1)); echo "ok   - $1"; }
bad() { fail=$((fail + 1)); echo "FAIL - $1"; }

# run_wrapper SHELL PATHVAL [ENV...] -- [ARGS...]
# Runs the wrapper with a clean environment; sets $rc, $tmp/argv, $tmp/err.
run_wrapper() {
    sh_=$1; pathval=$2; shift 2
    envs=
    while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
        envs="$envs
$1"
        shift
    done
    [ "$#" -gt 0 ] && shift
    rm -f "$tmp/argv"
    # env -i: nothing (e.g. a stray QREXEC_SERVICE_ARGUMENT) leaks in from us.
    if [ -n "$envs" ]; then
        old_ifs=$IFS; IFS='
'
        # shellcheck disable=SC2086
        env -i PATH="$pathval" $envs "$sh_" "$wrapper" "$@" </dev/null >"$tmp/out" 2>"$tmp/err"
        rc=$?
        IFS=$old_ifs
    else
        env -i PATH="$pathval" "$sh_" "$wrapper" "$@" </dev/null >"$tmp/out" 2>"$tmp/err"
        rc=$?
    fi
}

expect_exec() { # NAME -- the fake must have run as `sparsebak-vm serve`, rc 3
    name=$1
    want=$(printf 'argc=1\narg=serve')
    if [ "$rc" -eq 3 ] && [ -f "$tmp/argv" ] && [ "$(cat "$tmp/argv")" = "$want" ]; then
        ok "$name"
    else
        bad "$name (rc=$rc, argv=$(tr '\n' ' ' <"$tmp/argv" 2>/dev/null), stderr=$(cat "$tmp/err"))"
    fi
}

expect_refused() { # NAME -- rc 1, fake never ran, one line on stderr
    name=$1
    lines=$(wc -l <"$tmp/err")
    if [ "$rc" -eq 1 ] && [ ! -e "$tmp/argv" ] && [ "$lines" -eq 1 ] && [ ! -s "$tmp/out" ]; then
        ok "$name"
    else
        bad "$name (rc=$rc, fake ran: $([ -e "$tmp/argv" ] && echo yes || echo no), stderr lines=$lines: $(cat "$tmp/err"))"
    fi
}

if [ ! -x "$wrapper" ]; then
    bad "wrapper exists and is executable: $wrapper"
fi
case $(head -n 1 "$wrapper") in
    '#!/bin/sh') ok "wrapper has #!/bin/sh" ;;
    *) bad "wrapper has #!/bin/sh" ;;
esac

# Every distinct POSIX shell available (/bin/sh is often one of the others).
shells=
seen=
for s in sh dash bash busybox; do
    p=$(command -v "$s" 2>/dev/null) || continue
    r=$(readlink -f "$p")
    case " $seen " in *" $r "*) continue ;; esac
    seen="$seen $r"
    if [ "$s" = busybox ]; then
        "$p" sh -c true 2>/dev/null || continue
        printf '#!/bin/sh\nexec %s sh "$@"\n' "$p" >"$tmp/busybox-sh"
        chmod 755 "$tmp/busybox-sh"
        shells="$shells $tmp/busybox-sh"
    else
        shells="$shells $p"
    fi
done

P="$tmp/bin:/usr/bin:/bin"
for sh_ in $shells; do
    t=$(basename "$sh_")

    run_wrapper "$sh_" "$P" --
    expect_exec "[$t] no argument: execs 'sparsebak-vm serve', exit 3 propagates"

    run_wrapper "$sh_" "$P" -- ""
    expect_exec "[$t] empty argument (service+): accepted"

    run_wrapper "$sh_" "$P" QREXEC_SERVICE_ARGUMENT= --
    expect_exec "[$t] empty QREXEC_SERVICE_ARGUMENT: accepted"

    # shellcheck disable=SC2016 # the '$(touch pwned)' argument is literal on purpose
    for a in foo --help -x ../x serve '-' ' ' '$(touch pwned)' 'a;b' "$(printf 'a\nb')"; do
        run_wrapper "$sh_" "$P" -- "$a"
        expect_refused "[$t] argument '$(printf %s "$a" | tr '\n' '?')' refused"
    done

    run_wrapper "$sh_" "$P" -- "" ""
    expect_refused "[$t] two (empty) arguments refused"

    run_wrapper "$sh_" "$P" -- serve extra
    expect_refused "[$t] arguments 'serve extra' refused"

    for a in foo --help ../x; do
        run_wrapper "$sh_" "$P" "QREXEC_SERVICE_ARGUMENT=$a" --
        expect_refused "[$t] QREXEC_SERVICE_ARGUMENT=$a refused"
    done

    run_wrapper "$sh_" "$P" QREXEC_SERVICE_ARGUMENT=foo -- ""
    expect_refused "[$t] empty \$1 but QREXEC_SERVICE_ARGUMENT=foo refused"

    # No receiver installed: must not exit 127 (qrexec: "no such service").
    run_wrapper "$sh_" "$tmp/empty" --
    if [ "$rc" -eq 1 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ]; then
        ok "[$t] missing sparsebak-vm: exit 1, one-line error"
    elif [ -x /usr/bin/sparsebak-vm ]; then
        ok "[$t] missing sparsebak-vm: skipped (/usr/bin/sparsebak-vm installed)"
    else
        bad "[$t] missing sparsebak-vm: exit 1, one-line error (rc=$rc: $(cat "$tmp/err"))"
    fi
done
[ -e pwned ] && { bad "argument was evaluated (file 'pwned' created)"; rm -f pwned; }

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
