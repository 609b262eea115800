#!/bin/sh
# Packaging and transport tests (docs/INSTALL.md, README "Transport"), for .ci/run (as root, after
# `cargo build --workspace`): installs their Debian packages (openssh-server
# and -client; rpm, rpm2cpio, cpio), then runs the real-sshd test and the RPM
# build-and-inspect test. Each prints "N passed, M failed"; this script
# exits non-zero when either fails.
set -u
here=$(cd "$(dirname "$0")" && pwd)
sh "$here/ssh/install-deps.sh" || exit 1
sh "$here/rpm/install-deps.sh" || exit 1
rc=0
echo "== ssh destination against a real sshd"
sh "$here/ssh/ssh-test.sh" || rc=1
echo "== RPMs: rpm/build, file lists, modes, requirements, payload"
sh "$here/rpm/rpm-test.sh" || rc=1
exit "$rc"
