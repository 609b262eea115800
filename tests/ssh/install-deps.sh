#!/bin/sh
# Installs what tests/ssh/ssh-test.sh needs (Debian): the OpenSSH server and
# client. The server is not started or enabled by this script; the test runs
# its own sshd on 127.0.0.1 with a throwaway config and stops it.
# Usage (as root): tests/ssh/install-deps.sh
set -eu
if [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d exit 101: the package's own ssh service must not start on :22.
policy=/usr/sbin/policy-rc.d
made_policy=no
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=yes
fi
rc=0
apt-get install -y -qq --no-install-recommends openssh-server openssh-client || rc=$?
[ "$made_policy" = yes ] && rm -f "$policy"
exit "$rc"
