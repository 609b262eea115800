#!/bin/sh
# Checks policy/50-sparsebak.policy against the Qubes R4.1+ qrexec policy
# format (/etc/qubes/policy.d, "multifile policy"):
#   service-name|*   +argument|*   source   target   action   [param=value ...]
# and against what sparsebak needs: every rule names qubes.SparsebakStore and
# denies, and VM-initiated calls are denied for every argument.
#
# Usage: tests/qubes-rpc/policy-test.sh [POLICY_FILE]
# Prints "N passed, M failed" and exits non-zero on any failure.

set -u
here=$(cd "$(dirname "$0")" && pwd)
policy=${1:-$(cd "$here/../.." && pwd)/policy/50-sparsebak.policy}
pass=0
fail=0
ok()  { pass=$((pass + 1)); echo "ok   - $1"; }
bad() { fail=$((fail + 1)); echo "FAIL - $1"; }

if [ ! -f "$policy" ]; then
    bad "policy file exists: $policy"
    echo "$pass passed, $fail failed"
    exit 1
fi

# qrexec rejects (and then fails every call!) files in policy.d whose name
# is not [0-9a-z_.-]*.policy, so the name must be right.
name=$(basename "$policy")
if printf '%s\n' "$name" | grep -Eq '^[0-9a-z_-][0-9a-z_.-]*\.policy$'; then
    ok "file name '$name' is a valid policy.d name"
else
    bad "file name '$name' is a valid policy.d name"
fi

# Sources valid in the SRCQUBE column, targets in DSTQUBE (multifile-policy
# spec): @default and @dispvm are targets only.
valid_qube() { # COLUMN TOKEN
    case $2 in
        @adminvm|@anyvm|@tag:?*|@type:?*|@dispvm:?*) return 0 ;;
        @default|@dispvm) [ "$1" = target ] ;;
        @*|*[!A-Za-z0-9_.-]*|'') return 1 ;;
        *) return 0 ;;
    esac
}

rules=0
any_arg_anyvm=no
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    # Comments: '#' possibly after whitespace; blank lines.
    case $line in
        *"$(printf '\r')"*) bad "line $lineno: no CR (DOS line ending)"; continue ;;
    esac
    trimmed=$(printf '%s' "$line" | sed 's/^[[:space:]]*//')
    case $trimmed in
        ''|'#'*) continue ;;
    esac
    rules=$((rules + 1))
    set -f
    # shellcheck disable=SC2086 # split the rule into its fields, no globbing
    set -- $line
    set +f
    where="line $lineno ($line)"
    if [ "$#" -lt 5 ]; then
        bad "$where: at least 5 fields (has $#)"
        continue
    fi
    if [ "$#" -eq 5 ]; then
        ok "$where: 5 fields"
    else
        # Extra fields are params (key=value); allowed for deny: notify=.
        extra_ok=yes
        i=0
        for f in "$@"; do
            i=$((i + 1))
            [ "$i" -le 5 ] && continue
            case $f in notify=yes|notify=no) ;; *) extra_ok=no ;; esac
        done
        if [ "$extra_ok" = yes ]; then ok "$where: 5 fields + deny params"
        else bad "$where: fields after the action must be deny params (notify=)"; fi
    fi
    svc=$1 arg=$2 src=$3 dst=$4 action=$5
    if [ "$svc" = qubes.SparsebakStore ]; then ok "$where: service is qubes.SparsebakStore"
    else bad "$where: service is qubes.SparsebakStore (got '$svc')"; fi
    case $arg in
        '*'|'+'|+[A-Za-z0-9_.-]*) ok "$where: argument field '$arg' is * or +ARG" ;;
        *) bad "$where: argument field '$arg' is * or +ARG" ;;
    esac
    if valid_qube source "$src"; then ok "$where: source '$src' valid"
    else bad "$where: source '$src' valid"; fi
    if valid_qube target "$dst"; then ok "$where: target '$dst' valid"
    else bad "$where: target '$dst' valid"; fi
    if [ "$action" = deny ]; then ok "$where: action is deny"
    else bad "$where: action is deny (got '$action')"; fi
    [ "$arg" = '*' ] && [ "$src" = @anyvm ] && [ "$dst" = @anyvm ] && any_arg_anyvm=yes
done <"$policy"

if [ "$rules" -gt 0 ]; then ok "file has $rules rule(s)"; else bad "file has rules"; fi
if [ "$any_arg_anyvm" = yes ]; then
    ok "a rule denies '* @anyvm @anyvm' (every argument, every VM)"
else
    bad "a rule denies '* @anyvm @anyvm' (every argument, every VM)"
fi

# Self-check: the parser above must reject bad rules.
if [ "${POLICY_TEST_SELFCHECK-}" != no ]; then
    tmpd=$(mktemp -d)
    # shellcheck disable=SC2016 # literal '$anyvm' (old R4.0 syntax) is meant
    for badrule in \
        'qubes.SparsebakStore * @anyvm @anyvm allow' \
        'qubes.SparsebakStore * @anyvm deny' \
        'qubes.FileCopy * @anyvm @anyvm deny' \
        'qubes.SparsebakStore foo @anyvm @anyvm deny' \
        'qubes.SparsebakStore * @default @anyvm deny' \
        'qubes.SparsebakStore * @anyvm @anyvm deny target=dom0' \
        'qubes.SparsebakStore * $anyvm @anyvm deny'
    do
        printf '# test\n%s\n' "$badrule" >"$tmpd/50-bad.policy"
        if POLICY_TEST_SELFCHECK=no sh "$0" "$tmpd/50-bad.policy" >/dev/null 2>&1; then
            bad "self-check: rejects '$badrule'"
        else
            ok "self-check: rejects '$badrule'"
        fi
    done
    rm -rf "$tmpd"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
